"""`sglang:lragent_*` Prometheus metrics: the delta logic in-process, then the real CPU
server (base-shared, `--enable-metrics`) whose `/metrics` must agree with `/lragent/stats`.
"""

from __future__ import annotations

import random
import time
from types import SimpleNamespace
from typing import Any

import pytest
import requests

from lragent_sglang import metrics
from lragent_sglang.adapters import make_role_adapters
from lragent_sglang.server_process import ServerProcess


class FakeMetric:
    """Stands in for prometheus_client's Counter / Gauge (the collector's DI classes)."""

    def __init__(self, name: str, documentation: str, labelnames: list[str], **kwargs: Any) -> None:
        self.name = name
        self.labelnames = labelnames
        self.values: dict[tuple[str, ...], float] = {}

    def labels(self, **labels: str) -> "FakeMetric.Child":
        assert sorted(labels) == sorted(self.labelnames)
        return FakeMetric.Child(self, tuple(labels[n] for n in self.labelnames))

    class Child:
        def __init__(self, parent: "FakeMetric", key: tuple[str, ...]) -> None:
            self.parent, self.key = parent, key
            parent.values.setdefault(key, 0)  # prometheus_client exports a child from creation

        def inc(self, amount: float) -> None:
            assert amount > 0, "counters only go up"
            self.parent.values[self.key] += amount

        def set(self, value: float) -> None:
            self.parent.values[self.key] = value


def snapshot(per_key: dict[str, dict[str, int]], base_evicted: int = 0) -> dict[str, Any]:
    fields = [*metrics.ADAPTER_COUNTERS, *metrics.ADAPTER_GAUGES]
    return {
        "base": {"tokens": 10, "bytes": 100, "inserted_tokens": 10, "evicted_tokens": base_evicted},
        "lr_pool_size": 64, "lr_pool_available": 60,
        "per_lr_key": {k: {f: v.get(f, 0) for f in fields} for k, v in per_key.items()},
    }


def test_counters_follow_deltas_and_resets(monkeypatch):
    monkeypatch.setenv("LRAGENT_SCHEME", "base-shared")
    cache = SimpleNamespace(snap=None)
    cache.stats = lambda: cache.snap
    lora_ref = SimpleNamespace(lora_id="id-plan", lora_name="plan")
    scheduler = SimpleNamespace(
        tree_cache=cache, server_args=SimpleNamespace(lora_paths=[lora_ref]),
        tp_worker=SimpleNamespace(model_runner=None),
    )
    collector = SimpleNamespace(labels={"unit_rank": 0}, _counter_cls=FakeMetric, _gauge_cls=FakeMetric)
    exporter = metrics.LRAgentMetrics(scheduler, collector)
    fams = exporter.fams
    gap = fams.adapter_counters["lr_gap_tokens"]
    lr_tokens = fams.adapter_gauges["lr_tokens"]
    assert fams.info.values == {("0", "base-shared"): 1}

    cache.snap = snapshot({"id-plan": {"lr_gap_tokens": 5, "lr_tokens": 7}, "None": {"requested_tokens": 3}})
    exporter.update()
    cache.snap = snapshot({"id-plan": {"lr_gap_tokens": 9, "lr_tokens": 8}}, base_evicted=4)
    exporter.update()
    assert gap.values[("0", "plan")] == 9
    assert lr_tokens.values == {("0", "plan"): 8, ("0", "(base model)"): 0}
    assert fams.adapter_counters["requested_tokens"].values == {("0", "(base model)"): 3, ("0", "plan"): 0}
    assert fams.base_counters["evicted_tokens"].values == {("0",): 4}
    assert fams.pool_gauges["lr_pool_available"].values == {("0",): 60}

    cache.snap = snapshot({"id-plan": {"lr_gap_tokens": 2}})  # counters were reset
    exporter.update()
    assert gap.values[("0", "plan")] == 11


def test_update_failure_does_not_raise(monkeypatch):
    monkeypatch.setenv("LRAGENT_SCHEME", "base-shared")
    scheduler = SimpleNamespace(tree_cache=SimpleNamespace(stats=lambda: {"per_lr_key": {}}))
    collector = SimpleNamespace(labels={"unit_rank": 1}, _counter_cls=FakeMetric, _gauge_cls=FakeMetric)
    exporter = metrics.LRAgentMetrics(scheduler, collector)
    exporter.safe_update()
    assert exporter.failed


# ---- the real server ----------------------------------------------------------------

PREFIX_TOKENS = 48
VOCAB = (1000, 40000)
COUNTER_FIELDS = list(metrics.ADAPTER_COUNTERS)


def scrape(srv: ServerProcess) -> dict[str, list[tuple[dict[str, str], float]]]:
    """/metrics as sample name -> [(labels, value)], only our series."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(srv.url + "/metrics", timeout=30).text
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(metrics.PREFIX):
                out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def by_adapter(scraped: dict, name: str) -> dict[str, float]:
    return {labels["adapter"]: value for labels, value in scraped.get(name, [])}


def single(scraped: dict, name: str) -> float:
    ((_, value),) = scraped[name]
    return value


def expected_view(stats: dict) -> dict[str, Any]:
    return {
        **{f: {a: e[f] for a, e in stats["per_lr_key"].items()} for f in COUNTER_FIELDS},
        "lr_tokens": {a: e["lr_tokens"] for a, e in stats["per_lr_key"].items()},
        "lr_bytes": {a: e["lr_bytes"] for a, e in stats["per_lr_key"].items()},
        "base_tokens": stats["base"]["tokens"], "base_bytes": stats["base"]["bytes"],
        "base_evicted_tokens": stats["base"]["evicted_tokens"],
        "lr_pool_tokens": stats["lr_pool_size"], "lr_pool_available_tokens": stats["lr_pool_available"],
    }


def metrics_view(scraped: dict) -> dict[str, Any]:
    p = metrics.PREFIX
    return {
        **{f: by_adapter(scraped, f"{p}{f}_total") for f in COUNTER_FIELDS},
        "lr_tokens": by_adapter(scraped, f"{p}lr_tokens"),
        "lr_bytes": by_adapter(scraped, f"{p}lr_bytes"),
        "base_tokens": single(scraped, f"{p}base_tokens"), "base_bytes": single(scraped, f"{p}base_bytes"),
        "base_evicted_tokens": single(scraped, f"{p}base_evicted_tokens_total"),
        "lr_pool_tokens": single(scraped, f"{p}lr_pool_tokens"),
        "lr_pool_available_tokens": single(scraped, f"{p}lr_pool_available_tokens"),
    }


@pytest.mark.e2e
@pytest.mark.slow
def test_metrics_match_lragent_stats(smollm2, tmp_path):
    adapters = make_role_adapters(smollm2, tmp_path, roles=("plan", "action"), shared_v_a=True)
    args = [
        "--model-path", str(smollm2), "--dtype", "float32", "--enable-lora",
        "--lora-paths", *[f"{r}={p}" for r, p in adapters.items()],
        "--max-loras-per-batch", "2", "--max-lora-rank", "8",
        "--lragent-scheme", "base-shared", "--enable-metrics",
        # SGLang publishes (and so do we) every N decode steps, else 30 s after going idle.
        "--decode-log-interval", "1",
    ]
    rng = random.Random(0)
    prefix = [rng.randrange(*VOCAB) for _ in range(PREFIX_TOKENS)]
    tails = {name: [rng.randrange(*VOCAB) for _ in range(8)] for name in ("plan", "action", "base", "again")}
    sampling = {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True}
    with ServerProcess(args, log_path=tmp_path / "server.log") as srv:
        for lora, tail in (("plan", "plan"), ("action", "action"), (None, "base"), ("plan", "again")):
            payload: dict[str, Any] = {"input_ids": prefix + tails[tail], "sampling_params": sampling}
            if lora:
                payload["lora_path"] = lora
            srv.generate(**payload)
        # The last publish follows the response by a moment; poll until both views agree.
        deadline = time.monotonic() + 10
        while True:
            stats = requests.get(srv.url + "/lragent/stats", timeout=30).json()["schedulers"][0]
            scraped = scrape(srv)
            try:
                view = metrics_view(scraped)
            except (KeyError, ValueError):
                view = None
            if view == expected_view(stats) or time.monotonic() > deadline:
                break
            time.sleep(0.5)

    assert view == expected_view(stats), srv.log_tail()
    assert set(view["requested_tokens"]) == {"plan", "action", "(base model)"}
    assert view["lr_gap_tokens"]["action"] >= PREFIX_TOKENS, "action re-prefills plan's prefix LR"
    assert view["lr_hit_tokens"]["plan"] >= PREFIX_TOKENS, "plan's second request hits its own LR"
    assert view["base_tokens"] >= PREFIX_TOKENS and view["base_bytes"] > 0
    assert view["lr_pool_tokens"] > 0
    ((labels, value),) = scraped[f"{metrics.PREFIX}info"]
    assert labels["scheme"] == "base-shared" and value == 1
    assert labels["model_name"] and "tp_rank" in labels
