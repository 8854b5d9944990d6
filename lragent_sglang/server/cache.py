"""`--radix-cache-backend lragent` in the base-sharing schemes: SGLang's prefix-cache
interface over `lragent_sglang.radix.LRRadixTree`.

The tree is keyed by tokens only. A request's match has two lengths: the base prefix
(shared K and V_base) and its LR key's reach. SGLang sees the LR reach as the prefix;
the base slots between the two (the "gap") are handed to the request through its
`RequestState` (`req.lragent.gap`), and `allocation` points the request at them instead of fresh KV
slots, so an LR prefill recomputes only the LR rows there (its K/V writes go to the
padding slot 0). Insertion is first-writer-wins for base and LR; duplicates a request
computed concurrently are freed. A request's cache namespace (`cache_salt`, which SGLang
carries in `extra_key`) is the tree's namespace: salted requests share base and LR pages
with requests of the same salt only, never with other salts or unsalted ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Hashable

import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    BasePrefixCache,
    DecLockRefResult,
    EvictParams,
    EvictResult,
    IncLockRefResult,
    MatchPrefixParams,
    MatchResult,
)

from lragent_sglang.radix import LRRadixTree
from lragent_sglang.radix.node import TreeNode
from lragent_sglang.server.runtime import LRAgentRuntime, kv_bytes_per_token
from lragent_sglang.server.stats import AdapterStats, first_look, prompt_len

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class NodeHandle:
    """What SGLang keeps in `req.last_node`: the base node and the LR key it locks."""

    node: TreeNode
    lr_key: Hashable = None


class LRPoolExhausted(RuntimeError):
    """No LR slots left even after evicting every unlocked LR and base page."""


class LRAgentRadixCache(BasePrefixCache):
    """See module docstring. Needs `page_size == 1`."""

    has_host_tier = False

    def __init__(self, params: Any, runtime: LRAgentRuntime) -> None:
        self.disable = params.disable
        self.req_to_token_pool = params.req_to_token_pool
        self.token_to_kv_pool_allocator = params.token_to_kv_pool_allocator
        self.page_size = params.page_size
        if self.page_size != 1:
            raise ValueError("the LRAgent base-sharing schemes need --page-size 1")
        self.rt = runtime
        self.lr_pool = runtime.lr_pool
        device = self.token_to_kv_pool_allocator.device
        self.device = torch.device(device) if isinstance(device, (str, torch.device)) else torch.device("cpu")
        base_bytes_per_token = kv_bytes_per_token(self.token_to_kv_pool_allocator.get_kvcache())
        lr_bytes = self.lr_pool.total_bytes // (self.lr_pool.size + 1) if self.lr_pool else 0
        self.tree = LRRadixTree(
            page_size=1,
            base_bytes_per_token=base_bytes_per_token,
            lr_bytes_per_token=lr_bytes,
            eviction_policy=params.eviction_policy,
            device=self.device,
        )
        self.adapter_stats = AdapterStats()
        if params.enable_metrics:
            self.init_metrics_collector()

    # ---------------------------------------------------------------- tree access

    @property
    def root_node(self) -> TreeNode:
        return self.tree.root_node

    def reset(self) -> None:
        self.tree.reset()
        self.adapter_stats.reset()
        if self.lr_pool is not None:
            self.lr_pool.clear()

    def resolve_node_handle(self, node_handle: Any) -> Any:
        return node_handle.node if isinstance(node_handle, NodeHandle) else node_handle

    def root_node_handle(self, extra_key: str | None = None) -> Any:
        return NodeHandle(self.tree.root_node)

    def is_root(self, node: Any) -> bool:
        return self.resolve_node_handle(node) is self.tree.root_node

    def _empty_match(self, lr_key: Hashable = None) -> MatchResult:
        handle = NodeHandle(self.tree.root_node, lr_key)
        return MatchResult(
            device_indices=torch.empty((0,), dtype=torch.int64, device=self.device),
            last_device_node=handle, last_host_node=handle, best_match_node=handle,
        )

    # ---------------------------------------------------------------- match / insert

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        key, req = params.key, params.req
        if self.disable or len(key) == 0:
            if req is None:
                return self._empty_match()
            if first_look(req, key):
                self.adapter_stats.record(req.lora_id, prompt_len(req), 0, 0)
            req.lragent.gap = None
            req.lragent.lr_prefix = None
            return self._empty_match(self.rt.lr_key(req.lora_id))
        lr_key = self.rt.lr_key(req.lora_id) if req is not None else None
        counted = first_look(req, key)
        tokens = key.raw_token_ids()
        m = self.tree.match(tokens, lr_key, namespace=key.extra_key, record_stats=counted)
        use_len = m.lr_len if lr_key is not None else m.base_len
        if counted:
            self.adapter_stats.record(req.lora_id, prompt_len(req), m.base_len, use_len)
        if req is not None:
            self._hand_out(req, m, use_len)
            req.lragent.match_key = (tokens, key.extra_key)
        handle = NodeHandle(m.last_base_node, lr_key)
        host_end = NodeHandle(m.last_node, lr_key)
        return MatchResult(
            device_indices=m.base_indices[:use_len],
            last_device_node=handle, last_host_node=host_end, best_match_node=host_end,
            host_hit_length=m.host_len,
        )

    @staticmethod
    def _hand_out(req: Any, m: Any, use_len: int) -> None:
        """The request reuses `use_len` tokens (K, V_base and its LR); the base slots
        after them are its LR-prefill gap."""
        req.lragent.gap = m.base_indices[use_len:] if m.base_len > use_len else None
        req.lragent.lr_prefix = m.lr_indices[:use_len] if m.lr_key is not None else None

    def _insert(self, req: Any, token_ids: list[int], n: int,
                chunked: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """Insert the request's first `n` tokens (base, then its LR), free its duplicates,
        and return the tree's base slots, LR slots and match for those tokens."""
        handle: NodeHandle = req.last_node
        row = req.req_pool_idx
        tokens = token_ids[:n]
        kv = self.req_to_token_pool.req_to_token[row, :n].to(torch.int64)
        protected = req.cache_protected_len
        ns = req.extra_key
        res = self.tree.insert_base(tokens, kv, namespace=ns)
        m = self.tree.match(tokens, handle.lr_key, namespace=ns, record_stats=False)
        self._free_duplicates(kv[protected : res.prefix_len], m.base_indices[protected : res.prefix_len])
        lr_slots = None
        if handle.lr_key is not None:
            lr = self.lr_pool.req_to_lr[row, :n]
            res_lr = self.tree.insert_lr(tokens, handle.lr_key, lr, namespace=ns)
            m = self.tree.match(tokens, handle.lr_key, namespace=ns, record_stats=False)
            dup = slice(req.lragent.lr_protected, res_lr.prefix_len)
            self._free_duplicates(lr[dup], m.lr_indices[dup], lr_pool=True)
            lr_slots = m.lr_indices
        self._inserted(m.last_base_node, chunked)
        return m.base_indices, lr_slots, m

    def _inserted(self, last: TreeNode, chunked: bool) -> None:
        """After an insert ending at `last` (the host tier backs paths up here)."""

    def _free_duplicates(self, ours: torch.Tensor, tree: torch.Tensor, lr_pool: bool = False) -> None:
        if ours.numel() == 0:
            return
        dup = ours[ours != tree.to(ours)]
        if dup.numel():
            if lr_pool:
                self.lr_pool.free(dup)
            else:
                self.token_to_kv_pool_allocator.free(dup)

    def cache_unfinished_req(self, req: Any, chunked: bool = False, **kwargs: Any) -> None:
        if self.disable:
            return
        token_ids = req.get_fill_ids()
        n = len(token_ids)
        row = req.req_pool_idx
        base, lr, m = self._insert(req, token_ids, n, chunked)
        self.req_to_token_pool.write((row, slice(req.cache_protected_len, n)), base[req.cache_protected_len :].to(torch.int32))
        old: NodeHandle = req.last_node
        new = NodeHandle(m.last_base_node, old.lr_key)
        if lr is not None:
            self.lr_pool.req_to_lr[row, :n] = lr
            req.lragent.lr_protected = n
        self.tree.dec_lock_ref(old.node, old.lr_key)
        self.tree.inc_lock_ref(new.node, new.lr_key)
        req.cache_protected_len = n
        req.prefix_indices = base
        req.last_node = new

    def cache_finished_req(self, req: Any, is_insert: bool = True, *, kv_len_to_handle: int, **kwargs: Any) -> None:
        handle: NodeHandle = req.last_node
        row = req.req_pool_idx
        token_ids = (req.origin_input_ids + req.output_ids)[:kv_len_to_handle]
        n = len(token_ids)
        insert = is_insert and not self.disable
        kv = self.req_to_token_pool.req_to_token[row, :n].to(torch.int64)
        if insert:
            self._insert(req, token_ids, n)
        else:
            self.token_to_kv_pool_allocator.free(kv[req.cache_protected_len :])
            if handle is not None and handle.lr_key is not None:
                lr = self.lr_pool.req_to_lr[row, :n]
                self.lr_pool.free(lr[req.lragent.lr_protected :])
        if handle is not None:
            self.tree.dec_lock_ref(handle.node, handle.lr_key)

    # ---------------------------------------------------------------- memory

    def evict(self, params: EvictParams) -> EvictResult:
        if self.disable:
            return EvictResult()
        res = self._evict_base(params.num_tokens)
        return EvictResult(num_tokens_evicted=res.num_base_tokens)

    def _evict_base(self, num_tokens: int) -> Any:
        """Evict base pages (and their LR) and return the freed slots to the pools."""
        res = self.tree.evict_base(num_tokens)
        self._release(res)
        return res

    def _release(self, res: Any) -> None:
        if res.base_indices.numel():
            self.token_to_kv_pool_allocator.free(res.base_indices)
        for slots in res.lr_indices.values():
            self.lr_pool.free(slots)

    def alloc_lr(self, need: int) -> torch.Tensor:
        """`need` LR slots, evicting LR pages first and whole base pages second."""
        slots = self.lr_pool.alloc(need)
        if slots is None:
            self._release(self.tree.evict_lr(need - self.lr_pool.available_size()))
            slots = self.lr_pool.alloc(need)
        if slots is None:
            self._evict_base(need - self.lr_pool.available_size())
            slots = self.lr_pool.alloc(need)
        if slots is None:
            raise LRPoolExhausted(
                f"LR pool exhausted: need {need} slots, {self.lr_pool.available_size()} free "
                f"of {self.lr_pool.size} and nothing left to evict"
            )
        return slots

    def inc_lock_ref(self, node: Any) -> IncLockRefResult:
        if self.disable or not isinstance(node, NodeHandle):
            return IncLockRefResult(delta=0)
        return IncLockRefResult(delta=self.tree.inc_lock_ref(node.node, node.lr_key))

    def dec_lock_ref(self, node: Any, params: Any = None) -> DecLockRefResult:
        if self.disable or not isinstance(node, NodeHandle):
            return DecLockRefResult(delta=0)
        return DecLockRefResult(delta=self.tree.dec_lock_ref(node.node, node.lr_key))

    def evictable_size(self) -> int:
        return self.tree.evictable_size()

    def protected_size(self) -> int:
        return self.tree.protected_size()

    def total_size(self) -> int:
        return self.tree.total_size()

    def pretty_print(self) -> None:
        self.tree.pretty_print()

    def stats(self) -> dict[str, Any]:
        """The tree's statistics (per LR key), the per-adapter counters (keyed by lora_id)
        and LR pool occupancy, for metrics and /lragent/stats."""
        out = dict(self.tree.stats())
        if not self.has_host_tier:
            del out["host"]  # zeros would read as "a host tier that does nothing"
        out["per_adapter"] = self.adapter_stats.snapshot()
        if self.lr_pool is not None:
            out["lr_pool_size"] = self.lr_pool.size
            out["lr_pool_available"] = self.lr_pool.available_size()
        out["kv_pool_available"] = self.token_to_kv_pool_allocator.available_size()
        return out
