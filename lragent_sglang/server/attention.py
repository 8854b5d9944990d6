"""`--attention-backend lragent` in the base-sharing schemes: attention over shared
K / V_base plus each request's LR cache, `O = P V_base + (P L) B`, never forming V.

This module is the torch implementation of that math (used on CPU, where the CI and the
README demo run); it owns the LR pool of the process. Per forward it maps every token to
its LoRA buffer slot (the LoRA split hook needs it to pick A_v) and every new token to
its LR slot; per layer it writes K, V_base at `out_cache_loc` and the layer's LR rows at
their LR slots, then attends per request over `req_to_token` / `req_to_lr`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from sglang.kernels.ops.kvcache.kv_indices import create_flashinfer_kv_indices_triton
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from lragent_sglang.lora_split import ensure_stacks, preload_group_a, tag_layer_ids
from lragent_sglang.lr_pool import LRTokenPool
from lragent_sglang.runtime import LRAgentRuntime, get_runtime, lr_multiplicity

logger = logging.getLogger(__name__)


def create_lr_pool(runner: Any, rt: LRAgentRuntime) -> LRTokenPool:
    """One LR row per KV slot and LR key that may need it; logged next to the KV capacity."""
    kv_size = runner.token_to_kv_pool_allocator.size
    size = kv_size * lr_multiplicity(rt.scheme, runner.server_args)
    req_to_token = runner.req_to_token_pool.req_to_token
    pool = LRTokenPool(
        size=size, width=rt.width, num_layers=runner.model_config.num_hidden_layers,
        dtype=runner.kv_cache_dtype if runner.kv_cache_dtype.is_floating_point else runner.dtype,
        device=runner.device, max_reqs=req_to_token.shape[0], max_context_len=req_to_token.shape[1],
    )
    logger.info(
        "lragent memory: base KV %d tokens; LR pool %d rows x %d wide (%.1f MB, scheme %s)",
        kv_size, size, rt.width, pool.total_bytes / 2**20, rt.scheme,
    )
    return pool


class LRAgentTorchAttnBackend(TorchNativeAttnBackend):
    """The Flash-LoRA math in torch; see module docstring."""

    def __init__(self, runner: Any) -> None:
        super().__init__(runner)
        self.rt = get_runtime(runner.server_args)
        if self.rt.enabled and self.rt.lr_pool is None:
            self.rt.lr_pool = create_lr_pool(runner, self.rt)
        self.lora_manager = getattr(runner, "lora_manager", None)
        if self.rt.enabled:
            tag_layer_ids(self.lora_manager.lora_modules)
            ensure_stacks(self.rt, self.lora_manager.memory_pool)
            if self.rt.scheme == "base-lr-shared":
                preload_group_a(self.rt, runner.server_args.lora_paths)
        self.req_slot: torch.Tensor | None = None
        self.lr_out_loc: torch.Tensor | None = None

    def init_forward_metadata(self, forward_batch: Any) -> None:
        super().init_forward_metadata(forward_batch)
        rt = self.rt
        if not rt.enabled:
            return
        pool = self.lora_manager.memory_pool
        slots = [pool.uid_to_buffer_id.get(uid, -1) for uid in forward_batch.lora_ids]
        self.req_slot = torch.tensor(slots, dtype=torch.int64, device=self.device)
        rows = forward_batch.req_pool_indices
        if forward_batch.forward_mode.is_decode_or_idle():
            rt.token_slot = self.req_slot
            token_rows = rows
        else:
            lens = forward_batch.extend_seq_lens
            rt.token_slot = torch.repeat_interleave(self.req_slot, lens)
            token_rows = torch.repeat_interleave(rows, lens)
        self.lr_out_loc = rt.lr_pool.req_to_lr[token_rows, forward_batch.positions.to(torch.int64)]

    def _attend(self, q: torch.Tensor, layer: Any, forward_batch: Any, decode: bool) -> torch.Tensor:
        """Per request: softmax(q K^T) (V_base + L B), with P L formed before B."""
        rt = self.rt
        kv_pool = self.token_to_kv_pool
        k_buf = kv_pool.get_key_buffer(layer.layer_id)
        v_buf = kv_pool.get_value_buffer(layer.layer_id)
        lr_buf = rt.lr_pool.lr_buffer[layer.layer_id] if rt.enabled else None
        h_q, h_kv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.v_head_dim
        group = h_q // h_kv
        q = q.view(-1, h_q, layer.qk_head_dim)
        out = torch.empty(q.shape[0], h_q, d, dtype=q.dtype, device=q.device)
        seq_lens = forward_batch.seq_lens.tolist()
        q_lens = [1] * len(seq_lens) if decode else forward_batch.extend_seq_lens.tolist()
        rows = forward_batch.req_pool_indices.tolist()
        start = 0
        for i, (row, seq_len, q_len) in enumerate(zip(rows, seq_lens, q_lens)):
            kv_idx = self.req_to_token_pool.req_to_token[row, :seq_len].to(torch.int64)
            keys = k_buf[kv_idx].float().repeat_interleave(group, dim=1)  # [S, Hq, D]
            vals = v_buf[kv_idx].float().repeat_interleave(group, dim=1)
            qi = q[start : start + q_len].float()  # [E, Hq, D]
            scores = torch.einsum("ehd,shd->hes", qi, keys) * layer.scaling
            if layer.logit_cap and layer.logit_cap > 0:
                scores = layer.logit_cap * torch.tanh(scores / layer.logit_cap)
            if not decode:
                q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
                scores = scores.masked_fill(torch.arange(seq_len, device=q.device)[None, :] > q_pos, float("-inf"))
            p = torch.softmax(scores, dim=-1)
            o = torch.einsum("hes,shd->ehd", p, vals)
            slot = int(self.req_slot[i]) if rt.enabled else -1
            if slot >= 0 and rt.slot_uid.get(slot) is not None:
                lr_idx = rt.lr_pool.req_to_lr[row, :seq_len]
                p_l = torch.einsum("hes,sr->her", p, lr_buf[lr_idx].float())
                b = rt.b_v[layer.layer_id][slot].float().repeat_interleave(group, dim=0)  # [Hq, R, D]
                o = o + torch.einsum("her,hrd->ehd", p_l, b)
            out[start : start + q_len] = o.to(out.dtype)
            start += q_len
        return out.view(-1, h_q * d)

    def _save(self, k: torch.Tensor, v: torch.Tensor, layer: Any, forward_batch: Any) -> None:
        self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)
        if not self.rt.enabled:
            return
        lr = self.rt.pending_lr.pop(layer.layer_id, None)
        if lr is None:  # no adapter loaded yet: the LR term is zero, not a stale row
            lr = torch.zeros(len(self.lr_out_loc), self.rt.width, device=k.device)
        self.rt.lr_pool.write(layer.layer_id, self.lr_out_loc, lr)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if save_kv_cache and k is not None:
            self._save(k, v, layer, forward_batch)
        return self._attend(q, layer, forward_batch, decode=False)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if save_kv_cache and k is not None:
            self._save(k, v, layer, forward_batch)
        return self._attend(q, layer, forward_batch, decode=True)


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


class LRAgentTritonAttnBackend(LRAgentTorchAttnBackend):
    """The Flash-LoRA Triton kernels (`lragent_sglang.kernels`) behind plan()/run().

    All batch metadata is built on the device from sizes the host already knows
    (`seq_lens_sum`, `extend_num_tokens`), so a forward never waits for the GPU. Decode
    runs in CUDA graphs: `init_cuda_graph_state` allocates persistent index buffers, the
    decode wrapper is planned on them once per captured batch size, and before each replay
    `init_forward_metadata_out_graph` refills them. Extend reads the new tokens' K / V_base
    densely, except in batches with an LR-prefill gap, whose rows take the pool's (first
    writer's) K / V_base, as on CPU.
    """

    def __init__(self, runner: Any) -> None:
        from lragent_sglang.kernels import FlashLoRADecodeWrapper, FlashLoRAExtendWrapper

        super().__init__(runner)
        check_no_prefill_graph(runner.server_args)
        cfg = runner.model_config
        tp = runner.ps.tp_size
        h_q = cfg.num_attention_heads // tp
        h_kv = max(1, cfg.get_num_kv_heads(tp))
        self.scaling = cfg.head_dim ** -0.5
        self.max_context_len = self.req_to_token_pool.req_to_token.shape[1]
        self.decode_wrapper = FlashLoRADecodeWrapper(h_q, h_kv, cfg.head_dim, max_lr_rank=max(self.rt.width, 1), device=runner.device)
        self.extend_wrapper = FlashLoRAExtendWrapper(h_q, h_kv, cfg.head_dim, device=runner.device)
        self.extend_loc: torch.Tensor | None = None
        self.graph: dict[str, torch.Tensor] = {}

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return 1

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, **kwargs: Any) -> None:
        """Persistent decode metadata for every captured batch size (int32 indices: the
        kernels widen them; a request's slots fill at most `max_context_len` entries)."""
        i32 = dict(dtype=torch.int32, device=self.device)
        self.graph = {
            "kv_indptr": torch.zeros(max_bs + 1, **i32),
            "kv_indices": torch.zeros(max_bs * self.max_context_len, **i32),
            "adapter_ids": torch.full((max_bs,), -1, **i32),
            "lr_out_loc": torch.zeros(max_bs, dtype=torch.int64, device=self.device),
            "token_slot": torch.zeros(max_bs, dtype=torch.int64, device=self.device),
        }
        if self.rt.enabled:
            self.graph["lr_indices"] = torch.zeros(max_bs * self.max_context_len, **i32)

    def init_forward_metadata(self, forward_batch: Any) -> None:
        """Eager forwards (extend, and decode batches that do not fit a captured graph)."""
        bs = forward_batch.batch_size
        if bs == 0:
            return
        if forward_batch.forward_mode.is_decode_or_idle():
            indptr = torch.zeros(bs + 1, dtype=torch.int32, device=self.device)
            n = int(forward_batch.seq_lens_sum)
            kv_idx = torch.empty(n, dtype=torch.int32, device=self.device)
            lr_idx = torch.empty(n, dtype=torch.int32, device=self.device) if self.rt.enabled else None
            adapter_ids = torch.empty(bs, dtype=torch.int32, device=self.device) if self.rt.enabled else None
            lr_out_loc, token_slot = torch.empty(2, bs, dtype=torch.int64, device=self.device)
            self._fill_decode(forward_batch, bs, indptr, kv_idx, lr_idx, adapter_ids, lr_out_loc, token_slot, padding=0)
            max_len = int(forward_batch.seq_lens_cpu.max()) if forward_batch.seq_lens_cpu is not None else None
            self.decode_wrapper.plan(indptr, kv_idx, lr_idx, adapter_ids, sm_scale=self.scaling, max_kv_len=max_len)
            return
        self._plan_extend(forward_batch, bs)

    def init_forward_metadata_out_graph(self, forward_batch: Any, in_capture: bool = False) -> None:
        """Decode under CUDA graphs: refill the persistent buffers (capture and replay);
        at capture, also plan the wrapper on them, which fixes this batch size's splits."""
        bs = forward_batch.batch_size
        g = self.graph
        lr_idx = g.get("lr_indices")
        adapter_ids = g["adapter_ids"][:bs] if self.rt.enabled else None
        self._fill_decode(forward_batch, bs, g["kv_indptr"][: bs + 1], g["kv_indices"], lr_idx, adapter_ids,
                          g["lr_out_loc"][:bs], g["token_slot"][:bs], padding=getattr(forward_batch, "num_padding", 0))
        if in_capture:
            self.decode_wrapper.plan(g["kv_indptr"][: bs + 1], g["kv_indices"], lr_idx, adapter_ids,
                                     sm_scale=self.scaling)

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
        self.lr_out_loc = lr_out_loc
        if not self.rt.enabled:
            return
        req_to_lr = self.rt.lr_pool.req_to_lr
        fill_indices(req_to_lr, rows, lens, indptr, lr_idx)
        lr_out_loc.copy_(req_to_lr[rows, (lens - 1).to(torch.int64)])
        if padding:
            lr_out_loc[bs - padding :].zero_()
        slots = request_lora_slots(self.lora_manager, bs)
        token_slot.copy_(slots)
        self.rt.token_slot = token_slot
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
            self.lr_out_loc = req_to_lr[token_rows, positions]
            slots = request_lora_slots(self.lora_manager, bs)
            self.rt.token_slot = torch.repeat_interleave(slots.to(torch.int64), ext, output_size=n)
            adapter_ids = self._adapter_ids(slots)
        self.extend_wrapper.plan(qo_indptr, kv_indptr, kv_idx, lr_idx, adapter_ids, sm_scale=self.scaling,
                                 max_extend_len=max(fb.extend_seq_lens_cpu),
                                 max_prefix_len=max(fb.extend_prefix_lens_cpu))
        has_gap = self.rt.take_gap(fb.rids)
        self.extend_loc = self.req_to_token_pool.req_to_token[token_rows, positions].to(torch.int64) if has_gap else None

    def _lr_args(self, layer: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.rt.enabled:
            return None, None
        return self.rt.lr_pool.lr_buffer[layer.layer_id], self.rt.b_v[layer.layer_id]

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if save_kv_cache and k is not None:
            self._save(k, v, layer, forward_batch)
        k_buf = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_buf = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        h_q, h_kv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
        k_ext, v_ext = k.view(-1, h_kv, d), v.view(-1, h_kv, d)
        if self.extend_loc is not None:
            k_ext, v_ext = k_buf[self.extend_loc], v_buf[self.extend_loc]
        lr_buffer, b = self._lr_args(layer)
        lr_rows = lr_buffer[self.lr_out_loc] if lr_buffer is not None else None
        out = self.extend_wrapper.run(q.view(-1, h_q, d), k_ext, v_ext, k_buf, v_buf, lr_rows, lr_buffer, b)
        return out.view(-1, h_q * d)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if save_kv_cache and k is not None:
            self._save(k, v, layer, forward_batch)
        lr_buffer, b = self._lr_args(layer)
        h_q, d = layer.tp_q_head_num, layer.head_dim
        out = self.decode_wrapper.run(
            q.view(-1, h_q, d), self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id), lr_buffer, b,
        )
        return out.view(-1, h_q * d)
