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


def ragged_indices(table: torch.Tensor, rows: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`indptr [B+1]` and the concatenated `table[rows[b], :lens[b]]` (one host sync)."""
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32, device=lens.device)
    indptr[1:] = torch.cumsum(lens, 0)
    total = int(indptr[-1])
    owner = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens, output_size=total)
    pos = torch.arange(total, device=lens.device) - indptr[owner].to(torch.int64)
    return indptr, table[rows[owner], pos].to(torch.int64)


class LRAgentTritonAttnBackend(LRAgentTorchAttnBackend):
    """The Flash-LoRA Triton kernels (`lragent_sglang.kernels`) behind plan()/run().

    Extend reads the new tokens' K / V_base / L densely; rows of an LR prefill gap take
    the pool's (first writer's) K / V_base instead of the recomputed ones, as on CPU.
    CUDA graphs are not supported yet (the launcher disables them for this backend).
    """

    def __init__(self, runner: Any) -> None:
        from lragent_sglang.kernels import FlashLoRADecodeWrapper, FlashLoRAExtendWrapper

        super().__init__(runner)
        cfg = runner.model_config
        tp = runner.ps.tp_size
        h_q = cfg.num_attention_heads // tp
        h_kv = max(1, cfg.get_num_kv_heads(tp))
        self.scaling = cfg.head_dim ** -0.5
        self.decode_wrapper = FlashLoRADecodeWrapper(h_q, h_kv, cfg.head_dim, max_lr_rank=max(self.rt.width, 1), device=runner.device)
        self.extend_wrapper = FlashLoRAExtendWrapper(h_q, h_kv, cfg.head_dim, device=runner.device)
        self.extend_loc: torch.Tensor | None = None

    def init_cuda_graph_state(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "the lragent base-sharing backend does not support CUDA graphs yet: pass --disable-cuda-graph"
        )

    def init_forward_metadata(self, forward_batch: Any) -> None:
        super().init_forward_metadata(forward_batch)
        rt = self.rt
        rows = forward_batch.req_pool_indices
        req_to_token = self.req_to_token_pool.req_to_token
        adapter_ids = None
        if rt.enabled:
            live = torch.tensor([rt.slot_uid.get(int(s)) is not None for s in self.req_slot.tolist()], device=self.device)
            adapter_ids = torch.where(live, self.req_slot, -1).to(torch.int32)
        if forward_batch.forward_mode.is_decode_or_idle():
            lens = forward_batch.seq_lens.to(torch.int64)
            indptr, kv_idx = ragged_indices(req_to_token, rows, lens)
            lr_idx = ragged_indices(rt.lr_pool.req_to_lr, rows, lens)[1] if rt.enabled else None
            self.decode_wrapper.plan(indptr, kv_idx, lr_idx, adapter_ids, sm_scale=self.scaling,
                                     max_kv_len=int(lens.max()) if len(lens) else 1)
            return
        prefix = forward_batch.extend_prefix_lens.to(torch.int64)
        ext = forward_batch.extend_seq_lens.to(torch.int64)
        indptr, kv_idx = ragged_indices(req_to_token, rows, prefix)
        lr_idx = ragged_indices(rt.lr_pool.req_to_lr, rows, prefix)[1] if rt.enabled else None
        qo_indptr = torch.zeros(len(ext) + 1, dtype=torch.int32, device=self.device)
        qo_indptr[1:] = torch.cumsum(ext, 0)
        self.extend_wrapper.plan(qo_indptr, indptr, kv_idx, lr_idx, adapter_ids, sm_scale=self.scaling,
                                 max_extend_len=int(ext.max()) if len(ext) else 0)
        token_rows = torch.repeat_interleave(rows, ext)
        loc = req_to_token[token_rows, forward_batch.positions.to(torch.int64)].to(torch.int64)
        self.extend_loc = loc if bool((forward_batch.out_cache_loc == 0).any()) else None

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
