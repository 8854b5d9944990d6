"""`--attention-backend lragent` in the base-sharing schemes: attention over shared
K / V_base plus each request's LR cache, `O = P V_base + (P L) B`, never forming V.

`LRAgentAttnBackend` holds what both implementations share: the pools, the runtime, the
K / V_base write at `out_cache_loc` and the per-forward LR slots the LoRA split writes to
(`ForwardState`). `LRAgentTorchAttnBackend` below is the torch implementation (on CPU,
where the CI and the README demo run); `attention_triton.LRAgentTritonAttnBackend` runs
the Flash-LoRA Triton kernels on GPU.

With `--lragent-cascade auto|on` both run the cascade decode: requests of a decode batch that
share a prefix (role forks over one trajectory: the same physical KV slots, found by
`kernels.find_cascade_groups`) attend to it together, once per group, and to their own
suffix apart; the two partial softmaxes are merged by their log-sum-exp and B is applied
after the merge.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from lragent_sglang.kernels.cascade import find_cascade_groups, member_blocks
from lragent_sglang.server.runtime import LRAgentRuntime

logger = logging.getLogger(__name__)


def visible_keys(seq_len: int, q_len: int, window: int, device: torch.device) -> torch.Tensor:
    """[q_len, seq_len] mask of the keys each of the last `q_len` positions attends:
    causal, and with a window (SGLang's `sliding_window_size` w >= 0) only keys p - w .. p,
    as SGLang's own backends read it."""
    q_pos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None and window >= 0:
        mask &= k_pos >= q_pos - window
    return mask


class LRAgentAttnBackend(AttentionBackend):
    """Pools, runtime and the K / V_base write shared by the torch and Triton backends.

    Subclasses build the forward's metadata in `init_forward_metadata` (including
    `rt.forward`: every token's LoRA slot and every new token's LR slot, which the LoRA
    split hook reads to write the LR rows) and implement `_extend` / `_decode`.
    """

    def __init__(self, runner: Any, rt: LRAgentRuntime) -> None:
        super().__init__()
        self.rt = rt
        self.device = runner.device
        self.req_to_token_pool = runner.req_to_token_pool
        self.token_to_kv_pool = runner.token_to_kv_pool
        self.lora_manager = runner.lora_manager if rt.enabled else None

    def _save_kv(self, k: torch.Tensor, v: torch.Tensor, layer: Any, forward_batch: Any) -> None:
        self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if save_kv_cache and k is not None:
            self._save_kv(k, v, layer, forward_batch)
        return self._extend(q, k, v, layer, forward_batch)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if save_kv_cache and k is not None:
            self._save_kv(k, v, layer, forward_batch)
        return self._decode(q, layer, forward_batch)

    def _extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Any, forward_batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, q: torch.Tensor, layer: Any, forward_batch: Any) -> torch.Tensor:
        raise NotImplementedError


class LRAgentTorchAttnBackend(LRAgentAttnBackend):
    """The Flash-LoRA math in torch, one request at a time (the CPU path).

    Per forward it maps every token to its LoRA buffer slot and every new token to its
    LR slot; per layer it attends per request over `req_to_token` / `req_to_lr`, and in a
    cascade per group for the group's shared prefix.
    """

    def __init__(self, runner: Any, rt: LRAgentRuntime) -> None:
        super().__init__(runner, rt)
        self.req_slot: torch.Tensor | None = None  # [batch] LoRA buffer slot per request
        self.groups: list[tuple[list[int], int]] = []  # cascade: (batch positions, shared prefix)
        self.grouped_batches = 0

    def init_forward_metadata(self, forward_batch: Any) -> None:
        rt = self.rt
        decode = forward_batch.forward_mode.is_decode_or_idle()
        self.groups = self._cascade_groups(forward_batch) if decode else []
        if not rt.enabled:
            return
        pool = self.lora_manager.memory_pool
        slots = [pool.uid_to_buffer_id.get(uid, -1) for uid in forward_batch.lora_ids]
        self.req_slot = torch.tensor(slots, dtype=torch.int64, device=self.device)
        rows = forward_batch.req_pool_indices
        if forward_batch.forward_mode.is_decode_or_idle():
            token_slot, token_rows = self.req_slot, rows
        else:
            lens = forward_batch.extend_seq_lens
            token_slot = torch.repeat_interleave(self.req_slot, lens)
            token_rows = torch.repeat_interleave(rows, lens)
        rt.forward.token_slot = token_slot
        rt.forward.lr_out_loc = rt.lr_pool.req_to_lr[token_rows, forward_batch.positions.to(torch.int64)]

    def _cascade_groups(self, fb: Any) -> list[tuple[list[int], int]]:
        """This decode batch's cascade groups: (batch positions, shared prefix length); as on
        GPU, in the base-sharing schemes only."""
        mode, min_shared = self.rt.config.cascade, self.rt.config.cascade_min_shared
        lens = fb.seq_lens.tolist()
        if mode == "off" or not self.rt.scheme.shares_base or sum(n > min_shared for n in lens) < 2:
            return []
        rows = fb.req_pool_indices.tolist()
        table = self.req_to_token_pool.req_to_token
        kv_indices = torch.cat([table[row, :n] for row, n in zip(rows, lens)])
        kv_indptr = torch.tensor([0, *lens]).cumsum(0)
        prefix_lens = torch.empty(len(lens), dtype=torch.int32)
        blocks = torch.empty(member_blocks(len(lens), len(lens)), len(lens), dtype=torch.int32)
        find_cascade_groups(kv_indptr, kv_indices, prefix_lens, blocks, min_shared_len=min_shared)
        groups = [([i for i in block if i >= 0], int(prefix_lens[block[0]]))
                  for block in blocks.tolist() if block[0] >= 0]
        if groups:
            self.grouped_batches += 1
            if self.grouped_batches == 1:
                logger.info("lragent cascade: first grouped decode batch: %d requests, groups %s",
                            len(lens), [(len(m), p) for m, p in groups])
        return groups

    def _extend(self, q, k, v, layer, forward_batch):
        return self._attend(q, layer, forward_batch, decode=False)

    def _decode(self, q, layer, forward_batch):
        return self._attend(q, layer, forward_batch, decode=True)

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
        window = layer.sliding_window_size
        cascade = decode and self.groups and (window is None or window < 0)
        grouped = self._attend_groups(q, layer, rows, seq_lens, out) if cascade else set()
        start = 0
        for i, (row, seq_len, q_len) in enumerate(zip(rows, seq_lens, q_lens)):
            if i in grouped:
                start += q_len
                continue
            kv_idx = self.req_to_token_pool.req_to_token[row, :seq_len].to(torch.int64)
            vals = v_buf[kv_idx].float().repeat_interleave(group, dim=1)  # [S, Hq, D]
            scores = self._scores(q[start : start + q_len], k_buf[kv_idx], layer)  # [Hq, E, S]
            scores = scores.masked_fill(~visible_keys(seq_len, q_len, window, q.device), float("-inf"))
            p = torch.softmax(scores, dim=-1)
            o = torch.einsum("hes,shd->ehd", p, vals)
            b = self._adapter_b(i, layer, group)
            if b is not None:
                lr_idx = rt.lr_pool.req_to_lr[row, :seq_len]
                p_l = torch.einsum("hes,sr->her", p, lr_buf[lr_idx].float())
                o = o + torch.einsum("her,hrd->ehd", p_l, b)
            out[start : start + q_len] = o.to(out.dtype)
            start += q_len
        return out.view(-1, h_q * d)

    @staticmethod
    def _scores(q: torch.Tensor, keys: torch.Tensor, layer: Any) -> torch.Tensor:
        """Scaled (and soft-capped) scores ``[Hq, E, S]`` of queries ``[E, Hq, D]`` against
        keys ``[S, H_kv, D]``."""
        keys = keys.float().repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
        scores = torch.einsum("ehd,shd->hes", q.float(), keys) * layer.scaling
        if layer.logit_cap and layer.logit_cap > 0:
            scores = layer.logit_cap * torch.tanh(scores / layer.logit_cap)
        return scores

    def _adapter_b(self, i: int, layer: Any, group: int) -> torch.Tensor | None:
        """B ``[Hq, R, D]`` of request i's adapter, or None (no LR term)."""
        slot = int(self.req_slot[i]) if self.rt.enabled else -1
        if slot < 0 or self.rt.weights.slot_uid.get(slot) is None:
            return None
        return self.rt.weights.b_v[layer.layer_id][slot].float().repeat_interleave(group, dim=0)

    def _attend_groups(self, q: torch.Tensor, layer: Any, rows: list[int], seq_lens: list[int],
                       out: torch.Tensor) -> set[int]:
        """Cascade decode of the grouped requests into `out`; returns their batch positions.

        Level 1: a group's members attend to its shared prefix together (its K / V_base
        gathered once); level 2: each member to its own suffix. Each level keeps its
        partials unnormalised (max m, weights e = exp(s - m), P V_base); they merge by their
        log-sum-exp, and the L term (P L with the member's own L rows) likewise before B.
        """
        k_buf = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_buf = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        table = self.req_to_token_pool.req_to_token
        group = layer.tp_q_head_num // layer.tp_k_head_num

        def partial(queries: torch.Tensor, slots: torch.Tensor):
            slots = slots.to(torch.int64)
            scores = self._scores(queries, k_buf[slots], layer)
            m = scores.amax(-1)  # [Hq, E]
            e = torch.exp(scores - m[..., None])
            vals = v_buf[slots].float().repeat_interleave(group, dim=1)
            return m, e, torch.einsum("hes,shd->ehd", e, vals)

        for members, prefix in self.groups:
            m1, e1, o1 = partial(q[members], table[rows[members[0]], :prefix])
            for j, i in enumerate(members):
                m2, e2, o2 = partial(q[i : i + 1], table[rows[i], prefix : seq_lens[i]])
                m = torch.maximum(m1[:, j], m2[:, 0])
                w1, w2 = torch.exp(m1[:, j] - m), torch.exp(m2[:, 0] - m)  # [Hq]
                l = e1[:, j].sum(-1) * w1 + e2[:, 0].sum(-1) * w2
                o = (o1[j] * w1[:, None] + o2[0] * w2[:, None]) / l[:, None]  # [Hq, D]
                b = self._adapter_b(i, layer, group)
                if b is not None:
                    pool = self.rt.lr_pool
                    lr = pool.lr_buffer[layer.layer_id][pool.req_to_lr[rows[i], : seq_lens[i]]].float()
                    p_l = (torch.einsum("hs,sr->hr", e1[:, j], lr[:prefix]) * w1[:, None]
                           + torch.einsum("hs,sr->hr", e2[:, 0], lr[prefix:]) * w2[:, None]) / l[:, None]
                    o = o + torch.einsum("hr,hrd->hd", p_l, b)
                out[i] = o.to(out.dtype)
        return {i for members, _ in self.groups for i in members}
