"""The cascade sweep of the kernel benchmark on CPU (interpreter, tiny shape, timing
stubbed): every option plans and runs, its output is checked against the plain decode,
and the table picks the fastest correct one. The GPU run itself is not a test."""

from __future__ import annotations

import pytest
import torch

import bench_kernels
from lragent_sglang.kernels import FlashLoRACascadeDecodeWrapper

TINY = bench_kernels.Shape("tiny", 4, 1, 64)


def test_sweep_cascade_runs_every_option_and_the_table_picks_the_fastest_correct(monkeypatch) -> None:
    timings = iter(range(1, 1000))
    monkeypatch.setattr(bench_kernels, "bench", lambda fn, **kw: (fn(), float(next(timings)))[1])
    rows = bench_kernels.sweep_cascade(TINY, forks=3, prefix=40, suffix=8, rank=8, device="cpu",
                                       dtype=torch.float32, min_shared=16)
    default = [r for r in rows if r["default"]]
    assert len(default) == 1 and default[0]["tiles"] is None
    assert {r["members"] for r in rows} == {4, 8, 16}
    assert {tuple(r["tiles"]) for r in rows if r["tiles"]} == set(bench_kernels.CASCADE_TILES)
    assert len({r["chunks"] for r in rows}) > 1
    assert all(r["rel_diff"] < 1e-5 for r in rows)
    # the first option timed is the fastest here; poison it to see the table skip it
    rows[0]["rel_diff"] = 1.0
    table = bench_kernels.sweep_cascade_table(rows)
    second = rows[1]
    assert f"{second['ms']:.4f} ({second['plain'] / second['ms']:.2f}x)" in table.splitlines()[-1]


def test_members_knob_sets_the_level_one_rows_and_refuses_fewer_than_two() -> None:
    w = FlashLoRACascadeDecodeWrapper(32, 8, 128, device="cpu", members=8)
    assert w.members_per_block == 8 and w._block_m == 32
    with pytest.raises(ValueError, match="at least 2 members"):
        FlashLoRACascadeDecodeWrapper(32, 8, 128, device="cpu", members=1)


def test_sweep_decode_tries_every_tile_and_split_counts_around_the_plan(monkeypatch) -> None:
    monkeypatch.setattr(bench_kernels, "bench", lambda fn, **kw: (fn(), 1.0)[1])
    rows = bench_kernels.sweep_decode(TINY, 8, cases=((2, 64),), device="cpu")
    planned = rows[0]["planned_splits"]
    tiles = {(r["block_n"], r["warps"], r["stages"]) for r in rows if r["splits"] == planned}
    assert tiles == set(bench_kernels.DECODE_TILES)
    assert {r["splits"] for r in rows} == {planned, 2 * planned, 4 * planned} | {max(1, planned // 2)}
    assert all(r["off"] == r["lr"] == 1.0 for r in rows)
