"""Entry point of the `sglang.srt.plugins` group, run by SGLang in every process.

Registers the radix-cache backend `lragent` and the attention backend `lragent`, and,
where no accelerator is present, the CPU compatibility patches (`cpu_compat`).
"""

from __future__ import annotations

import logging

from lragent_sglang import cpu_compat
from lragent_sglang import backends
from lragent_sglang.backends import BACKEND_NAME, create_attention_backend, create_tree_cache
from lragent_sglang.config import ConfigError, scheme_from_env

logger = logging.getLogger(__name__)


def register() -> None:
    """Register the LRAgent backends in this SGLang process (idempotent)."""
    from sglang.srt.layers.attention.attention_registry import (
        ATTENTION_BACKENDS,
        register_attention_backend,
    )
    from sglang.srt.mem_cache.registry import (
        get_radix_cache_factory,
        register_radix_cache_backend,
    )
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    if cpu_compat.wanted():
        cpu_compat.apply_early()
        cpu_compat.register_hooks()
    try:
        scheme_from_env()
    except ConfigError:
        logger.error("lragent: invalid LRAGENT_SCHEME; the backends will refuse to start")
    else:
        backends.register_hooks()
    if get_radix_cache_factory(BACKEND_NAME) is None:
        register_radix_cache_backend(BACKEND_NAME, create_tree_cache)
    if BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(BACKEND_NAME)(create_attention_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    logger.debug("lragent backends registered")
