"""The Flash-LoRA Triton kernels (`lragent_sglang.kernels`) as SGLang's attention backend.

All batch metadata is built on the device from sizes the host already knows
(`seq_lens_sum`, `extend_num_tokens`), so a forward never waits for the GPU. Decode runs
in CUDA graphs: `init_cuda_graph_state` allocates persistent index buffers
(`DecodeGraphBuffers`), the decode wrapper is planned on them once per captured batch
size, and before each replay `init_forward_metadata_out_graph` refills them. Extend reads
the new tokens' K / V_base densely, except in batches with an LR-prefill gap, whose rows
take the pool's (first writer's) K / V_base, as on CPU.

With `--lragent-cascade auto|on` the decode wrapper is the cascade one: requests sharing a
prefix (role forks) read it once per step. Its groups are found on the device from the
batch's KV indices (their equal leading slots are the tree's shared pages): in `plan` for
an eager batch, and before each replay into the wrapper's fixed-size group buffers, which
the captured level-1 launches read (a graph captures the cascade for batch sizes >= 2).
Under `auto` a batch where the host sees fewer than two requests longer than the minimum
shared length plans the plain decode (eager) or only clears the groups (replay).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sglang.kernels.ops.kvcache.kv_indices import create_flashinfer_kv_indices_triton

from lragent_sglang.kernels import FlashLoRACascadeDecodeWrapper, FlashLoRADecodeWrapper, FlashLoRAExtendWrapper
from lragent_sglang.server.attention import LRAgentAttnBackend
from lragent_sglang.server.runtime import LRAgentRuntime


def fill_indices(table: torch.Tensor, rows: torch.Tensor, lens: torch.Tensor, indptr: torch.Tensor,
                 out: torch.Tensor) -> None:
    """`out[indptr[b] : indptr[b + 1]] = table[rows[b], :lens[b]]` on the device (no host sync)."""
    create_flashinfer_kv_indices_triton[(rows.shape[0],)](table, rows, lens, indptr, None, out, table.stride(0))


def check_no_prefill_graph(server_args: Any) -> None:
    """Refuse prefill CUDA graphs: SGLang's (breakable) prefill graphs replay the QKV
    projection without running Python, so the LR rows it computes would never reach the
    LR pool. Decode graphs capture the whole forward and are supported."""
    cfg = getattr(server_args, "cuda_graph_config", None)
    backend = getattr(getattr(cfg, "prefill", None), "backend", "disabled")
    if backend != "disabled":
        raise ValueError(
            f"the lragent attention backend cannot run prefill CUDA graphs (prefill backend {backend!r}): "
            "pass --disable-prefill-cuda-graph (our launcher does)"
        )


def request_lora_slots(lora_manager: Any, bs: int) -> torch.Tensor:
    """LoRA buffer slot of each request, as SGLang's LoRA backend prepared it on the device.

    Read from the backend's batch info rather than rebuilt from `lora_ids` on the host: under
    CUDA graphs that info lives in persistent buffers the captured kernels keep reading.
    """
    info = lora_manager.lora_backend.batch_info
    per_req = info.req_weight_indices if info.req_weight_indices is not None else info.weight_indices
    return per_req[:bs]


def layer_args(layer: Any) -> dict[str, Any]:
    """What differs between attention layers: the softmax scale (e.g. Gemma's
    query_pre_attn_scalar), the logit soft-cap and the sliding window (Gemma alternates)."""
    return {"sm_scale": layer.scaling, "logit_cap": layer.logit_cap or 0.0, "window": layer.sliding_window_size}


def decode_wrapper(rt: LRAgentRuntime, h_q: int, h_kv: int, head_dim: int,
                   device: torch.device) -> FlashLoRADecodeWrapper:
    """The plain decode wrapper, or with `--lragent-cascade auto|on` the cascade one: the
    prefix's LR rows are shared by a group where the scheme has one LR cache."""
    rank = max(rt.width, 1)
    if rt.config.cascade == "off":
        return FlashLoRADecodeWrapper(h_q, h_kv, head_dim, max_lr_rank=rank, device=device)
    return FlashLoRACascadeDecodeWrapper(h_q, h_kv, head_dim, max_lr_rank=rank, device=device,
                                         min_shared_len=rt.config.cascade_min_shared,
                                         lr_shared=rt.scheme.one_lr_cache)


def batch_may_group(fb: Any, mode: str, min_shared: int) -> bool:
    """Whether a decode batch may hold a cascade group, from what the host knows (no device
    sync): always under `on`; under `auto`, two requests longer than `min_shared` tokens."""
    lens = fb.seq_lens_cpu
    return mode == "on" or lens is None or int((lens > min_shared).sum()) >= 2


@dataclass
class DecodeGraphBuffers:
    """Persistent decode metadata for every captured batch size (int32 indices: the
    kernels widen them; a request's slots fill at most `max_context_len` entries)."""

    kv_indptr: torch.Tensor  # [max_bs + 1]
    kv_indices: torch.Tensor  # [max_bs * max_context_len]
    lr_indices: torch.Tensor | None  # same, into the LR pool (LR cache on only)
    adapter_ids: torch.Tensor  # [max_bs] B row per request, -1 for none
    lr_out_loc: torch.Tensor  # [max_bs] LR slot of each request's new token
    token_slot: torch.Tensor  # [max_bs] LoRA buffer slot of each request

    @classmethod
    def allocate(cls, max_bs: int, max_context_len: int, lr: bool, device: torch.device) -> "DecodeGraphBuffers":
        i32 = dict(dtype=torch.int32, device=device)
        return cls(
            kv_indptr=torch.zeros(max_bs + 1, **i32),
            kv_indices=torch.zeros(max_bs * max_context_len, **i32),
            lr_indices=torch.zeros(max_bs * max_context_len, **i32) if lr else None,
            adapter_ids=torch.full((max_bs,), -1, **i32),
            lr_out_loc=torch.zeros(max_bs, dtype=torch.int64, device=device),
            token_slot=torch.zeros(max_bs, dtype=torch.int64, device=device),
        )


class LRAgentTritonAttnBackend(LRAgentAttnBackend):
    """See module docstring."""

    def __init__(self, runner: Any, rt: LRAgentRuntime) -> None:
        super().__init__(runner, rt)
        check_no_prefill_graph(runner.server_args)
        cfg = runner.model_config
        tp = runner.ps.tp_size
        h_q = cfg.num_attention_heads // tp
        h_kv = max(1, cfg.get_num_kv_heads(tp))
        self.max_context_len = self.req_to_token_pool.req_to_token.shape[1]
        self.cascade, self.min_shared = rt.config.cascade, rt.config.cascade_min_shared
        self.decode_wrapper = decode_wrapper(rt, h_q, h_kv, cfg.head_dim, runner.device)
        self.extend_wrapper = FlashLoRAExtendWrapper(h_q, h_kv, cfg.head_dim, device=runner.device)
        # Extend batches with an LR-prefill gap: the KV slot of every new token.
        self.extend_loc: torch.Tensor | None = None
        self.graph: DecodeGraphBuffers | None = None

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return 1

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, **kwargs: Any) -> None:
        self.graph = DecodeGraphBuffers.allocate(max_bs, self.max_context_len, self.rt.enabled, self.device)

    def init_forward_metadata(self, forward_batch: Any) -> None:
        """Eager forwards (extend, and decode batches that do not fit a captured graph)."""
        bs = forward_batch.batch_size
        if bs == 0:
            return
        if not forward_batch.forward_mode.is_decode_or_idle():
            self._plan_extend(forward_batch, bs)
            return
        indptr = torch.zeros(bs + 1, dtype=torch.int32, device=self.device)
        n = int(forward_batch.seq_lens_sum)
        kv_idx = torch.empty(n, dtype=torch.int32, device=self.device)
        lr_idx = torch.empty(n, dtype=torch.int32, device=self.device) if self.rt.enabled else None
        adapter_ids = torch.empty(bs, dtype=torch.int32, device=self.device) if self.rt.enabled else None
        lr_out_loc, token_slot = torch.empty(2, bs, dtype=torch.int64, device=self.device)
        self._fill_decode(forward_batch, bs, indptr, kv_idx, lr_idx, adapter_ids, lr_out_loc, token_slot, padding=0)
        max_len = int(forward_batch.seq_lens_cpu.max()) if forward_batch.seq_lens_cpu is not None else None
        if self.cascade == "off":
            self.decode_wrapper.plan(indptr, kv_idx, lr_idx, adapter_ids, max_kv_len=max_len)
        else:
            self.decode_wrapper.plan(indptr, kv_idx, lr_idx, adapter_ids, max_kv_len=max_len,
                                     may_group=batch_may_group(forward_batch, self.cascade, self.min_shared))

    def init_forward_metadata_out_graph(self, forward_batch: Any, in_capture: bool = False) -> None:
        """Decode under CUDA graphs: refill the persistent buffers (capture and replay);
        at capture, also plan the wrapper on them, which fixes this batch size's splits."""
        bs = forward_batch.batch_size
        g = self.graph
        adapter_ids = g.adapter_ids[:bs] if self.rt.enabled else None
        self._fill_decode(forward_batch, bs, g.kv_indptr[: bs + 1], g.kv_indices, g.lr_indices, adapter_ids,
                          g.lr_out_loc[:bs], g.token_slot[:bs], padding=getattr(forward_batch, "num_padding", 0))
        if in_capture:
            self.decode_wrapper.plan(g.kv_indptr[: bs + 1], g.kv_indices, g.lr_indices, adapter_ids,
                                     **({} if self.cascade == "off" else {"num_entries": forward_batch.seq_lens_sum}))
        elif self.cascade != "off":
            # The captured level-1 launches read the groups: refind them for this batch.
            n = forward_batch.seq_lens_sum
            self.decode_wrapper.find_groups(
                g.kv_indptr[: bs + 1], g.kv_indices, g.lr_indices, num_entries=n,
                may_group=n is not None and batch_may_group(forward_batch, self.cascade, self.min_shared))

    def _fill_decode(self, fb: Any, bs: int, indptr: torch.Tensor, kv_idx: torch.Tensor,
                     lr_idx: torch.Tensor | None, adapter_ids: torch.Tensor | None,
                     lr_out_loc: torch.Tensor, token_slot: torch.Tensor, padding: int) -> None:
        """Write one decode batch's metadata into the given buffers with device ops only
        (under CUDA graphs the captured kernels read these buffers, so nothing may be
        rebound to a new tensor here).

        The last `padding` requests are CUDA-graph padding: their new LR row goes to the LR
        pool's padding row 0, as their K / V go to KV slot 0 (their `req_pool_indices` may
        name a live request, whose LR rows must not be overwritten).
        """
        rows, lens = fb.req_pool_indices[:bs], fb.seq_lens[:bs]
        torch.cumsum(lens, 0, dtype=indptr.dtype, out=indptr[1:])
        fill_indices(self.req_to_token_pool.req_to_token, rows, lens, indptr, kv_idx)
        if not self.rt.enabled:
            return
        req_to_lr = self.rt.lr_pool.req_to_lr
        fill_indices(req_to_lr, rows, lens, indptr, lr_idx)
        lr_out_loc.copy_(req_to_lr[rows, (lens - 1).to(torch.int64)])
        if padding:
            lr_out_loc[bs - padding :].zero_()
        slots = request_lora_slots(self.lora_manager, bs)
        token_slot.copy_(slots)
        self.rt.forward.token_slot = token_slot
        self.rt.forward.lr_out_loc = lr_out_loc
        adapter_ids.copy_(self._adapter_ids(slots))

    def _adapter_ids(self, slots: torch.Tensor) -> torch.Tensor:
        """B row per request for the kernels: its LoRA slot, or -1 where the slot holds no
        adapter (rank 0), which skips the LR term."""
        ranks = self.lora_manager.lora_backend.batch_info.lora_ranks
        return torch.where(ranks[slots.to(torch.int64)] > 0, slots, -1).to(torch.int32)

    def _plan_extend(self, fb: Any, bs: int) -> None:
        rows = fb.req_pool_indices
        n = fb.extend_num_tokens
        prefix, ext = fb.extend_prefix_lens, fb.extend_seq_lens
        token_rows = torch.repeat_interleave(rows, ext, output_size=n)
        positions = fb.positions.to(torch.int64)
        kv_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=self.device)
        torch.cumsum(prefix, 0, dtype=torch.int32, out=kv_indptr[1:])
        n_prefix = sum(fb.extend_prefix_lens_cpu)
        kv_idx = torch.empty(n_prefix, dtype=torch.int32, device=self.device)
        fill_indices(self.req_to_token_pool.req_to_token, rows, prefix, kv_indptr, kv_idx)
        qo_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=self.device)
        torch.cumsum(ext, 0, dtype=torch.int32, out=qo_indptr[1:])
        lr_idx = adapter_ids = None
        if self.rt.enabled:
            req_to_lr = self.rt.lr_pool.req_to_lr
            lr_idx = torch.empty(n_prefix, dtype=torch.int32, device=self.device)
            fill_indices(req_to_lr, rows, prefix, kv_indptr, lr_idx)
            slots = request_lora_slots(self.lora_manager, bs)
            self.rt.forward.lr_out_loc = req_to_lr[token_rows, positions]
            self.rt.forward.token_slot = torch.repeat_interleave(slots.to(torch.int64), ext, output_size=n)
            adapter_ids = self._adapter_ids(slots)
        self.extend_wrapper.plan(qo_indptr, kv_indptr, kv_idx, lr_idx, adapter_ids,
                                 max_extend_len=max(fb.extend_seq_lens_cpu),
                                 max_prefix_len=max(fb.extend_prefix_lens_cpu))
        has_gap = self.rt.take_gap(fb.rids)
        self.extend_loc = self.req_to_token_pool.req_to_token[token_rows, positions].to(torch.int64) if has_gap else None

    def _lr_args(self, layer: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.rt.enabled:
            return None, None
        return self.rt.lr_pool.lr_buffer[layer.layer_id], self.rt.weights.b_v[layer.layer_id]

    def _extend(self, q, k, v, layer, forward_batch):
        k_buf = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_buf = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        h_q, h_kv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
        k_ext, v_ext = k.view(-1, h_kv, d), v.view(-1, h_kv, d)
        if self.extend_loc is not None:
            k_ext, v_ext = k_buf[self.extend_loc], v_buf[self.extend_loc]
        lr_buffer, b = self._lr_args(layer)
        lr_rows = lr_buffer[self.rt.forward.lr_out_loc] if lr_buffer is not None else None
        out = self.extend_wrapper.run(q.view(-1, h_q, d), k_ext, v_ext, k_buf, v_buf, lr_rows, lr_buffer, b,
                                      **layer_args(layer))
        return out.view(-1, h_q * d)

    def _decode(self, q, layer, forward_batch):
        lr_buffer, b = self._lr_args(layer)
        h_q, d = layer.tp_q_head_num, layer.head_dim
        out = self.decode_wrapper.run(
            q.view(-1, h_q, d), self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id), lr_buffer, b, **layer_args(layer),
        )
        return out.view(-1, h_q * d)
