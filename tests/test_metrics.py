"""`sglang:lragent_*` Prometheus metrics: the counters and the delta logic in-process, then
the real CPU server (`--enable-metrics`) in base-shared (our cache) and non-shared
(SGLang's cache, counted through hooks), whose `/metrics` must agree with `/lragent/stats`.
"""

from __future__ import annotations

import random
import time
from types import SimpleNamespace
from typing import Any

import pytest
import requests
import torch

from lragent_sglang.scheme import Scheme
from lragent_sglang.server import metrics, stats
from lragent_sglang.server.config import LRAgentConfig
from lragent_sglang.server.request import RequestState
from lragent_sglang.server.runtime import LRAgentRuntime
from lragent_sglang.adapters.make import make_role_adapters
from lragent_sglang.agents.server_process import ServerProcess


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


def snapshot(per_adapter: dict[str | None, dict[str, int]], per_key: dict[str, dict[str, int]],
             base_evicted: int = 0) -> dict[str, Any]:
    """`cache.stats()` as our cache returns it: adapters by lora_id, LR keys by str(key)."""
    return {
        "base": {"tokens": 10, "bytes": 100, "inserted_tokens": 10, "evicted_tokens": base_evicted},
        "lr_pool_size": 64, "lr_pool_available": 60,
        "per_adapter": {k: {f: v.get(f, 0) for f in metrics.ADAPTER_COUNTERS} for k, v in per_adapter.items()},
        "per_lr_key": {k: {f: v.get(f, 0) for f in [*metrics.LR_KEY_COUNTERS, *metrics.LR_KEY_GAUGES]}
                       for k, v in per_key.items()},
    }


def runtime(scheme: Scheme, lr_keys: dict[str, str] | None = None) -> LRAgentRuntime:
    rt = LRAgentRuntime(LRAgentConfig(scheme))
    rt.lr_keys.update(lr_keys or {})
    return rt


def exporter_for(cache: SimpleNamespace, lora_ids: dict[str, str], rt: LRAgentRuntime, rank: int = 0) -> metrics.LRAgentMetrics:
    scheduler = SimpleNamespace(
        tree_cache=cache,
        server_args=SimpleNamespace(lora_paths=[SimpleNamespace(lora_id=i, lora_name=n) for i, n in lora_ids.items()]),
        tp_worker=SimpleNamespace(model_runner=None),
    )
    collector = SimpleNamespace(labels={"unit_rank": rank}, _counter_cls=FakeMetric, _gauge_cls=FakeMetric)
    return metrics.LRAgentMetrics(scheduler, collector, rt)


def test_counters_follow_deltas_and_resets():
    cache = SimpleNamespace(snap=None)
    cache.stats = lambda: cache.snap
    exporter = exporter_for(cache, {"id-plan": "plan", "id-act": "action"}, runtime(Scheme.BASE_LR_SHARED))
    fams = exporter.fams
    reprefill = fams.adapter_counters["lr_reprefill_tokens"]
    prompt = fams.adapter_counters["prompt_tokens"]
    lr_tokens = fams.lr_key_gauges["lr_tokens"]
    assert fams.info.values == {("0", "base-lr-shared"): 1}

    cache.snap = snapshot(
        {"id-plan": {"prompt_tokens": 40, "lr_reprefill_tokens": 5}, None: {"prompt_tokens": 3}},
        {"shared-lr": {"lr_tokens": 7}, "None": {}},
    )
    exporter.update()
    cache.snap = snapshot(
        {"id-plan": {"prompt_tokens": 50, "lr_reprefill_tokens": 9}, "id-act": {"prompt_tokens": 20}, None: {"prompt_tokens": 3}},
        {"shared-lr": {"lr_tokens": 8}}, base_evicted=4,
    )
    exporter.update()
    assert reprefill.values[("0", "plan")] == 9
    assert prompt.values == {("0", "plan"): 50, ("0", "action"): 20, ("0", "none"): 3}, "one series per adapter"
    assert lr_tokens.values == {("0", "shared-lr"): 8, ("0", "none"): 0}, "a key that left keeps its gauge, at 0"
    assert fams.base_counters["evicted_tokens"].values == {("0",): 4}
    assert fams.pool_gauges["lr_pool_available"].values == {("0",): 60}

    cache.snap = snapshot({"id-plan": {"lr_reprefill_tokens": 2}}, {})  # counters were reset
    exporter.update()
    assert reprefill.values[("0", "plan")] == 11


def test_adapter_and_lr_key_of_one_name_stay_apart():
    """In base-shared an adapter's LR key (its content) is shown with the adapter's name:
    separate delta bookkeeping."""
    cache = SimpleNamespace(snap=snapshot({"id-plan": {}}, {"adapter:c0ffee": {"lr_evicted_tokens": 6}}))
    cache.stats = lambda: cache.snap
    exporter = exporter_for(cache, {"id-plan": "plan"}, runtime(Scheme.BASE_SHARED, {"id-plan": "adapter:c0ffee"}), rank=2)
    exporter.update()
    cache.snap = snapshot({"id-plan": {"requests": 1}}, {"adapter:c0ffee": {"lr_evicted_tokens": 6}})
    exporter.update()
    assert exporter.fams.lr_key_counters["lr_evicted_tokens"].values[("2", "plan")] == 6
    assert exporter.fams.adapter_counters["requests"].values[("2", "plan")] == 1


def test_stock_cache_exports_adapters_and_base_only():
    counted = stats.StockCacheStats()
    counted.adapters.record("id-plan", 10, 4, 4)
    counted.evicted_tokens = 3
    kv = SimpleNamespace(k_buffer=[torch.zeros(5, 2, 4)], v_buffer=[torch.zeros(5, 2, 4)])
    cache = SimpleNamespace(
        evictable_size=lambda: 6, protected_size=lambda: 2, lragent_stats=counted,
        token_to_kv_pool_allocator=SimpleNamespace(get_kvcache=lambda: kv),
    )
    exporter = exporter_for(cache, {"id-plan": "plan"}, runtime(Scheme.NON_SHARED), rank=3)
    exporter.update()
    fams = exporter.fams
    assert fams.adapter_counters["computed_tokens"].values[("3", "plan")] == 6
    assert fams.base_gauges["bytes"].values[("3",)] == 8 * 2 * 8 * 4
    assert fams.base_counters["evicted_tokens"].values[("3",)] == 3
    assert ("3",) not in fams.base_counters["inserted_tokens"].values, "SGLang's cache has no insert counter"
    assert not any(k[0] == "3" for k in fams.lr_key_gauges["lr_tokens"].values), "no LR cache, no LR series"


def test_adapter_stats_arithmetic():
    counted = stats.AdapterStats()
    counted.record("a", prompt_tokens=100, base_hit=80, full_hit=30)
    counted.record("a", prompt_tokens=10, base_hit=0, full_hit=0)
    assert counted.snapshot()["a"] == {
        "requests": 2, "prompt_tokens": 110, "base_hit_tokens": 80, "lr_hit_tokens": 30,
        "lr_reprefill_tokens": 50, "computed_tokens": 80,
    }


def test_first_look_counts_the_capped_match_once_and_skips_health_checks():
    capped, priority_pass = SimpleNamespace(limit=9), SimpleNamespace(limit=None)
    req = SimpleNamespace(rid="abc", lragent=RequestState())
    assert not stats.first_look(req, priority_pass)
    assert stats.first_look(req, capped) and not stats.first_look(req, capped)
    assert not stats.first_look(SimpleNamespace(rid="HEALTH_CHECK_1", lragent=RequestState()), capped)
    assert not stats.first_look(None, capped)


def test_update_failure_does_not_raise():
    scheduler = SimpleNamespace(tree_cache=SimpleNamespace(stats=lambda: {"per_lr_key": {}}))
    collector = SimpleNamespace(labels={"unit_rank": 1}, _counter_cls=FakeMetric, _gauge_cls=FakeMetric)
    exporter = metrics.LRAgentMetrics(scheduler, collector, runtime(Scheme.BASE_SHARED))
    exporter.safe_update()
    assert exporter.failed


# ---- the real server ----------------------------------------------------------------

PREFIX_TOKENS = 48
VOCAB = (1000, 40000)


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


def by_label(scraped: dict, name: str, label: str) -> dict[str, float]:
    return {labels[label]: value for labels, value in scraped.get(name, [])}


def single(scraped: dict, name: str) -> float:
    ((_, value),) = scraped[name]
    return value


def expected_view(stats: dict) -> dict[str, Any]:
    """What /metrics must say, from /lragent/stats."""
    view: dict[str, Any] = {f: {a: e[f] for a, e in stats["per_adapter"].items()} for f in metrics.ADAPTER_COUNTERS}
    view["base_tokens"], view["base_bytes"] = stats["base"]["tokens"], stats["base"]["bytes"]
    view["base_evicted_tokens"] = stats["base"]["evicted_tokens"]
    if "per_lr_key" in stats:
        for f in (*metrics.LR_KEY_COUNTERS, *metrics.LR_KEY_GAUGES):
            view[f] = {k: e[f] for k, e in stats["per_lr_key"].items()}
        view["lr_pool_tokens"], view["lr_pool_available_tokens"] = stats["lr_pool_size"], stats["lr_pool_available"]
    return view


def metrics_view(scraped: dict, lr: bool) -> dict[str, Any]:
    p = metrics.PREFIX
    view: dict[str, Any] = {
        f: by_label(scraped, f"{p}{n}_total", metrics.ADAPTER_LABEL) for f, (n, _) in metrics.ADAPTER_COUNTERS.items()
    }
    view["base_tokens"], view["base_bytes"] = single(scraped, f"{p}base_tokens"), single(scraped, f"{p}base_bytes")
    view["base_evicted_tokens"] = single(scraped, f"{p}base_evicted_tokens_total")
    if lr:
        for f, (n, _) in metrics.LR_KEY_COUNTERS.items():
            view[f] = by_label(scraped, f"{p}{n}_total", metrics.LR_KEY_LABEL)
        for f, (n, _) in metrics.LR_KEY_GAUGES.items():
            view[f] = by_label(scraped, f"{p}{n}", metrics.LR_KEY_LABEL)
        view["lr_pool_tokens"] = single(scraped, f"{p}lr_pool_tokens")
        view["lr_pool_available_tokens"] = single(scraped, f"{p}lr_pool_available_tokens")
    return view


def run_and_compare(smollm2: Any, tmp_path: Any, scheme: str) -> tuple[dict[str, Any], dict[str, Any], dict]:
    """Start `scheme` with two adapters and metrics on, send plan, action, no adapter and
    plan again over one prefix, and return (/lragent/stats, the /metrics view, raw scrape)
    once both agree (the last publish follows the response by a moment)."""
    adapters = make_role_adapters(smollm2, tmp_path, roles=("plan", "action"), shared_v_a=True)
    args = [
        "--model-path", str(smollm2), "--dtype", "float32", "--enable-lora",
        "--lora-paths", *[f"{r}={p}" for r, p in adapters.items()],
        "--max-loras-per-batch", "2", "--max-lora-rank", "8",
        "--lragent-scheme", scheme, "--enable-metrics",
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
        deadline = time.monotonic() + 10
        while True:
            stats = requests.get(srv.url + "/lragent/stats", timeout=30).json()["schedulers"][0]
            scraped = scrape(srv)
            try:
                view = metrics_view(scraped, "per_lr_key" in stats)
            except (KeyError, ValueError):
                view = None
            if view == expected_view(stats) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert view == expected_view(stats), srv.log_tail()
        requests.post(srv.url + "/flush_cache", timeout=60).raise_for_status()
        flushed = requests.get(srv.url + "/lragent/stats", timeout=30).json()["schedulers"][0]
        assert flushed["per_adapter"] == {} and flushed["base"]["evicted_tokens"] == 0, (
            f"{scheme}: /flush_cache must start the counters afresh, as it empties the cache: {flushed}")
    return stats, view, scraped


@pytest.mark.e2e
@pytest.mark.slow
def test_metrics_match_lragent_stats(smollm2, tmp_path):
    stats, view, scraped = run_and_compare(smollm2, tmp_path, "base-shared")
    assert set(view["prompt_tokens"]) == {"plan", "action", "none"}
    assert set(view["lr_tokens"]) >= {"plan", "action"}, "one LR key per adapter in base-shared"
    assert view["requests"]["plan"] == 2 and view["requests"]["action"] == 1
    assert view["lr_reprefill_tokens"]["action"] >= PREFIX_TOKENS, "action re-prefills plan's prefix LR"
    assert view["lr_hit_tokens"]["plan"] >= PREFIX_TOKENS, "plan's second request hits its own LR"
    assert view["base_hit_tokens"]["action"] >= PREFIX_TOKENS and view["lr_hit_tokens"]["action"] == 0
    for a in view["prompt_tokens"]:
        assert view["computed_tokens"][a] == view["prompt_tokens"][a] - view["lr_hit_tokens"][a]
    assert view["base_tokens"] >= PREFIX_TOKENS and view["base_bytes"] > 0
    assert view["lr_pool_tokens"] > 0
    ((labels, value),) = scraped[f"{metrics.PREFIX}info"]
    assert labels["scheme"] == "base-shared" and value == 1
    assert labels["model_name"] and "tp_rank" in labels


@pytest.mark.e2e
@pytest.mark.slow
def test_stock_cache_per_adapter_metrics(smollm2, tmp_path):
    """non-shared runs on SGLang's RadixCache (keyed by adapter): counted through our hooks."""
    stats, view, scraped = run_and_compare(smollm2, tmp_path, "non-shared")
    assert "per_lr_key" not in stats and metrics.PREFIX + "lr_pool_tokens" not in scraped
    assert not any(metrics.LR_KEY_LABEL in labels for samples in scraped.values() for labels, _ in samples)
    assert view["requests"]["plan"] == 2 and view["requests"]["action"] == 1
    assert view["base_hit_tokens"]["plan"] >= PREFIX_TOKENS, "plan's second request hits its own subtree"
    assert view["base_hit_tokens"]["action"] == 0, "non-shared: action does not see plan's KV"
    assert view["lr_hit_tokens"] == view["base_hit_tokens"] and set(view["lr_reprefill_tokens"].values()) == {0}
    assert view["base_tokens"] > 2 * PREFIX_TOKENS, "each adapter stored its own copy of the prefix"
    ((labels, _),) = scraped[f"{metrics.PREFIX}info"]
    assert labels["scheme"] == "non-shared"
