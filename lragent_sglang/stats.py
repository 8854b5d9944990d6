"""Radix statistics out of the scheduler: `/server_info` and `/lragent/stats`.

The tree lives in the scheduler process; SGLang already carries each scheduler's
`get_internal_state()` dict to the HTTP process, so ours rides along under "lragent"
(adapter ids renamed to adapter names). `/lragent/stats` returns just that part.
"""

from __future__ import annotations

from typing import Any

from lragent_sglang.config import scheme_from_env
from lragent_sglang.runtime import SHARED_LR_KEY, kv_bytes_per_token


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


def lragent_state(scheduler: Any) -> dict[str, Any]:
    cache = scheduler.tree_cache
    state: dict[str, Any] = {"scheme": scheme_from_env()}
    if not hasattr(cache, "stats") and hasattr(cache, "total_size"):
        tokens = cache.total_size()
        per_token = kv_bytes_per_token(cache.token_to_kv_pool_allocator.get_kvcache())
        state["base"] = {"tokens": tokens, "bytes": tokens * per_token}
    if hasattr(cache, "stats"):
        stats = cache.stats()
        names = adapter_names(scheduler)
        names.update({"None": "(base model)", SHARED_LR_KEY: SHARED_LR_KEY})
        stats["per_lr_key"] = {names.get(k, k): v for k, v in stats["per_lr_key"].items()}
        state.update(stats)
    return state


def add_internal_state(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER hook of `Scheduler.get_internal_state`."""
    result.internal_state["lragent"] = lragent_state(scheduler)


def add_stats_route() -> None:
    """`GET /lragent/stats`: one entry per scheduler (data-parallel rank)."""
    from sglang.srt.entrypoints import http_server

    async def lragent_stats() -> dict[str, Any]:
        states = await http_server._global_state.tokenizer_manager.get_internal_state()
        return {"schedulers": [s.get("lragent", {}) for s in states]}

    http_server.app.get("/lragent/stats")(lragent_stats)


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.get_internal_state", add_internal_state, HookType.AFTER
    )
