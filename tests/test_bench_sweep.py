"""The in-flight sweep of bench_trace (host tier off and on, stock no-adapter peers) and
the profiler time breakdown, with stubbed servers and a synthetic profiler trace."""

from __future__ import annotations

import gzip
import json
from types import SimpleNamespace

import bench_trace
import pytest
from profile_summary import summarise, union_length


def kernel(name: str, ts: float, dur: float, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 7}


def cpu(name: str, ts: float, dur: float, tid: int = 1) -> dict:
    return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}


TRACE = {"traceEvents": [
    cpu("scheduler step", 0, 400_000), cpu("other thread", 0, 50, tid=2),
    kernel("sm90_xmma_gemm_bf16", 100_000, 200_000),
    kernel("_sgemm_lora_a_kernel", 300_000, 50_000),
    kernel("_extend_kernel", 320_000, 60_000),  # overlaps the LoRA kernel
    kernel("_decode_split_kernel", 500_000, 100_000),
    kernel("sampling_from_probs", 700_000, 100_000),
    kernel("Memcpy HtoD", 850_000, 50_000, cat="gpu_memcpy"),
    kernel("elementwise_add", 950_000, 50_000),
    {"ph": "i", "name": "marker", "ts": 0},
]}


def test_union_length_merges_overlaps() -> None:
    assert union_length([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4


def test_profile_summary_classes_busy_fraction_and_host_bound_time() -> None:
    s = summarise(TRACE)
    assert s["window_s"] == pytest.approx(1.0)
    # kernels cover 100-380k, 500-600k, 700-800k, 850-900k, 950-1000k us = 0.58 s
    assert s["gpu_busy_s"] == pytest.approx(0.58)
    assert s["gpu_busy_fraction"] == pytest.approx(0.58)
    assert s["kernel_s"] == pytest.approx({"gemm": 0.2, "attention": 0.16, "lora": 0.05, "sampling": 0.1,
                                           "copies": 0.05, "other": 0.05})
    assert s["top_kernels"]["attention"] == ["_decode_split_kernel", "_extend_kernel"]
    # the scheduler thread runs 0-400k us; the GPU is busy 100-380k of it
    assert s["scheduler_cpu_s"] == pytest.approx(0.4)
    assert s["scheduler_cpu_while_gpu_idle_s"] == pytest.approx(0.12)


def fake_run(url, steps, in_flight, roles, vocab, label):
    host = "+host" in label
    return {"throughput_tok_s": 1000.0 / in_flight * (2 if host else 1), "ttft_sum_s": 1.0,
            "cached_fraction": 0.9 if host else 0.5, "kv_bytes_per_trajectory": 0.0,
            "kv_bytes_written_per_trajectory": 0.0, "host_loaded_back_tokens": 100 if host else 0,
            "roles": roles}


@pytest.fixture
def stubbed(monkeypatch, fake_servers):
    posted: list[tuple[str, dict | None]] = []
    monkeypatch.setattr(bench_trace, "run_scheme", fake_run)
    monkeypatch.setattr(bench_trace, "stream_generate", lambda *a, **k: ([], 0.0, 0))
    monkeypatch.setattr(bench_trace.requests, "post", lambda url, json=None, **k: posted.append((url, json))
                        or SimpleNamespace(raise_for_status=lambda: None))
    return posted


def test_in_flight_sweep_with_host_tier_off_and_on_in_one_run(stubbed, fake_servers, tmp_path) -> None:
    out = tmp_path / "sweep.json"
    assert bench_trace.main(["--model-path", "m", "--lora-paths", "plan=p", "--context", "8192",
                             "--in-flight", "8", "16", "32", "64", "--schemes", "base-lr-shared",
                             "--no-adapter-run", "--host-tier", "off", "on", "--hicache-ratio", "3",
                             "--out", str(out)]) == 0
    servers = [(a[a.index("--lragent-scheme") + 1], "--enable-hierarchical-cache" in a) for a in fake_servers]
    assert sorted(servers) == [("base-lr-shared", False), ("base-lr-shared", True),
                               ("non-shared", False), ("non-shared", True)]
    host_args = next(a for a in fake_servers if "--enable-hierarchical-cache" in a)
    assert host_args[host_args.index("--hicache-ratio") + 1] == "3.0"
    cells = json.loads(out.read_text())["cells"]
    assert [c["in_flight"] for c in cells] == [8, 16, 32, 64]
    for cell in cells:
        assert set(cell["runs"]) == {"base-lr-shared", "base-lr-shared +host", "no-adapters lragent",
                                     "no-adapters lragent +host", "no-adapters", "no-adapters +host"}
        assert cell["runs"]["no-adapters +host"]["roles"] is False
        assert cell["runs"]["base-lr-shared +host"]["host_loaded_back_tokens"] == 100
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_profile_option_profiles_the_first_cell_of_one_label(stubbed, fake_servers, tmp_path, monkeypatch) -> None:
    posted = stubbed
    pdir = tmp_path / "prof"
    ttft = iter([10.0, 16.0])  # the server's TTFT sum before and after the run

    def fake_post(url, json=None, **k):
        posted.append((url, json))
        if url.endswith("/start_profile"):
            target = pdir / "base-lr-shared"
            with gzip.open(target / "run-TP-0.trace.json.gz", "wt") as f:
                f.write(globals()["json"].dumps(TRACE))
        return SimpleNamespace(raise_for_status=lambda: None)

    monkeypatch.setattr(bench_trace.requests, "post", fake_post)
    monkeypatch.setattr(bench_trace, "metric_sum", lambda url, name: next(ttft))
    out = tmp_path / "p.json"
    assert bench_trace.main(["--model-path", "m", "--lora-paths", "plan=p", "--context", "64",
                             "--in-flight", "2", "4", "--schemes", "base-lr-shared", "--profile-dir", str(pdir),
                             "--profile-steps", "50", "--out", str(out)]) == 0
    starts = [j for u, j in posted if u.endswith("/start_profile")]
    assert len(starts) == 1 and starts[0]["num_steps"] == 50
    assert "--enable-metrics" in fake_servers[0]
    cells = json.loads(out.read_text())["cells"]
    first = cells[0]["runs"]["base-lr-shared"]
    assert first["profile"]["gpu_busy_fraction"] == pytest.approx(0.58)
    assert first["http_ttft_s"] == pytest.approx(1.0 * 2 - 6.0)
    assert "profile" not in cells[1]["runs"]["base-lr-shared"]
