"""Scheduler hooks of the sharing schemes (registered through SGLang's HookRegistry).

- `Req.__init__`: SGLang appends the adapter id to every request's cache key, so each
  adapter gets a disjoint subtree. Every scheme but non-shared keys by tokens only.
- `alloc_for_extend`: an LR prefill reuses the cached base slots of its gap instead of
  the fresh KV slots SGLang just allocated (those are freed, and the gap tokens' K/V
  writes go to the padding slot 0); every request with an LR key gets LR slots for its
  new tokens in `req_to_lr`, after the LR prefix it matched.
- `alloc_for_decode`: one LR slot per decoding request with an LR key.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from lragent_sglang.cache import LRAgentRadixCache
from lragent_sglang.config import scheme_from_env
from lragent_sglang.runtime import get_runtime


def _our_cache_selected() -> bool:
    from sglang.srt.server_args import get_global_server_args

    return get_global_server_args().radix_cache_backend == "lragent"


def strip_lora_from_key(result: Any, req: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER hook of `Req.__init__`: drop the adapter id SGLang appended to `extra_key`."""
    lora_id = req.lora_id
    key = req.extra_key
    if lora_id and key is not None and key.endswith(lora_id) and _our_cache_selected():
        req.extra_key = key[: -len(lora_id)] or None


def fix_extend_alloc(original: Callable, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AROUND hook of `alloc_for_extend` (see module docstring)."""
    out_cache_loc, rpi_device, rpi_cpu = original(batch)
    cache = batch.tree_cache
    if not isinstance(cache, LRAgentRadixCache):
        return out_cache_loc, rpi_device, rpi_cpu
    req_to_token = batch.req_to_token_pool.req_to_token
    req_to_lr = cache.lr_pool.req_to_lr if cache.lr_pool is not None else None
    offset = 0
    for req, prefix_len, extend_len, row in zip(
        batch.reqs, batch.prefix_lens, batch.extend_lens, rpi_cpu.tolist()
    ):
        gap = getattr(req, "lragent_gap", None)
        if gap is not None and len(gap):
            g = min(len(gap), extend_len)
            fresh = out_cache_loc[offset : offset + g].clone()
            cache.token_to_kv_pool_allocator.free(fresh)
            req_to_token[row, prefix_len : prefix_len + g] = gap[:g].to(req_to_token.dtype)
            out_cache_loc[offset : offset + g] = 0
            req.lragent_gap = gap[g:]
            get_runtime().gap_rids.add(req.rid)
        if req.last_node is not None and req.last_node.lr_key is not None:
            lr_prefix = getattr(req, "lragent_lr_prefix", None)
            if lr_prefix is not None:
                req_to_lr[row, : len(lr_prefix)] = lr_prefix
                req.lragent_lr_protected = len(lr_prefix)
                req.lragent_lr_prefix = None
            req_to_lr[row, prefix_len : prefix_len + extend_len] = cache.alloc_lr(extend_len)
        offset += extend_len
    return out_cache_loc, rpi_device, rpi_cpu


def alloc_decode_lr(result: torch.Tensor, batch: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER hook of `alloc_for_decode` (see module docstring)."""
    cache = batch.tree_cache
    if not isinstance(cache, LRAgentRadixCache) or cache.lr_pool is None:
        return
    rows = [i for i, req in enumerate(batch.reqs) if req.last_node is not None and req.last_node.lr_key is not None]
    if not rows:
        return
    idx = torch.tensor(rows, dtype=torch.int64, device=batch.seq_lens.device)
    slots = cache.alloc_lr(len(rows))
    cache.lr_pool.req_to_lr[batch.req_pool_indices[idx], batch.seq_lens[idx]] = slots.to(batch.seq_lens.device)


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if scheme_from_env() != "non-shared":
        HookRegistry.register("sglang.srt.managers.schedule_batch.Req.__init__", strip_lora_from_key, HookType.AFTER)
    alloc = "sglang.srt.mem_cache.allocation"
    HookRegistry.register(f"{alloc}.alloc_for_extend", fix_extend_alloc, HookType.AROUND)
    HookRegistry.register(f"{alloc}.alloc_for_decode", alloc_decode_lr, HookType.AFTER)
