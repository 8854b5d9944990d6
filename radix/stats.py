"""O(1) counters of the prefix tree, exported as a plain dict for metrics and JSON."""

from __future__ import annotations

import dataclasses
from typing import Any

from .node import LRKey


@dataclasses.dataclass(slots=True)
class LRKeyStats:
    """Cumulative counters of one ``lr_key`` (``None``: base-model requests)."""

    match_calls: int = 0
    requested_tokens: int = 0
    base_hit_tokens: int = 0
    lr_hit_tokens: int = 0
    lr_gap_tokens: int = 0
    lr_inserted_tokens: int = 0
    lr_evicted_tokens: int = 0


class RadixStats:
    """Cumulative counters, bumped in match / insert / evict; current sizes live in the tree."""

    __slots__ = ("per_key", "base_inserted_tokens", "base_evicted_tokens", "host_written_tokens",
                 "host_loaded_tokens", "host_evicted_tokens", "host_hit_tokens")

    def __init__(self) -> None:
        self.per_key: dict[LRKey, LRKeyStats] = {}
        self.reset()

    def key(self, lr_key: LRKey) -> LRKeyStats:
        """The counters of ``lr_key``, created on first use."""
        stats = self.per_key.get(lr_key)
        if stats is None:
            stats = self.per_key[lr_key] = LRKeyStats()
        return stats

    def record_match(self, lr_key: LRKey, requested: int, base_len: int, lr_len: int, lr_gap: int) -> None:
        stats = self.key(lr_key)
        stats.match_calls += 1
        stats.requested_tokens += requested
        stats.base_hit_tokens += base_len
        stats.lr_hit_tokens += lr_len
        stats.lr_gap_tokens += lr_gap

    def reset(self) -> None:
        """Zero the cumulative counters (sizes are state, not counters, and stay)."""
        self.per_key.clear()
        self.base_inserted_tokens = 0
        self.base_evicted_tokens = 0
        self.host_written_tokens = 0  # base tokens copied to the host tier
        self.host_loaded_tokens = 0  # base tokens loaded back from it
        self.host_evicted_tokens = 0  # host-only tokens dropped from it
        self.host_hit_tokens = 0  # tokens matched in host memory only

    def snapshot(
        self,
        *,
        page_size: int,
        base_bytes_per_token: int,
        lr_bytes_per_token: int,
        base_evictable: int,
        base_protected: int,
        lr_evictable: dict[LRKey, int],
        lr_protected: dict[LRKey, int],
        host_tokens: int = 0,
    ) -> dict[str, Any]:
        """Counters and current sizes as a JSON-ready dict; ``per_lr_key`` keys are ``str(lr_key)``."""
        keys = list(self.per_key)
        keys += [k for k in lr_evictable if k not in self.per_key]
        per_key: dict[str, dict[str, int]] = {}
        for k in keys:
            entry = dataclasses.asdict(self.per_key.get(k, LRKeyStats()))
            evictable = lr_evictable.get(k, 0)
            protected = lr_protected.get(k, 0)
            entry["lr_tokens"] = evictable + protected
            entry["lr_bytes"] = (evictable + protected) * lr_bytes_per_token
            entry["lr_evictable_tokens"] = evictable
            entry["lr_protected_tokens"] = protected
            per_key[str(k)] = entry
        base_tokens = base_evictable + base_protected
        lr_tokens = sum(lr_evictable.values()) + sum(lr_protected.values())
        return {
            "page_size": page_size,
            "base": {
                "tokens": base_tokens,
                "bytes": base_tokens * base_bytes_per_token,
                "evictable_tokens": base_evictable,
                "protected_tokens": base_protected,
                "inserted_tokens": self.base_inserted_tokens,
                "evicted_tokens": self.base_evicted_tokens,
            },
            "lr": {
                "tokens": lr_tokens,
                "bytes": lr_tokens * lr_bytes_per_token,
                "evictable_tokens": sum(lr_evictable.values()),
                "protected_tokens": sum(lr_protected.values()),
                "inserted_tokens": sum(s.lr_inserted_tokens for s in self.per_key.values()),
                "evicted_tokens": sum(s.lr_evicted_tokens for s in self.per_key.values()),
            },
            "host": {
                "tokens": host_tokens,
                "bytes": host_tokens * base_bytes_per_token,
                "written_tokens": self.host_written_tokens,
                "loaded_back_tokens": self.host_loaded_tokens,
                "evicted_tokens": self.host_evicted_tokens,
                "hit_tokens": self.host_hit_tokens,
            },
            "per_lr_key": per_key,
        }
