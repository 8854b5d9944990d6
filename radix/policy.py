"""Eviction priorities (smallest evicted first), per component, like SGLang's strategies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .node import LRKey, TreeNode

BasePriority = Callable[[TreeNode], Any]
LRPriority = Callable[[TreeNode, LRKey], Any]


def _base_lru(node: TreeNode) -> int:
    return node.last_access_time


def _base_lfu(node: TreeNode) -> tuple[int, int]:
    return node.hit_count, node.last_access_time


def _lr_lru(node: TreeNode, lr_key: LRKey) -> int:
    return node.lr_last_access_time[lr_key]


def _lr_lfu(node: TreeNode, lr_key: LRKey) -> tuple[int, int]:
    return node.lr_hit_count[lr_key], node.lr_last_access_time[lr_key]


_POLICIES: dict[str, tuple[BasePriority, LRPriority]] = {
    "lru": (_base_lru, _lr_lru),
    "lfu": (_base_lfu, _lr_lfu),
}


def get_priorities(eviction_policy: str) -> tuple[BasePriority, LRPriority]:
    """Priority functions for base nodes and for (node, lr_key) LR arrays."""
    try:
        return _POLICIES[eviction_policy.lower()]
    except KeyError:
        raise ValueError(
            f"Unknown eviction policy {eviction_policy!r}; supported: {sorted(_POLICIES)}"
        ) from None
