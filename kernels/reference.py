"""Float64 torch reference for Flash-LoRA attention: materialises V = V_base + L B.

Slow and simple on purpose (a Python loop over requests); the tests compare the Triton
kernels against it. A request without an adapter (-1) never touches the LR cache.
"""

from __future__ import annotations

import torch


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float,
            logit_cap: float, first_query_pos: int, window: int | None) -> torch.Tensor:
    """q ``[M, H_q, D]`` at positions first_query_pos.., k/v ``[N, H_kv, D]`` -> ``[M, H_q, D]``.

    Query i (at position p = first_query_pos + i) sees keys 0 .. p (causal within the
    request), and with a window (>= 0) only keys p - window .. p, as SGLang's torch_native
    backend masks ``k_pos >= q_pos - sliding_window_size``.
    """
    n_qo, n_kv = q.shape[1], k.shape[1]
    group = n_qo // n_kv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("mhd,nhd->hmn", q, k) * sm_scale
    if logit_cap > 0:
        s = logit_cap * torch.tanh(s / logit_cap)
    q_pos = first_query_pos + torch.arange(q.shape[0], device=q.device)
    k_pos = torch.arange(k.shape[0], device=q.device)
    hidden = k_pos[None, :] > q_pos[:, None]
    if window is not None and window >= 0:
        hidden |= k_pos[None, :] < q_pos[:, None] - window
    s = s.masked_fill(hidden[None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hmn,nhd->mhd", p, v)


def _values(v_base: torch.Tensor, lr: torch.Tensor | None, b_weights: torch.Tensor | None,
            adapter: int) -> torch.Tensor:
    """V = V_base + L B for one request (``[N, H_kv, D]``), or V_base without an adapter."""
    if adapter < 0:
        return v_base
    return v_base + torch.einsum("nr,hrd->nhd", lr, b_weights[adapter].double())


def extend_reference(
    q: torch.Tensor, k_extend: torch.Tensor, v_extend: torch.Tensor, k_buffer: torch.Tensor,
    v_buffer: torch.Tensor, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor, sm_scale: float, logit_cap: float = 0.0,
    lr_extend: torch.Tensor | None = None, lr_buffer: torch.Tensor | None = None,
    lr_indices: torch.Tensor | None = None, b_weights: torch.Tensor | None = None,
    adapter_ids: torch.Tensor | None = None, window: int | None = None,
) -> torch.Tensor:
    """Same arguments as `flash_lora_extend`; returns ``[n_extend, H_q, D]`` float64."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    qo, kv = qo_indptr.tolist(), kv_indptr.tolist()
    for b in range(len(qo) - 1):
        ext = slice(qo[b], qo[b + 1])
        slots = kv_indices[kv[b]:kv[b + 1]].long()
        k = torch.cat([k_buffer[slots], k_extend[ext]]).double()
        v_base = torch.cat([v_buffer[slots], v_extend[ext]]).double()
        adapter = int(adapter_ids[b]) if lr_buffer is not None else -1
        lr = None
        if adapter >= 0:
            lr_slots = lr_indices[kv[b]:kv[b + 1]].long()
            lr = torch.cat([lr_buffer[lr_slots], lr_extend[ext]]).double()
        v = _values(v_base, lr, b_weights, adapter)
        out[ext] = _attend(q[ext].double(), k, v, sm_scale, logit_cap, len(slots), window)
    return out


def decode_reference(
    q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor, sm_scale: float, logit_cap: float = 0.0,
    lr_buffer: torch.Tensor | None = None, lr_indices: torch.Tensor | None = None,
    b_weights: torch.Tensor | None = None, adapter_ids: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Same arguments as `flash_lora_decode`; returns ``[batch, H_q, D]`` float64.

    The query sees every cached token of its request (the current token is already written).
    """
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    kv = kv_indptr.tolist()
    for b in range(q.shape[0]):
        if kv[b + 1] == kv[b]:
            continue
        slots = kv_indices[kv[b]:kv[b + 1]].long()
        k = k_buffer[slots].double()
        adapter = int(adapter_ids[b]) if lr_buffer is not None else -1
        lr = None
        if adapter >= 0:
            lr = lr_buffer[lr_indices[kv[b]:kv[b + 1]].long()].double()
        v = _values(v_buffer[slots].double(), lr, b_weights, adapter)
        out[b] = _attend(q[b:b + 1].double(), k, v, sm_scale, logit_cap, len(slots) - 1,
                         window)[0]
    return out
