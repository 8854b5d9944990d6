"""Factories behind `--attention-backend lragent` and `--radix-cache-backend lragent`.

Foundation stage: both delegate to SGLang's own implementations (RadixCache; the Triton
attention backend on GPU, the torch-native one on CPU) while the scheme is validated and
logged. The LRAgent tree (`lragent_sglang.radix`) and Flash-LoRA kernels
(`lragent_sglang.kernels`) replace them in the backend issue.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from lragent_sglang import cpu_compat
from lragent_sglang.config import scheme_from_env

if TYPE_CHECKING:
    from sglang.srt.mem_cache.base_prefix_cache import BasePrefixCache
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

logger = logging.getLogger(__name__)

BACKEND_NAME = "lragent"


def create_tree_cache(ctx: "TreeCacheBuildContext") -> "BasePrefixCache":
    """Radix-cache factory (`register_radix_cache_backend`)."""
    from sglang.srt.mem_cache.radix_cache import RadixCache

    scheme = scheme_from_env()
    logger.info("lragent radix cache: scheme=%s", scheme)
    return RadixCache(ctx.params)


def create_attention_backend(runner: Any) -> Any:
    """Attention-backend factory (`register_attention_backend`)."""
    scheme = scheme_from_env()
    if cpu_compat.wanted():
        from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

        logger.info("lragent attention: scheme=%s, torch-native path (CPU)", scheme)
        return TorchNativeAttnBackend(runner)
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    logger.info("lragent attention: scheme=%s, triton path", scheme)
    return TritonAttnBackend(runner)
