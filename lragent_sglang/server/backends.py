"""Factories behind `--attention-backend lragent` and `--radix-cache-backend lragent`.

| scheme | prefix cache | attention |
| --- | --- | --- |
| non-shared | SGLang's RadixCache, keyed by adapter (stock) | SGLang's (Triton on GPU, torch on CPU) |
| full-shared | SGLang's RadixCache keyed by tokens only: V with the writer's delta is reused | SGLang's |
| base-shared, base-lr-shared | `LRAgentRadixCache` (shared base pages + LR pages) | Flash-LoRA (`P V_base + (P L) B`): Triton kernels on GPU, torch on CPU |

Base-sharing schemes without `--enable-lora` share everything there is (no adapters).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from lragent_sglang import cpu_compat
from lragent_sglang.config import scheme_from_env
from lragent_sglang.runtime import BASE_SHARING, get_runtime

if TYPE_CHECKING:
    from sglang.srt.mem_cache.base_prefix_cache import BasePrefixCache
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

logger = logging.getLogger(__name__)

BACKEND_NAME = "lragent"


def create_tree_cache(ctx: "TreeCacheBuildContext") -> "BasePrefixCache":
    """Radix-cache factory (`register_radix_cache_backend`)."""
    scheme = scheme_from_env()
    if scheme in BASE_SHARING:
        from lragent_sglang.cache import LRAgentRadixCache

        rt = get_runtime(ctx.server_args)
        if rt.enabled and rt.lr_pool is None:
            raise ValueError(
                f"--lragent-scheme {scheme} needs --attention-backend {BACKEND_NAME} "
                "(it owns the LR cache)"
            )
        logger.info("lragent radix cache: scheme=%s (shared base pages + LR pages)", scheme)
        return LRAgentRadixCache(ctx.params, rt)
    from sglang.srt.mem_cache.radix_cache import RadixCache

    logger.info("lragent radix cache: scheme=%s (SGLang RadixCache)", scheme)
    return RadixCache(ctx.params)


def create_attention_backend(runner: Any) -> Any:
    """Attention-backend factory (`register_attention_backend`)."""
    scheme = scheme_from_env()
    if scheme in BASE_SHARING:
        from lragent_sglang.attention import LRAgentTorchAttnBackend, LRAgentTritonAttnBackend

        if cpu_compat.wanted():
            logger.info("lragent attention: scheme=%s, Flash-LoRA math (torch, CPU)", scheme)
            return LRAgentTorchAttnBackend(runner)
        logger.info("lragent attention: scheme=%s, Flash-LoRA Triton kernels", scheme)
        return LRAgentTritonAttnBackend(runner)
    if cpu_compat.wanted():
        from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

        logger.info("lragent attention: scheme=%s, torch-native path (CPU)", scheme)
        return TorchNativeAttnBackend(runner)
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    logger.info("lragent attention: scheme=%s, triton path", scheme)
    return TritonAttnBackend(runner)


def add_lr_bytes(cell_size: int, configurator: Any, kvc: Any, num_layers: int) -> int:
    """AFTER hook of SGLang's per-token KV cost: the LR pool is part of the same budget,
    so `--mem-fraction-static` means what it means in stock SGLang."""
    from lragent_sglang.runtime import lr_bytes_per_token

    return cell_size + lr_bytes_per_token(kvc.server_args, num_layers, kvc.kv_cache_dtype)


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from lragent_sglang import lora_split, schedule_hooks, stats

    schedule_hooks.register_hooks()
    stats.register_hooks()
    if scheme_from_env() in BASE_SHARING:
        lora_split.register_hooks()
        HookRegistry.register(
            "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size",
            add_lr_bytes, HookType.AFTER,
        )
