"""The LR pool: per layer, one R-wide row per (token, LR key) — the `L = x A_v` cache.

LR slots are a separate index space from SGLang's KV slots: in base-shared mode one
token has one LR row per adapter that has read it. Slot 0 is the padding row (writes of
tokens that need no LR land there, as SGLang's KV pool does with slot 0). A request's
LR slot per position lives in `req_to_lr`, the twin of SGLang's `req_to_token`.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class LRTokenPool:
    """`lr_buffer[layer]`: `[size + 1, width]`; `req_to_lr`: `[max_reqs, max_context]`."""

    def __init__(
        self,
        size: int,
        width: int,
        num_layers: int,
        dtype: torch.dtype,
        device: torch.device | str,
        max_reqs: int,
        max_context_len: int,
    ) -> None:
        if size < 1 or width < 1:
            raise ValueError(f"LR pool needs size >= 1 and width >= 1, got {size}, {width}")
        self.size = size
        self.width = width
        self.dtype = dtype
        self.device = torch.device(device)
        self.lr_buffer = [
            torch.zeros(size + 1, width, dtype=dtype, device=self.device) for _ in range(num_layers)
        ]
        self.req_to_lr = torch.zeros(max_reqs, max_context_len, dtype=torch.int64, device=self.device)
        self.clear()

    @staticmethod
    def bytes_per_slot(width: int, num_layers: int, dtype: torch.dtype) -> int:
        return width * num_layers * torch.empty((), dtype=dtype).element_size()

    @property
    def total_bytes(self) -> int:
        return (self.size + 1) * self.bytes_per_slot(self.width, len(self.lr_buffer), self.dtype)

    def clear(self) -> None:
        self.free_slots = torch.arange(1, self.size + 1, dtype=torch.int64, device=self.device)
        self.req_to_lr.zero_()

    def available_size(self) -> int:
        return len(self.free_slots)

    def alloc(self, need: int) -> torch.Tensor | None:
        """`need` fresh slots, or None if fewer are free (the caller evicts and retries)."""
        if need > len(self.free_slots):
            return None
        out, self.free_slots = self.free_slots[:need], self.free_slots[need:]
        return out

    def free(self, slots: torch.Tensor) -> None:
        slots = slots[slots > 0]
        if slots.numel():
            self.free_slots = torch.cat([self.free_slots, slots.to(self.free_slots)])

    def write(self, layer_id: int, loc: torch.Tensor, rows: torch.Tensor) -> None:
        """Store `rows [n, width]` at slots `loc [n]` of one layer."""
        self.lr_buffer[layer_id][loc] = rows.to(self.dtype)
