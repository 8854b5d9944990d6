"""FlashInfer-style wrappers: ``plan()`` once per batch, ``run()`` once per layer.

``plan`` keeps references to the batch's index tensors (it copies nothing), so a caller that
refills the same persistent buffers before each replay can capture ``run`` in a CUDA graph,
the way SGLang's backends reuse their ``kv_indptr`` / ``kv_indices`` buffers.

Paging is token-granular (page size 1), as in SGLang's triton backend:

- ``kv_indptr [batch + 1]`` (int32/int64): request b's tokens are entries
  ``kv_indptr[b] : kv_indptr[b + 1]`` of ``kv_indices`` (slots of the K / V_base pools,
  ``[slots, H_kv, D]``) and of ``lr_indices`` (slots of the LR pool, ``[lr_slots, R]``).
- ``adapter_ids [batch]`` (int32): row of ``B [n_adapters, H_kv, R, D]`` (alpha / r folded
  in) for each request, -1 for none. Without adapter_ids / lr_buffer the LR term is off.

What differs between layers is a ``run`` argument: ``window`` (SGLang's
``layer.sliding_window_size``: a query at position p sees keys p - window .. p; None or -1
for none; Gemma alternates windowed and global layers), and ``sm_scale`` / ``logit_cap``
(``layer.scaling``, e.g. Gemma's query_pre_attn_scalar ** -0.5, and ``layer.logit_cap``),
which default to the values given to ``plan``. So one plan serves every layer of a batch.
"""

from __future__ import annotations

import logging
import math

import torch
import triton

from .cascade import (
    find_cascade_groups,
    flash_lora_cascade_decode,
    member_blocks,
    members_per_block,
    prefix_rows_block,
)
from .common import padded_rank, window_or_none
from .decode import DecodeConfig, default_decode_config, flash_lora_decode, head_block
from .extend import ExtendConfig, flash_lora_extend

logger = logging.getLogger(__name__)

#: splits at least this long run the deep-tile decode config (H100 sweep, kernels/NOTES.md)
LONG_SPLIT_TOKENS = 4096


def _check_lr_plan(lr_indices: torch.Tensor | None, adapter_ids: torch.Tensor | None) -> None:
    if (lr_indices is None) != (adapter_ids is None):
        raise ValueError("lr_indices and adapter_ids go together (both or neither)")


def _lr_args(planned: bool, lr_buffer: torch.Tensor | None, b_weights: torch.Tensor | None) -> bool:
    """Whether this run has the LR term; checks that plan() and run() agree on it."""
    if (lr_buffer is None) != (b_weights is None):
        raise ValueError("lr_buffer and b_weights go together (both or neither)")
    if lr_buffer is not None and not planned:
        raise ValueError("run() got an LR cache but plan() got no lr_indices / adapter_ids")
    return lr_buffer is not None


class FlashLoRADecodeWrapper:
    """Split-KV Flash-LoRA decode (one query token per request).

    The workspace (per-split partial outputs and LSEs, fp32) is allocated here once, sized
    for ``workspace_rows`` (request, split) pairs; ``plan`` picks the split count so that
    ``batch * num_kv_splits <= workspace_rows``. ``run`` allocates nothing when ``out`` is
    given and never syncs with the host, so it can be captured in a CUDA graph.
    """

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, *,
                 max_lr_rank: int = 64, max_batch_size: int = 256, max_kv_splits: int = 64,
                 workspace_rows: int = 1024, min_split_len: int = 128,
                 device: torch.device | str = "cuda", config: DecodeConfig | None = None) -> None:
        if num_qo_heads % num_kv_heads:
            raise ValueError("num_qo_heads must be a multiple of num_kv_heads")
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.device = torch.device(device)
        self.max_kv_splits = max_kv_splits
        self.min_split_len = min_split_len
        self.config = config
        self._rows = max(workspace_rows, max_batch_size)
        self._r_pad = padded_rank(max_lr_rank)
        ws = dict(dtype=torch.float32, device=self.device)
        self._mid_o = torch.empty(self._rows * num_qo_heads * head_dim, **ws)
        self._mid_lr = torch.empty(self._rows * num_qo_heads * self._r_pad, **ws)
        self._mid_lse = torch.empty(self._rows * num_qo_heads, **ws)
        group = num_qo_heads // num_kv_heads
        self._programs_per_split = num_kv_heads * triton.cdiv(group, head_block(group))
        sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
               if self.device.type == "cuda" else 4)
        # Enough stage-1 programs for several resident ones per SM (latency hiding).
        self._target_programs = 4 * sms
        self._planned = False

    def choose_num_kv_splits(self, batch: int, max_kv_len: int | None = None) -> int:
        """Splits per request: fill the GPU, but no split shorter than ``min_split_len``."""
        splits = triton.cdiv(self._target_programs, batch * self._programs_per_split)
        if max_kv_len is not None:
            splits = min(splits, triton.cdiv(max_kv_len, self.min_split_len))
        return max(1, min(splits, self.max_kv_splits, self._rows // batch))

    def plan(self, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
             lr_indices: torch.Tensor | None = None, adapter_ids: torch.Tensor | None = None, *,
             sm_scale: float | None = None, logit_cap: float = 0.0,
             max_kv_len: int | None = None, num_kv_splits: int | None = None) -> None:
        """Record the batch's metadata and choose the split count (host arithmetic only).

        kv_indptr ``[batch + 1]``; kv_indices / lr_indices ``[kv_indptr[-1]]``; adapter_ids
        ``[batch]`` int32. ``max_kv_len`` (a host int, optional) keeps short contexts from
        being over-split and picks the tile shape for the split length; ``num_kv_splits``
        overrides the heuristic. Under CUDA graphs, plan
        with the same batch size and max_kv_len (same split count and tiles) as at capture.
        """
        _check_lr_plan(lr_indices, adapter_ids)
        batch = kv_indptr.shape[0] - 1
        if batch > self._rows:
            raise ValueError(f"batch {batch} exceeds the workspace ({self._rows} rows)")
        splits = num_kv_splits or self.choose_num_kv_splits(batch, max_kv_len)
        splits = max(1, min(splits, self._rows // batch))
        self._view_workspace(batch, splits)
        self.batch, self.num_kv_splits, self.max_kv_len = batch, splits, max_kv_len
        self.kv_indptr, self.kv_indices = kv_indptr, kv_indices
        self.lr_indices, self.adapter_ids = lr_indices, adapter_ids
        self.sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.logit_cap = logit_cap
        self._planned = True
        logger.debug("decode plan: batch=%d splits=%d lr=%s", batch, splits, lr_indices is not None)

    def _view_workspace(self, batch: int, slots: int) -> None:
        """The workspace as ``[batch, slots, H_q, ...]`` partials (slots: splits and, in a
        cascade, prefix chunks)."""
        h, d = self.num_qo_heads, self.head_dim
        self._mid_o_view = self._mid_o[: batch * slots * h * d].view(batch, slots, h, d)
        self._mid_lr_view = self._mid_lr[: batch * slots * h * self._r_pad].view(
            batch, slots, h, self._r_pad)
        self._mid_lse_view = self._mid_lse[: batch * slots * h].view(batch, slots, h)

    def splits_and_tiles(self, window: int | None,
                         dtype: torch.dtype = torch.bfloat16) -> tuple[int, DecodeConfig]:
        """Split count and tiles for a layer with this window (host arithmetic only).

        With window w a query sees at most w + 1 keys, so the layer gets no more splits than
        ``ceil((w + 1) / min_split_len)`` (in the plan's workspace) and tiles for that split
        length. Depends only on the plan and the window: a CUDA graph captured for a layer
        replays with the same choice.
        """
        splits, seen = self.num_kv_splits, self.max_kv_len
        window = window_or_none(window)
        if window >= 0:
            splits = max(1, min(splits, triton.cdiv(window + 1, self.min_split_len)))
            seen = window + 1 if seen is None else min(seen, window + 1)
        long_splits = seen // splits >= LONG_SPLIT_TOKENS if seen is not None else splits <= 2
        config = self.config or default_decode_config(self.device, dtype, long_splits,
                                                      self.head_dim)
        return splits, config

    def run(self, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
            lr_buffer: torch.Tensor | None = None, b_weights: torch.Tensor | None = None, *,
            out: torch.Tensor | None = None, window: int | None = None,
            sm_scale: float | None = None, logit_cap: float | None = None) -> torch.Tensor:
        """One layer: q ``[batch, H_q, D]``, k/v_buffer ``[slots, H_kv, D]``, lr_buffer
        ``[lr_slots, R]`` (R <= max_lr_rank), b_weights ``[n_adapters, H_kv, R, D]``;
        returns out ``[batch, H_q, D]`` (q's dtype). Pass ``out`` to allocate nothing.
        ``window``: this layer's sliding window (None or -1: none); ``sm_scale`` /
        ``logit_cap``: this layer's, if not the plan's.
        """
        mid_lr = self._lr_workspace(lr_buffer, b_weights)
        if out is None:
            out = torch.empty_like(q)
        splits, config = self.splits_and_tiles(window, q.dtype)
        return flash_lora_decode(
            q, k_buffer, v_buffer, out, self.kv_indptr, self.kv_indices,
            self._mid_o_view, self._mid_lse_view, splits,
            self.sm_scale if sm_scale is None else sm_scale,
            self.logit_cap if logit_cap is None else logit_cap,
            lr_buffer=lr_buffer if mid_lr is not None else None, lr_indices=self.lr_indices,
            b_weights=b_weights, adapter_ids=self.adapter_ids, mid_lr=mid_lr,
            config=config, window=window,
        )

    def _lr_workspace(self, lr_buffer: torch.Tensor | None,
                      b_weights: torch.Tensor | None) -> torch.Tensor | None:
        """Check a run's LR arguments against the plan; the LR partials' workspace view, or
        None when the LR term is off."""
        if not self._planned:
            raise RuntimeError("call plan() before run()")
        if not _lr_args(self.adapter_ids is not None, lr_buffer, b_weights):
            return None
        r_pad = padded_rank(lr_buffer.shape[1])
        if r_pad > self._r_pad:
            raise ValueError(f"LR rank {lr_buffer.shape[1]} exceeds max_lr_rank of this wrapper")
        return self._mid_lr_view[..., :r_pad]


class FlashLoRACascadeDecodeWrapper(FlashLoRADecodeWrapper):
    """Cascade decode (cascade.py): groups of ``min_group_size`` or more requests whose KV
    index lists share a prefix of at least ``min_shared_len`` tokens read it once per step
    (level 1), each request its own suffix (level 2), merged exactly by their LSE.

    ``plan`` also finds the groups on the device (``find_cascade_groups``: no host sync)
    into buffers allocated here for ``max_batch_size`` requests. Under CUDA graphs, plan at
    capture as for the plain wrapper; before each replay refill the index buffers and call
    ``find_groups`` on them, which rewrites the groups in place for the captured launches.
    ``run`` is the plain decode (same workspace) when ``plan`` saw that no group can form
    (fewer than ``min_group_size`` requests, more than ``max_batch_size``, ``max_kv_len``
    at most ``min_shared_len``) and for a layer with a sliding window.

    ``lr_shared``: the LR rows of a shared prefix are shared too (base-lr-shared's one LR
    cache): level 1 reads L once per member block, and the group finder ends a group's
    prefix where the members' LR slots differ. False (base-shared: an LR cache per
    adapter): level 1 reads each member's own L rows. ``members``: requests per level-1
    program (default ``members_per_block``'s choice; a tuning knob, see
    ``bench_kernels.py --part sweep-cascade``).
    """

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, *,
                 min_shared_len: int = 256, min_group_size: int = 2, lr_shared: bool = True,
                 max_batch_size: int = 256, workspace_rows: int = 2048,
                 prefix_config: DecodeConfig | None = None, members: int | None = None,
                 **kwargs) -> None:
        super().__init__(num_qo_heads, num_kv_heads, head_dim, max_batch_size=max_batch_size,
                         workspace_rows=workspace_rows, **kwargs)
        if min_group_size < 2 or min_shared_len < 1:
            raise ValueError("a group needs >= 2 requests sharing >= 1 token")
        self.min_shared_len, self.min_group_size = min_shared_len, min_group_size
        self.lr_shared = lr_shared
        self.prefix_config = prefix_config
        group = num_qo_heads // num_kv_heads
        if members is not None and members < 2:
            raise ValueError(f"a level-1 program takes at least 2 members, got {members}")
        self.members_per_block = members or members_per_block(group, not lr_shared, head_dim)
        self._block_m = prefix_rows_block(group, self.members_per_block)
        self._max_bs = max_batch_size
        i32 = dict(dtype=torch.int32, device=self.device)
        self._prefix_lens = torch.zeros(max_batch_size, **i32)
        self._block_members = torch.full(
            (member_blocks(max_batch_size, self.members_per_block), self.members_per_block), -1, **i32)
        self.cascade = False

    def choose_num_prefix_chunks(self, batch: int, num_kv_splits: int,
                                 max_kv_len: int | None = None) -> int:
        """Level-1 chunks per group: enough programs to fill the GPU if the whole batch is
        one group, chunks of at least ``min_split_len`` tokens and 8 per level-1 row (each
        chunk writes a partial per row to the workspace), and with level 2's
        ``num_kv_splits`` at most ``max_kv_splits`` slots (the combine loads all at once)."""
        blocks = triton.cdiv(batch, self.members_per_block)
        chunks = triton.cdiv(self._target_programs, self.num_kv_heads * blocks)
        if max_kv_len is not None:
            chunks = min(chunks, triton.cdiv(max_kv_len, max(self.min_split_len, 8 * self._block_m)))
        return max(1, min(chunks, self.max_kv_splits - num_kv_splits))

    def plan(self, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
             lr_indices: torch.Tensor | None = None, adapter_ids: torch.Tensor | None = None, *,
             sm_scale: float | None = None, logit_cap: float = 0.0,
             max_kv_len: int | None = None, num_kv_splits: int | None = None,
             num_prefix_chunks: int | None = None, num_entries: int | None = None,
             may_group: bool = True) -> None:
        """The plain plan (level 2's splits), then, if a group can form, level 1's chunk
        count and the groups (``find_groups``). ``num_prefix_chunks`` overrides the chunk
        heuristic; ``num_entries`` (host int) is ``kv_indptr[-1]`` where kv_indices is a
        larger persistent buffer (without it, kv_indices must hold exactly the batch's
        entries); ``may_group=False`` (the caller knows no group can form, say from the
        sequence lengths on the host) plans the plain decode."""
        super().plan(kv_indptr, kv_indices, lr_indices, adapter_ids, sm_scale=sm_scale,
                     logit_cap=logit_cap, max_kv_len=max_kv_len, num_kv_splits=num_kv_splits)
        batch, splits = self.batch, self.num_kv_splits
        chunks = min(num_prefix_chunks or self.choose_num_prefix_chunks(batch, splits, max_kv_len),
                     self._rows // batch - splits)
        self.cascade = (may_group and self.min_group_size <= batch <= self._max_bs and chunks >= 1
                        and (max_kv_len is None or max_kv_len > self.min_shared_len))
        if not self.cascade:
            return
        self._view_workspace(batch, splits + chunks)
        self.num_prefix_chunks = chunks
        self.prefix_lens, self.block_members = self._groups(batch)
        self.find_groups(kv_indptr, kv_indices, lr_indices, num_entries=num_entries)
        logger.debug("cascade plan: batch=%d splits=%d prefix chunks=%d", batch, splits, chunks)

    def find_groups(self, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                    lr_indices: torch.Tensor | None = None, *, num_entries: int | None = None,
                    may_group: bool = True) -> None:
        """Write the groups of the batch these index buffers describe into this wrapper's
        group buffers (device ops, no host sync; run it outside a CUDA graph, before the
        replay). ``may_group=False`` (no group can form, as far as the host knows) only
        clears them: a captured level-1 launch then exits at once."""
        batch = kv_indptr.numel() - 1
        if batch > self._max_bs:
            return
        prefix_lens, block_members = self._groups(batch)
        if not may_group:
            prefix_lens.zero_()
            block_members.fill_(-1)
            return
        find_cascade_groups(kv_indptr, kv_indices, prefix_lens, block_members,
                            min_shared_len=self.min_shared_len,
                            min_group_size=self.min_group_size,
                            lr_indices=lr_indices if self.lr_shared else None,
                            num_entries=num_entries)

    def _groups(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This batch size's views of the group buffers (the same at every plan and refill)."""
        blocks = member_blocks(batch, self.members_per_block)
        return self._prefix_lens[:batch], self._block_members[:blocks]

    def run(self, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
            lr_buffer: torch.Tensor | None = None, b_weights: torch.Tensor | None = None, *,
            out: torch.Tensor | None = None, window: int | None = None,
            sm_scale: float | None = None, logit_cap: float | None = None) -> torch.Tensor:
        """As the plain wrapper's run (same arguments and shapes)."""
        if not self.cascade or window_or_none(window) >= 0:
            return super().run(q, k_buffer, v_buffer, lr_buffer, b_weights, out=out,
                               window=window, sm_scale=sm_scale, logit_cap=logit_cap)
        mid_lr = self._lr_workspace(lr_buffer, b_weights)
        if out is None:
            out = torch.empty_like(q)
        splits, config = self.splits_and_tiles(None, q.dtype)
        return flash_lora_cascade_decode(
            q, k_buffer, v_buffer, out, self.kv_indptr, self.kv_indices, self.prefix_lens,
            self.block_members, self._mid_o_view, self._mid_lse_view, splits,
            self.num_prefix_chunks, self.sm_scale if sm_scale is None else sm_scale,
            self.logit_cap if logit_cap is None else logit_cap,
            lr_buffer=lr_buffer if mid_lr is not None else None, lr_indices=self.lr_indices,
            b_weights=b_weights, adapter_ids=self.adapter_ids, mid_lr=mid_lr,
            lr_per_member=not self.lr_shared, config=config, prefix_config=self.prefix_config,
        )


class FlashLoRAExtendWrapper:
    """Flash-LoRA extend: new tokens attend causally to themselves and to a cached prefix.

    The new tokens' K, V_base and L rows are passed to ``run`` as dense ragged tensors
    (``k_extend`` etc., rows ``qo_indptr[b] : qo_indptr[b + 1]``), like SGLang's
    ``extend_attention_fwd``; ``kv_indices`` / ``lr_indices`` list the cached PREFIX only.
    The backend writes the new rows into its pools as usual; the kernel does not read them
    back from there.
    """

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, *,
                 device: torch.device | str = "cuda", config: ExtendConfig | None = None) -> None:
        if num_qo_heads % num_kv_heads:
            raise ValueError("num_qo_heads must be a multiple of num_kv_heads")
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.device = torch.device(device)
        self.config = config
        self._planned = False

    def plan(self, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
             lr_indices: torch.Tensor | None = None, adapter_ids: torch.Tensor | None = None, *,
             max_extend_len: int | None = None, max_prefix_len: int | None = None,
             sm_scale: float | None = None, logit_cap: float = 0.0) -> None:
        """Record the batch's metadata.

        qo_indptr ``[batch + 1]`` (new tokens); kv_indptr ``[batch + 1]`` (prefix tokens);
        kv_indices / lr_indices ``[kv_indptr[-1]]``; adapter_ids ``[batch]`` int32.
        ``max_extend_len`` (host int) sizes the grid; if omitted it is read from qo_indptr
        (one host sync, here in plan, never in run). ``max_prefix_len`` (host int, optional:
        the longest cached prefix) lets long-prefix batches with the LR term run a deeper
        pipeline.
        """
        _check_lr_plan(lr_indices, adapter_ids)
        if max_extend_len is None:
            max_extend_len = int((qo_indptr[1:] - qo_indptr[:-1]).max().item()) if qo_indptr.numel() > 1 else 0
        self.qo_indptr, self.kv_indptr, self.kv_indices = qo_indptr, kv_indptr, kv_indices
        self.lr_indices, self.adapter_ids = lr_indices, adapter_ids
        self.max_extend_len, self.max_prefix_len = max_extend_len, max_prefix_len
        self.sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.logit_cap = logit_cap
        self._planned = True
        logger.debug("extend plan: batch=%d max_extend_len=%d", qo_indptr.numel() - 1, max_extend_len)

    def run(self, q: torch.Tensor, k_extend: torch.Tensor, v_extend: torch.Tensor,
            k_buffer: torch.Tensor, v_buffer: torch.Tensor, lr_extend: torch.Tensor | None = None,
            lr_buffer: torch.Tensor | None = None, b_weights: torch.Tensor | None = None, *,
            out: torch.Tensor | None = None, window: int | None = None,
            sm_scale: float | None = None, logit_cap: float | None = None) -> torch.Tensor:
        """One layer: q ``[n_extend, H_q, D]``, k/v_extend ``[n_extend, H_kv, D]``, lr_extend
        ``[n_extend, R]``, k/v_buffer ``[slots, H_kv, D]``, lr_buffer ``[lr_slots, R]``,
        b_weights ``[n_adapters, H_kv, R, D]``; returns out ``[n_extend, H_q, D]``.
        ``window``: this layer's sliding window (None or -1: none; kv_indices still lists
        the whole prefix); ``sm_scale`` / ``logit_cap``: this layer's, if not the plan's.
        """
        if not self._planned:
            raise RuntimeError("call plan() before run()")
        has_lr = _lr_args(self.adapter_ids is not None, lr_buffer, b_weights)
        if has_lr and lr_extend is None:
            raise ValueError("the LR term needs lr_extend (the new tokens' L rows)")
        if out is None:
            out = torch.empty_like(q)
        return flash_lora_extend(
            q, k_extend, v_extend, out, k_buffer, v_buffer, self.qo_indptr, self.kv_indptr,
            self.kv_indices, self.max_extend_len,
            self.sm_scale if sm_scale is None else sm_scale,
            self.logit_cap if logit_cap is None else logit_cap,
            lr_extend=lr_extend if has_lr else None, lr_buffer=lr_buffer if has_lr else None,
            lr_indices=self.lr_indices, b_weights=b_weights, adapter_ids=self.adapter_ids,
            config=self.config, max_prefix_len=self.max_prefix_len, window=window,
        )
