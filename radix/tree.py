"""LRRadixTree: the LRAgent prefix tree (shared base pages + per-``lr_key`` LR pages).

The tree is keyed by token ids only (within a cache namespace: SGLang's `cache_salt`,
given as ``namespace``; the root's children of one namespace are apart from every other's).
A node's ``base`` slots are shared by every adapter;
its ``lr`` mapping holds each adapter's (or sharing group's) low-rank cache slots for
the same tokens. Insertion is first-writer-wins for both components, eviction is
leaf-first per component, and locks protect what in-flight requests use.

A host tier (a hierarchical cache) is optional: a node's base may have a copy in host
memory (``TreeNode.host``, slots of the caller's host pool). Evicting such a node's base
keeps the node, host-only, with its LR arrays; a match reports the host-only part after
the device part, ``restore`` loads it back, and ``evict_host`` drops host-only leaves.
Device nodes form a subtree under the root; host-only nodes hang below it. Structure and
vocabulary follow SGLang's ``RadixCache`` (``mem_cache/radix_cache.py``), without
importing SGLang.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import sys
from collections import defaultdict
from array import array
from collections.abc import Callable, Hashable
from typing import Any, TextIO

import torch

from .key import TokenIds, child_key, common_prefix_len, page_aligned_len, to_key
from .node import LRKey, TreeNode
from .policy import get_priorities
from .results import EvictResult, InsertResult, MatchResult
from .stats import RadixStats

logger = logging.getLogger(__name__)


class LRRadixTree:
    """Prefix tree of KV (base) slots and per-``lr_key`` LR slots; see module docstring.

    ``page_size`` tokens form a page: keys are cut to whole pages, so a key shorter than
    a page is never cached. ``base_bytes_per_token`` / ``lr_bytes_per_token`` only feed
    the byte figures of ``stats()``. Slot indices are int64 tensors on ``device``.
    """

    def __init__(
        self,
        page_size: int = 1,
        *,
        base_bytes_per_token: int = 0,
        lr_bytes_per_token: int = 0,
        eviction_policy: str = "lru",
        device: torch.device | str = "cpu",
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.base_bytes_per_token = base_bytes_per_token
        self.lr_bytes_per_token = lr_bytes_per_token
        self.eviction_policy = eviction_policy.lower()
        self._base_priority, self._lr_priority = get_priorities(eviction_policy)
        self.device = torch.device(device)
        self._empty = torch.empty((0,), dtype=torch.int64, device=self.device)
        self.stats_ = RadixStats()
        self.reset()

    # ------------------------------------------------------------------ public API

    def reset(self) -> None:
        """Drop every node and zero all sizes and counters (the allocators are reset by the caller)."""
        self.root_node = TreeNode(base=self._empty)
        self.root_node.lock_ref = 1
        self.base_evictable_size_ = 0
        self.base_protected_size_ = 0
        self.lr_evictable_size_: dict[LRKey, int] = {}
        self.lr_protected_size_: dict[LRKey, int] = {}
        self._base_leaves: set[TreeNode] = set()  # unlocked device nodes without device children
        self._host_leaves: set[TreeNode] = set()  # host-only nodes without children
        self.host_size_ = 0
        self._lr_leaves: dict[LRKey, set[TreeNode]] = {}
        self._clock = 0
        self.stats_.reset()

    def match(self, tokens: TokenIds, lr_key: LRKey = None, *, namespace: Hashable = None,
              record_stats: bool = True) -> MatchResult:
        """Longest cached page-aligned prefix of ``tokens`` in ``namespace`` and ``lr_key``'s
        LR reach within it.

        Splits the node where the match ends inside a segment, as SGLang does, so the
        returned nodes end exactly at the matched lengths. ``record_stats=False`` is for
        repeated lookups of the same request, which must not count twice. Host-only
        nodes after the device part are reported as ``host_len`` / ``host_indices``.
        """
        key = to_key(tokens)
        n = page_aligned_len(len(key), self.page_size)
        ps = self.page_size
        self._clock += 1
        now = self._clock
        node = self.root_node
        node.last_access_time = now
        base_parts: list[torch.Tensor] = []
        lr_parts: list[torch.Tensor] = []
        lr_open = lr_key is not None
        lr_node = node
        lr_len = 0
        pos = 0
        base_node = node
        base_len = 0
        host_parts: list[torch.Tensor] = []
        while pos < n:
            child = node.children.get(self._lookup_key(node, key, pos, namespace))
            if child is None:
                break
            end = pos + len(child.key)
            partial = end > n or key[pos:end] != child.key
            if partial:
                split_len = common_prefix_len(child.key, key, pos, n, ps)
                child = self._split_node(child, split_len)
                end = pos + split_len
            child.last_access_time = now
            if child.base is None:
                host_parts.append(child.host)
                lr_open = False
            else:
                base_parts.append(child.base)
                base_node = child
                base_len = end
            if lr_open:
                lr = child.lr.get(lr_key)
                if lr is None:
                    lr_open = False
                else:
                    lr_parts.append(lr)
                    child.lr_last_access_time[lr_key] = now
                    lr_node = child
                    lr_len = end
            node = child
            pos = end
            if partial:
                break
        host_len = pos - base_len
        if record_stats:
            gap = base_len - lr_len if lr_key is not None else 0
            self.stats_.record_match(lr_key, len(key), base_len, lr_len, gap)
            self.stats_.host_hit_tokens += host_len
        return MatchResult(
            base_indices=torch.cat(base_parts) if base_parts else self._empty,
            base_len=base_len,
            last_base_node=base_node,
            lr_key=lr_key,
            lr_indices=torch.cat(lr_parts) if lr_parts else self._empty,
            lr_len=lr_len,
            last_lr_node=lr_node,
            host_len=host_len,
            host_indices=self._join(host_parts),
            last_node=node,
        )

    def insert_base(self, tokens: TokenIds, slots: torch.Tensor, *, namespace: Hashable = None) -> InsertResult:
        """Cache base (K, V_base) slots for the page-aligned part of ``tokens`` in ``namespace``.

        First writer wins: the already cached prefix keeps its slots and the caller's
        slots for it (``[:prefix_len]``) are not taken; only the new suffix is stored.
        Host-only nodes on the path are the exception: they take the caller's slots for
        their segment (the caller recomputed them) and are on the device again.
        """
        key = to_key(tokens)
        ps = self.page_size
        n = page_aligned_len(len(key), ps)
        if len(slots) < n:
            raise ValueError(f"insert_base: {len(slots)} slots for {n} page-aligned tokens")
        self._clock += 1
        now = self._clock
        node = self.root_node
        node.last_access_time = now
        pos = 0
        while pos < n:
            child = node.children.get(self._lookup_key(node, key, pos, namespace))
            if child is None:
                break
            end = pos + len(child.key)
            if end > n or key[pos:end] != child.key:
                split_len = common_prefix_len(child.key, key, pos, n, ps)
                child = self._split_node(child, split_len)
                end = pos + split_len
            child.last_access_time = now
            child.hit_count += 1
            if child.base is None:
                self._revive(child, slots[pos:end])
                self.stats_.base_inserted_tokens += end - pos
            node = child
            pos = end
        prefix_len = pos
        if pos < n:
            new_node = TreeNode(
                parent=node,
                key=key[pos:n],
                base=slots[pos:n].to(device=self.device, dtype=torch.int64, copy=True),
                access_time=now,
            )
            new_node.hit_count = 1
            if node is self.root_node:
                new_node.namespace = namespace
            node.children[self._lookup_key(node, key, pos, namespace)] = new_node
            self.base_evictable_size_ += n - pos
            self._base_leaves.discard(node)
            self._base_leaves.add(new_node)
            self.stats_.base_inserted_tokens += n - pos
            node = new_node
        return InsertResult(prefix_len=prefix_len, total_len=n, last_node=node)

    def insert_lr(self, tokens: TokenIds, lr_key: LRKey, lr_slots: torch.Tensor, *,
                  namespace: Hashable = None) -> InsertResult:
        """Cache ``lr_key``'s LR slots for the page-aligned part of ``tokens`` in ``namespace``.

        The base must already cover those tokens (whoever wrote it: a base-shared
        request stores its LR under another adapter's base). First writer wins: LR
        already cached for ``lr_key`` (always a prefix, ``[:prefix_len]``) is kept.
        Raises ``ValueError`` before changing anything if the base does not cover
        ``tokens`` or ``lr_key`` is ``None``.
        """
        if lr_key is None:
            raise ValueError("insert_lr: lr_key None means the base model, which has no LR cache")
        key = to_key(tokens)
        ps = self.page_size
        n = page_aligned_len(len(key), ps)
        if len(lr_slots) < n:
            raise ValueError(f"insert_lr: {len(lr_slots)} LR slots for {n} page-aligned tokens")
        path: list[tuple[TreeNode, int]] = []
        node = self.root_node
        pos = 0
        while pos < n:
            child = node.children.get(self._lookup_key(node, key, pos, namespace))
            if child is None:
                break
            end = pos + len(child.key)
            if end > n or key[pos:end] != child.key:
                seg = common_prefix_len(child.key, key, pos, n, ps)
                path.append((child, seg))
                pos += seg
                break
            path.append((child, end - pos))
            node = child
            pos = end
        if pos < n:
            raise ValueError(
                f"insert_lr: base is cached for only {pos} of {n} tokens; insert_base first"
            )

        self._clock += 1
        now = self._clock
        self.root_node.last_access_time = now
        prefix_len = 0
        pos = 0
        first_new: TreeNode | None = None
        node = self.root_node
        for child, seg in path:
            if seg < len(child.key):
                child = self._split_node(child, seg)
            child.last_access_time = now
            child.lr_last_access_time[lr_key] = now
            child.lr_hit_count[lr_key] = child.lr_hit_count.get(lr_key, 0) + 1
            if lr_key in child.lr:
                prefix_len = pos + seg
            else:
                child.lr[lr_key] = lr_slots[pos : pos + seg].to(
                    device=self.device, dtype=torch.int64, copy=True
                )
                if first_new is None:
                    first_new = child
            node = child
            pos += seg

        created = n - prefix_len
        if first_new is not None:
            self._account_new_lr(path_start=first_new, last=node, lr_key=lr_key)
            self.stats_.key(lr_key).lr_inserted_tokens += created
        return InsertResult(prefix_len=prefix_len, total_len=n, last_node=node)

    def inc_lock_ref(self, node: TreeNode, lr_key: LRKey = None) -> int:
        """Lock the path root -> ``node``: its base, and ``lr_key``'s LR pages on it.

        Returns the change of the base evictable size (<= 0), like SGLang's delta.
        """
        if node.evicted:
            raise ValueError(f"inc_lock_ref on an evicted node {node!r}")
        root = self.root_node
        delta = 0
        while node is not root:
            if node.lock_ref == 0:
                m = len(node.key)
                self.base_evictable_size_ -= m
                self.base_protected_size_ += m
                delta -= m
                self._base_leaves.discard(node)
            node.lock_ref += 1
            if lr_key is not None:
                count = node.lr_lock_ref.get(lr_key, 0)
                if count == 0 and lr_key in node.lr:
                    m = len(node.key)
                    self.lr_evictable_size_[lr_key] -= m
                    self.lr_protected_size_[lr_key] += m
                    self._lr_leaves[lr_key].discard(node)
                node.lr_lock_ref[lr_key] = count + 1
            node = node.parent
        return delta

    def dec_lock_ref(self, node: TreeNode, lr_key: LRKey = None) -> int:
        """Release a lock taken by ``inc_lock_ref(node, lr_key)``; returns the base evictable delta (>= 0)."""
        root = self.root_node
        if node is root:
            return 0
        if node.lock_ref <= 0 or (lr_key is not None and lr_key not in node.lr_lock_ref):
            raise RuntimeError(f"dec_lock_ref without a matching inc_lock_ref: {node!r}, lr_key={lr_key!r}")
        delta = 0
        below: TreeNode | None = None
        while node is not root:
            if node.lock_ref == 1:
                m = len(node.key)
                self.base_evictable_size_ += m
                self.base_protected_size_ -= m
                delta += m
                if not self._has_device_child(node):
                    self._base_leaves.add(node)
            node.lock_ref -= 1
            if lr_key is not None:
                count = node.lr_lock_ref[lr_key]
                if count == 1:
                    del node.lr_lock_ref[lr_key]
                    if lr_key in node.lr:
                        m = len(node.key)
                        self.lr_evictable_size_[lr_key] += m
                        self.lr_protected_size_[lr_key] -= m
                        if self._is_lr_leaf(node, lr_key, below):
                            self._lr_leaves[lr_key].add(node)
                else:
                    node.lr_lock_ref[lr_key] = count - 1
            below = node
            node = node.parent
        return delta

    def evict_base(self, num_tokens: int,
                   offload: Callable[[TreeNode], torch.Tensor | None] | None = None) -> EvictResult:
        """Evict at least ``num_tokens`` base tokens (whole nodes) if possible, leaf first.

        Only unlocked device leaves are candidates, in eviction-policy order (LRU default).
        A node with a host copy (or one ``offload`` gives host slots for: it has copied
        the node's base there) becomes host-only and keeps its LR arrays; any other node
        is deleted with all its LR arrays and host-only descendants. All freed slots are
        returned.
        """
        priority = self._base_priority
        heap = [(priority(x), x.id, x) for x in self._base_leaves]
        heapq.heapify(heap)
        root = self.root_node
        base_parts: list[torch.Tensor] = []
        host_parts: list[torch.Tensor] = []
        lr_parts: dict[LRKey, list[torch.Tensor]] = defaultdict(list)
        evicted = 0
        while evicted < num_tokens and heap:
            _, _, x = heapq.heappop(heap)
            if x.host is None and offload is not None:
                host = offload(x)
                if host is not None:
                    self.set_host(x, host)
            if x.host is None and not self._drop_subtree(x, lr_parts, host_parts):
                continue
            base_parts.append(x.base)
            evicted += len(x.key)
            parent = x.parent
            if x.host is None:
                self._delete_leaf(x, lr_parts, host_parts)
            else:
                self._demote(x)
            if parent is not root and parent.lock_ref == 0 and parent in self._base_leaves:
                heapq.heappush(heap, (priority(parent), parent.id, parent))
        self.stats_.base_evicted_tokens += evicted
        result = self._freed(base_parts, lr_parts, host_parts)
        self._count_lr_evicted(result)
        logger.debug("evict_base: asked %d, freed %d base tokens", num_tokens, evicted)
        return result

    def evict_lr(self, num_tokens: int, lr_key: LRKey = None) -> EvictResult:
        """Evict at least ``num_tokens`` LR tokens (whole arrays) if possible; base stays.

        Candidates are unlocked LR arrays with no descendant of the same ``lr_key``
        (so each key's coverage stays contiguous from the root), of ``lr_key`` only or of
        any key when it is ``None``, in eviction-policy order (LRU default).
        """
        priority = self._lr_priority
        keys = [lr_key] if lr_key is not None else list(self._lr_leaves)
        seq = itertools.count()
        heap = [(priority(x, k), next(seq), x, k) for k in keys for x in self._lr_leaves.get(k, ())]
        heapq.heapify(heap)
        root = self.root_node
        lr_parts: dict[LRKey, list[torch.Tensor]] = defaultdict(list)
        evicted = 0
        while evicted < num_tokens and heap:
            _, _, x, k = heapq.heappop(heap)
            lr_parts[k].append(x.lr.pop(k))
            del x.lr_last_access_time[k]
            del x.lr_hit_count[k]
            m = len(x.key)
            evicted += m
            self.lr_evictable_size_[k] -= m
            self._lr_leaves[k].discard(x)
            parent = x.parent
            if parent is not root and self._lr_evictable_leaf(parent, k):
                self._lr_leaves[k].add(parent)
                heapq.heappush(heap, (priority(parent, k), next(seq), parent, k))
        result = self._freed([], lr_parts)
        self._count_lr_evicted(result)
        logger.debug("evict_lr(lr_key=%r): asked %d, freed %d LR tokens", lr_key, num_tokens, evicted)
        return result

    def set_host(self, node: TreeNode, host: torch.Tensor) -> None:
        """Record that ``node``'s base was copied to host slots ``host`` (write-through or
        write-back of a hierarchical cache)."""
        if node.base is None or node.host is not None or len(host) != len(node.key):
            raise ValueError(f"set_host: {node!r} needs a device base, no host copy and {len(node.key)} host slots")
        node.host = host.to(dtype=torch.int64, copy=True)
        self.host_size_ += len(node.key)
        self.stats_.host_written_tokens += len(node.key)

    def host_path(self, node: TreeNode) -> tuple[list[TreeNode], TreeNode]:
        """The host-only nodes from the device part down to ``node`` (top first) and
        the device node (or root) above them: what a load back of ``node`` reads."""
        nodes: list[TreeNode] = []
        while node.base is None and node is not self.root_node:
            nodes.append(node)
            node = node.parent
        nodes.reverse()
        return nodes, node

    def protect_host(self, nodes: list[TreeNode], delta: int) -> None:
        """Claim (``delta`` 1) or release (-1) the host copies a load back reads."""
        for node in nodes:
            node.host_ref += delta

    def restore(self, nodes: list[TreeNode], slots: torch.Tensor) -> None:
        """Put the base of host-only ``nodes`` (a ``host_path``) back on the device at
        ``slots`` (one per token, in path order); they keep their host copies."""
        if len(slots) != sum(len(x.key) for x in nodes):
            raise ValueError("restore: one device slot per token of the nodes")
        pos = 0
        for x in nodes:
            m = len(x.key)
            self._revive(x, slots[pos : pos + m])
            pos += m
        self.stats_.host_loaded_tokens += pos

    def evict_host(self, num_tokens: int) -> EvictResult:
        """Drop at least ``num_tokens`` host-only tokens (whole leaves, with their LR
        arrays) if possible, in eviction-policy order; copies being loaded stay."""
        priority = self._base_priority
        heap = [(priority(x), x.id, x) for x in self._host_leaves]
        heapq.heapify(heap)
        root = self.root_node
        host_parts: list[torch.Tensor] = []
        lr_parts: dict[LRKey, list[torch.Tensor]] = defaultdict(list)
        evicted = 0
        while evicted < num_tokens and heap:
            _, _, x = heapq.heappop(heap)
            if x.host_ref > 0:
                continue
            evicted += len(x.key)
            parent = x.parent
            self._delete_leaf(x, lr_parts, host_parts)
            if parent is not root and parent in self._host_leaves:
                heapq.heappush(heap, (priority(parent), parent.id, parent))
        self.stats_.host_evicted_tokens += evicted
        result = self._freed([], lr_parts, host_parts)
        self._count_lr_evicted(result)
        return result

    def host_size(self) -> int:
        """Tokens with a host copy (host-only or backed-up device nodes)."""
        return self.host_size_

    def evict_to_budget(self, base_tokens: int | None = None, lr_tokens: int | None = None) -> EvictResult:
        """Evict until the tree holds at most ``lr_tokens`` LR and ``base_tokens`` base tokens.

        LR first (it is cheap to recompute and freeing it keeps the base), then base.
        ``None`` leaves a component unbounded. Locked pages may keep a budget exceeded.
        """
        results = []
        if lr_tokens is not None:
            excess = self.lr_evictable_size() + self.lr_protected_size() - lr_tokens
            if excess > 0:
                results.append(self.evict_lr(excess))
        if base_tokens is not None:
            excess = self.base_evictable_size_ + self.base_protected_size_ - base_tokens
            if excess > 0:
                results.append(self.evict_base(excess))
        base_parts = [r.base_indices for r in results]
        lr_parts: dict[LRKey, list[torch.Tensor]] = defaultdict(list)
        for r in results:
            for k, v in r.lr_indices.items():
                lr_parts[k].append(v)
        return self._freed(base_parts, lr_parts)

    def evictable_size(self) -> int:
        """Base tokens that eviction may free (unlocked)."""
        return self.base_evictable_size_

    def protected_size(self) -> int:
        """Base tokens locked by in-flight requests."""
        return self.base_protected_size_

    def lr_evictable_size(self, lr_key: LRKey = None) -> int:
        """Unlocked LR tokens of ``lr_key``, or of all keys when ``None``."""
        if lr_key is None:
            return sum(self.lr_evictable_size_.values())
        return self.lr_evictable_size_.get(lr_key, 0)

    def lr_protected_size(self, lr_key: LRKey = None) -> int:
        """Locked LR tokens of ``lr_key``, or of all keys when ``None``."""
        if lr_key is None:
            return sum(self.lr_protected_size_.values())
        return self.lr_protected_size_.get(lr_key, 0)

    def total_size(self) -> int:
        """Base tokens held on the device, by a full traversal (independent of the counters)."""
        total = 0
        stack = [self.root_node]
        while stack:
            node = stack.pop()
            if node.base is not None:
                total += len(node.key)
            stack.extend(node.children.values())
        return total

    def lr_total_size(self, lr_key: LRKey = None) -> int:
        """LR tokens held for ``lr_key`` (all keys when ``None``), by a full traversal."""
        total = 0
        stack = [self.root_node]
        while stack:
            node = stack.pop()
            if lr_key is None:
                total += len(node.key) * len(node.lr)
            elif lr_key in node.lr:
                total += len(node.key)
            stack.extend(node.children.values())
        return total

    def stats(self) -> dict[str, Any]:
        """Counters and current token / byte sizes per component, as a plain dict."""
        return self.stats_.snapshot(
            page_size=self.page_size,
            base_bytes_per_token=self.base_bytes_per_token,
            lr_bytes_per_token=self.lr_bytes_per_token,
            base_evictable=self.base_evictable_size_,
            base_protected=self.base_protected_size_,
            lr_evictable=self.lr_evictable_size_,
            lr_protected=self.lr_protected_size_,
            host_tokens=self.host_size_,
        )

    def reset_stats(self) -> None:
        """Zero the cumulative counters; the tree and its sizes are untouched."""
        self.stats_.reset()

    def pretty_print(self, file: TextIO | None = None) -> None:
        """Print the tree (segment length, first tokens, locks, LR keys) for debugging."""
        out = sys.stdout if file is None else file
        stack = [(self.root_node, 0)]
        while stack:
            node, indent = stack.pop()
            head = list(node.key[:10])
            lr = {repr(k): node.lr_lock_ref.get(k, 0) for k in node.lr}
            print(f"{' ' * indent}{len(node.key)} {head} lock={node.lock_ref} lr={lr}", file=out)
            stack.extend((c, indent + 2) for c in node.children.values())
        print(f"#base tokens: {self.total_size()}, #lr tokens: {self.lr_total_size()}", file=out)

    def sanity_check(self) -> None:
        """Recompute every derived quantity from the nodes; raise AssertionError on a mismatch."""
        ps = self.page_size
        root = self.root_node
        base_ev = base_pr = 0
        lr_ev: dict[LRKey, int] = defaultdict(int)
        lr_pr: dict[LRKey, int] = defaultdict(int)
        base_leaves: set[TreeNode] = set()
        host_leaves: set[TreeNode] = set()
        host_total = 0
        lr_leaves: dict[LRKey, set[TreeNode]] = defaultdict(set)
        stack = list(root.children.values())
        while stack:
            node = stack.pop()
            m = len(node.key)
            parent = node.parent
            _check(parent.children.get(self._link_key(node)) is node, f"bad child link {node!r}")
            _check(m > 0 and m % ps == 0, f"segment not page aligned {node!r}")
            _check(node.base is None or len(node.base) == m, f"base length {node!r}")
            _check(node.host is None or len(node.host) == m, f"host length {node!r}")
            _check(node.base is not None or node.host is not None, f"neither device nor host {node!r}")
            _check(node.base is None or parent is root or parent.base is not None, f"device under host-only {node!r}")
            host_total += m if node.host is not None else 0
            if node.base is None:
                _check(node.lock_ref == 0 and not node.lr_lock_ref, f"locked host-only node {node!r}")
                if not node.children:
                    host_leaves.add(node)
            _check(set(node.lr) == set(node.lr_last_access_time) == set(node.lr_hit_count), f"lr metadata {node!r}")
            child_locks = sum(c.lock_ref for c in node.children.values())
            _check(node.lock_ref >= child_locks, f"lock_ref below children's {node!r}")
            _check(node.lock_ref >= sum(node.lr_lock_ref.values()), f"lock_ref below lr locks {node!r}")
            for k, count in node.lr_lock_ref.items():
                _check(count > 0, f"zero lr lock kept {node!r}")
                child_lr = sum(c.lr_lock_ref.get(k, 0) for c in node.children.values())
                _check(count >= child_lr, f"lr lock below children's {node!r} {k!r}")
            if node.base is None:
                pass
            elif node.lock_ref:
                base_pr += m
            else:
                base_ev += m
                if not self._has_device_child(node):
                    base_leaves.add(node)
            for k, slots in node.lr.items():
                _check(len(slots) == m, f"lr length {node!r} {k!r}")
                _check(parent is root or k in parent.lr, f"lr not contiguous {node!r} {k!r}")
                if node.lr_lock_ref.get(k):
                    lr_pr[k] += m
                else:
                    lr_ev[k] += m
                    if not any(k in c.lr for c in node.children.values()):
                        lr_leaves[k].add(node)
            stack.extend(node.children.values())
        _check((base_ev, base_pr) == (self.base_evictable_size_, self.base_protected_size_), "base sizes")
        _check(base_leaves == self._base_leaves, "base evictable leaves")
        _check(host_leaves == self._host_leaves, "host-only leaves")
        _check(host_total == self.host_size_, "host size")
        for k in set(lr_ev) | set(lr_pr) | set(self.lr_evictable_size_):
            _check(lr_ev.get(k, 0) == self.lr_evictable_size_.get(k, 0), f"lr evictable size {k!r}")
            _check(lr_pr.get(k, 0) == self.lr_protected_size_.get(k, 0), f"lr protected size {k!r}")
            _check(lr_leaves.get(k, set()) == self._lr_leaves.get(k, set()), f"lr leaves {k!r}")

    # ------------------------------------------------------------- internal helpers

    def _lookup_key(self, node: TreeNode, key: array, pos: int, namespace: Hashable) -> Hashable:
        """Dict key of ``node``'s child holding ``key[pos:]``; below the root of a namespace
        other than the common one, the first page is tagged with the namespace."""
        first = child_key(key, pos, self.page_size)
        if namespace is None or node is not self.root_node:
            return first
        return (_NAMESPACE, namespace, first)

    def _link_key(self, node: TreeNode) -> Hashable:
        """The key under which ``node`` hangs in its parent's children."""
        return self._lookup_key(node.parent, node.key, 0, node.namespace)

    def _split_node(self, child: TreeNode, split_len: int) -> TreeNode:
        """Insert a node for ``child``'s first ``split_len`` tokens above it and return it.

        ``child`` keeps the suffix, so a handle to it still ends where it did. Base,
        every LR array, locks, access times and hit counts are split or copied alike;
        sizes and leaf sets do not change (the new node has exactly ``child`` below it).
        """
        ps = self.page_size
        parent = child.parent
        link = self._link_key(child)
        new_node = TreeNode(
            parent=parent,
            key=child.key[:split_len],
            base=None if child.base is None else child.base[:split_len],
            access_time=child.last_access_time,
        )
        if child.host is not None:
            new_node.host = child.host[:split_len]
            child.host = child.host[split_len:]
        new_node.host_ref = child.host_ref
        new_node.namespace = child.namespace
        new_node.lr = {k: v[:split_len] for k, v in child.lr.items()}
        new_node.lock_ref = child.lock_ref
        new_node.lr_lock_ref = dict(child.lr_lock_ref)
        new_node.lr_last_access_time = dict(child.lr_last_access_time)
        new_node.hit_count = child.hit_count
        new_node.lr_hit_count = dict(child.lr_hit_count)
        parent.children[link] = new_node
        child.key = child.key[split_len:]
        if child.base is not None:
            child.base = child.base[split_len:]
        child.lr = {k: v[split_len:] for k, v in child.lr.items()}
        child.parent = new_node
        new_node.children[child_key(child.key, 0, ps)] = child
        return new_node

    def _account_new_lr(self, path_start: TreeNode, last: TreeNode, lr_key: LRKey) -> None:
        """Size and leaf bookkeeping for LR arrays just added on the path ``path_start`` .. ``last``."""
        evictable = self.lr_evictable_size_.setdefault(lr_key, 0)
        protected = self.lr_protected_size_.setdefault(lr_key, 0)
        leaves = self._lr_leaves.setdefault(lr_key, set())
        stop = path_start.parent
        node = last
        while node is not stop:
            if node.lr_lock_ref.get(lr_key):
                protected += len(node.key)
            else:
                evictable += len(node.key)
            node = node.parent
        self.lr_evictable_size_[lr_key] = evictable
        self.lr_protected_size_[lr_key] = protected
        leaves.discard(stop)
        if not last.lr_lock_ref.get(lr_key):
            leaves.add(last)

    def _is_lr_leaf(self, node: TreeNode, lr_key: LRKey, below: TreeNode | None) -> bool:
        """No child of ``node`` holds ``lr_key``; ``below`` (a child already known) is checked first."""
        if below is not None and lr_key in below.lr:
            return False
        for child in node.children.values():
            if lr_key in child.lr:
                return False
        return True

    def _lr_evictable_leaf(self, node: TreeNode, lr_key: LRKey) -> bool:
        """``node`` holds an unlocked ``lr_key`` array with no ``lr_key`` below it."""
        return lr_key in node.lr and lr_key not in node.lr_lock_ref and self._is_lr_leaf(node, lr_key, None)

    def _has_device_child(self, node: TreeNode) -> bool:
        return any(c.base is not None for c in node.children.values())

    def _revive(self, node: TreeNode, slots: torch.Tensor) -> None:
        """A host-only (unlocked) node's base is on the device again at ``slots``."""
        m = len(node.key)
        node.base = slots.to(device=self.device, dtype=torch.int64, copy=True)
        self.base_evictable_size_ += m
        self._host_leaves.discard(node)
        self._base_leaves.discard(node.parent)
        if node.lock_ref == 0 and not self._has_device_child(node):
            self._base_leaves.add(node)

    def _demote(self, node: TreeNode) -> None:
        """An unlocked device leaf with a host copy becomes host-only (its LR stays)."""
        m = len(node.key)
        node.base = None
        self.base_evictable_size_ -= m
        self._base_leaves.discard(node)
        if not node.children:
            self._host_leaves.add(node)
        parent = node.parent
        if parent is not self.root_node and parent.lock_ref == 0 and not self._has_device_child(parent):
            self._base_leaves.add(parent)

    def _drop_subtree(self, node: TreeNode, lr_parts: dict[LRKey, list[torch.Tensor]],
                      host_parts: list[torch.Tensor]) -> bool:
        """Delete the host-only descendants of a device leaf that is about to go without a
        host copy; False (nothing changed) if a load back holds one of them."""
        below: list[TreeNode] = []
        stack = list(node.children.values())
        while stack:
            x = stack.pop()
            below.append(x)
            stack.extend(x.children.values())
        if any(x.host_ref > 0 for x in below):
            return False
        for x in reversed(below):  # children before their parents
            self._delete_leaf(x, lr_parts, host_parts)
        return True

    def _delete_leaf(self, node: TreeNode, lr_parts: dict[LRKey, list[torch.Tensor]],
                     host_parts: list[torch.Tensor] | None = None) -> None:
        """Unlink an unlocked leaf, moving its LR arrays into ``lr_parts`` and its host
        slots into ``host_parts``; marks it evicted."""
        m = len(node.key)
        parent = node.parent
        del parent.children[self._link_key(node)]
        if node.base is not None:
            self.base_evictable_size_ -= m
        self._base_leaves.discard(node)
        self._host_leaves.discard(node)
        if node.host is not None:
            host_parts.append(node.host)
            self.host_size_ -= m
        root = self.root_node
        for k, slots in node.lr.items():
            lr_parts[k].append(slots)
            self.lr_evictable_size_[k] -= m
            self._lr_leaves[k].discard(node)
            if parent is not root and self._lr_evictable_leaf(parent, k):
                self._lr_leaves[k].add(parent)
        if parent is not root and parent.base is None and not parent.children:
            self._host_leaves.add(parent)
        elif (parent is not root and parent.base is not None and parent.lock_ref == 0
              and not self._has_device_child(parent)):
            self._base_leaves.add(parent)
        node.base = None
        node.host = None
        node.lr = {}

    def _freed(self, base_parts: list[torch.Tensor], lr_parts: dict[LRKey, list[torch.Tensor]],
               host_parts: list[torch.Tensor] | None = None) -> EvictResult:
        """Freed slots as one tensor per component; a single part is handed over uncopied."""
        return EvictResult(
            base_indices=self._join(base_parts),
            lr_indices={k: self._join(v) for k, v in lr_parts.items()},
            host_indices=self._join(host_parts or []),
        )

    def _count_lr_evicted(self, result: EvictResult) -> None:
        for k, freed in result.lr_indices.items():
            self.stats_.key(k).lr_evicted_tokens += freed.numel()

    def _join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts) if parts else self._empty


# Tags a namespaced first page; token ids are ints and pages tuples of ints, so no
# common-namespace key equals a tagged one.
_NAMESPACE = "cache namespace"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)
