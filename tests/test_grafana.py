"""The checked-in Grafana dashboard only queries metrics we export and covers the topics
of the live dashboard, so a renamed metric cannot leave it silently empty."""

from __future__ import annotations

import json
import re
from pathlib import Path

from lragent_sglang import metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboards" / "grafana-lragent.json"
METRIC_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z0-9_:]+")

# topic -> (words the title must contain, metrics one of its queries must use)
TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "base hit rate": (("base", "hit rate"), ("base_hit_tokens_total", "requested_tokens_total")),
    "LR hit rate": (("lr", "hit rate"), ("lr_hit_tokens_total", "requested_tokens_total")),
    "LR re-prefill": (("re-prefill",), ("lr_gap_tokens_total",)),
    "evictions": (("eviction",), ("base_evicted_tokens_total", "lr_evicted_tokens_total")),
    "memory": (("memory per component",), ("base_bytes", "lr_bytes")),
    "memory without sharing": (("memory without sharing",), ("base_bytes", "base_tokens", "lr_tokens")),
    "prefill without sharing": (("prefill without sharing",), ("requested_tokens_total", "lr_hit_tokens_total")),
}


def exported_names() -> set[str]:
    """Every sample name our exporter produces (prometheus_client adds `_total` to counters)."""
    counters = [n for n, _ in (*metrics.ADAPTER_COUNTERS.values(), *metrics.BASE_COUNTERS.values())]
    gauges = [n for n, _ in (*metrics.ADAPTER_GAUGES.values(), *metrics.BASE_GAUGES.values(),
                             *metrics.POOL_GAUGES.values())]
    return {metrics.PREFIX + n + "_total" for n in counters} | {metrics.PREFIX + n for n in [*gauges, "info"]}


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def exprs(panel: dict) -> list[str]:
    return [t["expr"] for t in panel.get("targets", [])]


def test_queries_use_only_exported_metrics():
    names = exported_names()
    panels = load()["panels"]
    assert panels
    for panel in panels:
        assert exprs(panel), f"panel {panel['title']!r} has no query"
        for expr in exprs(panel):
            assert expr.count("(") == expr.count(")"), f"unbalanced parentheses in {expr}"
            used = set(METRIC_NAME.findall(expr))
            assert used, f"panel {panel['title']!r} queries no metric: {expr}"
            assert used <= names, f"panel {panel['title']!r} uses unknown metrics {sorted(used - names)}"
            assert panel["datasource"]["uid"] == "${datasource}"


def test_rates_wrap_counters_only():
    counter = re.compile(re.escape(metrics.PREFIX) + r"\w+_total")
    for panel in load()["panels"]:
        for expr in exprs(panel):
            for match in counter.finditer(expr):
                assert expr[: match.start()].endswith("rate("), f"counter without rate(): {expr}"


def test_panels_cover_the_topics():
    panels = load()["panels"]
    for topic, (words, needed) in TOPICS.items():
        matching = [p for p in panels if all(w in p["title"].lower() for w in words)]
        assert matching, f"no panel for {topic}"
        used = {n for p in matching for e in exprs(p) for n in METRIC_NAME.findall(e)}
        assert {metrics.PREFIX + n for n in needed} <= used, f"{topic}: missing {needed}"


def test_datasource_is_a_variable():
    variables = {v["name"]: v for v in load()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "$adapters" in json.dumps(load()["panels"]) and "adapters" in variables
