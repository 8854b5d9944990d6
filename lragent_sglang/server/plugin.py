"""Entry point of the `sglang.srt.plugins` group, run by SGLang once in every process.

Reads the launch settings once (`LRAgentConfig.from_env`), creates this process's
`LRAgentRuntime`, registers the patch table (`patches`) and the two backends named
`lragent`, each with the runtime bound in. With invalid settings nothing is patched and
both backends refuse to start with the settings' error.
"""

from __future__ import annotations

import logging
from functools import partial

from lragent_sglang.scheme import ConfigError
from lragent_sglang.server import backends, cpu_compat, patches
from lragent_sglang.server.config import BACKEND_NAME, LRAgentConfig
from lragent_sglang.server.runtime import LRAgentRuntime

logger = logging.getLogger(__name__)


def register() -> None:
    """Register the LRAgent patches and backends in this SGLang process (once)."""
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    if get_radix_cache_factory(BACKEND_NAME) is not None:
        return
    cpu = cpu_compat.wanted()
    if cpu:
        cpu_compat.apply_early()
    try:
        rt = LRAgentRuntime(LRAgentConfig.from_env())
    except ConfigError as exc:
        logger.error("lragent: %s; the lragent backends will refuse to start", exc)
        tree_cache = attention = partial(backends.refuse, exc)
        patches.install(None, cpu)
    else:
        tree_cache = partial(backends.create_tree_cache, rt)
        attention = partial(backends.create_attention_backend, rt)
        patches.install(rt, cpu)
    register_radix_cache_backend(BACKEND_NAME, tree_cache)
    register_attention_backend(BACKEND_NAME)(attention)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    logger.debug("lragent backends registered")
