"""The checked-in Grafana dashboard only queries metrics that exist (ours, and SGLang's own
ones that the live page reads too) and covers the topics of the live dashboard, so a
renamed metric cannot leave it silently empty."""

from __future__ import annotations

import json
import re
from pathlib import Path

from lragent_sglang.server import dashboard, metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboards" / "grafana-lragent.json"
METRIC_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z0-9_:]+")

# topic -> (words the title must contain, metrics one of its queries must use)
L = metrics.PREFIX
TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "base hit rate": (("base", "hit rate", "adapter"), (L + "base_hit_tokens_total", L + "prompt_tokens_total")),
    "LR hit rate": (("lr", "hit rate", "adapter"), (L + "lr_hit_tokens_total", L + "prompt_tokens_total")),
    "LR re-prefill": (("re-prefill", "adapter"), (L + "lr_reprefill_tokens_total",)),
    "prefill compute": (("prefill compute", "adapter"), (L + "computed_tokens_total",)),
    "evictions": (("eviction",), (L + "base_evicted_tokens_total", L + "lr_evicted_tokens_total")),
    "memory": (("memory per component",), (L + "base_bytes", L + "lr_bytes")),
    "LR memory per key": (("lr memory per lr key",), (L + "lr_bytes",)),
    "memory without sharing": (("memory without sharing",), (L + "base_bytes", L + "base_tokens", L + "lr_tokens")),
    "prefill without sharing": (("prefill without sharing",), (L + "prompt_tokens_total", L + "lr_hit_tokens_total")),
    "SGLang throughput": (("throughput (sglang)",), ("sglang:prompt_tokens_total", "sglang:generation_tokens_total")),
    "SGLang requests": (("requests (sglang)",), ("sglang:num_running_reqs", "sglang:num_queue_reqs")),
    "SGLang usage": (("usage", "(sglang)"), ("sglang:token_usage",)),
}


def known_names() -> set[str]:
    """Our exported sample names and the SGLang metrics checked against a live server
    (tests/test_dashboard.py)."""
    return metrics.exported_names() | set(dashboard.SGLANG_METRICS)


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def exprs(panel: dict) -> list[str]:
    return [t["expr"] for t in panel.get("targets", [])]


def test_queries_use_only_exported_metrics():
    names = known_names()
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


def test_every_metric_we_export_is_shown():
    used = {n for p in load()["panels"] for e in exprs(p) for n in METRIC_NAME.findall(e)}
    unused = metrics.exported_names() - used - {L + "base_inserted_tokens_total", L + "lr_inserted_tokens_total"}
    assert not unused, f"exported but on no panel: {sorted(unused)}"


def test_rates_wrap_counters_only():
    counter = re.compile(r"sglang:\w+_total")
    for panel in load()["panels"]:
        for expr in exprs(panel):
            for match in counter.finditer(expr):
                before = expr[: match.start()]
                assert before.endswith(("rate(", "increase(")), f"counter without rate(): {expr}"


def test_panels_cover_the_topics():
    panels = load()["panels"]
    for topic, (words, needed) in TOPICS.items():
        matching = [p for p in panels if all(w in p["title"].lower() for w in words)]
        assert matching, f"no panel for {topic}"
        used = {n for p in matching for e in exprs(p) for n in METRIC_NAME.findall(e)}
        assert set(needed) <= used, f"{topic}: missing {sorted(set(needed) - used)}"


def test_per_adapter_panels_group_by_adapter():
    for panel in load()["panels"]:
        if "per adapter" in panel["title"].lower():
            for expr in exprs(panel):
                assert f"by ({metrics.ADAPTER_LABEL})" in expr, expr
        if "per lr key" in panel["title"].lower():
            for expr in exprs(panel):
                assert f"by ({metrics.LR_KEY_LABEL})" in expr, expr


def test_datasource_is_a_variable():
    variables = {v["name"]: v for v in load()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "model" in variables
