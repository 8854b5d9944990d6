"""Benchmark the Flash-LoRA kernels on a GPU (served models' attention shapes, bf16).

Shapes (``--shapes``, all by default): Llama-3.1-8B (32 q / 8 kv heads, head_dim 128),
Qwen2.5-7B (28 / 4: GQA group 7), Gemma-2-9B's global layers (16 / 8, head_dim 256,
soft-cap 50) and its sliding-window layers (the same with a window of 4096 - 1).
For each shape and (batch, context) it times, in one run (median of CUDA-event timings via
``triton.testing.do_bench``): our kernel with the LR term for each rank, (a) our kernel with
the LR term off, (b) materialising V = V_base + L B into a pool copy and running (a) on it,
(c) SGLang 0.5.17's triton kernels on the same pools without LoRA (not for windowed shapes:
they take window-sliced indices), (d) FlashInfer's paged wrappers (page size 1, SGLang's
settings, with the shape's ``window_left`` and soft-cap), (e) torch SDPA flash on dense
tensors (extend only, no window), plus a device-to-device copy for the bandwidth ceiling.

Decode: one query per request over ``context`` cached tokens. Extend: ``min(context,
--extend-len)`` new tokens per request on top of a cached prefix of the rest.
Slots are shuffled (token-granular, non-contiguous); LR slots are a separate pool; each
request uses adapter ``b % 3``.

    python3 scripts/bench_kernels.py --part decode --out results.json

``--part cascade`` (issue 19): role forks decoding over one shared trajectory, ``--forks``
cases of (forks, shared prefix, own suffix), 8 x 32k + 256 and 32 x 8k + 256 by default:
our cascade decode (kernels/cascade.py) with the prefix's LR rows shared (base-lr-shared)
and one copy per adapter (base-shared), LR on and off, against our plain decode (the
current one), FlashInfer's two-level ``MultiLevelCascadeAttentionWrapper`` (LR off) and
its plain batch decode (LR off); plus the per-step group search, and the bytes of K /
V_base each reads. ``--part sweep-cascade``: level-1 options (members per program, tiles,
chunk counts) for the same cases, each against the plain decode in the same run;
``--part profile-cascade``: the plain and the cascade call of each case for ncu.

Prints the tables last and writes every number to JSON (``--out``, default $OUT/...).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from lragent_sglang.kernels import (
    DecodeConfig,
    FlashLoRACascadeDecodeWrapper,
    FlashLoRADecodeWrapper,
    FlashLoRAExtendWrapper,
)

logger = logging.getLogger("bench_kernels")

N_ADAPTERS = 3
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Shape:
    """One model's attention layer: heads, head dim, soft-cap and sliding window (SGLang's
    ``sliding_window_size``: the query at position p sees keys p - window .. p)."""

    name: str
    n_qo: int
    n_kv: int
    head_dim: int
    logit_cap: float = 0.0
    window: int | None = None

    def label(self) -> str:
        extra = (f", cap {self.logit_cap:g}" if self.logit_cap else "") + (
            f", window {self.window}" if self.window is not None else "")
        return f"{self.name} ({self.n_qo} q / {self.n_kv} kv, D {self.head_dim}{extra})"


SHAPES = {s.name: s for s in (
    Shape("llama3.1-8b", 32, 8, 128),
    Shape("qwen2.5-7b", 28, 4, 128),
    Shape("gemma2-9b", 16, 8, 256, logit_cap=50.0),
    Shape("gemma2-9b-local", 16, 8, 256, logit_cap=50.0, window=4095),
)}


def seen_keys(pos: int, window: int | None) -> int:
    """Keys a query at position ``pos`` attends to (causal, within the window)."""
    return pos + 1 if window is None else min(pos + 1, window + 1)


def bench(fn: Callable[[], object], graph: bool = False, rep_ms: float = 200.0) -> float:
    """Median time in ms from CUDA events after warm-up.

    ``graph``: time replays of a CUDA graph holding back-to-back calls (how SGLang runs
    decode; no Python launch overhead, no L2 flush between calls). Otherwise triton's
    do_bench, which flushes L2 before each call. Falls back to do_bench if capture fails.
    """
    if graph:
        try:
            return do_bench_cudagraph(fn, rep=rep_ms / 4, return_mode="median")
        except Exception as exc:  # noqa: BLE001
            logger.warning("CUDA-graph timing failed (%s); timing eagerly", exc)
            torch.cuda.synchronize()
    return do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def try_bench(name: str, fn: Callable[[], object], **kw) -> float | None:
    """A failing baseline is logged and recorded as missing, not fatal."""
    try:
        return bench(fn, **kw)
    except Exception as exc:  # noqa: BLE001 (third-party baselines fail in many ways)
        logger.warning("%s failed: %s: %s", name, type(exc).__name__, str(exc)[:300])
        return None


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 2 GiB, counting bytes read plus bytes written."""
    src = torch.empty(2**30, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


class Pools:
    """K / V_base pools and an LR pool per rank with shuffled slots for ``lens`` tokens."""

    def __init__(self, shape: Shape, n_tokens: int, ranks: list[int], seed: int = 0,
                 device: str = "cuda") -> None:
        torch.manual_seed(seed)
        self.shape = shape
        n_kv, d = shape.n_kv, shape.head_dim
        slots = n_tokens + 1  # slot 0 is SGLang's padding slot
        self.k = torch.randn(slots, n_kv, d, dtype=DTYPE, device=device)
        self.v = torch.randn(slots, n_kv, d, dtype=DTYPE, device=device)
        self.slot_of = (torch.randperm(n_tokens, device=device) + 1).to(torch.int32)
        self.lr_slot_of = (torch.randperm(n_tokens, device=device) + 1).to(torch.int32)
        self.lr = {r: torch.randn(slots, r, dtype=DTYPE, device=device) for r in ranks}
        self.b = {r: (torch.randn(N_ADAPTERS, n_kv, r, d, device=device) * 0.3 / math.sqrt(r)).to(DTYPE)
                  for r in ranks}
        self.v_mat = torch.empty_like(self.v)
        # do_bench_cudagraph times on a side stream: the inputs must be written before it.
        if device == "cuda":
            torch.cuda.synchronize()

    def materialise(self, rank: int, token_pos: torch.Tensor, tokens_per_req: int,
                    adapter_of_req: torch.Tensor) -> None:
        """v_mat[slot] = V_base[slot] + L[lr_slot] B[adapter] for the listed token positions."""
        n_kv, d = self.shape.n_kv, self.shape.head_dim
        slots = self.slot_of[token_pos].long()
        lr = self.lr[rank][self.lr_slot_of[token_pos].long()].view(-1, tokens_per_req, rank)
        b = self.b[rank].permute(0, 2, 1, 3).reshape(N_ADAPTERS, rank, n_kv * d)
        delta = torch.bmm(lr, b[adapter_of_req.long()]).view(-1, n_kv, d)
        self.v_mat.index_copy_(0, slots, self.v[slots] + delta)


class DecodeBatch:
    """One query token per request over ``ctx`` cached tokens each, in shuffled pools."""

    def __init__(self, shape: Shape, batch: int, ctx: int, ranks: list[int],
                 device: str = "cuda") -> None:
        self.shape, self.batch, self.ctx = shape, batch, ctx
        self.pools = Pools(shape, batch * ctx, ranks, device=device)
        self.kv_indptr = torch.arange(batch + 1, device=device, dtype=torch.int32) * ctx
        self.adapters = torch.arange(batch, device=device, dtype=torch.int32) % N_ADAPTERS
        self.q = torch.randn(batch, shape.n_qo, shape.head_dim, dtype=DTYPE, device=device)
        self.out = torch.empty_like(self.q)
        if device == "cuda":
            torch.cuda.synchronize()  # graph timing runs on a side stream (see Pools)

    def planned(self, config: DecodeConfig | None = None,
                num_kv_splits: int | None = None) -> FlashLoRADecodeWrapper:
        """Our decode wrapper planned for this batch (default tiles and split count unless
        ``config`` / ``num_kv_splits``)."""
        s = self.shape
        w = FlashLoRADecodeWrapper(s.n_qo, s.n_kv, s.head_dim, max_batch_size=self.batch,
                                   config=config, device=self.q.device)
        w.plan(self.kv_indptr, self.pools.slot_of, self.pools.lr_slot_of, self.adapters,
               logit_cap=s.logit_cap, max_kv_len=self.ctx, num_kv_splits=num_kv_splits)
        return w

    def run_off(self, w: FlashLoRADecodeWrapper, v: torch.Tensor | None = None) -> torch.Tensor:
        """LR off, over V_base (or ``v``, a materialised pool)."""
        return w.run(self.q, self.pools.k, self.pools.v if v is None else v, out=self.out,
                     window=self.shape.window)

    def run_lr(self, w: FlashLoRADecodeWrapper, rank: int) -> torch.Tensor:
        return w.run(self.q, self.pools.k, self.pools.v, self.pools.lr[rank], self.pools.b[rank],
                     out=self.out, window=self.shape.window)


class ExtendBatch:
    """``ext`` new tokens per request after a cached prefix of ``ctx - ext`` tokens over
    shuffled pools, planned on our extend wrapper. Request b owns positions b*ctx ..
    b*ctx+ctx-1: the first ``ctx - ext`` are cached, the rest new."""

    def __init__(self, shape: Shape, batch: int, ctx: int, ext: int, ranks: list[int]) -> None:
        self.shape = shape
        self.pre = pre = ctx - ext
        self.pools = pools = Pools(shape, batch * ctx, ranks)
        self.pos = torch.arange(batch * ctx, device="cuda").view(batch, ctx)
        pre_pos, ext_pos = self.pos[:, :pre].reshape(-1), self.pos[:, pre:].reshape(-1)
        i32 = dict(dtype=torch.int32, device="cuda")
        self.qo_indptr = torch.arange(batch + 1, **i32) * ext
        self.kv_indptr = torch.arange(batch + 1, **i32) * pre
        self.kv_indices = pools.slot_of[pre_pos].contiguous()
        self.adapters = torch.arange(batch, **i32) % N_ADAPTERS
        self.ext_slots = pools.slot_of[ext_pos].long()
        self.k_ext, self.v_ext = pools.k[self.ext_slots], pools.v[self.ext_slots]
        self.lr_ext = {r: pools.lr[r][pools.lr_slot_of[ext_pos].long()] for r in ranks}
        self.q = torch.randn(batch * ext, shape.n_qo, shape.head_dim, dtype=DTYPE, device="cuda")
        self.out = torch.empty_like(self.q)
        self.wrapper = FlashLoRAExtendWrapper(shape.n_qo, shape.n_kv, shape.head_dim)
        self.wrapper.plan(self.qo_indptr, self.kv_indptr, self.kv_indices,
                          pools.lr_slot_of[pre_pos].contiguous(), self.adapters,
                          max_extend_len=ext, max_prefix_len=pre, logit_cap=shape.logit_cap)

    def run_off(self, v_ext: torch.Tensor | None = None, v: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Our kernel with the LR term off (over ``v_ext`` / ``v``: a materialised pool)."""
        return self.wrapper.run(self.q, self.k_ext, self.v_ext if v_ext is None else v_ext,
                                self.pools.k, self.pools.v if v is None else v, out=self.out,
                                window=self.shape.window)

    def run_lr(self, rank: int) -> torch.Tensor:
        """Our kernel with the LR term of rank ``rank``."""
        return self.wrapper.run(self.q, self.k_ext, self.v_ext, self.pools.k, self.pools.v,
                                self.lr_ext[rank], self.pools.lr[rank], self.pools.b[rank],
                                out=self.out, window=self.shape.window)


class ForkBatch:
    """``forks`` requests over one trajectory of ``prefix`` tokens (the same KV slots in
    every request's list, as the prefix tree hands them out) plus ``suffix`` tokens of
    their own, over shuffled slots; fork b uses adapter ``b % 3``. LR slots: one copy of
    the prefix's rows (base-lr-shared: ``lr_shared``) and one per adapter (base-shared:
    ``lr_per_adapter``), then each fork's own rows."""

    def __init__(self, shape: Shape, forks: int, prefix: int, suffix: int, ranks: list[int],
                 device: str = "cuda", dtype: torch.dtype = DTYPE, min_shared: int = 256) -> None:
        self.shape, self.forks, self.prefix, self.suffix = shape, forks, prefix, suffix
        self.min_shared = min_shared
        n_kv, d = shape.n_kv, shape.head_dim
        dev = dict(device=device)
        torch.manual_seed(0)
        n_tok = prefix + forks * suffix
        self.k = torch.randn(n_tok + 1, n_kv, d, dtype=dtype, **dev)  # slot 0: padding
        self.v = torch.randn(n_tok + 1, n_kv, d, dtype=dtype, **dev)
        slots = (torch.randperm(n_tok, **dev) + 1).to(torch.int32)
        own = slots[prefix:].view(forks, suffix)
        self.kv_indices = torch.cat([torch.cat([slots[:prefix], own[b]]) for b in range(forks)])
        n_lr = prefix * N_ADAPTERS + forks * suffix
        lr_slots = (torch.randperm(n_lr, **dev) + 1).to(torch.int32)
        lr_prefix = lr_slots[: prefix * N_ADAPTERS].view(N_ADAPTERS, prefix)
        lr_own = lr_slots[prefix * N_ADAPTERS:].view(forks, suffix)
        self.lr_shared = torch.cat([torch.cat([lr_prefix[0], lr_own[b]]) for b in range(forks)])
        self.lr_per_adapter = torch.cat([torch.cat([lr_prefix[b % N_ADAPTERS], lr_own[b]])
                                         for b in range(forks)])
        self.lr = {r: torch.randn(n_lr + 1, r, dtype=dtype, **dev) for r in ranks}
        self.b = {r: (torch.randn(N_ADAPTERS, n_kv, r, d, **dev) * 0.3 / math.sqrt(r)).to(dtype)
                  for r in ranks}
        i32 = dict(dtype=torch.int32, **dev)
        self.kv_indptr = torch.arange(forks + 1, **i32) * (prefix + suffix)
        self.adapters = torch.arange(forks, **i32) % N_ADAPTERS
        self.q = torch.randn(forks, shape.n_qo, d, dtype=dtype, **dev)
        self.out = torch.empty_like(self.q)
        if device == "cuda":
            torch.cuda.synchronize()  # graph timing runs on a side stream (see Pools)

    def planned(self, cascade: bool, lr_shared: bool = True, members: int | None = None,
                prefix_config: DecodeConfig | None = None,
                num_prefix_chunks: int | None = None) -> FlashLoRADecodeWrapper:
        """Our plain decode wrapper, or the cascade one (level-1 options: the wrapper's
        defaults unless given), planned for this batch."""
        s, dev = self.shape, self.q.device
        lr_idx = self.lr_shared if lr_shared else self.lr_per_adapter
        max_kv_len = self.prefix + self.suffix
        if not cascade:
            w = FlashLoRADecodeWrapper(s.n_qo, s.n_kv, s.head_dim, max_batch_size=self.forks,
                                       device=dev)
            w.plan(self.kv_indptr, self.kv_indices, lr_idx, self.adapters, logit_cap=s.logit_cap,
                   max_kv_len=max_kv_len)
            return w
        w = FlashLoRACascadeDecodeWrapper(s.n_qo, s.n_kv, s.head_dim, lr_shared=lr_shared,
                                          min_shared_len=self.min_shared, max_batch_size=self.forks,
                                          device=dev, members=members, prefix_config=prefix_config)
        w.plan(self.kv_indptr, self.kv_indices, lr_idx, self.adapters, logit_cap=s.logit_cap,
               max_kv_len=max_kv_len, num_prefix_chunks=num_prefix_chunks)
        return w

    def run(self, w: FlashLoRADecodeWrapper, rank: int | None = None) -> torch.Tensor:
        """One layer, LR off (``rank`` None) or with the LR term of that rank."""
        lr = (self.lr[rank], self.b[rank]) if rank is not None else (None, None)
        return w.run(self.q, self.k, self.v, *lr, out=self.out, window=self.shape.window)


def max_rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return (out.float() - ref).abs().max().item() / ref.abs().max().item()


def cascade_shape(shape: Shape, forks: int, prefix: int, suffix: int, ranks: list[int], fi,
                  device: str = "cuda", dtype: torch.dtype = DTYPE, min_shared: int = 256) -> dict:
    """Our cascade decode against our plain decode and FlashInfer's (see the docstring)."""
    n_qo, n_kv, d = shape.n_qo, shape.n_kv, shape.head_dim
    fb = ForkBatch(shape, forks, prefix, suffix, ranks, device, dtype, min_shared)
    res: dict = dict(shape=shape.name, forks=forks, prefix=prefix, suffix=suffix)
    token_bytes = n_kv * d * 2 * dtype.itemsize  # K and V_base of one token
    res["bytes_plain"] = forks * (prefix + suffix) * token_bytes
    res["bytes_cascade"] = (prefix + forks * suffix) * token_bytes

    plain, shared, per_adapter = fb.planned(False), fb.planned(True), fb.planned(True, False)
    res["groups"] = shared.prefix_lens.count_nonzero().item()
    res["prefix_chunks"] = shared.num_prefix_chunks
    # each cascade must agree with the plain decode over the same LR rows (the tests' float64
    # reference is exact)
    diffs = []
    for cascade, reference in ((shared, plain), (per_adapter, fb.planned(False, False))):
        ref = fb.run(reference, ranks[0]).float().clone()
        diffs.append(max_rel_diff(fb.run(cascade, ranks[0]), ref))
    res["max_rel_diff"] = max(diffs)
    res["group_search_ms"] = bench(lambda: shared.find_groups(fb.kv_indptr, fb.kv_indices,
                                                              fb.lr_shared))
    res["plain_lr_off"] = bench(lambda: fb.run(plain), graph=True)
    res["cascade_lr_off"] = bench(lambda: fb.run(shared), graph=True)
    for r in ranks:
        res[f"plain_lr{r}"] = bench(lambda: fb.run(plain, r), graph=True)
        res[f"cascade_lr{r}"] = bench(lambda: fb.run(shared, r), graph=True)
        res[f"cascade_per_adapter_lr{r}"] = bench(lambda: fb.run(per_adapter, r), graph=True)
    if fi is not None:
        i32 = dict(dtype=torch.int32, device=device)
        cache = (fb.k.unsqueeze(1), fb.v.unsqueeze(1))  # page size 1
        scale = d ** -0.5
        own = fb.kv_indices.view(forks, prefix + suffix)[:, prefix:].reshape(-1).contiguous()

        def fi_cascade():
            ws = torch.zeros(512 * 2**20, dtype=torch.uint8, device=device)
            fw = fi.MultiLevelCascadeAttentionWrapper(2, ws, "NHD")
            fw.plan([torch.tensor([0, forks], **i32), torch.arange(forks + 1, **i32)],
                    [torch.tensor([0, prefix], **i32), torch.arange(forks + 1, **i32) * suffix],
                    [fb.kv_indices[:prefix].contiguous(), own],
                    [torch.ones(1, **i32), torch.ones(forks, **i32)],
                    n_qo, n_kv, d, 1, sm_scale=scale, logits_soft_cap=shape.logit_cap or None,
                    q_data_type=dtype, kv_data_type=dtype)
            torch.cuda.synchronize()
            return lambda: fw.run(fb.q, cache)

        def fi_decode():
            ws = torch.zeros(512 * 2**20, dtype=torch.uint8, device=device)
            fw = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
            fw.plan(fb.kv_indptr, fb.kv_indices, torch.ones(forks, **i32), n_qo, n_kv, d, 1,
                    q_data_type=dtype, kv_data_type=dtype, sm_scale=scale,
                    logits_soft_cap=shape.logit_cap or None)
            torch.cuda.synchronize()
            return lambda: fw.run(fb.q, cache)

        for name, setup in (("flashinfer_cascade", fi_cascade), ("flashinfer_decode", fi_decode)):
            try:
                res[name] = try_bench(name, setup(), graph=True)
            except Exception as exc:  # noqa: BLE001
                logger.warning("%s plan failed: %s", name, exc)
    del fb
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def load_sglang() -> dict[str, Callable]:
    try:
        from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
        from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd
        from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton
    except Exception as exc:  # noqa: BLE001
        logger.warning("sglang kernels unavailable: %s", exc)
        return {}
    return dict(decode=decode_attention_fwd, extend=extend_attention_fwd,
                splits=get_num_kv_splits_triton)


def load_flashinfer():
    try:
        import flashinfer
    except Exception as exc:  # noqa: BLE001
        logger.warning("flashinfer unavailable: %s", exc)
        return None
    return flashinfer


def decode_shape(shape: Shape, batch: int, ctx: int, ranks: list[int], sgl: dict, fi,
                 sms: int) -> dict:
    n_kv, d = shape.n_kv, shape.head_dim
    d_batch = DecodeBatch(shape, batch, ctx, ranks)
    pools, kv_indptr, kv_indices, q, out = (d_batch.pools, d_batch.kv_indptr,
                                            d_batch.pools.slot_of, d_batch.q, d_batch.out)
    scale = d ** -0.5
    seen = seen_keys(ctx - 1, shape.window)
    res: dict = dict(shape=shape.name, batch=batch, ctx=ctx, seen=seen)

    w = d_batch.planned()
    res["splits"] = w.splits_and_tiles(shape.window)[0]
    res["ours_lr_off"] = bench(lambda: d_batch.run_off(w), graph=True)
    # a materialising server would build V for the keys the query sees only
    seen_pos = torch.arange(batch * ctx, device="cuda").view(batch, ctx)[:, ctx - seen:].reshape(-1)
    for r in ranks:
        res[f"ours_lr{r}"] = bench(lambda: d_batch.run_lr(w, r), graph=True)

        def materialised() -> None:
            pools.materialise(r, seen_pos, seen, d_batch.adapters)
            d_batch.run_off(w, pools.v_mat)
        res[f"materialise_lr{r}"] = bench(materialised, graph=True)

    kv_bytes = batch * seen * (n_kv * d * 2 * 2 + 4)
    res["bytes_lr_off"] = kv_bytes
    for r in ranks:
        res[f"bytes_lr{r}"] = kv_bytes + batch * seen * (r * 2 + 4)

    if sgl and shape.window is None:
        max_splits = 8  # SGLang's default --triton-attention-num-kv-splits
        num_splits = torch.empty(batch, dtype=torch.int32, device="cuda")
        sgl["splits"][(1,)](num_splits, kv_indptr[1:] - kv_indptr[:-1], batch, 1, shape.n_qo,
                            n_kv, max_splits, sms, MAX_NUM_SEQ=max(256, triton.next_power_of_2(batch)))
        torch.cuda.synchronize()
        logits = torch.empty(batch, shape.n_qo, max_splits, d, dtype=torch.float32, device="cuda")
        lse = torch.empty(batch, shape.n_qo, max_splits, dtype=torch.float32, device="cuda")
        # int64 as SGLang's backend passes them: its kernels multiply the loaded slot by the
        # row stride in the index dtype, and 2M slots x 2,048 elements (Gemma-2, 64 x 32k)
        # overflow int32 (the likely cause of the 2026-12-02 run's illegal memory access)
        sgl_indices = kv_indices.long()
        res["sglang"] = try_bench("sglang decode", lambda: sgl["decode"](
            q, pools.k, pools.v, out, kv_indptr, sgl_indices, logits, lse, num_splits,
            max_splits, scale, 1.0, 1.0, logit_cap=shape.logit_cap), graph=True)
    if fi is not None:
        def fi_setup():
            ws = torch.zeros(512 * 2**20, dtype=torch.uint8, device="cuda")
            fw = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
            fw.plan(kv_indptr, kv_indices, torch.ones(batch, dtype=torch.int32, device="cuda"),
                    shape.n_qo, n_kv, d, 1, q_data_type=DTYPE, kv_data_type=DTYPE,
                    sm_scale=scale, window_left=-1 if shape.window is None else shape.window,
                    logits_soft_cap=shape.logit_cap or None)
            cache = (pools.k.unsqueeze(1), pools.v.unsqueeze(1))
            torch.cuda.synchronize()
            return lambda: fw.run(q, cache)
        try:
            res["flashinfer"] = try_bench("flashinfer decode", fi_setup(), graph=True)
        except Exception as exc:  # noqa: BLE001
            logger.warning("flashinfer decode plan failed: %s", exc)
    del d_batch, pools
    torch.cuda.empty_cache()
    return res


def extend_shape(shape: Shape, batch: int, ctx: int, ext: int, ranks: list[int], sgl: dict,
                 fi) -> dict:
    """``ext`` new tokens per request after a cached prefix of ``ctx - ext`` tokens."""
    n_qo, n_kv, d = shape.n_qo, shape.n_kv, shape.head_dim
    e = ExtendBatch(shape, batch, ctx, ext, ranks)
    pools, q, out, pre = e.pools, e.q, e.out, e.pre
    i32 = dict(dtype=torch.int32, device="cuda")
    scale = d ** -0.5
    pairs = sum(seen_keys(pre + i, shape.window) for i in range(ext))
    flops = 4 * d * n_qo * batch * pairs
    res: dict = dict(shape=shape.name, batch=batch, ctx=ctx, ext=ext, flops=flops)

    rep = dict(rep_ms=500.0)
    res["ours_lr_off"] = bench(e.run_off, **rep)
    # a materialising server would build V for the keys some query sees only
    first = 0 if shape.window is None else max(0, pre - shape.window)
    seen_pos = e.pos[:, first:].reshape(-1)
    for r in ranks:
        res[f"ours_lr{r}"] = bench(lambda: e.run_lr(r), **rep)

        def materialised() -> None:
            pools.materialise(r, seen_pos, ctx - first, e.adapters)
            e.run_off(pools.v_mat[e.ext_slots], pools.v_mat)
        res[f"materialise_lr{r}"] = bench(materialised, **rep)

    if sgl and shape.window is None:
        sgl_indices = e.kv_indices.long()  # as SGLang's backend passes them (see decode_shape)
        res["sglang"] = try_bench("sglang extend", lambda: sgl["extend"](
            q, e.k_ext, e.v_ext, out, pools.k, pools.v, e.qo_indptr, e.kv_indptr, sgl_indices,
            None, True, None, ext, 1.0, 1.0, sm_scale=scale, logit_cap=shape.logit_cap), **rep)
    if fi is not None:
        try:
            ws = torch.zeros(512 * 2**20, dtype=torch.uint8, device="cuda")
            fw = fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="fa2")
            full_indptr = torch.arange(batch + 1, **i32) * ctx
            fw.plan(e.qo_indptr, full_indptr, pools.slot_of, torch.ones(batch, **i32), n_qo, n_kv,
                    d, 1, causal=True, sm_scale=scale, q_data_type=DTYPE, kv_data_type=DTYPE,
                    window_left=-1 if shape.window is None else shape.window,
                    logits_soft_cap=shape.logit_cap or None)
            cache = (pools.k.unsqueeze(1), pools.v.unsqueeze(1))
            res["flashinfer"] = try_bench("flashinfer prefill", lambda: fw.run(q, cache), **rep)
        except Exception as exc:  # noqa: BLE001
            logger.warning("flashinfer prefill plan failed: %s", exc)
    dense_bytes = 2 * batch * n_qo * ctx * d * 2
    if dense_bytes < 24 * 2**30 and shape.window is None and not shape.logit_cap:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.bias import causal_lower_right
        kd = pools.k[pools.slot_of.long()].view(batch, ctx, n_kv, d).transpose(1, 2)
        vd = pools.v[pools.slot_of.long()].view(batch, ctx, n_kv, d).transpose(1, 2)
        kd = kd.repeat_interleave(n_qo // n_kv, dim=1).contiguous()
        vd = vd.repeat_interleave(n_qo // n_kv, dim=1).contiguous()
        qd = q.view(batch, ext, n_qo, d).transpose(1, 2).contiguous()
        mask = causal_lower_right(ext, ctx)

        def sdpa() -> torch.Tensor:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask)
        res["sdpa_flash"] = try_bench("sdpa", sdpa, **rep)
        del kd, vd
    del e, pools
    torch.cuda.empty_cache()
    return res


DECODE_TILES = ((32, 4, 2), (32, 4, 3), (32, 4, 4), (64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 8, 2))


def sweep_decode(shape: Shape, rank: int, cases: tuple[tuple[int, int], ...] = ((64, 8192), (1, 32768)),
                 device: str = "cuda") -> list[dict]:
    """Stage-1 options per (batch, context), by default bandwidth-bound (64 x 8k) and
    split-bound (1 x 32k): tiles at the planned split count, then split counts around it
    at the planned tiles."""
    rows = []
    for batch, ctx in cases:
        d = DecodeBatch(shape, batch, ctx, [rank], device)
        planned = d.planned().num_kv_splits
        options = [(DecodeConfig(block_n=n, num_warps=w, num_stages=st), None) for n, w, st in DECODE_TILES]
        options += [(None, n) for n in sorted({max(1, planned // 2), 2 * planned, 4 * planned} - {planned})]
        for cfg, splits in options:
            w = d.planned(cfg, splits)
            t_off = try_bench(f"{cfg} {splits} off", lambda: d.run_off(w), graph=True)
            t_lr = try_bench(f"{cfg} {splits} lr", lambda: d.run_lr(w, rank), graph=True)
            n_splits, tiles = w.splits_and_tiles(shape.window, DTYPE)
            rows.append(dict(shape=shape.name, batch=batch, ctx=ctx, block_n=tiles.block_n,
                             warps=tiles.num_warps, stages=tiles.num_stages, splits=n_splits,
                             planned_splits=planned, off=t_off, lr=t_lr))
            print(f"sweep {shape.name} {batch}x{ctx} {tiles} splits {n_splits} (planned {planned}): "
                  f"off {fmt(t_off, '.4f')} lr{rank} {fmt(t_lr, '.4f')} ms", flush=True)
        del d
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# (BLOCK_N, warps, stages, register cap): the default 64-row build (64/8/3) takes 174
# registers, one block per SM; 32-token tiles under a 128 cap compile without spills and
# fit two (kernels/NOTES.md item 9)
CASCADE_TILES = ((32, 4, 3, None), (64, 4, 3, None), (64, 8, 3, None), (128, 8, 2, None),
                 (32, 8, 3, 128), (32, 8, 2, 128), (64, 8, 3, 128))
# An option whose output is further than this from the plain decode's (bf16: the cascade's
# LSE merge alone differs by ~0.006) is wrong, whatever its speed.
SWEEP_TOLERANCE = 0.02


def sweep_cascade(shape: Shape, forks: int, prefix: int, suffix: int, rank: int,
                  device: str = "cuda", dtype: torch.dtype = DTYPE, min_shared: int = 256) -> list[dict]:
    """Level-1 options for one fork case, LR on (``rank``, shared LR rows): members per
    program x tiles (and register caps) at the wrapper's chunk count, then chunk counts at
    its default tiles.
    Each row: the time, ``x_plain`` (the plain decode's time in the same run over it) and
    the relative difference to the plain decode's output (a wrong option shows there)."""
    fb = ForkBatch(shape, forks, prefix, suffix, [rank], device, dtype, min_shared)
    plain = fb.planned(False)
    ref = fb.run(plain, rank).float().clone()
    t_plain = bench(lambda: fb.run(plain, rank), graph=True)
    default = fb.planned(True)
    if not default.cascade:
        raise ValueError(f"{forks} x {prefix} forms no cascade group (min_shared {min_shared})")
    group = shape.n_qo // shape.n_kv
    members = sorted({m for m in (4, 8, 16) if group * m <= 64} | {default.members_per_block})
    options = [dict(members=m, prefix_config=DecodeConfig(block_n=n, num_warps=w, num_stages=st, maxnreg=r))
               for m in members for n, w, st, r in CASCADE_TILES]
    free_slots = default.max_kv_splits - default.num_kv_splits
    options += [dict(num_prefix_chunks=c) for c in (8, 16, 32, 64) if c <= free_slots]
    rows = []
    for opt in [{}, *options]:
        w = fb.planned(True, **opt) if opt else default
        cfg = opt.get("prefix_config")
        row = dict(shape=shape.name, forks=forks, prefix=prefix, suffix=suffix, rank=rank,
                   members=w.members_per_block, chunks=w.num_prefix_chunks,
                   tiles=None if cfg is None else [cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.maxnreg],
                   default=not opt, plain=t_plain)
        try:
            out = fb.run(w, rank)
        except Exception as exc:  # noqa: BLE001 (an option may not compile: spills, smem)
            logger.warning("cascade option %s failed: %s", opt, exc)
            rows.append(row)
            continue
        row["rel_diff"] = max_rel_diff(out, ref)
        row["ms"] = try_bench(f"cascade {opt}", lambda: fb.run(w, rank), graph=True)
        row["x_plain"] = None if row["ms"] is None else t_plain / row["ms"]
        rows.append(row)
        print(f"sweep-cascade {shape.name} {forks}x{prefix}+{suffix} members {row['members']} "
              f"tiles {row['tiles'] or 'default'} chunks {row['chunks']}: "
              f"{fmt(row['ms'], '.4f')} ms (plain {t_plain:.4f})", flush=True)
    del fb
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def profile_decode(shape: Shape, batch: int, ctx: int, rank: int) -> list[Callable[[], object]]:
    """An LR-off and an LR-on decode call over shuffled pools (see ``profile``)."""
    d = DecodeBatch(shape, batch, ctx, [rank])
    w = d.planned()
    return [lambda: d.run_off(w), lambda: d.run_lr(w, rank)]


def profile_extend(shape: Shape, batch: int, ctx: int, ext: int,
                   rank: int) -> list[Callable[[], object]]:
    """An LR-off and an LR-on extend call: ``ext`` new tokens after ``ctx - ext`` cached."""
    e = ExtendBatch(shape, batch, ctx, ext, [rank])
    return [e.run_off, lambda: e.run_lr(rank)]


def profile_cascade(shape: Shape, forks: int, prefix: int, suffix: int,
                    rank: int) -> list[Callable[[], object]]:
    """The plain decode and the cascade (shared LR rows), LR on, over one fork case: ncu
    then times level 1, level 2 and the combine as separate launches."""
    fb = ForkBatch(shape, forks, prefix, suffix, [rank])
    plain, cascade = fb.planned(False), fb.planned(True)
    return [lambda: fb.run(plain, rank), lambda: fb.run(cascade, rank)]


def profile(calls: list[Callable[[], object]]) -> None:
    """Run each call once warm, between cudaProfilerStart/Stop, for
    ``ncu --profile-from-start off`` (compilation and warm-up stay outside)."""
    for fn in calls:
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for fn in calls:
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def shape_legend(rows: list[dict]) -> str:
    names = dict.fromkeys(row["shape"] for row in rows)
    return "Shapes: " + "; ".join(SHAPES[n].label() for n in names) + "."


def decode_table(rows: list[dict], ranks: list[int], copy_gbs: float) -> str:
    lines = [f"Decode (bf16, page size 1). Copy bandwidth {copy_gbs:,.0f} GB/s (read + write). "
             f"{shape_legend(rows)} GB/s counts the keys the query sees (with a window, the "
             "last window + 1).",
             "| shape | batch x ctx | splits | R | LR on ms | GB/s (% copy) | LR off ms | on/off | "
             "materialise ms (x) | SGLang triton ms (x) | FlashInfer ms (x) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for r in ranks:
            on = row[f"ours_lr{r}"]
            gbs = row[f"bytes_lr{r}"] / on / 1e6
            mat = row[f"materialise_lr{r}"]
            sg, fi = row.get("sglang"), row.get("flashinfer")
            lines.append(
                f"| {row['shape']} | {row['batch']} x {row['ctx'] // 1024}k | {row['splits']} | "
                f"{r} | {on:.4f} | "
                f"{gbs:,.0f} ({100 * gbs / copy_gbs:.0f}%) | {row['ours_lr_off']:.4f} | "
                f"{on / row['ours_lr_off']:.3f} | {mat:.3f} ({mat / on:.2f}) | "
                f"{fmt(sg, '.4f')} ({fmt(sg and on / sg, '.2f')}) | "
                f"{fmt(fi, '.4f')} ({fmt(fi and on / fi, '.2f')}) |")
    lines.append("(x) = our LR-on time / that time for the LR-on rows' baselines; for "
                 "materialise it is materialise / ours (speed-up).")
    return "\n".join(lines)


def extend_table(rows: list[dict], ranks: list[int]) -> str:
    lines = ["Extend (bf16): `ext` new tokens per request after a cached prefix of ctx - ext; "
             "TFLOP/s counts attention FLOPs only (of the query-key pairs inside the window). "
             f"{shape_legend(rows)}",
             "| shape | batch x ctx (ext) | R | LR on ms | TFLOP/s | LR off ms | on/off | "
             "materialise ms (x) | SGLang triton ms (x) | FlashInfer fa2 ms (x) | SDPA flash ms (x) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for r in ranks:
            on = row[f"ours_lr{r}"]
            mat = row[f"materialise_lr{r}"]
            sg, fi, sd = row.get("sglang"), row.get("flashinfer"), row.get("sdpa_flash")
            lines.append(
                f"| {row['shape']} | {row['batch']} x {row['ctx'] // 1024}k ({row['ext']}) | {r} | "
                f"{on:.3f} | "
                f"{row['flops'] / on / 1e9:.0f} | {row['ours_lr_off']:.3f} | "
                f"{on / row['ours_lr_off']:.3f} | {mat:.3f} ({mat / on:.2f}) | "
                f"{fmt(sg)} ({fmt(sg and on / sg, '.2f')}) | {fmt(fi)} ({fmt(fi and on / fi, '.2f')}) | "
                f"{fmt(sd)} ({fmt(sd and on / sd, '.2f')}) |")
    return "\n".join(lines)


def cascade_table(rows: list[dict], ranks: list[int], copy_gbs: float) -> str:
    lines = [f"Cascade decode (bf16): forks x (shared prefix + own suffix). {shape_legend(rows)} "
             "Plain = our current decode; cascade = kernels/cascade.py with the prefix's LR rows "
             "shared (base-lr-shared) or per adapter (base-shared); FlashInfer with LR off. "
             "GB/s counts the K / V_base bytes the cascade must read (prefix once).",
             "| shape | forks x (prefix + suffix) | R | plain ms | cascade ms (x faster) | GB/s "
             "(% copy) | per-adapter LR ms | LR off: plain / cascade ms | FlashInfer cascade ms "
             "(ours LR on / it) | FlashInfer decode ms | group search ms / step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for r in ranks:
            plain, casc = row[f"plain_lr{r}"], row[f"cascade_lr{r}"]
            fic, fid = row.get("flashinfer_cascade"), row.get("flashinfer_decode")
            gbs = row["bytes_cascade"] / casc / 1e6
            lines.append(
                f"| {row['shape']} | {row['forks']} x ({row['prefix'] // 1024}k + {row['suffix']}) | "
                f"{r} | {plain:.4f} | {casc:.4f} ({plain / casc:.2f}) | {gbs:,.0f} "
                f"({100 * gbs / copy_gbs:.0f}%) | {row[f'cascade_per_adapter_lr{r}']:.4f} | "
                f"{row['plain_lr_off']:.4f} / {row['cascade_lr_off']:.4f} | "
                f"{fmt(fic, '.4f')} ({fmt(fic and casc / fic, '.2f')}) | {fmt(fid, '.4f')} | "
                f"{row['group_search_ms']:.3f} |")
    lines.append("Targets (issue 19): cascade >= 3x faster than plain at 8 x 32k; cascade with "
                 "LR on within 1.15x of FlashInfer's cascade.")
    return "\n".join(lines)


def sweep_cascade_table(rows: list[dict]) -> str:
    """The best level-1 option per case next to the wrapper's default."""
    lines = ["| shape | forks x (prefix + suffix) | R | plain ms | default: members, chunks, ms "
             "(x plain) | best: members, tiles, chunks, ms (x plain) |", "| --- " * 6 + "|"]
    cases: dict[tuple, list[dict]] = {}
    for row in rows:
        cases.setdefault((row["shape"], row["forks"], row["prefix"], row["suffix"], row["rank"]),
                         []).append(row)
    for (name, forks, prefix, suffix, rank), group in cases.items():
        timed = [r for r in group if r.get("ms") is not None and r["rel_diff"] < SWEEP_TOLERANCE]
        if not timed:
            continue
        best = min(timed, key=lambda r: r["ms"])
        default = next((r for r in timed if r["default"]), best)
        lines.append(f"| {name} | {forks} x ({prefix} + {suffix}) | {rank} | {best['plain']:.4f} | "
                     f"{default['members']}, {default['chunks']}, {default['ms']:.4f} "
                     f"({default['x_plain']:.2f}x) | {best['members']}, {best['tiles'] or 'default'}, "
                     f"{best['chunks']}, {best['ms']:.4f} ({best['x_plain']:.2f}x) |")
    return "\n".join(lines)


def fork_case(case: str) -> tuple[int, int, int]:
    """``FORKSxPREFIX+SUFFIX`` -> (forks, prefix, suffix)."""
    forks, rest = case.split("x")
    prefix, suffix = rest.split("+")
    return int(forks), int(prefix), int(suffix)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="all", choices=(
        "decode", "extend", "all", "sweep", "profile", "profile-extend", "cascade",
        "sweep-cascade", "profile-cascade"))
    ap.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 24, 64])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--forks", nargs="+", default=["8x32768+256", "32x8192+256"],
                    help="--part cascade / sweep-cascade: FORKSxPREFIX+SUFFIX cases")
    ap.add_argument("--extend-len", type=int, default=1024)
    ap.add_argument("--max-extend-tokens", type=int, default=64 * 32768,
                    help="skip extend shapes with more cached+new tokens than this")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_kernels.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")

    shapes = [SHAPES[name] for name in args.shapes]
    if args.part == "profile-cascade":
        for shape in shapes:
            for forks, prefix, suffix in map(fork_case, args.forks):
                profile(profile_cascade(shape, forks, prefix, suffix, args.ranks[0]))
        return
    if args.part in ("profile", "profile-extend"):
        for shape in shapes:
            for batch in args.batches:
                for ctx in args.contexts:
                    profile(profile_decode(shape, batch, ctx, args.ranks[0])
                            if args.part == "profile" else
                            profile_extend(shape, batch, ctx, min(ctx, args.extend_len),
                                           args.ranks[0]))
        return
    props = torch.cuda.get_device_properties(0)
    meta = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                triton=triton.__version__, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d"), argv=sys.argv[1:])
    copy_gbs = copy_bandwidth_gbs()
    meta["copy_gbs"] = copy_gbs
    logger.info("%s, copy bandwidth %.0f GB/s", props.name, copy_gbs)
    sweeping = args.part.startswith("sweep")
    sgl = load_sglang() if not sweeping else {}
    fi = load_flashinfer() if not sweeping else None
    if fi is not None:
        meta["flashinfer"] = fi.__version__
    result: dict = dict(meta=meta, decode=[], extend=[], sweep=[], cascade=[])
    tables: list[str] = []

    def save() -> None:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    if args.part == "sweep":
        for shape in shapes:
            result["sweep"] += sweep_decode(shape, args.ranks[0])
            save()
    if args.part in ("decode", "all"):
        for shape in shapes:
            for batch in args.batches:
                for ctx in args.contexts:
                    result["decode"].append(decode_shape(shape, batch, ctx, args.ranks, sgl, fi,
                                                         props.multi_processor_count))
                    logger.info("decode %s", result["decode"][-1])
                    save()
        tables.append(decode_table(result["decode"], args.ranks, copy_gbs))
    if args.part in ("extend", "all"):
        for shape in shapes:
            for batch in args.batches:
                for ctx in args.contexts:
                    if batch * ctx > args.max_extend_tokens:
                        continue
                    ext = min(ctx, args.extend_len)
                    result["extend"].append(extend_shape(shape, batch, ctx, ext, args.ranks, sgl,
                                                         fi))
                    logger.info("extend %s", result["extend"][-1])
                    save()
        tables.append(extend_table(result["extend"], args.ranks))
    if args.part in ("cascade", "sweep-cascade"):
        for shape in shapes:
            if shape.window is not None:  # windowed layers take the plain decode
                continue
            for forks, prefix, suffix in map(fork_case, args.forks):
                if args.part == "sweep-cascade":
                    result["sweep"] += sweep_cascade(shape, forks, prefix, suffix, args.ranks[0])
                else:
                    result["cascade"].append(cascade_shape(shape, forks, prefix, suffix,
                                                           args.ranks, fi))
                    logger.info("cascade %s", result["cascade"][-1])
                save()
        if args.part == "cascade":
            tables.append(cascade_table(result["cascade"], args.ranks, copy_gbs))
        else:
            tables.append(sweep_cascade_table(result["sweep"]))
    save()
    print(f"\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"flashinfer {meta.get('flashinfer', 'n/a')}")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
