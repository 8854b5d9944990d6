"""Factories behind `--attention-backend lragent` and `--radix-cache-backend lragent`.

| scheme | prefix cache | attention |
| --- | --- | --- |
| non-shared | SGLang's RadixCache, keyed by adapter (stock) | SGLang's Triton backend on GPU (its sliding-window decode made exact: `stock_triton`), ours (torch, no LR term) on CPU |
| full-shared | SGLang's RadixCache keyed by tokens only: V with the writer's delta is reused | the same |
| base-shared, base-lr-shared | `LRAgentRadixCache` (shared base pages + LR pages) | Flash-LoRA (`P V_base + (P L) B`): Triton kernels on GPU, torch on CPU |

Base-sharing schemes without `--enable-lora` share everything there is (no adapters).
The plugin registers both with the process's runtime bound in (`functools.partial`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from lragent_sglang.server import cpu_compat
from lragent_sglang.server.config import BACKEND_NAME
from lragent_sglang.server.hicache_check import check_hicache
from lragent_sglang.server.model_check import check_attention_layers
from lragent_sglang.server.runtime import LRAgentRuntime

if TYPE_CHECKING:
    from sglang.srt.mem_cache.base_prefix_cache import BasePrefixCache
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

logger = logging.getLogger(__name__)


def create_tree_cache(rt: LRAgentRuntime, ctx: "TreeCacheBuildContext") -> "BasePrefixCache":
    """Radix-cache factory (`register_radix_cache_backend`). With
    `--enable-hierarchical-cache`, the hierarchical variant (see `hicache_check`)."""
    rt.bind(ctx.server_args)
    hierarchical = ctx.enable_hierarchical_cache
    if hierarchical:
        check_hicache(rt.scheme, ctx.server_args, cpu_compat.wanted())
    if rt.scheme.shares_base:
        from lragent_sglang.server.cache import LRAgentRadixCache

        if rt.enabled and rt.lr_pool is None:
            raise ValueError(
                f"--lragent-scheme {rt.scheme} needs --attention-backend {BACKEND_NAME} "
                "(it owns the LR cache)"
            )
        logger.info("lragent radix cache: scheme=%s (shared base pages + LR pages), hierarchical=%s",
                    rt.scheme, hierarchical)
        if not hierarchical:
            return LRAgentRadixCache(ctx.params, rt)
        from lragent_sglang.server.hicache import LRAgentHiRadixCache

        cache = LRAgentHiRadixCache(ctx.params, rt, ctx.server_args)
    elif hierarchical:
        from sglang.srt.mem_cache.hiradix_cache import HiRadixCache

        logger.info("lragent radix cache: scheme=%s (SGLang HiRadixCache)", rt.scheme)
        cache = HiRadixCache(params=ctx.params, server_args=ctx.server_args)
    else:
        from sglang.srt.mem_cache.radix_cache import RadixCache

        logger.info("lragent radix cache: scheme=%s (SGLang RadixCache)", rt.scheme)
        return RadixCache(ctx.params)
    ctx.tp_worker.register_hicache_layer_transfer_counter(cache.cache_controller.layer_done_counter)
    return cache


def create_attention_backend(rt: LRAgentRuntime, runner: Any) -> Any:
    """Attention-backend factory (`register_attention_backend`).

    On CPU every scheme runs our torch backend (with the LR term only where there is an
    LR cache): SGLang's torch-native backend drops the layer's logit soft-cap (Gemma-2).
    Where ours runs, the model's attention layers are checked first (`model_check`).
    """
    cpu = cpu_compat.wanted()
    ours = cpu or rt.scheme.shares_base
    if ours:
        check_attention_layers(runner.model, runner.token_to_kv_pool, rt.scheme)
    if rt.scheme.shares_base:
        rt.attach_model_runner(runner)
    if cpu:
        from lragent_sglang.server.attention import LRAgentTorchAttnBackend

        logger.info("lragent attention: scheme=%s, torch (CPU), LR term %s", rt.scheme, rt.enabled)
        return LRAgentTorchAttnBackend(runner, rt)
    if ours:
        from lragent_sglang.server.attention_triton import LRAgentTritonAttnBackend

        logger.info("lragent attention: scheme=%s, Flash-LoRA Triton kernels", rt.scheme)
        return LRAgentTritonAttnBackend(runner, rt)
    from lragent_sglang.server.stock_triton import WindowExactTritonAttnBackend

    logger.info("lragent attention: scheme=%s, SGLang's triton backend (decode window exact)", rt.scheme)
    return WindowExactTritonAttnBackend(runner)


def refuse(error: Exception, *args: Any) -> Any:
    """Both factories when the launch settings are invalid: the server fails to start
    with the settings' own error message."""
    raise error
