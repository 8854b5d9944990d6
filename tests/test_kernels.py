"""Flash-LoRA kernels against the float64 reference that materialises V = V_base + L B.

Without CUDA the kernels run under TRITON_INTERPRET=1 (set here, before triton is first
imported by the kernels) with tiny shapes, mostly fp32; `gpu` tests take larger shapes in
bf16, fp16 and fp32. Every output is poisoned with NaN before a run, so an unwritten element
fails. The served models' shapes are covered: head dims 64-256 (80 / 96 / 72 padded to a
power of two in the kernels), GQA groups 1-8 (7: Qwen2.5-7B), sliding windows (Gemma-2/3,
SGLang's ``sliding_window_size`` convention) and soft-caps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lragent_sglang.kernels import (  # noqa: E402  (the env var must be set first)
    DecodeConfig,
    FlashLoRADecodeWrapper,
    FlashLoRAExtendWrapper,
    decode_reference,
    extend_reference,
)
from lragent_sglang.kernels.extend import LONG_PREFIX_TOKENS, default_extend_config  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
GPU = pytest.mark.gpu
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Problem:
    """A random paged batch: pools with shuffled slots, per-request prefix and new tokens."""

    q: torch.Tensor
    k_extend: torch.Tensor
    v_extend: torch.Tensor
    lr_extend: torch.Tensor
    k_buffer: torch.Tensor
    v_buffer: torch.Tensor
    lr_buffer: torch.Tensor
    b_weights: torch.Tensor
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    lr_indices: torch.Tensor
    adapter_ids: torch.Tensor


def make_problem(prefix_lens: list[int], extend_lens: list[int], adapters: list[int], *,
                 n_qo: int, n_kv: int, head_dim: int, rank: int, dtype: torch.dtype,
                 n_adapters: int = 3, seed: int = 0, device: str = DEV) -> Problem:
    """Pools hold the prefixes at random, non-contiguous slots (K/V and LR pools differ)."""
    g = torch.Generator().manual_seed(seed)
    total_prefix = sum(prefix_lens)
    n_ext = sum(extend_lens)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    kv_slots = total_prefix + 7
    lr_slots = total_prefix + 13
    kv_perm = torch.randperm(kv_slots, generator=g)[:total_prefix]
    lr_perm = torch.randperm(lr_slots, generator=g)[:total_prefix]
    to_ptr = lambda lens: torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    return Problem(
        q=rnd(n_ext if n_ext else len(prefix_lens), n_qo, head_dim),
        k_extend=rnd(n_ext, n_kv, head_dim),
        v_extend=rnd(n_ext, n_kv, head_dim),
        lr_extend=rnd(n_ext, rank),
        k_buffer=rnd(kv_slots, n_kv, head_dim),
        v_buffer=rnd(kv_slots, n_kv, head_dim),
        lr_buffer=rnd(lr_slots, rank),
        # L B about as large as V_base, so an error in the LR term shows up.
        b_weights=rnd(n_adapters, n_kv, rank, head_dim, scale=rank ** -0.5),
        qo_indptr=to_ptr(extend_lens).to(device),
        kv_indptr=to_ptr(prefix_lens).to(device),
        kv_indices=kv_perm.to(device=device, dtype=torch.int32),
        lr_indices=lr_perm.to(device=device, dtype=torch.int32),
        adapter_ids=torch.tensor(adapters, dtype=torch.int32, device=device),
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "unwritten (NaN-poisoned) or NaN output"
    return ((out.double() - ref).norm() / ref.norm()).item()


def run_decode(p: Problem, *, lr: bool = True, cap: float = 0.0, splits: int | None = None,
               b_weights: torch.Tensor | None = None, window: int | None = None,
               sm_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan and run the decode wrapper once; returns (output, float64 reference).

    ``min_split_len=1`` lets a window keep the requested split count (the wrapper's rule
    would merge the splits of short windows)."""
    n_qo, head_dim = p.q.shape[1], p.q.shape[2]
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    w = FlashLoRADecodeWrapper(n_qo, p.k_buffer.shape[1], head_dim, device=p.q.device,
                               max_lr_rank=p.lr_buffer.shape[1], workspace_rows=64,
                               min_split_len=1)
    w._mid_o.fill_(float("nan"))
    w._mid_lr.fill_(float("nan"))
    w._mid_lse.fill_(float("nan"))
    lr_plan = (p.lr_indices, p.adapter_ids) if lr else (None, None)
    w.plan(p.kv_indptr, p.kv_indices, *lr_plan, sm_scale=scale, logit_cap=cap,
           num_kv_splits=splits)
    out = torch.full_like(p.q, float("nan"))
    bw = p.b_weights if b_weights is None else b_weights
    lr_run = (p.lr_buffer, bw) if lr else (None, None)
    w.run(p.q, p.k_buffer, p.v_buffer, *lr_run, out=out, window=window)
    ref = decode_reference(p.q, p.k_buffer, p.v_buffer, p.kv_indptr, p.kv_indices, scale, cap,
                           *((p.lr_buffer, p.lr_indices, bw, p.adapter_ids) if lr else ()),
                           window=window)
    return out, ref


def run_extend(p: Problem, *, lr: bool = True, cap: float = 0.0,
               b_weights: torch.Tensor | None = None, window: int | None = None,
               sm_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan and run the extend wrapper once; returns (output, float64 reference)."""
    n_qo, head_dim = p.q.shape[1], p.q.shape[2]
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    w = FlashLoRAExtendWrapper(n_qo, p.k_buffer.shape[1], head_dim, device=p.q.device)
    lr_plan = (p.lr_indices, p.adapter_ids) if lr else (None, None)
    max_prefix = int((p.kv_indptr[1:] - p.kv_indptr[:-1]).max())
    w.plan(p.qo_indptr, p.kv_indptr, p.kv_indices, *lr_plan, sm_scale=scale, logit_cap=cap,
           max_prefix_len=max_prefix)
    out = torch.full_like(p.q, float("nan"))
    bw = p.b_weights if b_weights is None else b_weights
    lr_run = (p.lr_extend, p.lr_buffer, bw) if lr else (None, None, None)
    w.run(p.q, p.k_extend, p.v_extend, p.k_buffer, p.v_buffer, *lr_run, out=out, window=window)
    ref = extend_reference(p.q, p.k_extend, p.v_extend, p.k_buffer, p.v_buffer, p.qo_indptr,
                           p.kv_indptr, p.kv_indices, scale, cap, *(
                               (p.lr_extend, p.lr_buffer, p.lr_indices, bw, p.adapter_ids)
                               if lr else ()), window=window)
    return out, ref


# A sample of the (group, head_dim, rank, logit cap) grid that still touches every value;
# CPU shapes stay tiny because the interpreter runs each program in Python.
CPU_CASES = [
    # group, n_kv, head_dim, rank, cap
    (1, 2, 64, 8, 0.0),
    (4, 2, 128, 24, 0.0),
    (8, 1, 64, 1, 5.0),
    (4, 1, 64, 64, 0.0),
    (1, 1, 128, 16, 3.0),
]


@pytest.mark.parametrize("group,n_kv,head_dim,rank,cap", CPU_CASES)
def test_decode_cpu(group: int, n_kv: int, head_dim: int, rank: int, cap: float) -> None:
    p = make_problem([1, 45, 70, 9], [1, 1, 1, 1], [0, -1, 2, 1], n_qo=group * n_kv, n_kv=n_kv,
                     head_dim=head_dim, rank=rank, dtype=torch.float32, seed=rank)
    p.q = p.q[:4]
    for splits in (None, 1 + rank % 3, 9):  # 9 splits leave some of them empty
        out, ref = run_decode(p, cap=cap, splits=splits)
        assert rel_err(out, ref) < TOL[torch.float32], f"splits={splits}"


@pytest.mark.parametrize("group,n_kv,head_dim,rank,cap", CPU_CASES)
def test_extend_cpu(group: int, n_kv: int, head_dim: int, rank: int, cap: float) -> None:
    # empty prefix, a long prefix, a single new token, and a new span of several tiles
    p = make_problem([0, 57, 20, 3], [19, 5, 1, 34], [1, -1, 0, 2], n_qo=group * n_kv,
                     n_kv=n_kv, head_dim=head_dim, rank=rank, dtype=torch.float32, seed=rank + 1)
    out, ref = run_extend(p, cap=cap)
    assert rel_err(out, ref) < TOL[torch.float32]


# The served models' attention shapes, a sample of the grid that touches every value:
# Qwen2.5-7B's GQA group 7, Gemma-2/3's head_dim 256 with a soft-cap of 50 and a sliding
# window on some layers, Phi-3's head_dim 96, and 80 / 72 (padded to 128 in the kernels).
# The 16-bit cases are fp16: Triton 3.6's interpreter multiplies bf16 `tl.dot` operands as
# their raw uint16 bits, so bf16 runs in the `gpu` tests only.
MODEL_CASES = [
    # group, n_kv, head_dim, rank, cap, window, lr, dtype
    (7, 1, 128, 8, 0.0, 31, True, torch.float32),
    (8, 1, 256, 16, 50.0, 31, True, torch.float16),
    (2, 1, 256, 8, 50.0, None, False, torch.float32),
    (1, 2, 96, 24, 0.0, 16, True, torch.float32),
    (4, 1, 80, 8, 5.0, 0, True, torch.float32),
    (4, 2, 64, 64, 0.0, 1000, False, torch.float16),
    (7, 1, 72, 8, 30.0, 16, False, torch.float32),
]
MODEL_IDS = [f"g{c[0]}-d{c[2]}-r{c[3]}-cap{c[4]:g}-w{c[5]}-{'lr' if c[6] else 'nolr'}-"
             f"{str(c[7]).split('.')[-1]}" for c in MODEL_CASES]


def model_scale(head_dim: int) -> float:
    """A softmax scale other than head_dim ** -0.5, as Gemma's query_pre_attn_scalar gives
    (Gemma-2-27B: 144 ** -0.5 at head_dim 128)."""
    return (1.125 * head_dim) ** -0.5


@pytest.mark.parametrize("group,n_kv,head_dim,rank,cap,window,lr,dtype", MODEL_CASES,
                         ids=MODEL_IDS)
def test_decode_models_cpu(group: int, n_kv: int, head_dim: int, rank: int, cap: float,
                           window: int | None, lr: bool, dtype: torch.dtype) -> None:
    # Against a window of 31 (32 keys with the query's own) the lengths are: shorter, one
    # short, exact, one past, the window starting on a tile (48) and on the boundary of the
    # windowless 2-way split (64), and well inside (70). 2 splits of 16 cut the 32 seen keys
    # exactly in halves; with 3 the last one is empty.
    lens = [1, 31, 32, 33, 48, 64, 70]
    p = make_problem(lens, [1] * len(lens), [0, -1, 2, 1, 0, -1, 2], n_qo=group * n_kv,
                     n_kv=n_kv, head_dim=head_dim, rank=rank, dtype=dtype, seed=head_dim + group)
    for splits in (2, 3):
        out, ref = run_decode(p, lr=lr, cap=cap, splits=splits, window=window,
                              sm_scale=model_scale(head_dim))
        assert rel_err(out, ref) < TOL[dtype], f"splits={splits}"


@pytest.mark.parametrize("group,n_kv,head_dim,rank,cap,window,lr,dtype", MODEL_CASES,
                         ids=MODEL_IDS)
def test_extend_models_cpu(group: int, n_kv: int, head_dim: int, rank: int, cap: float,
                           window: int | None, lr: bool, dtype: torch.dtype) -> None:
    # The windows of 16 and 31 are shorter than the 40-token prefix, and 16 is one tile
    # (16 x 16 tiles here); 33 new tokens span three query blocks, so the window's lower
    # edge falls in the prefix, in the new tokens and inside the diagonal block.
    p = make_problem([0, 40, 17, 5], [19, 5, 33, 16], [1, -1, 0, 2], n_qo=group * n_kv,
                     n_kv=n_kv, head_dim=head_dim, rank=rank, dtype=dtype,
                     seed=head_dim + group + 1)
    out, ref = run_extend(p, lr=lr, cap=cap, window=window, sm_scale=model_scale(head_dim))
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("window", [15, 33, 56, 69])
def test_window_edges_cpu(window: int) -> None:
    """Windows one short of a tile (15), one past two tiles (33), exactly the longest
    extend request's length minus one (56: the window covers it whole), and the longest
    decode request's (69)."""
    p = make_problem([0, 40, 17, 5], [19, 5, 40, 16], [1, -1, 0, 2], n_qo=4, n_kv=1,
                     head_dim=64, rank=8, dtype=torch.float32, seed=window)
    out, ref = run_extend(p, window=window)
    assert rel_err(out, ref) < TOL[torch.float32]
    p = make_problem([70, 34, 16, 57], [1] * 4, [1, -1, 0, 2], n_qo=4, n_kv=1, head_dim=64,
                     rank=8, dtype=torch.float32, seed=window)
    out, ref = run_decode(p, splits=3, window=window)
    assert rel_err(out, ref) < TOL[torch.float32]


def test_one_plan_serves_every_layer_cpu() -> None:
    """One plan per batch; layers differ in window, scale and soft-cap at run(), as Gemma's
    alternate sliding-window and global layers do. Decode keeps the wrapper's own split
    rule here (a window of w gets at most ceil((w + 1) / min_split_len) splits)."""
    head_dim, n_qo, n_kv = 96, 4, 2
    p = make_problem([40, 9], [12, 20], [0, -1], n_qo=n_qo, n_kv=n_kv, head_dim=head_dim,
                     rank=8, dtype=torch.float32)
    lr_pool = (p.lr_buffer, p.lr_indices, p.b_weights, p.adapter_ids)
    layers = [(15, 0.1, 50.0), (None, None, 0.0), (7, 0.05, 0.0)]  # window, scale, cap

    ext = FlashLoRAExtendWrapper(n_qo, n_kv, head_dim, device=p.q.device)
    ext.plan(p.qo_indptr, p.kv_indptr, p.kv_indices, p.lr_indices, p.adapter_ids)
    for window, scale, cap in layers:
        out = ext.run(p.q, p.k_extend, p.v_extend, p.k_buffer, p.v_buffer, p.lr_extend,
                      p.lr_buffer, p.b_weights, window=window, sm_scale=scale, logit_cap=cap)
        ref = extend_reference(p.q, p.k_extend, p.v_extend, p.k_buffer, p.v_buffer,
                               p.qo_indptr, p.kv_indptr, p.kv_indices,
                               scale or head_dim ** -0.5, cap, p.lr_extend, *lr_pool,
                               window=window)
        assert rel_err(out, ref) < TOL[torch.float32], f"window={window}"

    dec = FlashLoRADecodeWrapper(n_qo, n_kv, head_dim, device=p.q.device, max_lr_rank=8,
                                 min_split_len=4)
    dec.plan(p.kv_indptr, p.kv_indices, p.lr_indices, p.adapter_ids, num_kv_splits=4)
    q = p.q[:2]
    for window, scale, cap in layers:
        out = dec.run(q, p.k_buffer, p.v_buffer, p.lr_buffer, p.b_weights, window=window,
                      sm_scale=scale, logit_cap=cap)
        ref = decode_reference(q, p.k_buffer, p.v_buffer, p.kv_indptr, p.kv_indices,
                               scale or head_dim ** -0.5, cap, *lr_pool, window=window)
        assert rel_err(out, ref) < TOL[torch.float32], f"window={window}"


def test_zero_b_equals_plain_attention_cpu() -> None:
    """B = 0: the LR term vanishes, and the output must equal attention without it."""
    p = make_problem([33, 8], [9, 17], [0, 1], n_qo=4, n_kv=2, head_dim=64, rank=8,
                     dtype=torch.float32)
    zero_b = torch.zeros_like(p.b_weights)
    out_ext, _ = run_extend(p, b_weights=zero_b)
    plain_ext, ref_ext = run_extend(p, lr=False)
    torch.testing.assert_close(out_ext, plain_ext, rtol=1e-6, atol=1e-6)
    assert rel_err(plain_ext, ref_ext) < TOL[torch.float32]

    p.q = p.q[:2]
    out_dec, _ = run_decode(p, b_weights=zero_b, splits=2)
    plain_dec, ref_dec = run_decode(p, lr=False, splits=2)
    torch.testing.assert_close(out_dec, plain_dec, rtol=1e-6, atol=1e-6)
    assert rel_err(plain_dec, ref_dec) < TOL[torch.float32]


def test_no_adapter_never_reads_lr_cpu() -> None:
    """Requests with adapter -1 skip the LR term: their L rows and lr_indices are never read."""
    p = make_problem([30, 12], [4, 3], [-1, 1], n_qo=4, n_kv=1, head_dim=64, rank=8,
                     dtype=torch.float32)
    p.lr_indices[:30] = 10**6  # far outside the LR pool
    p.lr_extend[:4] = float("nan")
    out, ref = run_extend(p)
    assert rel_err(out, ref) < TOL[torch.float32]
    p.q = p.q[:2]
    out, ref = run_decode(p, splits=3)
    assert rel_err(out, ref) < TOL[torch.float32]


def test_wrapper_argument_checks_cpu() -> None:
    p = make_problem([4], [2], [0], n_qo=2, n_kv=1, head_dim=64, rank=8, dtype=torch.float32)
    w = FlashLoRADecodeWrapper(2, 1, 64, device=p.q.device, max_lr_rank=8)
    with pytest.raises(RuntimeError):
        w.run(p.q[:1], p.k_buffer, p.v_buffer)
    with pytest.raises(ValueError):
        w.plan(p.kv_indptr, p.kv_indices, p.lr_indices)  # adapter_ids missing
    w.plan(p.kv_indptr, p.kv_indices)
    with pytest.raises(ValueError):
        w.run(p.q[:1], p.k_buffer, p.v_buffer, p.lr_buffer, p.b_weights)  # LR not planned
    w = FlashLoRADecodeWrapper(2, 1, 64, device=p.q.device, max_lr_rank=8)
    w.plan(p.kv_indptr, p.kv_indices, p.lr_indices, p.adapter_ids)
    with pytest.raises(ValueError):
        w.run(p.q[:1], p.k_buffer, p.v_buffer, torch.zeros(4, 64), p.b_weights)  # rank 64 > 8
    wide = torch.zeros(1, 2, 288)
    w = FlashLoRADecodeWrapper(2, 1, 288, device=p.q.device)
    w.plan(p.kv_indptr, p.kv_indices)
    with pytest.raises(ValueError, match="head_dim"):
        w.run(wide, torch.zeros(8, 1, 288), torch.zeros(8, 1, 288))  # past the tiles' 256


def test_extend_pipeline_depth_rule() -> None:
    """Four stages only for the 16-bit LR build with R padded to <= 32 behind a long prefix."""
    def stages(width: int | None, prefix: int | None, dtype: torch.dtype = torch.bfloat16) -> int:
        return default_extend_config(torch.device("cuda"), dtype, width, prefix).num_stages

    assert stages(32, LONG_PREFIX_TOKENS) == 4
    assert stages(32, LONG_PREFIX_TOKENS - 1) == stages(64, 10**5) == stages(None, 10**5) == 3
    assert stages(32, None) == 3  # prefix unknown: the default
    assert stages(32, 10**5, torch.float32) == 1


def test_split_heuristic() -> None:
    w = FlashLoRADecodeWrapper(32, 8, 128, device="cpu", max_kv_splits=64, workspace_rows=1024)
    assert w.choose_num_kv_splits(1) == 2  # 4 "SMs" on CPU: 16 targets / 8 programs
    assert w.choose_num_kv_splits(64, max_kv_len=8192) == 1
    w._target_programs = 528
    assert w.choose_num_kv_splits(1, max_kv_len=32768) == 64
    assert w.choose_num_kv_splits(1, max_kv_len=1024) == 8
    assert w.choose_num_kv_splits(64) == 2
    assert w.choose_num_kv_splits(1024) == 1
    # A windowed layer reuses the plan's workspace with no more splits than its window needs.
    w.device = torch.device("cuda")  # tile choice only; nothing is launched
    w.plan(torch.zeros(2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
           max_kv_len=32768)
    assert w.num_kv_splits == 64
    assert w.splits_and_tiles(None)[0] == 64
    assert w.splits_and_tiles(-1)[0] == 64
    assert w.splits_and_tiles(4095) == (32, DecodeConfig(32, 4, 4, 96))  # Gemma-2: 4096 keys
    assert w.splits_and_tiles(100)[0] == 1
    w.plan(torch.zeros(2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
           max_kv_len=32768, num_kv_splits=4)
    assert w.splits_and_tiles(None) == (4, DecodeConfig(64, 4, 3, 104))  # 8k-token splits
    assert w.splits_and_tiles(1 << 20)[1] == DecodeConfig(64, 4, 3, 104)
    w.head_dim = 256
    assert w.splits_and_tiles(None)[1] == DecodeConfig(32, 4, 3, 104)  # same bytes per stage


# ---------------------------------------------------------------- GPU (larger shapes)

GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
GPU_CASES = [
    # group, n_kv, head_dim, rank, cap
    (1, 4, 128, 8, 0.0),
    (4, 8, 128, 24, 0.0),
    (8, 2, 128, 64, 30.0),
    (4, 2, 64, 1, 0.0),
    (8, 4, 64, 16, 0.0),
    (1, 8, 64, 64, 50.0),
    (4, 8, 128, 16, 50.0),
]


def _gpu_lens(seed: int) -> tuple[list[int], list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    prefix = [0, 1, 5000, *torch.randint(1, 1500, (5,), generator=g).tolist()]  # 5000: 4 stages
    extend = [300, 1, 77, *torch.randint(1, 400, (5,), generator=g).tolist()]
    adapters = [0, -1, 2, 1, -1, 1, 0, 2]
    return prefix, extend, adapters


@GPU
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("group,n_kv,head_dim,rank,cap", GPU_CASES)
def test_decode_gpu(group: int, n_kv: int, head_dim: int, rank: int, cap: float,
                    dtype: torch.dtype) -> None:
    prefix, _, adapters = _gpu_lens(rank + head_dim)
    prefix[0] = 9000
    p = make_problem(prefix, [1] * len(prefix), adapters, n_qo=group * n_kv, n_kv=n_kv,
                     head_dim=head_dim, rank=rank, dtype=dtype, seed=rank)
    for splits in (None, 1, 7):
        out, ref = run_decode(p, cap=cap, splits=splits)
        assert rel_err(out, ref) < TOL[dtype], f"splits={splits}"


@GPU
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("group,n_kv,head_dim,rank,cap", GPU_CASES)
def test_extend_gpu(group: int, n_kv: int, head_dim: int, rank: int, cap: float,
                    dtype: torch.dtype) -> None:
    prefix, extend, adapters = _gpu_lens(rank + head_dim + 1)
    p = make_problem(prefix, extend, adapters, n_qo=group * n_kv, n_kv=n_kv,
                     head_dim=head_dim, rank=rank, dtype=dtype, seed=rank + 1)
    out, ref = run_extend(p, cap=cap)
    assert rel_err(out, ref) < TOL[dtype]


# Served models at serving sizes: Qwen2.5-7B (28 q / 4 kv heads), Gemma-2-9B (16 / 8, head_dim
# 256, cap 50, window 4096 - 1 on every other layer), Gemma-3 (window 1024 - 1), Phi-3-mini
# (32 / 32, head_dim 96), and head_dim 80 with a one-key window.
GPU_MODEL_CASES = [
    # group, n_kv, head_dim, rank, cap, window
    (7, 4, 128, 8, 0.0, None),
    (7, 4, 128, 24, 0.0, 4095),
    (2, 8, 256, 16, 50.0, 4095),
    (2, 8, 256, 8, 50.0, None),
    (2, 4, 256, 64, 0.0, 1023),
    (1, 32, 96, 16, 0.0, None),
    (4, 8, 96, 8, 0.0, 2047),
    (8, 2, 80, 8, 0.0, 0),
    (4, 2, 64, 16, 30.0, 63),
]


@GPU
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("group,n_kv,head_dim,rank,cap,window", GPU_MODEL_CASES)
def test_models_gpu(group: int, n_kv: int, head_dim: int, rank: int, cap: float,
                    window: int | None, dtype: torch.dtype) -> None:
    prefix, extend, adapters = _gpu_lens(rank + head_dim + group)
    p = make_problem(prefix, extend, adapters, n_qo=group * n_kv, n_kv=n_kv,
                     head_dim=head_dim, rank=rank, dtype=dtype, seed=rank + 2)
    out, ref = run_extend(p, cap=cap, window=window, sm_scale=model_scale(head_dim))
    assert rel_err(out, ref) < TOL[dtype], "extend"
    prefix[0] = 9000
    p = make_problem(prefix, [1] * len(prefix), adapters, n_qo=group * n_kv, n_kv=n_kv,
                     head_dim=head_dim, rank=rank, dtype=dtype, seed=rank + 3)
    for splits in (None, 7):
        out, ref = run_decode(p, cap=cap, splits=splits, window=window,
                              sm_scale=model_scale(head_dim))
        assert rel_err(out, ref) < TOL[dtype], f"decode splits={splits}"


@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_zero_b_equals_plain_attention_gpu(dtype: torch.dtype) -> None:
    prefix, extend, adapters = _gpu_lens(5)
    p = make_problem(prefix, extend, adapters, n_qo=32, n_kv=8, head_dim=128, rank=24,
                     dtype=dtype)
    zero_b = torch.zeros_like(p.b_weights)
    out, _ = run_extend(p, b_weights=zero_b)
    plain, ref = run_extend(p, lr=False)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    assert rel_err(plain, ref) < TOL[dtype]
    p.q = p.q[: len(prefix)]
    out, _ = run_decode(p, b_weights=zero_b)
    plain, ref = run_decode(p, lr=False)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    assert rel_err(plain, ref) < TOL[dtype]


@GPU
def test_decode_cuda_graph_replay() -> None:
    """run() captured once replays correctly after the batch's buffers are refilled in place;
    a global and a windowed layer share the plan inside one graph."""
    prefix = [3000, 17, 800, 5000]
    p = make_problem(prefix, [1] * 4, [0, -1, 2, 1], n_qo=32, n_kv=8, head_dim=128, rank=8,
                     dtype=torch.bfloat16)
    p.q = p.q[:4]
    w = FlashLoRADecodeWrapper(32, 8, 128, max_lr_rank=8)
    w.plan(p.kv_indptr, p.kv_indices, p.lr_indices, p.adapter_ids, max_kv_len=8192)
    out, out_win = torch.empty_like(p.q), torch.empty_like(p.q)

    def two_layers() -> None:
        w.run(p.q, p.k_buffer, p.v_buffer, p.lr_buffer, p.b_weights, out=out)
        w.run(p.q, p.k_buffer, p.v_buffer, p.lr_buffer, p.b_weights, out=out_win, window=1023)

    two_layers()  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        two_layers()
    for seed in range(2):
        g = torch.Generator(device="cuda").manual_seed(seed)
        p.q.copy_(torch.randn(p.q.shape, generator=g, device="cuda"))
        p.adapter_ids.copy_(torch.tensor([seed, 1, -1, 2 - seed], dtype=torch.int32))
        p.kv_indices.copy_(p.kv_indices[torch.randperm(p.kv_indices.numel(), device="cuda",
                                                       generator=g)])
        out.fill_(float("nan"))
        out_win.fill_(float("nan"))
        graph.replay()
        for window, result in ((None, out), (1023, out_win)):
            ref = decode_reference(p.q, p.k_buffer, p.v_buffer, p.kv_indptr, p.kv_indices,
                                   128 ** -0.5, 0.0, p.lr_buffer, p.lr_indices, p.b_weights,
                                   p.adapter_ids, window=window)
            assert rel_err(result, ref) < TOL[torch.bfloat16], f"window={window}"
