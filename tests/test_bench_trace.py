"""The trace benchmark's bookkeeping (the GPU run itself is not a test)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_trace import kv_bytes_written, paper_trace  # noqa: E402


def state(computed: int, reprefill: int, lr_tokens: int = 0) -> dict:
    return {
        "base": {"tokens": 100, "bytes": 100 * 1000},
        "lr": {"tokens": lr_tokens, "bytes": lr_tokens * 10},
        "per_adapter": {
            "plan": {"computed_tokens": computed - 5, "lr_reprefill_tokens": reprefill},
            "none": {"computed_tokens": 5, "lr_reprefill_tokens": 0},
        },
    }


def test_paper_trace_has_17_steps_and_the_papers_length() -> None:
    steps = paper_trace(2048)
    assert len(steps) == 17
    assert sum(n for _, n, _ in steps) + sum(g for _, _, g in steps) == 912 + 4 * 2048


def test_kv_written_counts_the_run_only_and_spares_lr_reprefill_its_kv() -> None:
    before = state(computed=50, reprefill=0)
    after = state(computed=350, reprefill=100, lr_tokens=7)
    # 300 computed tokens in the run, 100 of them LR re-prefill: 200 KV slots + 300 LR rows,
    # plus 4 decode tokens of both.
    assert kv_bytes_written(before, after, decode_tokens=4) == 204 * 1000 + 304 * 10


def test_kv_written_without_an_lr_cache_counts_kv_only() -> None:
    assert kv_bytes_written(state(0, 0), state(40, 0), decode_tokens=0) == 40 * 1000
