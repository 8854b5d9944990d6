"""Per-process LRAgent state shared by the cache backend, the attention backend and the
LoRA hooks of one SGLang scheduler process.

SGLang builds the LoRA pool, the KV pool, the attention backend and the tree cache at
different moments and hands none of them to the others; they meet here. Created lazily
by whichever part needs it first, from `ServerArgs`, which every part can reach.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Hashable

import torch

from lragent_sglang.config import DEFAULT_LR_BASIS, ConfigError, lr_basis_from_env, scheme_from_env
from lragent_sglang.joint_basis import JOINT, SHARED_A, GroupBasis, joint_group, shared_a_group
from lragent_sglang.lr_pool import LRTokenPool

logger = logging.getLogger(__name__)

BASE_SHARING = ("base-shared", "base-lr-shared")
SHARED_LR_KEY = "shared-lr"


def selected(server_args: Any) -> bool:
    """Both `lragent` backends are selected: nothing of ours may act otherwise."""
    return server_args.attention_backend == "lragent" and server_args.radix_cache_backend == "lragent"


def uses_lr_cache(scheme: str, server_args: Any) -> bool:
    """V is split into shared V_base and an LR cache: a base-sharing scheme, LoRA on,
    and our backends selected."""
    return scheme in BASE_SHARING and bool(server_args.enable_lora) and selected(server_args)


def lr_multiplicity(scheme: str, server_args: Any) -> int:
    """LR rows one KV token may need: one per adapter in base-shared, one in base-lr-shared."""
    if scheme == "base-lr-shared":
        return 1
    n = server_args.max_loaded_loras or len(server_args.lora_paths or []) or server_args.max_loras_per_batch
    return max(1, int(n))


def kv_bytes_per_token(kv_pool: Any) -> int:
    """Bytes of K and V one token takes across all layers of an MHA KV pool."""
    return sum(b[0].numel() * b.element_size() for b in (*kv_pool.k_buffer, *kv_pool.v_buffer))


def start_up_group(lora_paths: Any, lr_basis: str) -> GroupBasis | None:
    """The group the `--lora-paths` adapters form in base-lr-shared (None without any):
    the first one's v_proj A (shared-a) or the joint basis of all (joint). Built once per
    process; the LR width, the adapter load check and the start-up A stack all read it."""
    from lragent_sglang.adapter_check import lora_pairs

    return _group_of(tuple(lora_pairs(lora_paths)), lr_basis)


@functools.lru_cache(maxsize=4)
def _group_of(pairs: tuple[tuple[str, str], ...], lr_basis: str) -> GroupBasis | None:
    from lragent_sglang.adapter_check import v_proj_a

    if not pairs:
        return None
    if lr_basis == SHARED_A:
        name, path = pairs[0]
        return shared_a_group(name, v_proj_a(path))
    return joint_group([(name, v_proj_a(path)) for name, path in pairs])


def lr_width(server_args: Any, lr_basis: str = DEFAULT_LR_BASIS) -> int:
    """LR row width: the joint basis's (joint), else `--max-lora-rank`, else the largest
    rank among the adapters. SGLang's `--max-lora-rank` stays the adapters' r either way."""
    if lr_basis == JOINT:
        group = start_up_group(server_args.lora_paths, lr_basis)
        if group is None:
            raise ConfigError("--lragent-lr-basis joint needs the adapters at start-up (--lora-paths)")
        return group.width
    from lragent_sglang.adapter_check import max_rank

    return int(server_args.max_lora_rank or max_rank(server_args.lora_paths))


def lr_bytes_per_token(server_args: Any, num_layers: int, dtype: torch.dtype) -> int:
    """Bytes the LR pool reserves per KV token (added to SGLang's per-token cell size)."""
    rt = get_runtime(server_args)
    if not rt.enabled:
        return 0
    return lr_multiplicity(rt.scheme, server_args) * LRTokenPool.bytes_per_slot(rt.width, num_layers, dtype)


@dataclass
class LRAgentRuntime:
    """What the parts of one scheduler process share (see module docstring)."""

    scheme: str
    enabled: bool  # an LR cache exists (base-sharing scheme with LoRA on)
    width: int  # LR row width: max LoRA rank, or the joint basis's width
    lr_basis: str = DEFAULT_LR_BASIS
    num_layers: int = 0
    lr_pool: LRTokenPool | None = None
    # Per layer: [n_buffer_slots, H_kv, width, D] up-projections of v, scaling folded in.
    b_v: list[torch.Tensor] = field(default_factory=list)
    # Per layer: [n_buffer_slots, width, hidden] (base-shared) or [1, width, hidden] (group).
    a_v: list[torch.Tensor] = field(default_factory=list)
    slot_uid: dict[int, str | None] = field(default_factory=dict)
    group: GroupBasis | None = None  # base-lr-shared: the rows of the one LR cache
    # Per forward: LoRA buffer slot of every token, and L rows waiting for attention.
    token_slot: torch.Tensor | None = None
    pending_lr: dict[int, torch.Tensor] = field(default_factory=dict)
    # Requests whose next extend has an LR-prefill gap (set at allocation, read by the
    # attention backend without a device sync).
    gap_rids: set[str] = field(default_factory=set)

    def take_gap(self, rids: list[str] | None) -> bool:
        """Whether any of these requests was allocated a gap; forgets them."""
        if not self.gap_rids or not rids:
            return False
        hit = self.gap_rids.intersection(rids)
        self.gap_rids.difference_update(hit)
        return bool(hit)

    def lr_key(self, lora_id: str | None) -> Hashable:
        """The tree's LR key of a request: its adapter, the shared group, or None."""
        if not self.enabled:
            return None
        if self.scheme == "base-lr-shared":
            return SHARED_LR_KEY
        return lora_id

    def init_weight_stacks(self, n_slots: int, num_layers: int, h_kv: int, head_dim: int,
                           hidden: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_layers = num_layers
        a_slots = 1 if self.scheme == "base-lr-shared" else n_slots
        self.b_v = [torch.zeros(n_slots, h_kv, self.width, head_dim, dtype=dtype, device=device)
                    for _ in range(num_layers)]
        self.a_v = [torch.zeros(a_slots, self.width, hidden, dtype=dtype, device=device)
                    for _ in range(num_layers)]


_RUNTIME: LRAgentRuntime | None = None


def get_runtime(server_args: Any | None = None) -> LRAgentRuntime:
    """This process's runtime; the first call must pass `server_args`."""
    global _RUNTIME
    if _RUNTIME is None:
        if server_args is None:
            from sglang.srt.server_args import get_global_server_args

            server_args = get_global_server_args()
        scheme = scheme_from_env()
        lr_basis = lr_basis_from_env(scheme)
        _RUNTIME = LRAgentRuntime(
            scheme=scheme,
            enabled=uses_lr_cache(scheme, server_args),
            width=lr_width(server_args, lr_basis),
            lr_basis=lr_basis,
        )
        logger.info("lragent runtime: scheme=%s, lr cache=%s, LR width %d (lr basis %s)",
                    scheme, _RUNTIME.enabled, _RUNTIME.width, lr_basis)
    return _RUNTIME
