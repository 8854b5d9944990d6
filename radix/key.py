"""Token keys: normalisation, page alignment and prefix comparison.

Keys are ``array('q')`` like SGLang's ``RadixKey.token_ids``: compact, sliced with one
memcpy and compared in C without boxing, which keeps matching cheap on long prefixes.
"""

from __future__ import annotations

from array import array
from collections.abc import Hashable, Sequence

import torch

TokenIds = Sequence[int] | array | torch.Tensor


def to_key(tokens: TokenIds) -> array:
    """Return ``tokens`` as ``array('q')``, without a copy when it already is one."""
    if isinstance(tokens, array) and tokens.typecode == "q":
        return tokens
    if isinstance(tokens, torch.Tensor):
        return array("q", tokens.tolist())
    return array("q", tokens)


def page_aligned_len(length: int, page_size: int) -> int:
    """Longest page-aligned length <= ``length``; a partial last page is never cached."""
    return length if page_size == 1 else length - length % page_size


def child_key(key: array, pos: int, page_size: int) -> Hashable:
    """Dict key of the child holding ``key[pos:]``: its first token, or first page as a tuple."""
    return key[pos] if page_size == 1 else tuple(key[pos : pos + page_size])


def common_prefix_len(node_key: array, key: array, pos: int, end: int, page_size: int) -> int:
    """Page-aligned length of the common prefix of ``node_key`` and ``key[pos:end]``.

    Gallops in doubling windows (one C-level slice compare each) and then bisects the
    window holding the first difference, as SGLang's ``RadixKey.match`` does, so long
    equal runs cost a few compares instead of a Python loop per token.
    """
    n = min(len(node_key), end - pos)
    matched = n
    lo = 0
    step = 1
    while lo < n:
        hi = min(lo + step, n)
        if node_key[lo:hi] != key[pos + lo : pos + hi]:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if node_key[lo:mid] == key[pos + lo : pos + mid]:
                    lo = mid
                else:
                    hi = mid
            matched = lo
            break
        lo = hi
        step *= 2
    return page_aligned_len(matched, page_size)
