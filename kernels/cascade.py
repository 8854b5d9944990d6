"""Cascade Flash-LoRA decode: requests that share a prefix read it once per step.

Role forks over one trajectory decode together, and their KV index lists start with the
same slots (the prefix tree hands every fork the same physical pages). The plain decode
reads that prefix once per request; the cascade splits each request's keys in two:

- level 1 (``_cascade_prefix_kernel``): grid ``(kv heads, member blocks, prefix chunks)``.
  A program takes up to ``MEMBERS`` requests of one group (a "member block") and one chunk
  of their shared prefix; its rows are (member, query head of the kv head) pairs, so a K /
  V_base tile is loaded once for all members: ``S = Q_rows K^T``, ``acc = P V_base``, and
  the LR term ``acc_lr = P L``. Where the prefix's LR rows are shared too (base-lr-shared:
  one LR cache, and the group finder checked the LR slots) L is one tile for all rows;
  otherwise (base-shared: one LR cache per adapter) each member's L rows are gathered
  through its own ``lr_indices`` and multiplied with its own rows of P (``LR_PER_MEMBER``;
  rows of members with the same adapter read the same L rows, from L2). Each member's
  normalised partials and LSE go to its own workspace slots ``num_splits + chunk``.
- level 2: the plain split kernel over each request's own suffix (``prefix_lens[b]`` on;
  a request in no group has prefix 0, i.e. its whole context, as in the plain decode).
- the plain combine merges both levels' partials with their LSE weights, then applies the
  request's B once: ``O = acc + acc_lr @ B`` (exact: the merge is linear in both).

Groups are data on the device (``find_cascade_groups``), prepared once per batch outside
the layers: ``prefix_lens [batch]`` and ``block_members [blocks, MEMBERS]`` (-1 padded),
both of fixed size for a batch size, so a captured CUDA graph replays correctly after they
are refilled in place. Level 1's grid covers ``member_blocks(batch, MEMBERS)`` blocks (the
most that groups of >= 2 requests can fill, about batch / 2); empty ones exit at once.
"""

from __future__ import annotations

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
)
from .decode import DecodeConfig, _chunk_bounds, flash_lora_decode

def members_per_block(group: int, lr_per_member: bool, head_dim: int = 128) -> int:
    """Requests per level-1 program (at least 2): as many GQA groups as fit 64 rows (member
    x query head), at most 16; 16 rows and 8 members when each member's L tile is
    multiplied on its own (one ``tl.dot`` per member and tile) or past head_dim 128. The
    offline sm_90 compiles of kernels/NOTES.md item 8 spill beyond that (255 registers)."""
    narrow = lr_per_member or head_dim_block(head_dim) > 128
    return max(2, min(8 if narrow else 16, (16 if narrow else 64) // group))


def member_blocks(batch: int, members: int) -> int:
    """The most member blocks groups of >= 2 requests can fill: ``ceil(s / M) <= s / 2`` for
    every group size s >= 2 when M >= 3 (pairs reach it); with M = 2, groups of 3 take 2
    blocks each, ``2 / 3`` of the batch."""
    return batch // 2 if members >= 3 else 2 * batch // 3


def prefix_rows_block(group: int, members: int) -> int:
    """``BLOCK_M``: the level-1 rows padded to a power of two ``tl.dot`` accepts (>= 16)."""
    return max(16, triton.next_power_of_2(group * members))


def default_prefix_config(device: torch.device, dtype: torch.dtype, block_m: int,
                          head_dim: int = 128) -> DecodeConfig:
    """Level-1 tiles (not yet measured on a GPU; kernels/NOTES.md, item 8): the decode's
    64-token, 3-stage tiles, 8 warps for 64-row programs (their fp32 accumulators would
    take 64 registers per thread at 4 warps); half the tokens per tile past head_dim 128."""
    if device.type != "cuda":
        return DecodeConfig(block_n=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return DecodeConfig(block_n=16, num_warps=4, num_stages=1)
    shrink = max(1, head_dim_block(head_dim) // 128)
    return DecodeConfig(block_n=64 // shrink, num_warps=8 if block_m >= 64 else 4, num_stages=3)


def find_cascade_groups(kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                        prefix_lens: torch.Tensor, block_members: torch.Tensor, *,
                        min_shared_len: int, min_group_size: int = 2,
                        lr_indices: torch.Tensor | None = None,
                        num_entries: int | None = None) -> None:
    """Find the batch's groups and write them into ``prefix_lens`` / ``block_members``.

    Device tensor ops of fixed shapes for a batch size, no host sync: kv_indptr
    ``[batch + 1]``, kv_indices (and lr_indices) ``[>= kv_indptr[-1]]``; ``num_entries``
    (host int, optional) is ``kv_indptr[-1]`` when kv_indices is a larger persistent buffer.
    Out: prefix_lens ``[batch]`` int32, block_members ``[member_blocks(batch, M), M]`` int32.

    1. Candidates: requests longer than ``min_shared_len`` whose slot at position
       ``min_shared_len - 1`` is the same. In a token-granular prefix tree a KV slot holds
       one token after one prefix, so equal slots there mean equal slots before it.
    2. The group's prefix: the first position where a member's slots differ from the first
       member's (its "leader"), at most one short of either length (each request keeps its
       own current token), minimised over the group; with ``lr_indices`` (a shared LR cache)
       a differing LR slot ends it too. Nothing is assumed from step 1: this comparison
       alone decides what level 1 reads for every member.
    3. Groups of at least ``min_group_size`` requests sharing at least ``min_shared_len``
       tokens are kept; the rest get prefix 0 (the plain decode for them). A kept group's
       members, in batch order, fill member blocks of ``M`` requests.

    One level of sharing per request: the key is the slot at ``min_shared_len - 1``, so where
    two trajectories share a system prompt longer than that, the forks of both form one
    group over the prompt only, and each fork reads its trajectory in level 2.
    """
    batch = kv_indptr.numel() - 1
    n_blocks, per_block = block_members.shape
    if n_blocks != member_blocks(batch, per_block):
        raise ValueError(f"block_members needs {member_blocks(batch, per_block)} rows for "
                         f"{batch} requests, has {n_blocks}")
    if min_group_size < 2 or min_shared_len < 1:
        raise ValueError("a group needs >= 2 requests sharing >= 1 token")
    n = kv_indices.numel() if num_entries is None else num_entries
    prefix_lens.zero_()
    block_members.fill_(-1)
    if batch < min_group_size or n == 0:
        return
    device = kv_indptr.device
    indptr = kv_indptr.long()
    start, lens = indptr[:-1], indptr[1:] - indptr[:-1]
    req = torch.arange(batch, device=device)

    long_enough = lens > min_shared_len
    key_at = (start + min_shared_len - 1).clamp(0, n - 1)
    key = torch.where(long_enough, kv_indices[key_at].long(), -1 - req)
    same = key[:, None] == key[None, :]
    leader = same.int().argmax(1)  # the first request with the same key

    owner = torch.repeat_interleave(req, lens, output_size=n)
    pos = torch.arange(n, device=device) - start[owner]
    limit = (torch.minimum(lens, lens[leader]) - 1).clamp(min=0)
    inside = pos < limit[owner]
    theirs = torch.where(inside, start[leader[owner]] + pos, 0)
    differs = kv_indices[:n] != kv_indices[theirs]
    if lr_indices is not None:
        differs |= lr_indices[:n] != lr_indices[theirs]
    first_diff = torch.where(inside & differs, pos, limit[owner])
    shared = limit.scatter_reduce(0, owner, first_diff, "amin")

    group_len = torch.full_like(shared, n).scatter_reduce(0, leader, shared, "amin")
    group_size = torch.zeros_like(shared).index_add_(0, leader, torch.ones_like(shared))
    member = (long_enough & (group_size[leader] >= min_group_size)
              & (group_len[leader] >= min_shared_len))
    prefix_lens.copy_(torch.where(member, group_len[leader], 0))

    earlier = (same & member[None, :] & (req[None, :] < req[:, None])).sum(1)
    blocks_of = torch.where(member & (leader == req), (group_size + per_block - 1) // per_block, 0)
    first_block = torch.cumsum(blocks_of, 0) - blocks_of
    block = torch.where(member, first_block[leader] + earlier // per_block, n_blocks)
    table = torch.full((n_blocks + 1, per_block), -1, dtype=block_members.dtype, device=device)
    table[block, earlier % per_block] = req.to(block_members.dtype)  # row n_blocks: the rest
    block_members.copy_(table[:n_blocks])


@triton.jit
def _cascade_prefix_kernel(
    Q, K, V, L,
    kv_indptr, kv_indices, lr_indices, adapter_ids, prefix_lens, block_members,
    MidO, MidLR, MidLSE,
    pre_scale, post_scale, logit_cap, num_chunks,
    stride_qb, stride_qh,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_lt,
    stride_bm,
    stride_mo_b, stride_mo_s, stride_mo_h,
    stride_ml_b, stride_ml_s, stride_ml_h,
    stride_me_b, stride_me_s,
    GROUP: tl.constexpr, MEMBERS: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, RANK: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, LR_ALIGN: tl.constexpr, HAS_LR: tl.constexpr,
    LR_PER_MEMBER: tl.constexpr, USE_CAP: tl.constexpr, DOT_PREC: tl.constexpr,
):
    kv_head = tl.program_id(0)
    blk = tl.program_id(1)
    chunk = tl.program_id(2)
    members_row = block_members + blk * stride_bm

    # Every member lists the same slots over the prefix: read them through the first's.
    first = tl.load(members_row)
    if first < 0:
        return
    prefix = tl.load(prefix_lens + first)
    lo, hi, _ = _chunk_bounds(0, prefix, chunk, num_chunks, BLOCK_N)
    if lo >= hi:
        return
    kv_start = tl.load(kv_indptr + first)

    # Row r is query head (r % GROUP) of this kv head for member (r // GROUP) of the block.
    rows = tl.arange(0, BLOCK_M)
    member_of_row = rows // GROUP
    member = tl.load(members_row + member_of_row, mask=member_of_row < MEMBERS, other=-1)
    mask_m = member >= 0
    b = tl.maximum(member, 0).to(tl.int64)
    heads = kv_head * GROUP + rows % GROUP

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = head_dim_mask(HEAD_DIM, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    lr_cols = offs_r % RANK  # padding columns re-read the row's values (decode.py)
    # Rows without a member load q = 0: their scores stay finite and they are never stored.
    q = tl.load(Q + b[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if HAS_LR:
        block_uses_lr = tl.max(tl.load(adapter_ids + b, mask=mask_m, other=-1), 0) >= 0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_lr = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)

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
            acc_lr = acc_lr * alpha[:, None]
            if LR_PER_MEMBER:
                # Member j's L rows meet only its own rows of P (the others' are zeroed).
                for j in tl.static_range(MEMBERS):
                    req_j = tl.load(members_row + j)
                    use_j = (req_j >= 0) & (tl.load(adapter_ids + tl.maximum(req_j, 0)) >= 0)
                    start_j = tl.load(kv_indptr + tl.maximum(req_j, 0))
                    mask_lr = mask_n & use_j
                    lr_slot = tl.load(lr_indices + start_j + offs_n, mask=mask_lr,
                                      other=0).to(tl.int64)
                    lr_row = tl.multiple_of(lr_slot * stride_lt, LR_ALIGN)
                    lr = tl.load(L + lr_row[:, None] + lr_cols[None, :], mask=mask_lr[:, None],
                                 other=0.0)
                    p_j = tl.where(member_of_row[:, None] == j, p, 0.0)
                    acc_lr += tl.dot(p_j.to(lr.dtype), lr, input_precision=DOT_PREC)
            else:
                mask_lr = mask_n & block_uses_lr
                lr_slot = tl.load(lr_indices + kv_start + offs_n, mask=mask_lr,
                                  other=0).to(tl.int64)
                lr_row = tl.multiple_of(lr_slot * stride_lt, LR_ALIGN)
                lr = tl.load(L + lr_row[:, None] + lr_cols[None, :], mask=mask_lr[:, None],
                             other=0.0)
                acc_lr += tl.dot(p.to(lr.dtype), lr, input_precision=DOT_PREC)
        m_i = m_new

    inv_l = 1.0 / l_i
    tl.store(MidO + b[:, None] * stride_mo_b + chunk * stride_mo_s + heads[:, None] * stride_mo_h
             + offs_d[None, :], acc * inv_l[:, None], mask=mask_m[:, None] & mask_d[None, :])
    tl.store(MidLSE + b * stride_me_b + chunk * stride_me_s + heads, m_i + tl.log2(l_i),
             mask=mask_m)
    if HAS_LR:
        tl.store(MidLR + b[:, None] * stride_ml_b + chunk * stride_ml_s
                 + heads[:, None] * stride_ml_h + offs_r[None, :], acc_lr * inv_l[:, None],
                 mask=mask_m[:, None])


def flash_lora_cascade_decode(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    out: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    block_members: torch.Tensor,
    mid_o: torch.Tensor,
    mid_lse: torch.Tensor,
    num_splits: int,
    num_prefix_chunks: int,
    sm_scale: float,
    logit_cap: float = 0.0,
    lr_buffer: torch.Tensor | None = None,
    lr_indices: torch.Tensor | None = None,
    b_weights: torch.Tensor | None = None,
    adapter_ids: torch.Tensor | None = None,
    mid_lr: torch.Tensor | None = None,
    lr_per_member: bool = False,
    config: DecodeConfig | None = None,
    prefix_config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Level 1, then level 2 and the combine (``flash_lora_decode``); no allocation, no
    host sync. Arguments as for ``flash_lora_decode`` plus the groups (``prefix_lens
    [batch]``, ``block_members [blocks, M]`` from ``find_cascade_groups``); the
    workspace holds ``num_splits + num_prefix_chunks`` slots per request. ``lr_per_member``:
    the prefix's L rows are read through each member's own ``lr_indices`` (base-shared);
    otherwise through the first member's (the group finder compared the LR slots).
    """
    batch, n_qo, head_dim = q.shape
    n_kv = k_buffer.shape[1]
    check_head_dim(head_dim)
    interpreter_compat()
    group = n_qo // n_kv
    n_blocks, members = block_members.shape
    block_m = prefix_rows_block(group, members)
    cfg = prefix_config or default_prefix_config(q.device, q.dtype, block_m, head_dim)
    pre, post = score_scale(sm_scale, logit_cap)
    if mid_o.shape[1] < num_splits + num_prefix_chunks:
        raise ValueError("the workspace needs num_splits + num_prefix_chunks slots per request")

    has_lr = lr_buffer is not None
    if has_lr:
        rank, block_r = lr_buffer.shape[1], padded_rank(lr_buffer.shape[1])
        lr_args = (lr_buffer, lr_indices, adapter_ids, mid_lr[:, num_splits:])
        lr_strides = (lr_buffer.stride(0),)
        ml_strides = (mid_lr.stride(0), mid_lr.stride(1), mid_lr.stride(2))
    else:
        rank, block_r = 1, 16
        lr_args = (v_buffer, kv_indices, kv_indptr, mid_o[:, num_splits:])
        lr_strides, ml_strides = (0,), (0, 0, 0)
    lr_buf, lr_idx, adapters, mid_lr_prefix = lr_args

    if n_blocks:
        _cascade_prefix_kernel[(n_kv, n_blocks, num_prefix_chunks)](
            q, k_buffer, v_buffer, lr_buf,
            kv_indptr, kv_indices, lr_idx, adapters, prefix_lens, block_members,
            mid_o[:, num_splits:], mid_lr_prefix, mid_lse[:, num_splits:],
            pre, post, logit_cap, num_prefix_chunks,
            q.stride(0), q.stride(1),
            k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
            *lr_strides,
            block_members.stride(0),
            mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
            *ml_strides,
            mid_lse.stride(0), mid_lse.stride(1),
            GROUP=group, MEMBERS=members, BLOCK_M=block_m, HEAD_DIM=head_dim,
            BLOCK_D=head_dim_block(head_dim), RANK=rank, BLOCK_R=block_r, BLOCK_N=cfg.block_n,
            LR_ALIGN=lr_row_alignment(lr_buffer) if has_lr else 1, HAS_LR=has_lr,
            LR_PER_MEMBER=lr_per_member, USE_CAP=logit_cap > 0,
            DOT_PREC=dot_precision(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
        )
    return flash_lora_decode(
        q, k_buffer, v_buffer, out, kv_indptr, kv_indices, mid_o, mid_lse, num_splits, sm_scale,
        logit_cap, lr_buffer=lr_buffer, lr_indices=lr_indices, b_weights=b_weights,
        adapter_ids=adapter_ids, mid_lr=mid_lr, config=config, prefix_lens=prefix_lens,
        num_prefix_chunks=num_prefix_chunks, prefix_block_n=cfg.block_n,
    )
