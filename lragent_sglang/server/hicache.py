"""`--enable-hierarchical-cache` in the base-sharing schemes: a host-memory tier for base
pages under `LRAgentRadixCache`, driven by SGLang's own HiCache machinery.

SGLang's `HiRadixCache` cannot drive our tree: it is a `RadixCache` over SGLang's own
`TreeNode`s. Its two other parts are tree-agnostic and are used here as they are: the
host pool (`get_mha_host_pool_cls`: `--hicache-ratio`, `--hicache-size`,
`--hicache-mem-layout`) and `HiCacheController` (write and load queues, CUDA streams, the
per-layer `LayerDoneCounter` the attention backend waits on through `get_key_buffer`,
`--hicache-io-backend`). The scheduler's load-back path (`match_prefix` reporting
`host_hit_length`, `init_load_back` in the prefill adder, `ready_to_load_host_cache`,
`check_hicache_events`) calls this class as it calls `HiRadixCache`. What `HiRadixCache`
does to its tree, this class does to ours (`radix.LRRadixTree`: `set_host`,
`host_path`, `restore`, `evict_host`, host-only nodes), with the same policies:
write-through after 1 hit (`write_through`) or 2 (`write_through_selective`) with the
node locked until its copy is done, or a copy at eviction (`write_back`); load back only
of 10 tokens or more that fit the prefill budget.

Only the base (K and V_base) goes to host memory. A node's LR rows stay on the device
while its base is on the host: they are rank-r rows per token (0.4% of the KV bytes of a
Llama-3.1-8B layer at r = 8), SGLang's host pool and controller move one KV pool and no
second one, and an LR row that was dropped would cost a whole LR prefill of its tokens
(a LoRA forward) after the load back, which is the recomputation the host tier exists
to avoid. Under LR-pool pressure the LR rows of host-only nodes are evicted like any
other LR rows (LRU), and the tokens they covered are LR-prefilled after a load back.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
from sglang.srt.managers.cache_controller import HiCacheController
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.pool_host.common import get_allocator_type
from sglang.srt.mem_cache.pool_host.mha import get_mha_host_pool_cls

from lragent_sglang.radix.node import TreeNode
from lragent_sglang.server.cache import LRAgentRadixCache, NodeHandle
from lragent_sglang.server.runtime import LRAgentRuntime

logger = logging.getLogger(__name__)

#: as HiRadixCache: a host hit shorter than this is recomputed, not loaded back
LOAD_BACK_THRESHOLD = 10


class LRAgentHiRadixCache(LRAgentRadixCache):
    """`LRAgentRadixCache` with SGLang's host pool and HiCacheController (see module docstring)."""

    has_host_tier = True

    def __init__(self, params: Any, runtime: LRAgentRuntime, server_args: Any) -> None:
        super().__init__(params, runtime)
        kv = self.token_to_kv_pool_allocator.get_kvcache()
        if not isinstance(kv, MHATokenToKVPool):
            raise ValueError(f"--enable-hierarchical-cache with --lragent-scheme {runtime.scheme} needs an MHA "
                             f"KV pool, got {type(kv).__name__}")
        self.token_to_kv_pool_host = get_mha_host_pool_cls(kv)(
            kv, server_args.hicache_ratio, server_args.hicache_size, self.page_size,
            server_args.hicache_mem_layout, allocator_type=get_allocator_type(server_args),
        )
        self.tp_group = params.tp_cache_group
        self.cache_controller = HiCacheController(
            self.token_to_kv_pool_allocator, self.token_to_kv_pool_host, self.page_size, self.tp_group,
            load_cache_event=threading.Event(), attn_cp_group=params.attn_cp_cache_group,
            attn_tp_group=params.attn_tp_cache_group, pp_group=params.pp_cache_group,
            write_policy=server_args.hicache_write_policy, io_backend=server_args.hicache_io_backend,
        )
        self.write_policy = server_args.hicache_write_policy
        self.write_through_threshold = 1 if self.write_policy == "write_through" else 2
        self.enable_storage = False
        self.ongoing_write_through: dict[int, TreeNode] = {}
        self.ongoing_load_back: dict[int, TreeNode] = {}
        logger.info("lragent hierarchical cache: %d host tokens (%s, %s layout, %s io)",
                    self.token_to_kv_pool_host.size, self.write_policy, server_args.hicache_mem_layout,
                    server_args.hicache_io_backend)

    # ---------------------------------------------------------------- SGLang's HiCache interface

    def reset(self) -> None:
        self.cache_controller.reset()
        self.token_to_kv_pool_host.clear()
        self.ongoing_write_through.clear()
        self.ongoing_load_back.clear()
        super().reset()

    def ready_to_load_host_cache(self) -> int:
        """Start the queued loads; the batch's consumer index for the per-layer waits."""
        return self.cache_controller.start_loading()

    def check_hicache_events(self) -> None:
        """Finish the copies the device has completed (the same count on every TP rank)."""
        controller = self.cache_controller
        writes, loads = self._ready_counts(controller.ack_write_queue, controller.ack_load_queue)
        for _ in range(writes):
            ack = controller.ack_write_queue.pop(0)
            ack.finish_event.synchronize()
            for node_id in ack.node_ids:
                self.tree.dec_lock_ref(self.ongoing_write_through.pop(node_id))
        for _ in range(loads):
            ack = controller.ack_load_queue.pop(0)
            ack.finish_event.synchronize()
            for node_id in ack.node_ids:
                self.tree.dec_lock_ref(self.ongoing_load_back.pop(node_id))
            if getattr(self, "metrics_collector", None) is not None:
                self.metrics_collector.increment_load_back_num_tokens(ack.num_tokens)

    def terminate_prefetch(self, rid: str) -> None:
        """No storage tier, so nothing is prefetched (the priority-abort path calls it)."""

    def init_load_back(self, params: Any) -> tuple[torch.Tensor, Any]:
        """Load the host-only end of a request's match back to the device; return the
        slots that extend its prefix and its new last node. Loaded tokens past the
        request's LR reach join its LR-prefill gap."""
        req = params.req
        handle: NodeHandle = params.best_match_node
        empty = torch.empty((0,), dtype=torch.int64, device=self.device)
        nodes, above = self.tree.host_path(handle.node)
        if not nodes:
            return empty, req.last_node
        delta = self.tree.inc_lock_ref(above)
        host = torch.cat([x.host for x in nodes])
        quota = params.mem_quota
        if len(host) < LOAD_BACK_THRESHOLD or (quota is not None and len(host) > quota + delta):
            self.tree.dec_lock_ref(above)
            return empty, req.last_node
        self.tree.protect_host(nodes, 1)
        device = self.cache_controller.load(host_indices=host, node_id=handle.node.id)
        if device is None:
            self.evict(EvictParams(num_tokens=len(host)))
            device = self.cache_controller.load(host_indices=host, node_id=handle.node.id)
        self.tree.protect_host(nodes, -1)
        self.tree.dec_lock_ref(above)
        if device is None:
            logger.warning("load back: no device room for %d tokens", len(host))
            return empty, req.last_node
        self.tree.restore(nodes, device)
        self.ongoing_load_back[handle.node.id] = handle.node
        self.tree.inc_lock_ref(handle.node)
        tokens, namespace = req.lragent.match_key
        m = self.tree.match(tokens, handle.lr_key, namespace=namespace, record_stats=False)
        before = len(req.prefix_indices)
        use_len = m.lr_len if handle.lr_key is not None else m.base_len
        self._hand_out(req, m, use_len)
        return m.base_indices[before:use_len], NodeHandle(m.last_base_node, handle.lr_key)

    # ---------------------------------------------------------------- tree <-> host pool

    def _evict_base(self, num_tokens: int) -> Any:
        """Device eviction: nodes with a host copy become host-only; under write_back the
        others are copied first (and their device slots freed once the copies are done)."""
        offload = self._host_write if self.write_policy == "write_back" else None
        res = self.tree.evict_base(num_tokens, offload=offload)
        if offload is not None:
            for ack in self.cache_controller.ack_write_queue:
                ack.finish_event.synchronize()
            self.cache_controller.ack_write_queue.clear()
        self._release(res)
        return res

    def _host_write(self, node: TreeNode) -> torch.Tensor | None:
        """Queue a copy of `node`'s base to fresh host slots (dropping host-only leaves
        when the pool is full); the slots, or None."""
        host = self.cache_controller.write(device_indices=node.base, node_id=node.id)
        if host is None:
            self._release(self.tree.evict_host(len(node.key)))
            host = self.cache_controller.write(device_indices=node.base, node_id=node.id)
        return host

    def _inserted(self, last: TreeNode, chunked: bool) -> None:
        """Write-through: back up the path to `last` top-down, each node once it has
        enough hits (chunks of one prefill do not count); a node stays locked until its
        copy is done (`check_hicache_events`)."""
        if self.write_policy == "write_back" or chunked:
            return
        path = []
        while last is not self.tree.root_node:
            path.append(last)
            last = last.parent
        for node in reversed(path):
            if node.host is not None or node.base is None:
                continue
            if node.hit_count < self.write_through_threshold:
                return
            host = self._host_write(node)
            if host is None:
                return
            self.tree.set_host(node, host)
            self.ongoing_write_through[node.id] = node
            self.tree.inc_lock_ref(node)

    def _release(self, res: Any) -> None:
        super()._release(res)
        if res.host_indices is not None and res.host_indices.numel():
            self.token_to_kv_pool_host.free(res.host_indices)

    def _ready_counts(self, *queues: list[Any]) -> list[int]:
        """Completed copies at the head of each queue, the minimum over the TP ranks."""
        counts = []
        for queue in queues:
            ready = 0
            for ack in queue:
                if not ack.finish_event.query():
                    break
                ready += 1
            counts.append(ready)
        if self.tp_group is not None and torch.distributed.get_world_size(group=self.tp_group) > 1:
            t = torch.tensor(counts, dtype=torch.int)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.tp_group)
            counts = t.tolist()
        return counts

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        pool = self.token_to_kv_pool_host
        out["host"].update(pool_tokens=pool.size, pool_available_tokens=pool.available_size())
        return out
