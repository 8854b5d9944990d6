"""The LRAgent prefix tree: token-keyed nodes holding shared base pages and per-adapter LR pages."""

from .key import TokenIds
from .node import LRKey, TreeNode
from .results import EvictResult, InsertResult, MatchResult
from .stats import LRKeyStats, RadixStats
from .tree import LRRadixTree

__all__ = [
    "EvictResult",
    "InsertResult",
    "LRKey",
    "LRKeyStats",
    "LRRadixTree",
    "MatchResult",
    "RadixStats",
    "TokenIds",
    "TreeNode",
]
