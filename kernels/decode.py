"""Flash-LoRA split-KV decode: one query token per request over a paged KV + LR cache.

    O = softmax(q K^T * scale) (V_base + L B) = P V_base + (P L) B

Stage 1 (``_decode_split_kernel``): grid ``(head blocks, batch, splits)``. A program takes
one request, the query heads of one kv-head (all of the GQA group, up to ``BLOCK_H``), and
one contiguous chunk of the request's tokens. Head blocks vary fastest, so the programs of
all kv heads of one (request, split) run side by side and read its ``kv_indices``,
``lr_indices`` and L rows (shared by all heads) from DRAM once and from L2 after that.
It streams K, V_base and L once through an online softmax with two accumulators,
``acc = P V_base`` ``[BLOCK_H, D]`` and ``acc_lr = P L`` ``[BLOCK_H, R_pad]``, and writes
both (normalised) plus the split's LSE to the workspace.

Stage 2 (``_decode_combine_kernel``): grid ``(batch, H_q)``. Merges all splits at once
with their LSE weights and applies the adapter once: ``O = acc + acc_lr @ B``. B is applied
after the combine (exact, since the combine is linear) so it is read once per query head
rather than once per split.

Splitting: the keys a request's query sees (all ``kv_len`` of them, or with a sliding
window the last ``min(kv_len, window + 1)``) are cut into ``num_splits`` chunks of
``round_up(ceil(seen / num_splits), BLOCK_N)`` tokens (chunks past the end are empty and
their programs exit at once). Tokens before the window are never read: no split starts
there. Everything is derived on the device from ``kv_indptr`` and the window, so a launch
needs no host sync and no allocation (CUDA-graph safe), and one plan serves layers with and
without a window.

Head dims that are not a power of two run at ``BLOCK_D = next_power_of_2(D)`` with masked
loads and stores (common.py).
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
class DecodeConfig:
    """Tile sizes and launch options of the split kernel.

    ``maxnreg`` caps registers per thread: decode is latency-bound, so blocks resident per
    SM matter more than the deeper register pipelining ptxas would otherwise choose.
    """

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    maxnreg: int | None = None


def default_decode_config(device: torch.device, dtype: torch.dtype,
                          long_splits: bool = True, head_dim: int = 128) -> DecodeConfig:
    """Tile options measured on an H100 (kernels/NOTES.md, item 6): 64-token tiles 3 stages
    deep for long splits (>= 4k tokens), 32-token tiles 4 deep for short ones (less pipeline
    fill per split). Register caps keep the LR build at the LR-off build's blocks per SM
    (uncapped, ptxas spends 166 registers on the LR build's register pipeline against 122).
    Small tiles for fp32 (larger ones spill on sm_90) and under the interpreter.

    Head dims padded past 128 (Gemma's 256) take half as many tokens per tile: a stage then
    holds the K / V bytes it holds at 128, and the same caps compile without spills (offline
    sm_90 compile, kernels/NOTES.md item 7; uncapped, the LR build takes 191 registers)."""
    if device.type != "cuda":
        return DecodeConfig(block_n=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return DecodeConfig(block_n=16, num_warps=4, num_stages=1)
    shrink = max(1, head_dim_block(head_dim) // 128)
    if long_splits:
        return DecodeConfig(block_n=64 // shrink, num_warps=4, num_stages=3, maxnreg=104)
    return DecodeConfig(block_n=32 // shrink, num_warps=4, num_stages=4, maxnreg=96)


def head_block(group: int) -> int:
    """Query heads per program: the GQA group (padded to a tl.dot-able 16), at most 64."""
    return max(16, min(64, triton.next_power_of_2(group)))


@triton.jit
def _chunk_bounds(first, end, split, num_splits, BLOCK_N: tl.constexpr):
    """Token range [lo, hi) of chunk `split` when [first, end) is cut into `num_splits`
    chunks of a whole number of BLOCK_N tiles, and the number of non-empty chunks."""
    chunk = tl.cdiv(tl.cdiv(end - first, num_splits), BLOCK_N) * BLOCK_N
    lo = first + split * chunk
    hi = tl.minimum(lo + chunk, end)
    n_active = tl.cdiv(end - first, tl.maximum(chunk, 1))
    return lo, hi, n_active


@triton.jit
def _split_bounds(kv_indptr, b, split, num_splits, window, skip, BLOCK_N: tl.constexpr,
                  USE_WINDOW: tl.constexpr):
    """Start of request b's tokens in kv_indices, split `split`'s token range [lo, hi), and
    the number of non-empty splits. The splits cover only the keys the query (the last
    token, at position kv_len - 1) sees: with a window, positions kv_len - 1 - window on;
    and never the first `skip` tokens (a cascade's shared prefix, read elsewhere; else 0)."""
    kv_start = tl.load(kv_indptr + b)
    kv_len = tl.load(kv_indptr + b + 1) - kv_start
    first = skip
    if USE_WINDOW:
        first = tl.maximum(kv_len - 1 - window, skip)
    lo, hi, n_active = _chunk_bounds(first, kv_len, split, num_splits, BLOCK_N)
    return kv_start, lo, hi, n_active


@triton.jit
def _decode_split_kernel(
    Q, K, V, L,
    kv_indptr, kv_indices, lr_indices, adapter_ids,
    MidO, MidLR, MidLSE,
    pre_scale, post_scale, logit_cap, num_splits,
    stride_qb, stride_qh,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_lt,
    stride_mo_b, stride_mo_s, stride_mo_h,
    stride_ml_b, stride_ml_s, stride_ml_h,
    stride_me_b, stride_me_s,
    window, prefix_lens,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    RANK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, LR_ALIGN: tl.constexpr,
    HAS_LR: tl.constexpr, USE_CAP: tl.constexpr, USE_WINDOW: tl.constexpr,
    DOT_PREC: tl.constexpr, HAS_PREFIX: tl.constexpr,
):
    head_blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    blocks_per_kv: tl.constexpr = (GROUP + BLOCK_H - 1) // BLOCK_H
    kv_head = head_blk // blocks_per_kv
    in_group = (head_blk % blocks_per_kv) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = in_group < GROUP
    heads = kv_head * GROUP + in_group

    skip = 0
    if HAS_PREFIX:
        skip = tl.load(prefix_lens + b)
    kv_start, lo, hi, n_active = _split_bounds(kv_indptr, b, split, num_splits, window, skip,
                                               BLOCK_N, USE_WINDOW)
    if lo >= hi:
        return

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = head_dim_mask(HEAD_DIM, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    # L tiles are BLOCK_R wide; the padding columns re-read the row's own values instead of
    # being masked (row-only masks keep the gathers vectorised) and meet B's zero rows.
    lr_cols = offs_r % RANK
    # Padded head rows load q = 0: their scores stay finite and they are never stored.
    # Padded head dims load 0 in q and K, so they add nothing to the scores.
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)

    if HAS_LR:
        use_lr = tl.load(adapter_ids + b) >= 0

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    acc_lr = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)

    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        slot = tl.load(kv_indices + kv_start + offs_n, mask=mask_n, other=0).to(tl.int64)

        k = tl.load(K + slot[None, :] * stride_kt + kv_head * stride_kh + offs_d[:, None],
                    mask=mask_n[None, :] & mask_d[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PREC) * pre_scale
        if USE_CAP:
            s = soft_cap(s, logit_cap)
        s = tl.where(mask_n[None, :], s * post_scale, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        v = tl.load(V + slot[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)

        if HAS_LR:
            # A request without an adapter masks every L load off: no bytes move for it.
            mask_lr = mask_n & use_lr
            lr_slot = tl.load(lr_indices + kv_start + offs_n, mask=mask_lr, other=0).to(tl.int64)
            lr_row = tl.multiple_of(lr_slot * stride_lt, LR_ALIGN)
            lr = tl.load(L + lr_row[:, None] + lr_cols[None, :], mask=mask_lr[:, None], other=0.0)
            acc_lr = acc_lr * alpha[:, None] + tl.dot(p.to(lr.dtype), lr, input_precision=DOT_PREC)
        m_i = m_new

    inv_l = 1.0 / l_i
    tl.store(MidO + b * stride_mo_b + split * stride_mo_s + heads[:, None] * stride_mo_h
             + offs_d[None, :], acc * inv_l[:, None], mask=mask_h[:, None] & mask_d[None, :])
    tl.store(MidLSE + b * stride_me_b + split * stride_me_s + heads, m_i + tl.log2(l_i),
             mask=mask_h)
    if HAS_LR:
        tl.store(MidLR + b * stride_ml_b + split * stride_ml_s + heads[:, None] * stride_ml_h
                 + offs_r[None, :], acc_lr * inv_l[:, None], mask=mask_h[:, None])


@triton.jit
def _decode_combine_kernel(
    MidO, MidLR, MidLSE, O, Bw,
    kv_indptr, adapter_ids, num_splits,
    stride_mo_b, stride_mo_s, stride_mo_h,
    stride_ml_b, stride_ml_s, stride_ml_h,
    stride_me_b, stride_me_s,
    stride_ob, stride_oh,
    stride_ba, stride_bh, stride_br,
    window, prefix_lens, num_prefix_chunks,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, RANK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, MAX_SPLITS: tl.constexpr,
    HAS_LR: tl.constexpr, USE_WINDOW: tl.constexpr, HAS_PREFIX: tl.constexpr,
    PREFIX_BLOCK_N: tl.constexpr,
):
    # One program per (request, query head); all splits are loaded at once (a loop over
    # splits would chain their load latencies: with 64 splits that cost as much as stage 1).
    # With a cascade prefix (HAS_PREFIX), slots num_splits.. hold the chunks of the request's
    # shared prefix that the cascade's level 1 wrote (cascade.py); they merge like splits.
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    kv_head = head // GROUP

    skip = 0
    if HAS_PREFIX:
        skip = tl.load(prefix_lens + b)
    kv_start, lo, hi, n_active = _split_bounds(kv_indptr, b, 0, num_splits, window, skip,
                                               BLOCK_N, USE_WINDOW)
    offs_s = tl.arange(0, MAX_SPLITS)
    mask_s = offs_s < n_active
    if HAS_PREFIX:
        _, _, n_prefix = _chunk_bounds(0, skip, 0, num_prefix_chunks, PREFIX_BLOCK_N)
        mask_s = mask_s | ((offs_s >= num_splits) & (offs_s < num_splits + n_prefix))
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = head_dim_mask(HEAD_DIM, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)

    if HAS_LR:
        # Issued first: adapter id -> B is a chain of two dependent loads.
        adapter = tl.load(adapter_ids + b)
        bw = tl.load(Bw + tl.maximum(adapter, 0).to(tl.int64) * stride_ba + kv_head * stride_bh
                     + offs_r[:, None] * stride_br + offs_d[None, :],
                     mask=(offs_r[:, None] < RANK) & (adapter >= 0) & mask_d[None, :], other=0.0)
        lr_s = tl.load(MidLR + b * stride_ml_b + offs_s[:, None] * stride_ml_s + head * stride_ml_h
                       + offs_r[None, :], mask=mask_s[:, None], other=0.0)
    lse = tl.load(MidLSE + b * stride_me_b + offs_s * stride_me_s + head, mask=mask_s,
                  other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # an empty request has no split at all
    w = tl.exp2(lse - m)
    l_sum = tl.sum(w, 0)
    inv_l = tl.where(l_sum > 0, 1.0 / l_sum, 0.0)
    o_s = tl.load(MidO + b * stride_mo_b + offs_s[:, None] * stride_mo_s + head * stride_mo_h
                  + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    out = tl.sum(w[:, None] * o_s, 0) * inv_l
    if HAS_LR:
        p_l = tl.sum(w[:, None] * lr_s, 0) * inv_l  # (P L) for this head, [BLOCK_R]
        out += tl.sum(p_l[:, None] * bw.to(tl.float32), 0)
    tl.store(O + b * stride_ob + head * stride_oh + offs_d, out.to(O.dtype.element_ty),
             mask=mask_d)


def flash_lora_decode(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    out: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    mid_o: torch.Tensor,
    mid_lse: torch.Tensor,
    num_splits: int,
    sm_scale: float,
    logit_cap: float = 0.0,
    lr_buffer: torch.Tensor | None = None,
    lr_indices: torch.Tensor | None = None,
    b_weights: torch.Tensor | None = None,
    adapter_ids: torch.Tensor | None = None,
    mid_lr: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
    window: int | None = None,
    prefix_lens: torch.Tensor | None = None,
    num_prefix_chunks: int = 0,
    prefix_block_n: int = 1,
) -> torch.Tensor:
    """Launch both stages; no allocation, no host sync (config: default_decode_config).

    ``window``: sliding window (common.py: the query at position p sees keys p - window .. p;
    None or -1: all keys). Shapes: q, out ``[batch, H_q, D]``; k/v_buffer ``[slots, H_kv, D]``;
    kv_indptr ``[batch + 1]``; kv_indices / lr_indices ``[kv_indptr[-1]]``;
    lr_buffer ``[lr_slots, R]``; b_weights ``[n_adapters, H_kv, R, D]``; adapter_ids
    ``[batch]`` int32 (-1: none). Workspace: mid_o ``[batch, >= num_splits, H_q, D]`` fp32,
    mid_lse ``[batch, >= num_splits, H_q]`` fp32, mid_lr ``[batch, >= num_splits, H_q, R_pad]``
    fp32. The LR term is on when lr_buffer is given (then all LR arguments are needed).

    Cascade level 2 (cascade.py): ``prefix_lens [batch]`` int32 tokens of each request that
    the cascade's level 1 already covered (0: none), whose ``num_prefix_chunks`` partials
    (chunks of ``prefix_block_n`` tiles) it left in workspace slots ``num_splits ..``; the
    splits then cover the rest and the combine merges both (no window then).
    """
    batch, n_qo, head_dim = q.shape
    n_kv = k_buffer.shape[1]
    check_head_dim(head_dim)
    interpreter_compat()
    group = n_qo // n_kv
    block_h = head_block(group)
    grid_heads = n_kv * triton.cdiv(group, block_h)
    cfg = config or default_decode_config(q.device, q.dtype, head_dim=head_dim)
    prec = dot_precision(q.dtype)
    pre, post = score_scale(sm_scale, logit_cap)
    window = window_or_none(window)

    has_lr = lr_buffer is not None
    if has_lr:
        rank = lr_buffer.shape[1]
        block_r = padded_rank(rank)
        lr_strides = (lr_buffer.stride(0),)
        ml_strides = (mid_lr.stride(0), mid_lr.stride(1), mid_lr.stride(2))
        b_strides = (b_weights.stride(0), b_weights.stride(1), b_weights.stride(2))
    else:
        rank, block_r = 1, 16
        lr_buffer, lr_indices, adapter_ids, mid_lr, b_weights = v_buffer, kv_indices, kv_indptr, mid_o, v_buffer
        lr_strides, ml_strides, b_strides = (0,), (0, 0, 0), (0, 0, 0)

    has_prefix = prefix_lens is not None
    if has_prefix and window >= 0:
        raise ValueError("a cascade prefix cannot be combined with a sliding window")
    prefix_lens = prefix_lens if has_prefix else kv_indptr

    _decode_split_kernel[(grid_heads, batch, num_splits)](
        q, k_buffer, v_buffer, lr_buffer,
        kv_indptr, kv_indices, lr_indices, adapter_ids,
        mid_o, mid_lr, mid_lse,
        pre, post, logit_cap, num_splits,
        q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        *lr_strides,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        *ml_strides,
        mid_lse.stride(0), mid_lse.stride(1),
        window, prefix_lens,
        GROUP=group, BLOCK_H=block_h, HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim),
        RANK=rank, BLOCK_R=block_r, BLOCK_N=cfg.block_n,
        LR_ALIGN=lr_row_alignment(lr_buffer) if has_lr else 1,
        HAS_LR=has_lr, USE_CAP=logit_cap > 0, USE_WINDOW=window >= 0, DOT_PREC=prec,
        HAS_PREFIX=has_prefix,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
    )
    _decode_combine_kernel[(batch, n_qo)](
        mid_o, mid_lr, mid_lse, out, b_weights,
        kv_indptr, adapter_ids, num_splits,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        *ml_strides,
        mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        *b_strides,
        window, prefix_lens, num_prefix_chunks,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim), RANK=rank,
        BLOCK_R=block_r, BLOCK_N=cfg.block_n,
        MAX_SPLITS=triton.next_power_of_2(num_splits + num_prefix_chunks),
        HAS_LR=has_lr, USE_WINDOW=window >= 0, HAS_PREFIX=has_prefix,
        PREFIX_BLOCK_N=prefix_block_n,
        num_warps=4 if q.device.type == "cuda" else 1,
    )
    return out
