"""Every change LRAgent makes to SGLang, in one table, registered from one place.

Each row names the SGLang function it changes, how (SGLang's `HookRegistry`: before,
after or around the original), when it applies, and why. `install` registers the rows
that apply to this process's configuration; SGLang applies them right after loading its
plugins, in every process. Hooks that need the process's `LRAgentRuntime` get it bound
in as their first argument. The CPU compatibility layer has two tables beside it: hooks
(`cpu_patches` here) and what must happen before SGLang's modules import
(`cpu_compat.EARLY`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from lragent_sglang.server import allocation, cpu_compat, lora_split, metrics, model_compat, request, runtime, stats
from lragent_sglang.server import body_limit, cpu_hicache, guards, lora_usage, placement
from lragent_sglang.server.config import LRAgentConfig
from lragent_sglang.server.runtime import LRAgentRuntime

_ALLOC = "sglang.srt.mem_cache.allocation"
_RADIX = "sglang.srt.mem_cache.radix_cache.RadixCache"
_HIRADIX = "sglang.srt.mem_cache.hiradix_cache.HiRadixCache"
_HOST_POOL = "sglang.srt.mem_cache.pool_host"
_SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
_XGRAMMAR = "sglang.srt.constrained.xgrammar_backend"


def always(config: LRAgentConfig) -> bool:
    return True


def shares_base(config: LRAgentConfig) -> bool:
    return config.scheme.shares_base


def stock_cache(config: LRAgentConfig) -> bool:
    """Our factory builds SGLang's own RadixCache (non-shared, full-shared)."""
    return not config.scheme.shares_base


@dataclass(frozen=True)
class Patch:
    """One change to SGLang: `hook` runs `kind` ("before", "after", "around") `target`."""

    target: str
    hook: Callable[..., Any]
    kind: str
    when: Callable[[LRAgentConfig], bool]
    why: str


def sglang_patches(rt: LRAgentRuntime) -> tuple[Patch, ...]:
    """The serving patches, with `rt` bound into the hooks that need it."""
    return (
        Patch("sglang.srt.managers.schedule_batch.Req.__init__", partial(request.init_request, rt), "after", always,
              "give each request its RequestState; schemes that share across adapters drop the adapter id "
              "SGLang appends to the cache key"),
        Patch(f"{_ALLOC}.alloc_for_extend", allocation.fix_extend_alloc, "around", shares_base,
              "an LR prefill reuses its gap's cached base slots; new tokens get LR slots"),
        Patch(f"{_ALLOC}.alloc_for_decode", allocation.alloc_decode_lr, "after", shares_base,
              "each decoding request with an LR key gets an LR slot"),
        Patch("sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size",
              partial(runtime.add_lr_bytes, rt), "after", shares_base,
              "the LR pool counts in SGLang's per-token memory budget"),
        Patch("sglang.srt.lora.lora_manager.LoRAManager.load_lora_weights", partial(lora_split.on_adapter_load, rt),
              "around", shares_base, "key an adapter's LR rows by its content; refuse an adapter the one LR "
              "cache's basis cannot serve exactly"),
        Patch("sglang.srt.lora.lora_manager.LoRAManager.load_lora_weights_from_tensors",
              partial(lora_split.on_adapter_load, rt), "around", shares_base,
              "the same for adapters loaded from tensors"),
        Patch("sglang.srt.lora.mem_pool.LoRAMemoryPool.load_lora_weight_to_buffer",
              partial(lora_split.capture_v_weights, rt), "after", shares_base,
              "take v_proj's LoRA out of SGLang's QKV LoRA into the Flash-LoRA weight stacks"),
        Patch("sglang.srt.lora.layers.QKVParallelLinearWithLoRA.forward", partial(lora_split.split_qkv_lora, rt),
              "around", shares_base, "write each token's LR row x A_v to the LR pool"),
        Patch("sglang.srt.models.gemma2.Gemma2DecoderLayer.__init__", model_compat.gemma2_hidden_act, "before",
              always, "load Gemma-2 configs that transformers 5 writes with hidden_activation only"),
        Patch(f"{_SCHEDULER}.get_internal_state", partial(stats.add_internal_state, rt), "after", always,
              "carry our statistics to /server_info and /lragent/stats"),
        Patch(f"{_RADIX}.match_prefix", stats.count_stock_match, "after", stock_cache,
              "per-adapter hit counters on SGLang's own cache"),
        Patch(f"{_RADIX}.evict", stats.count_stock_evict, "after", stock_cache, "eviction counter on SGLang's cache"),
        Patch(f"{_RADIX}.reset", stats.reset_stock_stats, "after", stock_cache,
              "/flush_cache restarts the counters with the cache"),
        Patch(f"{_HIRADIX}.match_prefix", stats.count_stock_match, "after", stock_cache,
              "the same counters on SGLang's hierarchical cache (--enable-hierarchical-cache)"),
        Patch(f"{_HIRADIX}.evict", stats.count_stock_evict, "after", stock_cache,
              "eviction counter on SGLang's hierarchical cache"),
        Patch(f"{_SCHEDULER}.init_metrics_reporter", partial(metrics.attach_exporter, rt), "after", always,
              "export our statistics as Prometheus metrics next to SGLang's"),
        Patch("sglang.srt.observability.metrics_collector.SchedulerMetricsCollector.log_stats",
              metrics.export_after_log_stats, "after", always, "publish on SGLang's own metrics cadence"),
    )


def request_guard_patches(rt: LRAgentRuntime) -> tuple[Patch, ...]:
    """Hostile-client guards in the process that receives requests, in every scheme
    (issues 17 and 20); each acts only where both our backends are selected."""
    tm = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
    return (
        Patch(f"{tm}.generate_request", guards.validate_request, "before", always,
              "refuse out-of-vocabulary ids, mistyped sampling_params, a lora_path list for one prompt "
              "and adapters not loaded "
              "with a one-line 400 before they reach the model (they kill the scheduler or end in a 500)"),
        Patch(f"{tm}.load_lora_adapter", partial(guards.check_adapter_load, rt), "around", always,
              "refuse a runtime adapter the launcher would refuse (missing folder, scheme rules) naming it"),
        Patch(f"{tm}.unload_lora_adapter", guards.forget_on_unload, "around", always,
              "an explicitly unloaded adapter stays unloaded: SGLang reloads its old weights when a request "
              "names it, so a new load under the name fails while traffic names it"),
        Patch(f"{tm}.__init__", partial(body_limit.add_body_limit, rt), "after", always,
              "413 for request bodies above --lragent-max-body-mb before SGLang parses and tokenises them"),
        Patch(f"{tm}._resolve_lora_path", lora_usage.track_acquire, "around", always,
              "note the adapter usage count SGLang acquires for each request"),
        Patch(f"{tm}._send_one_request", lora_usage.track_send_one, "after", always,
              "note each rid the scheduler will run for an adapter request"),
        Patch(f"{tm}._send_batch_request", lora_usage.track_send_batch, "after", always,
              "the same for batched sends"),
        Patch(f"{tm}._handle_batch_output", lora_usage.track_outputs, "before", always,
              "a finished rid is done with its adapter, even when its state was already deleted"),
        Patch(f"{tm}._handle_abort_req", lora_usage.track_abort, "before", always,
              "the same for a request the scheduler dropped from its waiting queue"),
        Patch(f"{tm}._remove_req_state", lora_usage.track_state_removed, "after", always,
              "release a request's count once its state is gone and the scheduler is done with it"),
        Patch("sglang.srt.lora.lora_registry.LoRARegistry.release", lora_usage.skip_stock_release, "around",
              always, "SGLang never releases disconnected requests and releases some twice; the ledger does it"),
    )


def placement_patches() -> tuple[Patch, ...]:
    """Data-parallel placement in the process that receives requests, and where each
    trajectory ran in the schedulers (issue 15)."""
    return (
        Patch("sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request", placement.place_request,
              "before", always, "with --dp-size N, send every request of one routing key (trajectory) to one DP "
              "rank, whose tree holds its prefix; the key is SGLang's routing_key or the router's header"),
        Patch("sglang.srt.managers.schedule_batch.Req.__init__", placement.count_request, "after", always,
              "count each scheduler's requests per routing key: where every trajectory ran"),
    )


def cpu_patches() -> tuple[Patch, ...]:
    """Hooks that let SGLang 0.5.17 serve on a machine without an accelerator."""
    return (
        Patch(f"{_XGRAMMAR}.XGrammarGrammar.apply_vocab_mask", cpu_compat.apply_vocab_mask, "around", always,
              "constrained decoding masks CPU logits with xgrammar's CPU kernel"),
        Patch(f"{_XGRAMMAR}.XGrammarGrammarBackend.apply_vocab_mask", cpu_compat.apply_vocab_mask, "around",
              always, "the same for the backend-level mask"),
        Patch("sglang.srt.utils.common.support_triton", cpu_compat.support_triton, "around", always,
              "our backend's name takes SGLang's torch paths on CPU"),
        Patch(f"{_ALLOC}.get_last_loc", cpu_compat.get_last_loc, "around", always,
              "the torch version of a Triton-only helper"),
        Patch(f"{_HOST_POOL}.mha.MHATokenToKVPoolHost.load_to_device_per_layer", cpu_hicache.load_to_device_per_layer,
              "around", always, "HiCache load back: torch copies where sgl-kernel's transfer kernels are absent"),
        Patch(f"{_HOST_POOL}.mha.MHATokenToKVPoolHost.backup_from_device_all_layer",
              cpu_hicache.backup_from_device_all_layer, "around", always, "HiCache write to host: the same"),
        Patch(f"{_HOST_POOL}.common._cuda_host_register", cpu_hicache.skip_host_register, "around", always,
              "the HiCache host pool is not pinned without a driver"),
        Patch("sglang.srt.entrypoints.engine.Engine._launch_subprocesses", cpu_compat.launch_subprocesses,
              "around", always, "start the scheduler and detokenizer through entry points that patch first"),
    )


def install(rt: LRAgentRuntime | None, cpu: bool) -> list[Patch]:
    """Register the rows that apply to this process (no serving rows without a runtime:
    invalid settings); return them (for logs and tests)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    serving = (*sglang_patches(rt), *request_guard_patches(rt), *placement_patches()) if rt is not None else ()
    rows = [p for p in serving if p.when(rt.config)]
    if cpu:
        rows.extend(cpu_patches())
    for row in rows:
        HookRegistry.register(row.target, row.hook, HookType(row.kind))
    return rows
