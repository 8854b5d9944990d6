"""Slot allocation for the base-sharing schemes (hooks on `sglang.srt.mem_cache.allocation`).

- `alloc_for_extend` (around): an LR prefill reuses the cached base slots of its gap
  instead of the fresh KV slots SGLang just allocated (those are freed, and the gap
  tokens' K/V writes go to the padding slot 0); every request with an LR key gets LR
  slots for its new tokens in `req_to_lr`, after the LR prefix it matched.
- `alloc_for_decode` (after): one LR slot per decoding request with an LR key.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from lragent_sglang.server.cache import LRAgentRadixCache


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
        state = req.lragent
        if state.gap is not None and len(state.gap):
            g = min(len(state.gap), extend_len)
            fresh = out_cache_loc[offset : offset + g].clone()
            cache.token_to_kv_pool_allocator.free(fresh)
            req_to_token[row, prefix_len : prefix_len + g] = state.gap[:g].to(req_to_token.dtype)
            out_cache_loc[offset : offset + g] = 0
            state.gap = state.gap[g:]
            cache.rt.gap_rids.add(req.rid)
        if req.last_node is not None and req.last_node.lr_key is not None:
            if state.lr_prefix is not None:
                req_to_lr[row, : len(state.lr_prefix)] = state.lr_prefix
                state.lr_protected = len(state.lr_prefix)
                state.lr_prefix = None
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
