"""The router benchmark's Python on CPU, clusters and timings stubbed (the GPU run itself is
not a test)."""

from __future__ import annotations

import json

import bench_router
import bench_trace


def test_every_run_gets_its_cluster_policy_scheme_and_keyed_requests(monkeypatch, tmp_path, capsys) -> None:
    started, keyed = [], []

    class FakeWorker:
        def __init__(self, i: int) -> None:
            self.url = f"http://w{i}"

    class FakeCluster:
        def __init__(self, worker_args, n, policy, log_dir=None) -> None:
            started.append((worker_args[worker_args.index("--lragent-scheme") + 1], policy, n,
                            "--mem-fraction-static" in worker_args))
            self.workers = [FakeWorker(i) for i in range(n)]
            self.url = "http://router"

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            return None

    hits = {"http://w0": [0, 0], "http://w1": [0, 0]}

    def fake_trajectory(url, seed, steps, roles, vocab, out, bar, headers=None) -> None:
        keyed.append(headers[bench_router.ROUTING_KEY_HEADER])
        hits[f"http://w{seed % 2}"][0] += 10
        hits[f"http://w{seed % 2}"][1] += 8
        out[seed] = {"tokens": 100, "ttft_sum_s": 0.5, "cached": 8, "prompt": 10}

    monkeypatch.setattr(bench_router, "Cluster", FakeCluster)
    monkeypatch.setattr(bench_trace, "run_trajectory", fake_trajectory)
    monkeypatch.setattr(bench_router, "stream_generate", lambda *a, **k: None)
    monkeypatch.setattr(bench_router, "worker_hits", lambda url: tuple(hits[url]))
    monkeypatch.setattr(bench_router.requests, "post", lambda *a, **k: type("R", (), {"raise_for_status": lambda s: None})())
    out = tmp_path / "bench.json"
    assert bench_router.main(["--model-path", "m", "--lora-paths", "plan=p", "--context", "64", "--in-flight", "4",
                              "--out", str(out), "--", "--mem-fraction-static", "0.4"]) == 0
    assert started == [("base-lr-shared", "manual", 2, True), ("base-lr-shared", "round_robin", 2, True),
                       ("non-shared", "manual", 2, True)]
    assert len(keyed) == 12 and len(set(keyed)) == 12  # one key per trajectory and run
    body = json.loads(out.read_text())
    assert set(body["runs"]) == {r.label for r in bench_router.RUNS}
    row = body["runs"]["base-lr-shared placement"]
    assert row["cached_fraction"] == 0.8 and [w["cached_fraction"] for w in row["workers"]] == [0.8, 0.8]
    assert "x rr" in capsys.readouterr().out
