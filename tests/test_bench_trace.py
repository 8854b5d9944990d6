"""The trace benchmark's bookkeeping (the GPU run itself is not a test)."""

from __future__ import annotations

from bench_trace import kv_bytes_written, paper_trace


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


def test_every_server_runs_every_cell_of_the_grid(monkeypatch, fake_servers, tmp_path) -> None:
    """Four server starts cover the whole (context x in-flight) grid, each cell flushed first."""
    import json
    from types import SimpleNamespace

    import bench_trace

    flushed = []

    def fake_run(url, steps, in_flight, roles, vocab, label):
        return {"throughput_tok_s": 1.0, "ttft_sum_s": 0.0, "cached_fraction": 0.0, "steps": len(steps),
                "tokens": sum(n + g for _, n, g in steps), "roles": roles, "in_flight": in_flight,
                "kv_bytes_per_trajectory": 0.0, "kv_bytes_written_per_trajectory": 0.0}

    monkeypatch.setattr(bench_trace, "run_scheme", fake_run)
    monkeypatch.setattr(bench_trace, "stream_generate", lambda *a, **k: ([], 0.0, 0))
    monkeypatch.setattr(bench_trace.requests, "post",
                        lambda url, **k: flushed.append(url) or SimpleNamespace(raise_for_status=lambda: None))
    out = tmp_path / "trace.json"
    assert bench_trace.main(["--model-path", "m", "--lora-paths", "plan=p", "--context", "2048", "8192",
                             "--in-flight", "1", "8", "--no-adapter-run", "--out", str(out)]) == 0
    started = [args[args.index("--lragent-scheme") + 1] for args in fake_servers]
    assert sorted(started) == sorted(["non-shared", "full-shared", "base-shared", "base-lr-shared"])
    cells = json.loads(out.read_text())["cells"]
    assert [(c["context"], c["in_flight"]) for c in cells] == [(2048, 1), (2048, 8), (8192, 1), (8192, 8)]
    for cell in cells:
        assert set(cell["runs"]) == {"non-shared", "no-adapters", "full-shared", "base-shared",
                                     "base-lr-shared", "no-adapters lragent"}
        assert cell["runs"]["base-shared"]["tokens"] == 912 + 4 * cell["context"]
        assert cell["runs"]["base-shared"]["in_flight"] == cell["in_flight"]
        assert cell["runs"]["no-adapters"]["roles"] is False and cell["runs"]["non-shared"]["roles"] is True
    assert len(flushed) == 4 * 6, "every run starts from an empty cache"
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
