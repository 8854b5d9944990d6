"""TreeNode: one token segment with its shared base slots and per-``lr_key`` LR slots."""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Hashable

import torch

LRKey = Hashable

_node_ids = itertools.count()


class TreeNode:
    """A radix-tree node, keyed by tokens only (never by adapter).

    ``base`` holds the KV slot indices of ``key`` (K and V_base, written by the first
    request that computed them). ``lr[lr_key]`` holds the LR slot indices of the same
    segment for one adapter or sharing group; an ``lr_key`` present here is present on
    every ancestor too (LR coverage is contiguous from the root).

    ``host`` holds the node's slots in a host-memory copy of the base (a hierarchical
    cache's second tier) or is None. A node whose ``base`` was evicted while ``host`` is
    set stays in the tree, host-only: its LR arrays stay where they are (on the device),
    and it can be loaded back. Host-only nodes are never locked; their descendants are
    host-only too. ``host_ref`` counts claims that keep ``host`` from eviction while a
    load back reads it.

    ``namespace`` is set on the root's children only: the cache namespace (SGLang's
    `cache_salt`) their subtree belongs to, None for the common one. Namespaces never
    share a node, so requests of one salt never match another salt's (or no salt's) pages.

    Lock counts are claims of in-flight requests on the path root -> node:
    ``lock_ref`` counts every claim (the base is always locked), ``lr_lock_ref[k]``
    counts the claims of requests using ``k``. A claim on ``k`` may exist where ``lr[k]``
    does not yet (the request is re-prefilling that LR); an LR array inserted there is
    protected at once. Zero counts are removed from the dict.
    """

    __slots__ = (
        "id",
        "children",
        "parent",
        "key",
        "base",
        "lr",
        "lock_ref",
        "lr_lock_ref",
        "last_access_time",
        "lr_last_access_time",
        "hit_count",
        "lr_hit_count",
        "namespace",
        "host",
        "host_ref",
    )

    def __init__(
        self,
        parent: TreeNode | None = None,
        key: array | None = None,
        base: torch.Tensor | None = None,
        access_time: int = 0,
    ) -> None:
        self.id: int = next(_node_ids)
        self.children: dict[Hashable, TreeNode] = {}
        self.parent = parent
        self.key: array = array("q") if key is None else key
        self.base = base
        self.lr: dict[LRKey, torch.Tensor] = {}
        self.lock_ref = 0
        self.lr_lock_ref: dict[LRKey, int] = {}
        self.last_access_time = access_time
        self.lr_last_access_time: dict[LRKey, int] = {}
        self.hit_count = 0
        self.lr_hit_count: dict[LRKey, int] = {}
        self.namespace: Hashable = None
        self.host: torch.Tensor | None = None
        self.host_ref = 0

    @property
    def evicted(self) -> bool:
        """True once the node's base was evicted; a stale handle must not be locked."""
        return self.base is None

    @property
    def backuped(self) -> bool:
        """The base has a host-memory copy (``host``)."""
        return self.host is not None

    def __len__(self) -> int:
        return len(self.key)

    def __repr__(self) -> str:
        head = list(self.key[:8])
        more = "..." if len(self.key) > 8 else ""
        return (
            f"TreeNode(id={self.id}, len={len(self.key)}, key={head}{more}, "
            f"lock_ref={self.lock_ref}, lr={sorted(map(repr, self.lr))})"
        )
