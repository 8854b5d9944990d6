"""Per-process LRAgent state of one SGLang scheduler: what the cache backend, the attention
backend and the LoRA hooks share.

SGLang builds the LoRA pool, the KV pool, the attention backend and the tree cache at
different moments and hands none of them to the others; they meet here. The plugin
creates one `LRAgentRuntime` per process from the launch configuration and hands it to
every hook and factory (`patches`). `bind` completes it from SGLang's `ServerArgs` on
first use; `attach_model_runner` builds the LR pool and the v_proj weight stacks once the
model runner's KV pool and LoRA manager exist (SGLang builds the attention backend then).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Hashable

import torch

from lragent_sglang.adapters.joint_basis import GroupBasis
from lragent_sglang.scheme import LRBasis, Scheme
from lragent_sglang.server.config import LRAgentConfig, selected
from lragent_sglang.server import lora_split
from lragent_sglang.server.lora_split import LRWeights, start_up_group
from lragent_sglang.server.lr_pool import LRTokenPool

logger = logging.getLogger(__name__)

#: how the one LR cache of base-lr-shared is shown; its key adds the group basis's digest
SHARED_LR_KEY = "shared-lr"


def uses_lr_cache(scheme: Scheme, server_args: Any) -> bool:
    """V is split into shared V_base and an LR cache: a base-sharing scheme, LoRA on,
    and our backends selected."""
    return scheme.shares_base and bool(server_args.enable_lora) and selected(server_args)


def lr_multiplicity(scheme: Scheme, server_args: Any) -> int:
    """LR rows one KV token may need: one per adapter in base-shared, one in base-lr-shared."""
    if scheme.one_lr_cache:
        return 1
    n = server_args.max_loaded_loras or len(server_args.lora_paths or []) or server_args.max_loras_per_batch
    return max(1, int(n))


def host_tier_ratio(server_args: Any) -> float:
    """Host-tier tokens per device token for the memory budget: `--hicache-ratio` with
    `--enable-hierarchical-cache` (a fixed `--hicache-size` is counted when the LR pool is
    built, outside the budget: its rows are 0.4% of the host KV they cover), else 0."""
    if not getattr(server_args, "enable_hierarchical_cache", False) or server_args.hicache_size > 0:
        return 0.0
    return float(server_args.hicache_ratio)


def host_tier_tokens(server_args: Any, kv_size: int, kv_bytes: int) -> int:
    """KV tokens of the hierarchical cache's host pool, sized as SGLang sizes it; 0 without it.
    Their LR rows stay on the device (see `hicache`), so the LR pool has room for them."""
    if not getattr(server_args, "enable_hierarchical_cache", False):
        return 0
    if server_args.hicache_size > 0:
        return int(server_args.hicache_size * 1e9 // kv_bytes)
    return int(kv_size * server_args.hicache_ratio)


def kv_bytes_per_token(kv_pool: Any) -> int:
    """Bytes of K and V one token takes across all layers of an MHA KV pool."""
    return sum(b[0].numel() * b.element_size() for b in (*kv_pool.k_buffer, *kv_pool.v_buffer))


def lr_width(server_args: Any, lr_basis: LRBasis) -> int:
    """LR row width: the joint basis's (joint), else `--max-lora-rank`, else the largest
    rank among the adapters. SGLang's `--max-lora-rank` stays the adapters' r either way."""
    from lragent_sglang.scheme import ConfigError

    if lr_basis is LRBasis.JOINT:
        group = start_up_group(server_args.lora_paths, lr_basis)
        if group is None:
            raise ConfigError(f"--lragent-lr-basis {LRBasis.JOINT} needs the adapters at start-up (--lora-paths)")
        return group.width
    from lragent_sglang.adapters.io import max_rank

    return int(server_args.max_lora_rank or max_rank(server_args.lora_paths))


@dataclass
class ForwardState:
    """What the attention backend prepares for the LoRA split of the current forward."""

    token_slot: torch.Tensor | None = None  # [tokens] LoRA buffer slot of every token
    lr_out_loc: torch.Tensor | None = None  # [tokens] LR pool slot every new token's L row goes to


class LRAgentRuntime:
    """See module docstring."""

    def __init__(self, config: LRAgentConfig) -> None:
        self.config = config
        self.bound = False
        self.enabled = False  # an LR cache exists (base-sharing scheme, LoRA on, our backends)
        self.width = 0  # LR row width: max LoRA rank, or the joint basis's width
        self.lr_pool: LRTokenPool | None = None
        self.weights: LRWeights | None = None
        self.group: GroupBasis | None = None  # base-lr-shared: the rows of the one LR cache
        # base-shared: adapter uid -> LR key, the digest of the adapter's weights (its LR rows
        # depend on all of them), so a name reloaded with other weights never reads old rows
        # and identical weights under another name read the same ones.
        self.lr_keys: dict[str, str] = {}
        self.forward = ForwardState()
        # Requests whose next extend has an LR-prefill gap (set at allocation, read by the
        # attention backend without a device sync).
        self.gap_rids: set[str] = set()

    @property
    def scheme(self) -> Scheme:
        return self.config.scheme

    def bind(self, server_args: Any) -> "LRAgentRuntime":
        """Complete the runtime from SGLang's server arguments (once; later calls return it)."""
        if not self.bound:
            self.enabled = uses_lr_cache(self.scheme, server_args)
            self.width = lr_width(server_args, self.config.lr_basis)
            self.bound = True
            logger.info("lragent runtime: scheme=%s, lr cache=%s, LR width %d (lr basis %s)",
                        self.scheme, self.enabled, self.width, self.config.lr_basis)
        return self

    def lr_bytes_per_token(self, server_args: Any, num_layers: int, dtype: torch.dtype) -> int:
        """Bytes the LR pool reserves per KV token (added to SGLang's per-token cell size)."""
        self.bind(server_args)
        if not self.enabled:
            return 0
        per_slot = LRTokenPool.bytes_per_slot(self.width, num_layers, dtype)
        return int(lr_multiplicity(self.scheme, server_args) * per_slot * (1 + host_tier_ratio(server_args)))

    def attach_model_runner(self, runner: Any) -> None:
        """Build the LR pool and the v_proj weight stacks for this runner's pools (once).

        In base-lr-shared the group's rows are written at once: SGLang copies an adapter
        into its buffers only when a batch first uses it, but the shared LR rows must be
        right from the first request on, no-adapter ones included (a fork's prefix commit).
        """
        self.bind(runner.server_args)
        if not self.enabled or self.lr_pool is not None:
            return
        self.lr_pool = create_lr_pool(runner, self)
        manager = runner.lora_manager
        lora_split.tag_layer_ids(manager.lora_modules)
        self.weights = lora_split.weight_stacks(self, manager.memory_pool)
        if self.scheme.one_lr_cache:
            group = start_up_group(runner.server_args.lora_paths, self.config.lr_basis)
            if group is not None:
                lora_split.set_group(self, group)

    def take_gap(self, rids: list[str] | None) -> bool:
        """Whether any of these requests was allocated a gap; forgets them."""
        if not self.gap_rids or not rids:
            return False
        hit = self.gap_rids.intersection(rids)
        self.gap_rids.difference_update(hit)
        return bool(hit)

    def lr_key(self, lora_id: str | None) -> Hashable:
        """The tree's LR key of a request: its adapter's content (base-shared), the group
        basis's (base-lr-shared; no key before a group exists, whose rows would be zeros),
        or None (no LR cache)."""
        if not self.enabled:
            return None
        if self.scheme.one_lr_cache:
            return None if self.group is None else f"{SHARED_LR_KEY}:{self.group.digest}"
        if lora_id is None:
            return None
        return self.lr_keys.get(lora_id, lora_id)

    def lr_key_names(self, adapter_names: dict[str, str]) -> dict[str, str]:
        """LR key -> how people know it: `shared-lr`, or the names of the adapters whose
        content it is (`plan`, `plan+plan-copy`); keys not listed keep their own name."""
        if self.group is not None:
            return {f"{SHARED_LR_KEY}:{self.group.digest}": SHARED_LR_KEY}
        out: dict[str, str] = {}
        for uid, name in adapter_names.items():
            key = self.lr_keys.get(uid, uid)
            out[key] = "+".join(filter(None, [out.get(key), name]))
        return out


def create_lr_pool(runner: Any, rt: LRAgentRuntime) -> LRTokenPool:
    """One LR row per KV slot (device and host tier) and LR key that may need it; logged
    next to the KV capacity."""
    kv_size = runner.token_to_kv_pool_allocator.size
    host = host_tier_tokens(runner.server_args, kv_size, kv_bytes_per_token(runner.token_to_kv_pool))
    size = (kv_size + host) * lr_multiplicity(rt.scheme, runner.server_args)
    req_to_token = runner.req_to_token_pool.req_to_token
    pool = LRTokenPool(
        size=size, width=rt.width, num_layers=runner.model_config.num_hidden_layers,
        dtype=runner.kv_cache_dtype if runner.kv_cache_dtype.is_floating_point else runner.dtype,
        device=runner.device, max_reqs=req_to_token.shape[0], max_context_len=req_to_token.shape[1],
    )
    logger.info(
        "lragent memory: base KV %d tokens (host tier %d); LR pool %d rows x %d wide (%.1f MB, scheme %s)",
        kv_size, host, size, rt.width, pool.total_bytes / 2**20, rt.scheme,
    )
    return pool


def add_lr_bytes(rt: LRAgentRuntime, cell_size: int, configurator: Any, kvc: Any, num_layers: int) -> int:
    """AFTER hook of SGLang's per-token KV cost: the LR pool is part of the same budget,
    so `--mem-fraction-static` means what it means in stock SGLang."""
    return cell_size + rt.lr_bytes_per_token(kvc.server_args, num_layers, kvc.kv_cache_dtype)
