"""Flash-LoRA extend (prefill with a cached prefix) over a paged KV + LR cache.

    O = softmax(q K^T * scale, causal) (V_base + L B) = P V_base + (P L) B

Each request b has ``prefix_len = kv_indptr[b+1] - kv_indptr[b]`` cached tokens, read from
the pools through ``kv_indices`` (K, V_base) and ``lr_indices`` (L), and
``extend_len = qo_indptr[b+1] - qo_indptr[b]`` new tokens. Like SGLang's
``extend_attention_fwd``, the new tokens' K, V_base and L rows are passed as dense ragged
tensors (rows ``qo_indptr[b] : qo_indptr[b+1]``): the attention backend holds them anyway
when it writes them into the pools, and reading them densely is coalesced. So kv_indices /
lr_indices list the PREFIX only.

Grid ``(query blocks, H_q, batch)``; a program owns ``BLOCK_M`` new tokens of one query
head, streams the prefix tiles, then the new tokens up to its causal diagonal (tiles wholly
below the diagonal skip the mask), keeping ``acc = P V_base`` and ``acc_lr = P L`` under one
online softmax, and finishes with ``O = acc / l + ((acc_lr / l) @ B)`` (B read once per
program; the normalised ``P L`` is rounded to the input dtype for that product, as P is for
the others: an fp32 tf32 product there cost ~10% of a pure prefill, kernels/NOTES.md).

Sliding window (common.py for the convention): a program starts at the first key its
block's first query sees, prefix or new, so keys before the window cost no bandwidth; only
the tiles at the window's lower edge and the diagonal are masked for it. kv_indices still
lists the whole prefix (positions are indices in it), so one plan serves layers with and
without a window. Head dims that are not a power of two run at ``BLOCK_D =
next_power_of_2(D)`` with masked loads and stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import (
    check_head_dim,
    dot_precision,
    head_dim_block,
    head_dim_mask,
    interpreter_compat,
    lr_row_alignment,
    padded_rank,
    score_scale,
    soft_cap,
    window_or_none,
)


@dataclass(frozen=True)
class ExtendConfig:
    """Tile sizes and launch options of the extend kernel (BLOCK_N must divide BLOCK_M)."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3


#: with at least this many cached tokens, the LR build (R padded to <= 32) runs 4 stages
LONG_PREFIX_TOKENS = 4096


def default_extend_config(device: torch.device, dtype: torch.dtype, lr_width: int | None = None,
                          max_prefix_len: int | None = None, head_dim: int = 128) -> ExtendConfig:
    """Hopper-sized tiles for 16-bit inputs (no register spills for head_dim 64 / 128 and
    R <= 64 on sm_90), small ones for fp32 and the interpreter.

    ``lr_width`` is the padded LR width (None: LR off); ``max_prefix_len`` the longest cached
    prefix in the batch (None: unknown). Measured on an H100 (kernels/NOTES.md item 6): a
    fourth stage takes 2-5% off the LR build with R <= 32 behind 7k-31k-token prefixes,
    is neutral or worse with LR off or R = 64, and 6% slower for pure prefill.
    Head dims padded past 128 (Gemma's 256) take 64 x 64 tiles, as SGLang's extend kernel
    does on Hopper, 2 stages deep: 128-query tiles or 3 stages need more shared memory
    than an SM has (offline sm_90 compile, kernels/NOTES.md item 7).
    """
    if device.type != "cuda":
        return ExtendConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return ExtendConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    if head_dim_block(head_dim) > 128:
        return ExtendConfig(block_m=64, block_n=64, num_warps=8, num_stages=2)
    if lr_width is not None and lr_width <= 32 and (max_prefix_len or 0) >= LONG_PREFIX_TOKENS:
        return ExtendConfig(num_stages=4)
    return ExtendConfig()


@triton.jit
def _attend_tile(q, k, v, lr, mask_s, m_i, l_i, acc, acc_lr,
                 pre_scale, post_scale, logit_cap,
                 USE_CAP: tl.constexpr, HAS_LR: tl.constexpr, APPLY_MASK: tl.constexpr,
                 ROWS_MAY_BE_EMPTY: tl.constexpr, DOT_PREC: tl.constexpr):
    """One online-softmax step over a [BLOCK_N] tile of keys for a [BLOCK_M] tile of queries.

    ``ROWS_MAY_BE_EMPTY``: the mask can hide a whole row of the tile before that row has seen
    any key (the lower edge of a sliding window); its running max is then still -inf, and
    the exponentials are taken against 0 instead (else exp2(-inf - -inf) = NaN)."""
    s = tl.dot(q, k, input_precision=DOT_PREC) * pre_scale
    if USE_CAP:
        s = soft_cap(s, logit_cap)
    s = s * post_scale
    if APPLY_MASK:
        s = tl.where(mask_s, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_exp = m_new
    if ROWS_MAY_BE_EMPTY:
        m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_exp)
    p = tl.exp2(s - m_exp[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    if HAS_LR:
        acc_lr = acc_lr * alpha[:, None] + tl.dot(p.to(lr.dtype), lr, input_precision=DOT_PREC)
    return m_new, l_i, acc, acc_lr


@triton.jit
def _tile_slots(kv_indices, lr_indices, start, offs_n, mask_n, use_lr, HAS_LR: tl.constexpr):
    """Pool slots (int64) of one prefix tile: K / V_base, and L (0 where masked off)."""
    slot = tl.load(kv_indices + start + offs_n, mask=mask_n, other=0).to(tl.int64)
    lr_slot = slot
    if HAS_LR:
        lr_slot = tl.load(lr_indices + start + offs_n, mask=mask_n & use_lr, other=0).to(tl.int64)
    return slot, lr_slot


@triton.jit
def _extend_kernel(
    Q, KExt, VExt, LExt, O,
    K, V, L, Bw,
    qo_indptr, kv_indptr, kv_indices, lr_indices, adapter_ids,
    pre_scale, post_scale, logit_cap,
    stride_qt, stride_qh, stride_ket, stride_keh, stride_vet, stride_veh, stride_let,
    stride_ot, stride_oh,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_lt,
    stride_ba, stride_bh, stride_br,
    window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, RANK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LR_ALIGN: tl.constexpr, LR_EXT_ALIGN: tl.constexpr, HAS_LR: tl.constexpr,
    USE_CAP: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Heaviest (last, longest causal range) query blocks are scheduled first.
    m_blk = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2)
    kv_head = head // GROUP

    qo_start = tl.load(qo_indptr + b).to(tl.int64)
    ext_len = (tl.load(qo_indptr + b + 1) - qo_start).to(tl.int32)
    if m_blk * BLOCK_M >= ext_len:
        return
    pre_start = tl.load(kv_indptr + b).to(tl.int64)
    pre_len = (tl.load(kv_indptr + b + 1) - pre_start).to(tl.int32)

    # Query i of the block is new token offs_m[i], at position pre_len + offs_m[i].
    diag = m_blk * BLOCK_M
    offs_m = diag + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = head_dim_mask(HEAD_DIM, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < ext_len
    # Padded head dims load 0 in q and K, so they add nothing to the scores.
    q = tl.load(Q + (qo_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    use_lr = False
    if HAS_LR:
        adapter = tl.load(adapter_ids + b)
        use_lr = adapter >= 0
    # L tiles are BLOCK_R wide; the padding columns re-read the row's own values instead of
    # being masked (row-only masks keep the gathers vectorised) and meet B's zero rows.
    lr_cols = (offs_r % RANK)[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_lr = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    lr = tl.zeros([BLOCK_N, BLOCK_R], L.dtype.element_ty)  # placeholder when HAS_LR is off

    # With a window, new token j (0-based) sees keys from position pre_len + j - window on,
    # so no query of the block sees the keys before pre_len + diag - window.
    pre_lo = 0
    if USE_WINDOW:
        pre_lo = tl.maximum(pre_len + diag - window, 0)

    # 1) cached prefix, gathered from the pools (every prefix token precedes every query).
    #    Each tile's slots are loaded one iteration ahead: Triton's pipeliner does not overlap
    #    an index load with the gather that depends on it in the same iteration.
    slot, lr_slot = _tile_slots(kv_indices, lr_indices, pre_start, pre_lo + offs_n,
                               pre_lo + offs_n < pre_len, use_lr, HAS_LR)
    for start in range(pre_lo, pre_len, BLOCK_N):
        pos = start + offs_n
        mask_n = pos < pre_len
        next_slot, next_lr_slot = _tile_slots(kv_indices, lr_indices, pre_start, pos + BLOCK_N,
                                             pos + BLOCK_N < pre_len, use_lr, HAS_LR)
        k = tl.load(K + slot[None, :] * stride_kt + kv_head * stride_kh + offs_d[:, None],
                    mask=mask_n[None, :] & mask_d[:, None], other=0.0)
        v = tl.load(V + slot[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if HAS_LR:
            lr_row = tl.multiple_of(lr_slot * stride_lt, LR_ALIGN)
            lr = tl.load(L + lr_row[:, None] + lr_cols, mask=(mask_n & use_lr)[:, None], other=0.0)
        visible = mask_n[None, :]
        if USE_WINDOW:
            visible = visible & (pos[None, :] >= (pre_len + offs_m - window)[:, None])
        m_i, l_i, acc, acc_lr = _attend_tile(
            q, k, v, lr, visible, m_i, l_i, acc, acc_lr, pre_scale, post_scale,
            logit_cap, USE_CAP, HAS_LR, True, USE_WINDOW, DOT_PREC)
        slot, lr_slot = next_slot, next_lr_slot

    # 2) new tokens strictly below this block's diagonal. With a window, the tiles at its
    #    lower edge are masked (some queries of the block no longer see them); from
    #    `inner_lo` on every query sees every key: no mask.
    inner_lo = 0
    if USE_WINDOW:
        edge_lo = tl.maximum(diag - window, 0) // BLOCK_N * BLOCK_N
        inner_lo = tl.minimum(tl.cdiv(tl.maximum(diag + BLOCK_M - 1 - window, 0), BLOCK_N)
                              * BLOCK_N, diag)
        for start in range(edge_lo, inner_lo, BLOCK_N):
            pos = start + offs_n
            k = tl.load(KExt + (qo_start + pos)[None, :] * stride_ket + kv_head * stride_keh
                        + offs_d[:, None], mask=mask_d[:, None], other=0.0)
            v = tl.load(VExt + (qo_start + pos)[:, None] * stride_vet + kv_head * stride_veh
                        + offs_d[None, :], mask=mask_d[None, :], other=0.0)
            if HAS_LR:
                lr_row = tl.multiple_of((qo_start + pos) * stride_let, LR_EXT_ALIGN)
                lr = tl.load(LExt + lr_row[:, None] + lr_cols, mask=use_lr, other=0.0)
            visible = pos[None, :] >= (offs_m - window)[:, None]
            m_i, l_i, acc, acc_lr = _attend_tile(
                q, k, v, lr, visible, m_i, l_i, acc, acc_lr, pre_scale, post_scale,
                logit_cap, USE_CAP, HAS_LR, True, True, DOT_PREC)
    for start in range(inner_lo, diag, BLOCK_N):
        pos = start + offs_n
        k = tl.load(KExt + (qo_start + pos)[None, :] * stride_ket + kv_head * stride_keh
                    + offs_d[:, None], mask=mask_d[:, None], other=0.0)
        v = tl.load(VExt + (qo_start + pos)[:, None] * stride_vet + kv_head * stride_veh
                    + offs_d[None, :], mask=mask_d[None, :], other=0.0)
        if HAS_LR:
            lr_row = tl.multiple_of((qo_start + pos) * stride_let, LR_EXT_ALIGN)
            lr = tl.load(LExt + lr_row[:, None] + lr_cols, mask=use_lr, other=0.0)
        m_i, l_i, acc, acc_lr = _attend_tile(
            q, k, v, lr, None, m_i, l_i, acc, acc_lr, pre_scale, post_scale,
            logit_cap, USE_CAP, HAS_LR, False, False, DOT_PREC)

    # 3) the diagonal block: causal mask (and the ragged end of the request, and the window).
    hi = tl.minimum(diag + BLOCK_M, ext_len)
    for start in range(diag, hi, BLOCK_N):
        pos = start + offs_n
        mask_n = pos < ext_len
        k = tl.load(KExt + (qo_start + pos)[None, :] * stride_ket + kv_head * stride_keh
                    + offs_d[:, None], mask=mask_n[None, :] & mask_d[:, None], other=0.0)
        v = tl.load(VExt + (qo_start + pos)[:, None] * stride_vet + kv_head * stride_veh
                    + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if HAS_LR:
            lr_row = tl.multiple_of((qo_start + pos) * stride_let, LR_EXT_ALIGN)
            lr = tl.load(LExt + lr_row[:, None] + lr_cols, mask=mask_n[:, None] & use_lr,
                         other=0.0)
        visible = (offs_m[:, None] >= pos[None, :]) & mask_n[None, :]
        if USE_WINDOW:
            visible = visible & (pos[None, :] >= (offs_m - window)[:, None])
        m_i, l_i, acc, acc_lr = _attend_tile(
            q, k, v, lr, visible, m_i, l_i, acc, acc_lr, pre_scale, post_scale,
            logit_cap, USE_CAP, HAS_LR, True, USE_WINDOW, DOT_PREC)

    if USE_WINDOW:
        l_i = tl.where(l_i > 0, l_i, 1.0)  # rows past the request's end may have seen no key
    out = acc / l_i[:, None]
    if HAS_LR:
        bw = tl.load(Bw + tl.maximum(adapter, 0).to(tl.int64) * stride_ba + kv_head * stride_bh
                     + offs_r[:, None] * stride_br + offs_d[None, :],
                     mask=(offs_r[:, None] < RANK) & use_lr & mask_d[None, :], other=0.0)
        p_l = (acc_lr / l_i[:, None]).to(bw.dtype)
        out = tl.dot(p_l, bw, out, input_precision=DOT_PREC)
    tl.store(O + (qo_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def flash_lora_extend(
    q: torch.Tensor,
    k_extend: torch.Tensor,
    v_extend: torch.Tensor,
    out: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    max_extend_len: int,
    sm_scale: float,
    logit_cap: float = 0.0,
    lr_extend: torch.Tensor | None = None,
    lr_buffer: torch.Tensor | None = None,
    lr_indices: torch.Tensor | None = None,
    b_weights: torch.Tensor | None = None,
    adapter_ids: torch.Tensor | None = None,
    config: ExtendConfig | None = None,
    max_prefix_len: int | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Launch the extend kernel; no host sync.

    ``window``: sliding window (common.py: a query at position p sees keys p - window .. p,
    positions counted over prefix then new tokens; None or -1: causal only).

    Shapes: q, out ``[n_extend, H_q, D]``; k/v_extend ``[n_extend, H_kv, D]``; lr_extend
    ``[n_extend, R]`` (rows ragged by qo_indptr ``[batch + 1]``); k/v_buffer
    ``[slots, H_kv, D]``, lr_buffer ``[lr_slots, R]`` with the prefix listed in
    kv_indices / lr_indices (ragged by kv_indptr ``[batch + 1]``); b_weights
    ``[n_adapters, H_kv, R, D]``; adapter_ids ``[batch]`` int32 (-1: none). The LR term is on
    when lr_buffer is given (then all LR arguments are needed). ``max_prefix_len`` (host int,
    optional) picks the pipeline depth (default_extend_config).
    """
    n_qo, head_dim = q.shape[1], q.shape[2]
    n_kv = k_buffer.shape[1]
    check_head_dim(head_dim)
    interpreter_compat()
    batch = qo_indptr.shape[0] - 1
    prec = dot_precision(q.dtype)
    pre, post = score_scale(sm_scale, logit_cap)
    window = window_or_none(window)

    has_lr = lr_buffer is not None
    if has_lr:
        rank = lr_buffer.shape[1]
        lr_args = (lr_extend.stride(0),)
        lr_pool = (lr_buffer.stride(0),)
        b_strides = (b_weights.stride(0), b_weights.stride(1), b_weights.stride(2))
    else:
        rank = 1
        lr_extend, lr_buffer, lr_indices, b_weights, adapter_ids = v_extend, v_buffer, kv_indices, v_buffer, kv_indptr
        lr_args, lr_pool, b_strides = (0,), (0,), (0, 0, 0)

    if window >= 0 and max_prefix_len is not None:
        max_prefix_len = min(max_prefix_len, window)  # the most prefix keys a query reads
    cfg = config or default_extend_config(q.device, q.dtype, padded_rank(rank) if has_lr else None,
                                          max_prefix_len, head_dim)
    grid = (triton.cdiv(max_extend_len, cfg.block_m), n_qo, batch)
    if grid[0] == 0 or batch == 0:
        return out
    _extend_kernel[grid](
        q, k_extend, v_extend, lr_extend, out,
        k_buffer, v_buffer, lr_buffer, b_weights,
        qo_indptr, kv_indptr, kv_indices, lr_indices, adapter_ids,
        pre, post, logit_cap,
        q.stride(0), q.stride(1), k_extend.stride(0), k_extend.stride(1),
        v_extend.stride(0), v_extend.stride(1), *lr_args,
        out.stride(0), out.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1), *lr_pool,
        *b_strides,
        window,
        GROUP=n_qo // n_kv, HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim), RANK=rank,
        BLOCK_R=padded_rank(rank), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        LR_ALIGN=lr_row_alignment(lr_buffer) if has_lr else 1,
        LR_EXT_ALIGN=lr_row_alignment(lr_extend) if has_lr else 1,
        HAS_LR=has_lr, USE_CAP=logit_cap > 0, USE_WINDOW=window >= 0, DOT_PREC=prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
