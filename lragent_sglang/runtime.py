"""Per-process LRAgent state shared by the cache backend, the attention backend and the
LoRA hooks of one SGLang scheduler process.

SGLang builds the LoRA pool, the KV pool, the attention backend and the tree cache at
different moments and hands none of them to the others; they meet here. Created lazily
by whichever part needs it first, from `ServerArgs`, which every part can reach.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Hashable

import torch

from lragent_sglang.config import scheme_from_env
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


def lr_width(server_args: Any) -> int:
    """LR row width: `--max-lora-rank`, else the largest rank among the adapters."""
    from lragent_sglang.adapter_check import max_rank

    return int(server_args.max_lora_rank or max_rank(server_args.lora_paths))


def lr_bytes_per_token(server_args: Any, num_layers: int, dtype: torch.dtype) -> int:
    """Bytes the LR pool reserves per KV token (added to SGLang's per-token cell size)."""
    scheme = scheme_from_env()
    if not uses_lr_cache(scheme, server_args):
        return 0
    return lr_multiplicity(scheme, server_args) * LRTokenPool.bytes_per_slot(
        lr_width(server_args), num_layers, dtype
    )


@dataclass
class LRAgentRuntime:
    """What the parts of one scheduler process share (see module docstring)."""

    scheme: str
    enabled: bool  # an LR cache exists (base-sharing scheme with LoRA on)
    width: int
    num_layers: int = 0
    lr_pool: LRTokenPool | None = None
    # Per layer: [n_buffer_slots, H_kv, width, D] up-projections of v, scaling folded in.
    b_v: list[torch.Tensor] = field(default_factory=list)
    # Per layer: [n_buffer_slots, width, hidden] (base-shared) or [1, width, hidden] (group).
    a_v: list[torch.Tensor] = field(default_factory=list)
    slot_uid: dict[int, str | None] = field(default_factory=dict)
    group_owner: str | None = None  # adapter whose v_proj A is the group's (base-lr-shared)
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
        _RUNTIME = LRAgentRuntime(
            scheme=scheme,
            enabled=uses_lr_cache(scheme, server_args),
            width=lr_width(server_args),
        )
        logger.info("lragent runtime: scheme=%s, lr cache=%s", scheme, _RUNTIME.enabled)
    return _RUNTIME
