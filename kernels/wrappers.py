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
        h, d = self.num_qo_heads, self.head_dim
        self._mid_o_view = self._mid_o[: batch * splits * h * d].view(batch, splits, h, d)
        self._mid_lr_view = self._mid_lr[: batch * splits * h * self._r_pad].view(
            batch, splits, h, self._r_pad)
        self._mid_lse_view = self._mid_lse[: batch * splits * h].view(batch, splits, h)
        self.batch, self.num_kv_splits, self.max_kv_len = batch, splits, max_kv_len
        self.kv_indptr, self.kv_indices = kv_indptr, kv_indices
        self.lr_indices, self.adapter_ids = lr_indices, adapter_ids
        self.sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
        self.logit_cap = logit_cap
        self._planned = True
        logger.debug("decode plan: batch=%d splits=%d lr=%s", batch, splits, lr_indices is not None)

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
        if not self._planned:
            raise RuntimeError("call plan() before run()")
        has_lr = _lr_args(self.adapter_ids is not None, lr_buffer, b_weights)
        if has_lr and padded_rank(lr_buffer.shape[1]) > self._r_pad:
            raise ValueError(f"LR rank {lr_buffer.shape[1]} exceeds max_lr_rank of this wrapper")
        if out is None:
            out = torch.empty_like(q)
        mid_lr = None
        if has_lr:
            r_pad = padded_rank(lr_buffer.shape[1])
            mid_lr = self._mid_lr_view[..., :r_pad]
        splits, config = self.splits_and_tiles(window, q.dtype)
        return flash_lora_decode(
            q, k_buffer, v_buffer, out, self.kv_indptr, self.kv_indices,
            self._mid_o_view, self._mid_lse_view, splits,
            self.sm_scale if sm_scale is None else sm_scale,
            self.logit_cap if logit_cap is None else logit_cap,
            lr_buffer=lr_buffer if has_lr else None, lr_indices=self.lr_indices,
            b_weights=b_weights, adapter_ids=self.adapter_ids, mid_lr=mid_lr,
            config=config, window=window,
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
