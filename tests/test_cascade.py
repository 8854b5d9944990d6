"""Cascade Flash-LoRA decode (kernels/cascade.py) against the float64 reference and the
plain decode: role forks that share a trajectory's KV slots, in batches mixed with
requests of no group, with the prefix's LR rows shared (base-lr-shared) or per adapter
(base-shared), and the group finder on its own.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py) on tiny shapes;
`gpu` tests take serving sizes in bf16 and capture a CUDA graph. Outputs and workspaces are
poisoned with NaN before a run, so an unwritten element fails.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lragent_sglang.kernels import (  # noqa: E402  (the env var must be set first)
    FlashLoRACascadeDecodeWrapper,
    FlashLoRADecodeWrapper,
    decode_reference,
    find_cascade_groups,
)
from lragent_sglang.kernels.cascade import member_blocks  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
GPU = pytest.mark.gpu
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Forks:
    """A decode batch over paged pools: groups of forks listing the same KV slots over their
    group's prefix, and requests of their own, in a shuffled batch order."""

    q: torch.Tensor
    k_buffer: torch.Tensor
    v_buffer: torch.Tensor
    lr_buffer: torch.Tensor
    b_weights: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    lr_indices: torch.Tensor
    adapter_ids: torch.Tensor

    def lr_args(self) -> tuple[torch.Tensor, ...]:
        return self.lr_buffer, self.lr_indices, self.b_weights, self.adapter_ids


def make_forks(groups: list[tuple[int, list[tuple[int, int]]]], singles: list[tuple[int, int]], *,
               n_qo: int, n_kv: int, head_dim: int, rank: int, dtype: torch.dtype,
               lr_per_adapter: bool = False, seed: int = 0, n_adapters: int = 3,
               device: str = DEV) -> Forks:
    """``groups``: (prefix length, [(suffix length, adapter), ...]) each; ``singles``:
    (length, adapter) each. A group's members share its prefix's KV slots, and its LR slots
    too, or (``lr_per_adapter``, base-shared) one LR copy of the prefix per adapter."""
    g = torch.Generator().manual_seed(seed)
    kv_lists, lr_lists, adapters = [], [], []
    kv_next, lr_next = iter(range(1, 10**6)), iter(range(1, 10**6))

    def take(it, n: int) -> list[int]:
        return [next(it) for _ in range(n)]

    for prefix, members in groups:
        kv_prefix = take(kv_next, prefix)
        lr_prefix: dict[int, list[int]] = {}
        for suffix, adapter in members:
            key = adapter if lr_per_adapter else 0
            if key not in lr_prefix:
                lr_prefix[key] = take(lr_next, prefix)
            kv_lists.append(kv_prefix + take(kv_next, suffix))
            lr_lists.append(lr_prefix[key] + take(lr_next, suffix))
            adapters.append(adapter)
    for length, adapter in singles:
        kv_lists.append(take(kv_next, length))
        lr_lists.append(take(lr_next, length))
        adapters.append(adapter)

    order = torch.randperm(len(kv_lists), generator=g).tolist()
    n_kv_slots, n_lr_slots = next(kv_next) + 5, next(lr_next) + 3
    kv_perm = torch.randperm(n_kv_slots, generator=g)  # scatter the slots over the pools
    lr_perm = torch.randperm(n_lr_slots, generator=g)
    lens = [len(kv_lists[i]) for i in order]

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    def flat(lists: list[list[int]], perm: torch.Tensor) -> torch.Tensor:
        return perm[torch.tensor([s for i in order for s in lists[i]])].to(device=device,
                                                                          dtype=torch.int32)

    return Forks(
        q=rnd(len(order), n_qo, head_dim),
        k_buffer=rnd(n_kv_slots, n_kv, head_dim),
        v_buffer=rnd(n_kv_slots, n_kv, head_dim),
        lr_buffer=rnd(n_lr_slots, rank),
        b_weights=rnd(n_adapters, n_kv, rank, head_dim, scale=rank ** -0.5),
        kv_indptr=torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(device=device,
                                                                          dtype=torch.int32),
        kv_indices=flat(kv_lists, kv_perm),
        lr_indices=flat(lr_lists, lr_perm),
        adapter_ids=torch.tensor([adapters[i] for i in order], dtype=torch.int32, device=device),
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "unwritten (NaN-poisoned) or NaN output"
    return ((out.double() - ref).norm() / ref.norm()).item()


def poisoned(w: FlashLoRADecodeWrapper) -> FlashLoRADecodeWrapper:
    for buf in (w._mid_o, w._mid_lr, w._mid_lse):
        buf.fill_(float("nan"))
    return w


def cascade(p: Forks, *, lr: bool = True, lr_shared: bool = True, min_shared: int = 8,
            splits: int | None = 2, chunks: int | None = 2, cap: float = 0.0,
            window: int | None = None, **kw) -> tuple[FlashLoRACascadeDecodeWrapper, torch.Tensor]:
    """Plan the cascade wrapper on ``p`` and run it once; returns (wrapper, output).
    ``splits`` / ``chunks`` None: the wrapper's heuristics."""
    n_qo, head_dim = p.q.shape[1:]
    kw = dict(workspace_rows=256, min_split_len=1) | kw
    w = poisoned(FlashLoRACascadeDecodeWrapper(
        n_qo, p.k_buffer.shape[1], head_dim, device=p.q.device, max_lr_rank=p.lr_buffer.shape[1],
        min_shared_len=min_shared, lr_shared=lr_shared, **kw))
    lr_plan = (p.lr_indices, p.adapter_ids) if lr else (None, None)
    w.plan(p.kv_indptr, p.kv_indices, *lr_plan, logit_cap=cap, num_kv_splits=splits,
           num_prefix_chunks=chunks)
    out = torch.full_like(p.q, float("nan"))
    lr_run = (p.lr_buffer, p.b_weights) if lr else (None, None)
    w.run(p.q, p.k_buffer, p.v_buffer, *lr_run, out=out, window=window)
    return w, out


def reference(p: Forks, *, lr: bool = True, cap: float = 0.0,
              window: int | None = None) -> torch.Tensor:
    return decode_reference(p.q, p.k_buffer, p.v_buffer, p.kv_indptr, p.kv_indices,
                            p.q.shape[2] ** -0.5, cap, *(p.lr_args() if lr else ()), window=window)


# ---------------------------------------------------------------- the group finder


def find(lists: list[list[int]], *, min_shared: int = 4, min_group: int = 2, members: int = 4,
         lr_lists: list[list[int]] | None = None, pad: int = 0) -> tuple[list[int], list[list[int]]]:
    """Run the group finder on index lists (``pad`` garbage entries after the batch's)."""
    lens = [len(x) for x in lists]
    indptr = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    flat = lambda ls: torch.tensor([s for x in ls for s in x] + [7] * pad, dtype=torch.int32)
    prefix_lens = torch.full((len(lists),), -5, dtype=torch.int32)
    blocks = torch.full((member_blocks(len(lists), members), members), -5, dtype=torch.int32)
    find_cascade_groups(indptr, flat(lists), prefix_lens, blocks, min_shared_len=min_shared,
                        min_group_size=min_group,
                        lr_indices=None if lr_lists is None else flat(lr_lists),
                        num_entries=sum(lens) if pad else None)
    return prefix_lens.tolist(), blocks.tolist()


TRAJ_A, TRAJ_B = list(range(1, 11)), list(range(50, 60))


def test_groups_are_requests_sharing_their_first_slots() -> None:
    lists = [
        TRAJ_A + [100, 101],          # 0: A
        TRAJ_B + [60],                # 1: B
        TRAJ_A + [200],               # 2: A
        [1, 2],                       # 3: too short for any group
        TRAJ_A[:3] + [300, 301, 302],  # 4: shares 3 slots with A: under min_shared
        TRAJ_B + [61, 62],            # 5: B
        TRAJ_A + [400, 401, 402],     # 6: A
        [500, 501, 502, 503, 504],    # 7: alone
    ]
    prefix, blocks = find(lists, members=2, pad=9)
    assert prefix == [10, 10, 10, 0, 0, 10, 10, 0]
    # A's three members fill one block and start another; B's two fill the third. (With 2
    # members per block, groups of 3 need 2 / 3 of the batch in blocks: 5 rows for 8.)
    assert blocks == [[0, 2], [6, -1], [1, 5], [-1, -1], [-1, -1]]
    assert find(lists, members=3)[1] == [[0, 2, 6], [1, 5, -1], [-1, -1, -1], [-1, -1, -1]]
    trios = [TRAJ_A + [100 + i] for i in range(3)] + [TRAJ_B + [100 + i] for i in range(3)]
    assert find(trios, members=2)[1] == [[0, 1], [2, -1], [3, 4], [5, -1]]
    # a member's own current token is never shared: a trajectory that is a prefix of the
    # others' leaves its last slot to level 2
    assert find([TRAJ_A, TRAJ_A + [11, 12], TRAJ_A + [13]])[0] == [9, 9, 9]


def test_a_group_shares_what_all_its_members_share() -> None:
    # member 2 leaves A after 6 slots: the group's prefix is 6 for everyone
    lists = [TRAJ_A + [100], TRAJ_A + [200], TRAJ_A[:6] + [9, 9, 9, 300]]
    assert find(lists)[0] == [6, 6, 6]
    # with a shared LR cache a differing LR slot ends the prefix too (an LR re-prefill gap
    # gave member 1 its own LR rows from position 5 on)
    lr = [list(range(70, 81)), list(range(70, 75)) + [90, 91, 92, 93, 94, 95], list(range(70, 81))]
    assert find(lists[:2] + [TRAJ_A + [300]], lr_lists=lr)[0] == [5, 5, 5]
    # ... and when that leaves less than min_shared, there is no group
    assert find(lists[:2] + [TRAJ_A + [300]], lr_lists=lr, min_shared=6)[0] == [0, 0, 0]


def test_groups_below_the_size_or_length_threshold_are_dropped() -> None:
    lists = [TRAJ_A + [100], TRAJ_A + [200], TRAJ_B + [60], TRAJ_B + [61], TRAJ_B + [62]]
    assert find(lists, min_group=3)[0] == [0, 0, 10, 10, 10]
    assert find(lists, min_shared=11)[0] == [0] * 5  # nobody is longer than 11 + their own token
    assert find(lists[:1])[0] == [0]  # a batch of one: no block at all


# ---------------------------------------------------------------- kernels on CPU

# Two groups of forks (one long, one short prefix) among requests of their own; adapters
# mixed, -1 (no adapter) included.
FORKS = [(40, [(3, 0), (5, 1), (1, -1)]), (20, [(2, 2), (9, 0)])]
SINGLES = [(30, 1), (12, -1)]
CPU_CASES = [
    # group, n_kv, head_dim, rank, cap, lr_shared
    (4, 2, 64, 8, 0.0, True),
    (4, 2, 64, 8, 0.0, False),
    (7, 1, 80, 24, 5.0, False),  # Qwen2.5's group of 7, a padded head dim, a soft-cap
    (1, 2, 64, 64, 0.0, True),
]


@pytest.mark.parametrize("group,n_kv,head_dim,rank,cap,lr_shared", CPU_CASES)
def test_cascade_equals_the_reference_cpu(group: int, n_kv: int, head_dim: int, rank: int,
                                          cap: float, lr_shared: bool) -> None:
    p = make_forks(FORKS, SINGLES, n_qo=group * n_kv, n_kv=n_kv, head_dim=head_dim, rank=rank,
                   dtype=torch.float32, lr_per_adapter=not lr_shared, seed=rank + group)
    w, out = cascade(p, lr_shared=lr_shared, cap=cap, splits=3, chunks=3)
    # both groups were found: 3 + 2 members, 4 requests of the batch in no group
    assert sorted(w.prefix_lens.tolist()) == [0, 0, 20, 20, 40, 40, 40]
    assert rel_err(out, reference(p, cap=cap)) < TOL[torch.float32]


def test_groups_spanning_several_member_blocks_cpu() -> None:
    """16 query heads per kv head leave room for 2 members per level-1 program with the L
    term per member: a group of 5 forks takes 3 blocks, each reading the prefix for its
    members."""
    p = make_forks([(20, [(2, 0), (4, 1), (1, 2), (3, -1), (2, 1)])], [], n_qo=16,
                   n_kv=1, head_dim=32, rank=8, dtype=torch.float32, lr_per_adapter=True, seed=5)
    w, out = cascade(p, lr_shared=False, splits=1, chunks=2)
    assert w.members_per_block == 2
    assert w.block_members.tolist() == [[0, 1], [2, 3], [4, -1]]
    assert rel_err(out, reference(p)) < TOL[torch.float32]


def test_lr_off_and_a_group_without_adapters_cpu() -> None:
    p = make_forks([(24, [(3, -1), (2, -1)]), (30, [(1, 0), (5, -1)])], [], n_qo=4, n_kv=1,
                   head_dim=64, rank=8, dtype=torch.float32, seed=7)
    _, out = cascade(p, lr=False)
    assert rel_err(out, reference(p, lr=False)) < TOL[torch.float32]
    _, out = cascade(p)
    assert rel_err(out, reference(p)) < TOL[torch.float32]


def test_a_shared_lr_plan_never_shares_per_adapter_lr_rows_cpu() -> None:
    """Forks whose prefix has one LR copy per adapter (base-shared) under a wrapper told the
    LR rows are shared: the group finder sees the LR slots differ and forms no group."""
    p = make_forks(FORKS, SINGLES, n_qo=4, n_kv=1, head_dim=64, rank=8, dtype=torch.float32,
                   lr_per_adapter=True, seed=3)
    w, out = cascade(p, lr_shared=True)
    assert w.prefix_lens.tolist() == [0] * 7
    assert rel_err(out, reference(p)) < TOL[torch.float32]


def test_windowed_layers_take_the_plain_decode_cpu() -> None:
    """One plan; a layer with a sliding window shorter than the shared prefix gets the plain
    decode (level 1 has no window), the global layer the cascade."""
    p = make_forks(FORKS, SINGLES, n_qo=4, n_kv=1, head_dim=64, rank=8, dtype=torch.float32,
                   seed=11)
    w, out = cascade(p, window=15)
    assert w.cascade
    assert rel_err(out, reference(p, window=15)) < TOL[torch.float32]
    out = w.run(p.q, p.k_buffer, p.v_buffer, p.lr_buffer, p.b_weights)
    assert rel_err(out, reference(p)) < TOL[torch.float32]


def test_plan_falls_back_where_no_group_can_form_cpu() -> None:
    p = make_forks(FORKS, SINGLES, n_qo=4, n_kv=1, head_dim=64, rank=8, dtype=torch.float32)
    w = FlashLoRACascadeDecodeWrapper(4, 1, 64, device=p.q.device, max_lr_rank=8,
                                      min_shared_len=8, max_batch_size=8)
    one = p.kv_indptr[:2]
    w.plan(one, p.kv_indices, p.lr_indices, p.adapter_ids)
    assert not w.cascade  # a single request
    w.plan(p.kv_indptr, p.kv_indices, p.lr_indices, p.adapter_ids, max_kv_len=8)
    assert not w.cascade  # nobody is longer than min_shared_len
    w.plan(p.kv_indptr, p.kv_indices, p.lr_indices, p.adapter_ids, max_kv_len=45)
    assert w.cascade and w.prefix_lens.count_nonzero() == 5
    with pytest.raises(ValueError, match="2 requests"):
        FlashLoRACascadeDecodeWrapper(4, 1, 64, device="cpu", min_group_size=1)


def test_groups_refilled_in_place_serve_a_planned_run_cpu() -> None:
    """What a CUDA-graph replay does, without the graph: plan once on persistent buffers
    (larger than the batch), then write another batch's indices into them, refind the
    groups in place and run the same plan again."""
    shape = dict(n_qo=4, n_kv=1, head_dim=64, rank=8, dtype=torch.float32)
    first = make_forks(FORKS, SINGLES, **shape, seed=1)
    second = make_forks([(25, [(4, 1), (2, 0), (6, 2), (1, -1)])], [(50, 0), (9, 2), (3, 1)],
                        **shape, seed=2)
    cap = 300
    kv_buf = torch.zeros(cap, dtype=torch.int32, device=DEV)
    lr_buf = torch.zeros(cap, dtype=torch.int32, device=DEV)
    indptr, adapters = first.kv_indptr.clone(), first.adapter_ids.clone()

    def refill(p: Forks) -> int:
        n = int(p.kv_indptr[-1])
        kv_buf[:n], lr_buf[:n] = p.kv_indices, p.lr_indices
        indptr.copy_(p.kv_indptr)
        adapters.copy_(p.adapter_ids)
        return n

    w = poisoned(FlashLoRACascadeDecodeWrapper(4, 1, 64, device=DEV, max_lr_rank=8,
                                               min_split_len=1, min_shared_len=8))
    w.plan(indptr, kv_buf, lr_buf, adapters, num_kv_splits=2, num_prefix_chunks=2,
           num_entries=refill(first))
    for p in (first, second):
        w.find_groups(indptr, kv_buf, lr_buf, num_entries=refill(p))
        out = w.run(p.q, p.k_buffer, p.v_buffer, p.lr_buffer, p.b_weights)  # each its own pools
        assert w.prefix_lens.count_nonzero() == (5 if p is first else 4)
        assert rel_err(out, reference(p)) < TOL[torch.float32]


def test_prefix_chunk_heuristic() -> None:
    w = FlashLoRACascadeDecodeWrapper(32, 8, 128, device="cpu", max_kv_splits=64)
    w._target_programs = 528  # an H100's 132 SMs x 4
    assert w.members_per_block == 16 and w._block_m == 64
    # 8 forks x 32k: one member block, 8 kv heads -> 66 programs' worth, within 64 slots
    assert w.choose_num_prefix_chunks(8, 9, max_kv_len=33024) == 55
    assert w.choose_num_prefix_chunks(32, 3, max_kv_len=8448) == 17  # 512-token chunks
    assert w.choose_num_prefix_chunks(32, 3) == 33  # length unknown (CUDA-graph capture)
    # rows that compile without spills on sm_90 (kernels/NOTES.md item 8)
    per_member = FlashLoRACascadeDecodeWrapper(32, 8, 128, device="cpu", lr_shared=False)
    assert per_member.members_per_block == 4 and per_member._block_m == 16
    gemma = FlashLoRACascadeDecodeWrapper(16, 8, 256, device="cpu")
    assert gemma.members_per_block == 8 and gemma._block_m == 16
    qwen = FlashLoRACascadeDecodeWrapper(28, 4, 128, device="cpu")
    assert qwen.members_per_block == 9 and qwen._block_m == 64


# ---------------------------------------------------------------- GPU (serving sizes)

# 8 forks over a 5000-token trajectory (suffixes of 1 to 300 tokens), 3 forks over 1200,
# and requests of their own from 100 to 9000 tokens.
GPU_FORKS = [(5000, [(1, 0), (37, 1), (300, 2), (64, -1), (5, 0), (129, 1), (250, 2), (2, 0)]),
             (1200, [(17, 1), (90, -1), (3, 2)])]
GPU_SINGLES = [(100, 0), (9000, 1), (2500, -1), (777, 2), (4096, 0)]
GPU_CASES = [
    # group, n_kv, head_dim, rank, cap, lr_shared
    (4, 8, 128, 8, 0.0, True),      # Llama-3.1-8B, base-lr-shared
    (4, 8, 128, 64, 0.0, False),    # base-shared, R = 64
    (7, 4, 128, 24, 0.0, True),     # Qwen2.5-7B
    (7, 4, 128, 8, 0.0, False),
    (2, 8, 256, 16, 50.0, False),   # Gemma-2-9B's global layers
    (1, 32, 96, 8, 0.0, True),      # Phi-3-mini
]


@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("group,n_kv,head_dim,rank,cap,lr_shared", GPU_CASES)
def test_cascade_gpu(group: int, n_kv: int, head_dim: int, rank: int, cap: float,
                     lr_shared: bool, dtype: torch.dtype) -> None:
    p = make_forks(GPU_FORKS, GPU_SINGLES, n_qo=group * n_kv, n_kv=n_kv, head_dim=head_dim,
                   rank=rank, dtype=dtype, lr_per_adapter=not lr_shared, seed=rank + group)
    ref = reference(p, cap=cap)
    plain = FlashLoRADecodeWrapper(group * n_kv, n_kv, head_dim, max_lr_rank=rank,
                                   device=p.q.device)
    plain.plan(p.kv_indptr, p.kv_indices, p.lr_indices, p.adapter_ids, logit_cap=cap)
    plain_out = plain.run(p.q, p.k_buffer, p.v_buffer, p.lr_buffer, p.b_weights)
    for splits, chunks in ((None, None), (1, 1), (3, 20)):
        w, out = cascade(p, lr_shared=lr_shared, cap=cap, min_shared=256, splits=splits,
                         chunks=chunks, workspace_rows=2048, min_split_len=128)
        assert w.prefix_lens.count_nonzero() == sum(len(members) for _, members in GPU_FORKS)
        assert rel_err(out, ref) < TOL[dtype], f"splits={splits} chunks={chunks}"
        assert rel_err(out, plain_out.double()) < TOL[dtype]


@GPU
def test_cascade_cuda_graph_replay() -> None:
    """run() captured once (a global layer: cascade, and a windowed one: plain) replays
    correctly after the batch's index buffers are refilled and the groups refound in place,
    for a batch of other groups over the same pools."""
    shape = dict(n_qo=32, n_kv=8, head_dim=128, rank=8, dtype=torch.bfloat16)
    first = make_forks(GPU_FORKS, GPU_SINGLES[:1], **shape, seed=1)  # 12 requests
    second = make_forks([(3000, [(5, 1), (40, 2), (1, 0)]), (700, [(9, 0), (300, -1)])],
                        [(800, 2), (60, 1), (200, 0), (12, -1), (500, 2), (3, 0), (99, 1)],
                        **shape, seed=2)
    # one set of pools: the second batch's slots lie within the first's
    assert second.kv_indices.max() < first.k_buffer.shape[0]
    assert second.lr_indices.max() < first.lr_buffer.shape[0]
    for name in ("k_buffer", "v_buffer", "lr_buffer", "b_weights"):
        setattr(second, name, getattr(first, name))
    cap = int(first.kv_indptr[-1]) + 1000
    i32 = dict(dtype=torch.int32, device="cuda")
    kv_buf, lr_buf = torch.zeros(cap, **i32), torch.zeros(cap, **i32)
    indptr, adapters = torch.zeros(13, **i32), torch.zeros(12, **i32)
    q = torch.empty_like(first.q)

    def refill(p: Forks) -> int:
        n = int(p.kv_indptr[-1])
        kv_buf[:n], lr_buf[:n] = p.kv_indices, p.lr_indices
        indptr.copy_(p.kv_indptr)
        adapters.copy_(p.adapter_ids)
        q.copy_(p.q)
        return n

    w = FlashLoRACascadeDecodeWrapper(32, 8, 128, max_lr_rank=8, min_shared_len=256)
    w.plan(indptr, kv_buf, lr_buf, adapters, num_entries=refill(first))
    out, out_win = torch.empty_like(q), torch.empty_like(q)

    def two_layers() -> None:
        w.run(q, first.k_buffer, first.v_buffer, first.lr_buffer, first.b_weights, out=out)
        w.run(q, first.k_buffer, first.v_buffer, first.lr_buffer, first.b_weights, out=out_win,
              window=1023)

    two_layers()  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        two_layers()
    for p, grouped in ((second, 5), (first, 11)):
        w.find_groups(indptr, kv_buf, lr_buf, num_entries=refill(p))
        out.fill_(float("nan"))
        out_win.fill_(float("nan"))
        graph.replay()
        assert w.prefix_lens.count_nonzero() == grouped
        for window, result in ((None, out), (1023, out_win)):
            assert rel_err(result, reference(p, window=window)) < TOL[torch.bfloat16], window


# ---------------------------------------------------------------- the benchmark's Python


def test_the_cascade_benchmark_runs_with_stubbed_timers(monkeypatch) -> None:
    """scripts/bench_kernels.py --part cascade without a GPU: its batches, plans, checks and
    table, with the timer stubbed (each timed call runs once) and no FlashInfer."""
    import bench_kernels

    monkeypatch.setattr(bench_kernels, "bench", lambda fn, **kw: (fn(), 1.0)[1])
    shape = bench_kernels.Shape("tiny", 4, 1, 32)
    monkeypatch.setitem(bench_kernels.SHAPES, "tiny", shape)
    row = bench_kernels.cascade_shape(shape, 3, 24, 2, [8], None, device=DEV, dtype=torch.float32,
                                      min_shared=8)
    assert row["groups"] == 3 and row["max_rel_diff"] < 1e-5
    assert row["bytes_plain"] == 3 * 26 * 2 * 32 * 4 and row["bytes_cascade"] == 30 * 2 * 32 * 4
    table = bench_kernels.cascade_table([row], [8], copy_gbs=1.0)
    assert "| tiny | 3 x (0k + 2) | 8 | 1.0000 | 1.0000 (1.00) |" in table


def test_the_fork_benchmark_measures_the_decode_phase(monkeypatch, tmp_path) -> None:
    """scripts/bench_forks.py without a server: one server per cascade mode, a commit then
    the forks per repetition, cache flushed before each, and the decode phase counted from
    the last fork's first token."""
    import json
    from types import SimpleNamespace

    import bench_forks

    assert bench_forks.decode_phase([[(1.0, 1), (2.0, 3), (5.0, 9)], [(3.0, 1), (4.0, 5)]]) == {
        "decode_tokens": 9 - 3 + 5 - 1, "decode_s": 2.0, "decode_tok_s": 5.0}
    started, sent, flushed = [], [], []

    class FakeServer:
        def __init__(self, args, log_path=None) -> None:
            started.append(args[args.index("--lragent-cascade") + 1])
            assert args[args.index("--lragent-scheme") + 1] == "base-shared"
            self.url = "http://fake"

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            return None

    clock = iter(range(10**6))

    def fake_stream(url, ids, role, n_gen):
        sent.append((len(ids), role, n_gen))
        return [(next(clock), n) for n in range(1, n_gen + 1)]

    monkeypatch.setattr(bench_forks, "ServerProcess", FakeServer)
    monkeypatch.setattr(bench_forks, "stream_tokens", fake_stream)
    monkeypatch.setattr(bench_forks.requests, "post",
                        lambda url, **k: flushed.append(url) or SimpleNamespace(raise_for_status=lambda: None))
    out = tmp_path / "forks.json"
    assert bench_forks.main(["--model-path", "m", "--lora-paths", "plan=p", "action=a", "--context", "50",
                             "--forks", "3", "--gen", "4", "--reps", "2", "--scheme", "base-shared",
                             "--out", str(out)]) == 0
    assert started == ["off", "on"] and len(flushed) == 4
    own = 50 + bench_forks.OWN_TOKENS
    assert sent[:2] == [(3, None, 2), (50, None, 1)]  # warm-up, commit
    assert sorted(sent[2:5]) == [(own, "action", 4), (own, "plan", 4), (own, "plan", 4)]
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"off", "on"} and runs["on"]["decode_tokens"] > 0
