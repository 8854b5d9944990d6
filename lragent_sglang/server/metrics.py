"""Radix-cache statistics as Prometheus metrics on SGLang's `/metrics` (`--enable-metrics`).

The caches live in the scheduler process, so the metrics are created there, the way
SGLang's own `SchedulerMetricsCollector` creates its: prometheus_client is imported only
inside the scheduler (after SGLang has set `PROMETHEUS_MULTIPROC_DIR`), cumulative
numbers are Counters (summed over processes by the multiprocess collector), current
sizes are Gauges with `multiprocess_mode="mostrecent"`, and every series carries the
collector's labels (model_name, tp_rank, ...), so data-parallel schedulers stay apart.

Updates ride on `SchedulerMetricsCollector.log_stats`, which SGLang calls after each
prefill batch, every `--decode-log-interval` decode steps and when the scheduler goes
idle (at the latest 30 s later): one `lragent_state` snapshot per call, counters
advanced by the delta since the previous snapshot. So, like SGLang's own gauges, the
values are those of SGLang's last publish; `/lragent/stats` is read live.

Per-adapter series (label `adapter`: the name given in `--lora-paths`, "none" without
one) exist in every scheme; per-LR-key series (label `lr_key`: the adapter's name in
base-shared, "shared-lr" in base-lr-shared) and the LR pool only where an LR cache does.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any

from lragent_sglang.server.config import selected
from lragent_sglang.server.runtime import LRAgentRuntime
from lragent_sglang.server.stats import lragent_state

logger = logging.getLogger(__name__)

ADAPTER_LABEL = "adapter"
LR_KEY_LABEL = "lr_key"
PREFIX = "sglang:lragent_"

# `per_adapter[name]` field -> (metric name without prefix, help).
ADAPTER_COUNTERS: dict[str, tuple[str, str]] = {
    "requests": ("requests", "Requests, counted at their first prefix match."),
    "prompt_tokens": ("prompt_tokens", "Prompt tokens of those requests."),
    "base_hit_tokens": ("base_hit_tokens", "Prompt tokens whose K and base V were cached."),
    "lr_hit_tokens": ("lr_hit_tokens", "Prompt tokens whose whole V (base and the adapter's LR) was cached."),
    "lr_reprefill_tokens": ("lr_reprefill_tokens", "Base-hit tokens whose LR cache had to be re-prefilled."),
    "computed_tokens": ("computed_tokens", "Prompt tokens the prefill forwarded (LR re-prefill included)."),
}
# `per_lr_key[key]` field -> (metric name without prefix, help).
LR_KEY_COUNTERS: dict[str, tuple[str, str]] = {
    "lr_inserted_tokens": ("lr_inserted_tokens", "LR-cache tokens inserted into the tree."),
    "lr_evicted_tokens": ("lr_evicted_tokens", "LR-cache tokens evicted from the tree."),
}
LR_KEY_GAUGES: dict[str, tuple[str, str]] = {
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
# `host` field (hierarchical cache) -> (metric name without prefix, help).
HOST_COUNTERS: dict[str, tuple[str, str]] = {
    "written_tokens": ("host_written_tokens", "Base-KV tokens copied to the host tier."),
    "loaded_back_tokens": ("host_loaded_back_tokens", "Base-KV tokens loaded back from the host tier."),
}
HOST_GAUGES: dict[str, tuple[str, str]] = {
    "tokens": ("host_tokens", "Base-KV tokens held in the host tier now."),
    "bytes": ("host_bytes", "Bytes of base KV held in the host tier now."),
}
# top-level field -> (metric name without prefix, help).
POOL_GAUGES: dict[str, tuple[str, str]] = {
    "lr_pool_size": ("lr_pool_tokens", "Token slots of the LR pool."),
    "lr_pool_available": ("lr_pool_available_tokens", "Free token slots of the LR pool."),
}


def exported_names() -> set[str]:
    """Every sample name we export (prometheus_client adds `_total` to counters)."""
    counters = [*ADAPTER_COUNTERS.values(), *LR_KEY_COUNTERS.values(), *BASE_COUNTERS.values(),
                *HOST_COUNTERS.values()]
    gauges = [*LR_KEY_GAUGES.values(), *BASE_GAUGES.values(), *HOST_GAUGES.values(), *POOL_GAUGES.values()]
    return {PREFIX + n + "_total" for n, _ in counters} | {PREFIX + n for n, _ in gauges} | {PREFIX + "info"}


@dataclasses.dataclass
class Families:
    """The metric objects of one process (prometheus_client refuses to create a name twice)."""

    adapter_counters: dict[str, Any]
    lr_key_counters: dict[str, Any]
    lr_key_gauges: dict[str, Any]
    base_counters: dict[str, Any]
    base_gauges: dict[str, Any]
    host_counters: dict[str, Any]
    host_gauges: dict[str, Any]
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
    per_lr_key = [*labelnames, LR_KEY_LABEL]

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
        lr_key_counters=counters(LR_KEY_COUNTERS, per_lr_key),
        lr_key_gauges=gauges(LR_KEY_GAUGES, per_lr_key),
        base_counters=counters(BASE_COUNTERS, list(labelnames)),
        base_gauges=gauges(BASE_GAUGES, list(labelnames)),
        host_counters=counters(HOST_COUNTERS, list(labelnames)),
        host_gauges=gauges(HOST_GAUGES, list(labelnames)),
        pool_gauges=gauges(POOL_GAUGES, list(labelnames)),
        info=gauge_cls(
            name=PREFIX + "info", documentation="LRAgent sharing scheme of this scheduler (value 1).",
            labelnames=[*labelnames, "scheme"], multiprocess_mode="mostrecent",
        ),
    )
    _families[labelnames] = fams
    return fams


class LRAgentMetrics:
    """One scheduler's exporter: turns `lragent_state` snapshots into metric updates."""

    def __init__(self, scheduler: Any, collector: Any, rt: LRAgentRuntime) -> None:
        self.scheduler = scheduler
        self.rt = rt
        self.labels = {k: str(v) for k, v in collector.labels.items()}
        self.fams = families_for(collector, tuple(self.labels))
        self.last: dict[tuple[str, ...], int] = {}
        self.lr_keys: set[str] = set()
        self.failed = False
        self.fams.info.labels(**self.labels, scheme=str(rt.scheme)).set(1)

    def advance(self, counter: Any, key: tuple[str, ...], value: int, labels: dict[str, str]) -> None:
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
        state = lragent_state(self.scheduler, self.rt)
        self.update_base(state.get("base", {}))
        self.update_host(state.get("host", {}))
        for field, gauge in self.fams.pool_gauges.items():
            if field in state:
                gauge.labels(**self.labels).set(state[field])
        for name, entry in state.get("per_adapter", {}).items():
            labels = {**self.labels, ADAPTER_LABEL: name}
            for field, counter in self.fams.adapter_counters.items():
                self.advance(counter, (ADAPTER_LABEL, name, field), entry[field], labels)
        if "per_lr_key" in state:
            self.update_lr_keys(state["per_lr_key"])

    def update_base(self, base: dict[str, int]) -> None:
        """Unlabelled base-KV series; a stock cache has no insert counter, so only the
        fields present are exported."""
        for field, counter in self.fams.base_counters.items():
            if field in base:
                self.advance(counter, ("base", field), base[field], self.labels)
        for field, gauge in self.fams.base_gauges.items():
            if field in base:
                gauge.labels(**self.labels).set(base[field])

    def update_host(self, host: dict[str, int]) -> None:
        """Unlabelled host-tier series (present only with --enable-hierarchical-cache)."""
        for field, counter in self.fams.host_counters.items():
            if field in host:
                self.advance(counter, ("host", field), host[field], self.labels)
        for field, gauge in self.fams.host_gauges.items():
            if field in host:
                gauge.labels(**self.labels).set(host[field])

    def update_lr_keys(self, per_key: dict[str, dict[str, int]]) -> None:
        """Per-LR-key series; a key that left the tree keeps its gauges, at 0."""
        for key in self.lr_keys - per_key.keys():
            for gauge in self.fams.lr_key_gauges.values():
                gauge.labels(**self.labels, **{LR_KEY_LABEL: key}).set(0)
        for key, entry in per_key.items():
            labels = {**self.labels, LR_KEY_LABEL: key}
            for field, counter in self.fams.lr_key_counters.items():
                self.advance(counter, (LR_KEY_LABEL, key, field), entry[field], labels)
            for field, gauge in self.fams.lr_key_gauges.items():
                gauge.labels(**labels).set(entry[field])
        self.lr_keys |= per_key.keys()

    def safe_update(self) -> None:
        """Never let metrics break scheduling; warn once, keep trying."""
        try:
            self.update()
        except Exception:
            if not self.failed:
                logger.exception("lragent metrics update failed")
            self.failed = True


_exporters: "weakref.WeakKeyDictionary[Any, LRAgentMetrics]" = weakref.WeakKeyDictionary()


def attach_exporter(rt: LRAgentRuntime, result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER hook of `Scheduler.init_metrics_reporter`: an exporter for its collector,
    where metrics are on and our backends are selected."""
    collector = getattr(scheduler, "metrics_collector", None)
    if collector is None or not selected(scheduler.server_args):
        return
    _exporters[collector] = LRAgentMetrics(scheduler, collector, rt)
    logger.info("lragent metrics: exporting %s* from this scheduler", PREFIX)


def export_after_log_stats(result: Any, collector: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER hook of `SchedulerMetricsCollector.log_stats`: SGLang's own publishing cadence."""
    exporter = _exporters.get(collector)
    if exporter is not None:
        exporter.safe_update()
