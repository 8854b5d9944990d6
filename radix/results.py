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
    """

    base_indices: torch.Tensor
    base_len: int
    last_base_node: TreeNode
    lr_key: LRKey
    lr_indices: torch.Tensor
    lr_len: int
    last_lr_node: TreeNode

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
    """Slots freed by an eviction, for the caller to return to its allocators."""

    base_indices: torch.Tensor
    lr_indices: dict[LRKey, torch.Tensor]

    @property
    def num_base_tokens(self) -> int:
        return len(self.base_indices)

    @property
    def num_lr_tokens(self) -> int:
        return sum(len(v) for v in self.lr_indices.values())
