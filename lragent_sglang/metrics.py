"""Radix-cache statistics as Prometheus metrics on SGLang's `/metrics` (`--enable-metrics`).

The tree lives in the scheduler process, so the metrics are created there, the way
SGLang's own `SchedulerMetricsCollector` creates its: prometheus_client is imported only
inside the scheduler (after SGLang has set `PROMETHEUS_MULTIPROC_DIR`), cumulative
numbers are Counters (summed over processes by the multiprocess collector), current
sizes are Gauges with `multiprocess_mode="mostrecent"`, and every series carries the
collector's labels (model_name, tp_rank, ...), so data-parallel schedulers stay apart.

Updates ride on `SchedulerMetricsCollector.log_stats`, which SGLang calls after each
prefill batch, every `--decode-log-interval` decode steps and when the scheduler goes
idle (at the latest 30 s later): one `cache.stats()` snapshot per call, counters advanced
by the delta since the previous snapshot. So, like SGLang's own gauges, the values are
those of SGLang's last publish; `/lragent/stats` is read live. Registered for the
base-sharing schemes only (the other schemes use SGLang's RadixCache, which has no such
statistics).
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any

from lragent_sglang.config import scheme_from_env
from lragent_sglang.stats import lragent_state

logger = logging.getLogger(__name__)

ADAPTER_LABEL = "adapter"
PREFIX = "sglang:lragent_"

# `per_lr_key[adapter]` field -> (metric name without prefix, help).
ADAPTER_COUNTERS: dict[str, tuple[str, str]] = {
    "requested_tokens": ("requested_tokens", "Prompt tokens looked up in the radix tree."),
    "base_hit_tokens": ("base_hit_tokens", "Prompt tokens whose base KV was found in the tree."),
    "lr_hit_tokens": ("lr_hit_tokens", "Prompt tokens whose LR cache was found in the tree."),
    "lr_gap_tokens": ("lr_gap_tokens", "Base-hit tokens whose LR cache had to be re-prefilled."),
    "lr_inserted_tokens": ("lr_inserted_tokens", "LR-cache tokens inserted into the tree."),
    "lr_evicted_tokens": ("lr_evicted_tokens", "LR-cache tokens evicted from the tree."),
}
ADAPTER_GAUGES: dict[str, tuple[str, str]] = {
    "lr_tokens": ("lr_tokens", "LR-cache tokens held in the tree now."),
    "lr_bytes": ("lr_bytes", "Bytes of LR cache held in the tree now."),
}
# `base` field -> (metric name without prefix, help).
BASE_COUNTERS: dict[str, tuple[str, str]] = {
    "inserted_tokens": ("base_inserted_tokens", "Base-KV tokens inserted into the tree."),
    "evicted_tokens": ("base_evicted_tokens", "Base-KV tokens evicted from the tree."),
}
BASE_GAUGES: dict[str, tuple[str, str]] = {
    "tokens": ("base_tokens", "Base-KV tokens held in the tree now."),
    "bytes": ("base_bytes", "Bytes of base KV held in the tree now."),
}
# top-level field -> (metric name without prefix, help).
POOL_GAUGES: dict[str, tuple[str, str]] = {
    "lr_pool_size": ("lr_pool_tokens", "Token slots of the LR pool."),
    "lr_pool_available": ("lr_pool_available_tokens", "Free token slots of the LR pool."),
}


@dataclasses.dataclass
class Families:
    """The metric objects of one process (prometheus_client refuses to create a name twice)."""

    adapter_counters: dict[str, Any]
    adapter_gauges: dict[str, Any]
    base_counters: dict[str, Any]
    base_gauges: dict[str, Any]
    pool_gauges: dict[str, Any]
    info: Any


_families: dict[tuple[str, ...], Families] = {}


def families_for(collector: Any, labelnames: tuple[str, ...]) -> Families:
    """Create (once per process and label set) our metrics with the collector's classes."""
    if labelnames in _families:
        return _families[labelnames]
    from prometheus_client import Counter as PromCounter
    from prometheus_client import Gauge as PromGauge

    counter_cls = getattr(collector, "_counter_cls", None) or PromCounter
    gauge_cls = getattr(collector, "_gauge_cls", None) or PromGauge
    per_adapter = [*labelnames, ADAPTER_LABEL]

    def counters(spec: dict[str, tuple[str, str]], names: list[str]) -> dict[str, Any]:
        return {
            f: counter_cls(name=PREFIX + n, documentation=d, labelnames=names) for f, (n, d) in spec.items()
        }

    def gauges(spec: dict[str, tuple[str, str]], names: list[str]) -> dict[str, Any]:
        return {
            f: gauge_cls(name=PREFIX + n, documentation=d, labelnames=names, multiprocess_mode="mostrecent")
            for f, (n, d) in spec.items()
        }

    fams = Families(
        adapter_counters=counters(ADAPTER_COUNTERS, per_adapter),
        adapter_gauges=gauges(ADAPTER_GAUGES, per_adapter),
        base_counters=counters(BASE_COUNTERS, list(labelnames)),
        base_gauges=gauges(BASE_GAUGES, list(labelnames)),
        pool_gauges=gauges(POOL_GAUGES, list(labelnames)),
        info=gauge_cls(
            name=PREFIX + "info", documentation="LRAgent sharing scheme of this scheduler (value 1).",
            labelnames=[*labelnames, "scheme"], multiprocess_mode="mostrecent",
        ),
    )
    _families[labelnames] = fams
    return fams


class LRAgentMetrics:
    """One scheduler's exporter: turns `cache.stats()` snapshots into metric updates."""

    def __init__(self, scheduler: Any, collector: Any) -> None:
        self.scheduler = scheduler
        self.labels = {k: str(v) for k, v in collector.labels.items()}
        self.fams = families_for(collector, tuple(self.labels))
        self.last: dict[tuple[str, str], int] = {}
        self.adapters: set[str] = set()
        self.failed = False
        self.fams.info.labels(**self.labels, scheme=scheme_from_env()).set(1)

    def advance(self, counter: Any, key: tuple[str, str], value: int, labels: dict[str, str]) -> None:
        """Add what `value` (a cumulative number) grew by; after a reset it counts from 0.
        Series are created at 0 on first sight, so a rate() over them starts from there."""
        prev = self.last.get(key)
        child = counter.labels(**labels)
        if prev is None or value < prev:
            prev = 0
        if value > prev:
            child.inc(value - prev)
        self.last[key] = value

    def update(self) -> None:
        state = lragent_state(self.scheduler)
        if "per_lr_key" not in state:
            return
        fams = self.fams
        for field, counter in fams.base_counters.items():
            self.advance(counter, ("base", field), state["base"][field], self.labels)
        for field, gauge in fams.base_gauges.items():
            gauge.labels(**self.labels).set(state["base"][field])
        for field, gauge in fams.pool_gauges.items():
            if field in state:
                gauge.labels(**self.labels).set(state[field])
        per_key: dict[str, dict[str, int]] = state["per_lr_key"]
        for adapter in self.adapters - per_key.keys():
            for gauge in fams.adapter_gauges.values():
                gauge.labels(**self.labels, adapter=adapter).set(0)
        for adapter, entry in per_key.items():
            labels = {**self.labels, ADAPTER_LABEL: adapter}
            for field, counter in fams.adapter_counters.items():
                self.advance(counter, (adapter, field), entry[field], labels)
            for field, gauge in fams.adapter_gauges.items():
                gauge.labels(**labels).set(entry[field])
        self.adapters |= per_key.keys()

    def safe_update(self) -> None:
        """Never let metrics break scheduling; warn once, keep trying."""
        try:
            self.update()
        except Exception:
            if not self.failed:
                logger.exception("lragent metrics update failed")
            self.failed = True


_exporters: "weakref.WeakKeyDictionary[Any, LRAgentMetrics]" = weakref.WeakKeyDictionary()


def attach_exporter(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER hook of `Scheduler.init_metrics_reporter`: an exporter for its collector."""
    collector = getattr(scheduler, "metrics_collector", None)
    if collector is None:
        return
    _exporters[collector] = LRAgentMetrics(scheduler, collector)
    logger.info("lragent metrics: exporting %s* from this scheduler", PREFIX)


def export_after_log_stats(result: Any, collector: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER hook of `SchedulerMetricsCollector.log_stats`: SGLang's own publishing cadence."""
    exporter = _exporters.get(collector)
    if exporter is not None:
        exporter.safe_update()


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.init_metrics_reporter", attach_exporter, HookType.AFTER
    )
    HookRegistry.register(
        "sglang.srt.observability.metrics_collector.SchedulerMetricsCollector.log_stats",
        export_after_log_stats, HookType.AFTER,
    )
