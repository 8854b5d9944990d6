"""Which hierarchical-cache settings (`--enable-hierarchical-cache`) each scheme serves
exactly; the others are refused in one line naming the flag and the scheme, by our
launcher before SGLang starts and by our cache factory for stock-launcher users.

non-shared and full-shared run SGLang's own `HiRadixCache` (full-shared shares each
token's whole KV on the device already, so a host copy of it shares nothing more). The
base-sharing schemes run `hicache.LRAgentHiRadixCache`: a host tier for base pages, no
storage tier (`--hicache-storage-backend`, L3) behind it. On CPU the host copies are
torch index copies (`cpu_hicache`) for the layouts that have per-layer views.
"""

from __future__ import annotations

from typing import Any

from lragent_sglang.scheme import ConfigError, Scheme

#: host-pool layouts the CPU copies serve (SGLang's kernels serve every layout on GPU)
CPU_LAYOUTS = ("layer_first", "page_first")


def check_hicache(scheme: Scheme, server_args: Any, cpu: bool) -> None:
    """ConfigError naming the flag and the scheme for a setting the scheme cannot serve."""
    if not server_args.enable_hierarchical_cache:
        return
    backend = server_args.hicache_storage_backend
    if scheme.shares_base and backend is not None:
        raise ConfigError(
            f"--hicache-storage-backend {backend} is not supported with --lragent-scheme {scheme}: its prefix "
            "tree has a host tier (--enable-hierarchical-cache) but no storage tier; drop --hicache-storage-backend")
    layout = server_args.hicache_mem_layout
    if cpu and layout not in CPU_LAYOUTS:
        raise ConfigError(
            f"--hicache-mem-layout {layout} is not supported on CPU with --lragent-scheme {scheme}; "
            f"use {' or '.join(CPU_LAYOUTS)}")
