"""Plain result records of match, insert and evict (what the cache backend consumes)."""

from __future__ import annotations

import dataclasses

import torch

from .node import LRKey, TreeNode


@dataclasses.dataclass(slots=True)
class MatchResult:
    """Longest cached page-aligned base prefix and, separately, ``lr_key``'s LR reach.

    ``lr_len <= base_len`` always; ``lr_gap`` tokens are cached in base but need an LR
    re-prefill ("LR prefill") before a base-shared request of ``lr_key`` can use them.
    With ``lr_key=None`` (base model only) no LR is needed: ``lr_len`` is 0 and so is
    ``lr_gap``.

    With a host tier, the ``host_len`` tokens after ``base_len`` are cached in host
    memory only (``host_indices``, ending at ``last_node``); ``lr_len`` and the LR fields
    count only the device part (the LR arrays of the host part are read when it is
    loaded back).
    """

    base_indices: torch.Tensor
    base_len: int
    last_base_node: TreeNode
    lr_key: LRKey
    lr_indices: torch.Tensor
    lr_len: int
    last_lr_node: TreeNode
    host_len: int = 0
    host_indices: torch.Tensor | None = None
    last_node: TreeNode | None = None

    @property
    def lr_gap(self) -> int:
        """Tokens whose base is cached but whose LR must be recomputed."""
        return 0 if self.lr_key is None else self.base_len - self.lr_len


@dataclasses.dataclass(slots=True)
class InsertResult:
    """``prefix_len`` tokens were already cached (first writer wins), as SGLang's insert.

    The caller's slots for ``[0, prefix_len)`` were not taken by the tree: the ones the
    caller allocated itself (past its protected prefix) are duplicates it must free.
    Slots for ``[prefix_len, total_len)`` now belong to the tree.
    """

    prefix_len: int
    total_len: int
    last_node: TreeNode


@dataclasses.dataclass(slots=True)
class EvictResult:
    """Slots freed by an eviction, for the caller to return to its allocators:
    device base slots, LR slots per key and host-tier slots."""

    base_indices: torch.Tensor
    lr_indices: dict[LRKey, torch.Tensor]
    host_indices: torch.Tensor | None = None

    @property
    def num_base_tokens(self) -> int:
        return len(self.base_indices)

    @property
    def num_lr_tokens(self) -> int:
        return sum(len(v) for v in self.lr_indices.values())
