"""Radix statistics out of the scheduler: `/server_info` and `/lragent/stats`.

The caches live in the scheduler process; SGLang already carries each scheduler's
`get_internal_state()` dict to the HTTP process, so ours rides along under "lragent"
(adapter ids renamed to adapter names). `/lragent/stats` returns just that part.

Per adapter is the primary view, in every scheme: a tree keyed by LR key cannot tell
the roles of base-lr-shared apart (they share one key), so each cache also counts, at a
request's first prefix match, its prompt tokens and what the cache gave it. Our
`LRAgentRadixCache` does so itself; SGLang's `RadixCache` (non-shared, full-shared) is
counted through hooks on its `match_prefix` and `evict`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from sglang.srt.constants import HEALTH_CHECK_RID_PREFIX

from lragent_sglang.server import placement
from lragent_sglang.server.config import selected
from lragent_sglang.server.runtime import LRAgentRuntime, kv_bytes_per_token

logger = logging.getLogger(__name__)

NO_ADAPTER = "none"  # the name of requests without an adapter, in JSON and metric labels


@dataclasses.dataclass(slots=True)
class AdapterCounters:
    """Cumulative numbers of one adapter's requests, each counted at its first match."""

    requests: int = 0
    prompt_tokens: int = 0
    base_hit_tokens: int = 0  # cached K and V_base
    lr_hit_tokens: int = 0  # cached K and the whole V (V_base and this adapter's LR)
    lr_reprefill_tokens: int = 0  # base hit, LR missing: forwarded to write LR rows only
    computed_tokens: int = 0  # forwarded by the prefill (LR re-prefill included)


ADAPTER_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(AdapterCounters))


class AdapterStats:
    """Per-adapter counters, keyed by `lora_id` (None: no adapter)."""

    def __init__(self) -> None:
        self.per_adapter: dict[str | None, AdapterCounters] = {}

    def record(self, lora_id: str | None, prompt_tokens: int, base_hit: int, full_hit: int) -> None:
        """One request: `base_hit` tokens have cached K and V_base, `full_hit` (<= base_hit)
        also the adapter's LR, which is the prefix SGLang reuses; the rest is forwarded."""
        c = self.per_adapter.get(lora_id)
        if c is None:
            c = self.per_adapter[lora_id] = AdapterCounters()
        c.requests += 1
        c.prompt_tokens += prompt_tokens
        c.base_hit_tokens += base_hit
        c.lr_hit_tokens += full_hit
        c.lr_reprefill_tokens += base_hit - full_hit
        c.computed_tokens += prompt_tokens - full_hit

    def snapshot(self) -> dict[str | None, dict[str, int]]:
        return {k: dataclasses.asdict(v) for k, v in self.per_adapter.items()}

    def reset(self) -> None:
        self.per_adapter.clear()


def first_look(req: Any, key: Any) -> bool:
    """True once per request, at the match that decides what it reuses: SGLang's
    `init_next_round_input`, the one caller that caps the key (`key.limit`, at most
    len - 1 tokens). Cache-aware policies (lpm) match the whole prompt uncapped first, and
    a waiting request is matched again at every scheduling attempt; neither counts.
    Never for SGLang's health checks, which its own request metrics skip too."""
    if (req is None or key.limit is None or req.lragent.counted
            or str(req.rid).startswith(HEALTH_CHECK_RID_PREFIX)):
        return False
    req.lragent.counted = True
    return True


def prompt_len(req: Any) -> int:
    return len(req.origin_input_ids)


# ---------------------------------------------------------------- SGLang's RadixCache


@dataclasses.dataclass
class StockCacheStats:
    """What we count on a stock `RadixCache` built by our factory."""

    adapters: AdapterStats = dataclasses.field(default_factory=AdapterStats)
    evicted_tokens: int = 0

    def reset(self) -> None:
        self.adapters.reset()
        self.evicted_tokens = 0


def stock_stats(cache: Any) -> StockCacheStats | None:
    """The counters of a stock cache, created on first use; None where our backends are
    not selected (the hooks then leave SGLang's cache alone)."""
    if "lragent_stats" not in cache.__dict__:
        from sglang.srt.server_args import get_global_server_args

        cache.lragent_stats = StockCacheStats() if selected(get_global_server_args()) else None
    return cache.lragent_stats


def count_stock_match(result: Any, cache: Any, params: Any = None, *args: Any, **kwargs: Any) -> None:
    """AFTER hook of `RadixCache.match_prefix`. A cached token's whole KV is reused there
    (the adapter's own in non-shared, the writer's in full-shared): base hit = LR hit."""
    req = getattr(params, "req", None)
    stats = stock_stats(cache) if req is not None else None
    if stats is None or not first_look(req, params.key):
        return
    hit = len(result.device_indices)
    stats.adapters.record(req.lora_id, prompt_len(req), hit, hit)


def count_stock_evict(result: Any, cache: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER hook of `RadixCache.evict`."""
    stats = stock_stats(cache)
    if stats is not None and result is not None:
        stats.evicted_tokens += result.num_tokens_evicted


def reset_stock_stats(result: Any, cache: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER hook of `RadixCache.reset` (`/flush_cache`): the counters start afresh with the
    cache, as ours do (the Prometheus counters keep counting from the new values)."""
    stats = cache.__dict__.get("lragent_stats")
    if stats is not None:
        stats.reset()


# ---------------------------------------------------------------- the state


def adapter_names(scheduler: Any) -> dict[str, str]:
    """lora_id -> name for every adapter the scheduler knows."""
    names = {}
    for ref in getattr(scheduler.server_args, "lora_paths", None) or []:
        if hasattr(ref, "lora_id"):
            names[ref.lora_id] = ref.lora_name
    manager = getattr(getattr(scheduler.tp_worker, "model_runner", None), "lora_manager", None)
    for uid, ref in (getattr(manager, "lora_refs", None) or {}).items():
        names[uid] = ref.lora_name
    return names


def display_name(key: Any, names: dict[str, str]) -> str:
    """An adapter id or LR key as people know it (`names`), NO_ADAPTER for none."""
    if key is None or key == "None":
        return NO_ADAPTER
    return names.get(key, str(key))


def renamed(entries: dict[Any, Any], names: dict[str, str]) -> dict[str, Any]:
    return {display_name(k, names): v for k, v in entries.items()}


def stock_state(cache: Any) -> dict[str, Any]:
    """Base KV held (O(1) sizes, not SGLang's tree walk) and our counters, if any."""
    tokens = cache.evictable_size() + cache.protected_size()
    per_token = kv_bytes_per_token(cache.token_to_kv_pool_allocator.get_kvcache())
    state: dict[str, Any] = {"base": {"tokens": tokens, "bytes": tokens * per_token}}
    stats = stock_stats(cache)
    if stats is not None:
        state["base"]["evicted_tokens"] = stats.evicted_tokens
        state["per_adapter"] = stats.adapters.snapshot()
    host_pool = getattr(cache, "token_to_kv_pool_host", None)  # SGLang's HiRadixCache
    if host_pool is not None:
        used = host_pool.size - host_pool.available_size()
        state["host"] = {"tokens": used, "bytes": used * host_pool.size_per_token, "pool_tokens": host_pool.size}
    return state


def lragent_state(scheduler: Any, rt: LRAgentRuntime) -> dict[str, Any]:
    """The scheduler's statistics, names resolved (see README "Statistics")."""
    cache = scheduler.tree_cache
    scheme = rt.scheme
    state: dict[str, Any] = {
        "scheme": str(scheme),
        "sharing": {"keys_by_adapter": scheme.keys_by_adapter, "shares_base": scheme.shares_base,
                    "one_lr_cache": scheme.one_lr_cache},
    }
    if hasattr(cache, "stats"):
        state.update(cache.stats())
    elif hasattr(cache, "evictable_size") and hasattr(cache, "token_to_kv_pool_allocator"):
        state.update(stock_state(cache))
    names = adapter_names(scheduler)
    if "per_adapter" in state:
        state["per_adapter"] = renamed(state["per_adapter"], names)
    if "per_lr_key" in state:
        state["per_lr_key"] = renamed(state["per_lr_key"], rt.lr_key_names(names))
    return state


def add_internal_state(rt: LRAgentRuntime, result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER hook of `Scheduler.get_internal_state`; `dp_rank` tells the data-parallel
    schedulers apart (0 without data parallelism), `routing_keys` counts its requests per
    routing key (trajectory)."""
    state = lragent_state(scheduler, rt)
    state["dp_rank"] = getattr(getattr(scheduler, "ps", None), "dp_rank", None) or 0
    state["routing_keys"] = dict(placement.served.counts)
    result.internal_state["lragent"] = state


def summed(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The schedulers' states added up: numbers summed at every depth, other values kept
    where all schedulers agree (scheme, sharing); `dp_rank` dropped."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for s in states for k in s if k != "dp_rank"):
        values = [s[key] for s in states if key in s]
        if all(isinstance(v, dict) for v in values):
            out[key] = summed(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = sum(values)
        elif all(v == values[0] for v in values):
            out[key] = values[0]
    return out


def add_stats_route() -> None:
    """`GET /lragent/stats`: one entry per scheduler (data-parallel rank, by `dp_rank`) and
    their sum (`total`)."""
    from sglang.srt.entrypoints import http_server

    async def lragent_stats() -> dict[str, Any]:
        states = await http_server._global_state.tokenizer_manager.get_internal_state()
        schedulers = sorted((s.get("lragent", {}) for s in states), key=lambda s: s.get("dp_rank", 0))
        return {"schedulers": schedulers, "total": summed(schedulers)}

    http_server.app.get("/lragent/stats")(lragent_stats)
