"""Unit tests of each rule of the LRAgent prefix tree (radix/)."""

from __future__ import annotations

import io
import json
from array import array

import pytest
import torch

from lragent_sglang.radix import LRRadixTree


def slots(start: int, n: int) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.int64)


def as_list(t: torch.Tensor) -> list[int]:
    return t.tolist()


def node_count(tree: LRRadixTree) -> int:
    count, stack = 0, [tree.root_node]
    while stack:
        node = stack.pop()
        count += 1
        stack.extend(node.children.values())
    return count


# ----------------------------------------------------------------- page alignment


def test_key_shorter_than_a_page_is_not_cached() -> None:
    tree = LRRadixTree(page_size=4)
    res = tree.insert_base([1, 2, 3], slots(0, 3))
    assert (res.prefix_len, res.total_len) == (0, 0)
    assert tree.total_size() == 0
    assert tree.match([1, 2, 3]).base_len == 0


def test_partial_last_page_is_dropped_and_match_rounds_down() -> None:
    tree = LRRadixTree(page_size=4)
    res = tree.insert_base([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], slots(0, 10))
    assert res.total_len == 8
    assert tree.total_size() == 8
    # Divergence inside the second page: only the first whole page matches.
    m = tree.match([1, 2, 3, 4, 5, 6, 0, 0])
    assert m.base_len == 4
    assert as_list(m.base_indices) == [0, 1, 2, 3]
    # The split made by the match is page aligned too.
    tree.sanity_check()
    assert len(m.last_base_node.key) == 4


def test_divergence_in_first_page_misses_entirely() -> None:
    tree = LRRadixTree(page_size=2)
    tree.insert_base([1, 2, 3, 4], slots(0, 4))
    assert tree.match([1, 9, 3, 4]).base_len == 0


def test_token_containers_are_equivalent() -> None:
    tree = LRRadixTree()
    tree.insert_base(array("q", [5, 6, 7]), slots(10, 3))
    for tokens in ([5, 6, 7], (5, 6, 7), torch.tensor([5, 6, 7]), array("q", [5, 6, 7])):
        assert as_list(tree.match(tokens).base_indices) == [10, 11, 12]


def test_insert_base_rejects_too_few_slots() -> None:
    tree = LRRadixTree(page_size=2)
    with pytest.raises(ValueError, match="slots"):
        tree.insert_base([1, 2, 3, 4], slots(0, 3))


# ----------------------------------------------------------------- first writer


def test_base_first_writer_keeps_existing_slots() -> None:
    tree = LRRadixTree()
    first = tree.insert_base([1, 2, 3], slots(0, 3))
    assert first.prefix_len == 0
    second = tree.insert_base([1, 2, 3, 4, 5], slots(100, 5))
    # [1,2,3] already cached: the caller's slots 100..102 are duplicates to free.
    assert second.prefix_len == 3
    assert second.total_len == 5
    assert as_list(tree.match([1, 2, 3, 4, 5]).base_indices) == [0, 1, 2, 103, 104]
    assert tree.evictable_size() == 5


def test_base_first_writer_with_branch_in_the_middle_of_a_node() -> None:
    tree = LRRadixTree()
    tree.insert_base([1, 2, 3, 4], slots(0, 4))
    res = tree.insert_base([1, 2, 7, 8], slots(100, 4))
    assert res.prefix_len == 2
    assert as_list(tree.match([1, 2, 7, 8]).base_indices) == [0, 1, 102, 103]
    assert as_list(tree.match([1, 2, 3, 4]).base_indices) == [0, 1, 2, 3]
    assert tree.total_size() == 6
    tree.sanity_check()


def test_lr_first_writer_returns_present_prefix() -> None:
    tree = LRRadixTree()
    tree.insert_base([1, 2, 3, 4], slots(0, 4))
    assert tree.insert_lr([1, 2], "a", slots(50, 2)).prefix_len == 0
    res = tree.insert_lr([1, 2, 3, 4], "a", slots(60, 4))
    assert res.prefix_len == 2
    m = tree.match([1, 2, 3, 4], "a")
    assert as_list(m.lr_indices) == [50, 51, 62, 63]
    assert tree.lr_evictable_size("a") == 4


def test_lr_insert_needs_base_and_changes_nothing_otherwise() -> None:
    tree = LRRadixTree()
    tree.insert_base([1, 2, 3, 4], slots(0, 4))
    before = node_count(tree)
    with pytest.raises(ValueError, match="base is cached for only 2 of 3"):
        tree.insert_lr([1, 2, 9], "a", slots(50, 3))
    with pytest.raises(ValueError, match="base is cached for only 4 of 5"):
        tree.insert_lr([1, 2, 3, 4, 5], "a", slots(50, 5))
    assert node_count(tree) == before
    assert tree.lr_total_size() == 0
    assert tree.stats()["lr"]["inserted_tokens"] == 0


def test_lr_insert_rejects_none_key() -> None:
    tree = LRRadixTree()
    tree.insert_base([1, 2], slots(0, 2))
    with pytest.raises(ValueError, match="base model"):
        tree.insert_lr([1, 2], None, slots(5, 2))


def test_base_shared_adapter_stores_lr_under_another_writers_base() -> None:
    tree = LRRadixTree()
    tokens = [1, 2, 3, 4, 5, 6]
    tree.insert_base(tokens, slots(0, 6))  # written by adapter "plan"
    tree.insert_lr(tokens, "plan", slots(100, 6))
    m = tree.match(tokens, "action")
    assert (m.base_len, m.lr_len, m.lr_gap) == (6, 0, 6)
    # "action" re-prefills its LR only; its base duplicates are never offered.
    res = tree.insert_lr(tokens, "action", slots(200, 6))
    assert res.prefix_len == 0
    m = tree.match(tokens, "action")
    assert as_list(m.base_indices) == [0, 1, 2, 3, 4, 5]
    assert as_list(m.lr_indices) == [200, 201, 202, 203, 204, 205]
    assert m.lr_gap == 0
    assert as_list(tree.match(tokens, "plan").lr_indices) == [100, 101, 102, 103, 104, 105]


# ----------------------------------------------------------------- match semantics


def test_lr_reach_is_contiguous_from_root_and_at_most_base() -> None:
    tree = LRRadixTree(page_size=2)
    tree.insert_base([1, 2, 3, 4, 5, 6, 7, 8], slots(0, 8))
    tree.insert_lr([1, 2, 3, 4], "a", slots(100, 4))
    m = tree.match([1, 2, 3, 4, 5, 6, 7, 8], "a")
    assert (m.base_len, m.lr_len, m.lr_gap) == (8, 4, 4)
    assert as_list(m.lr_indices) == [100, 101, 102, 103]
    assert m.last_lr_node.key.tolist() == [1, 2, 3, 4]
    assert m.last_base_node.key.tolist() == [5, 6, 7, 8]
    # A shorter request stops LR where base stops.
    m = tree.match([1, 2, 9, 9], "a")
    assert (m.base_len, m.lr_len) == (2, 2)


def test_match_with_no_adapter_has_no_gap() -> None:
    tree = LRRadixTree()
    tree.insert_base([1, 2, 3], slots(0, 3))
    m = tree.match([1, 2, 3], None)
    assert (m.base_len, m.lr_len, m.lr_gap) == (3, 0, 0)
    assert m.last_lr_node is tree.root_node


def test_empty_and_missing_match_return_root() -> None:
    tree = LRRadixTree()
    for tokens in ([], [7]):
        m = tree.match(tokens, "a")
        assert m.base_len == 0 and m.last_base_node is tree.root_node
        assert m.base_indices.dtype == torch.int64 and len(m.base_indices) == 0


# ----------------------------------------------------------------- cache namespaces


@pytest.mark.parametrize("page_size", [1, 2])
def test_namespaces_never_share_pages(page_size: int) -> None:
    """SGLang's cache_salt: a salt's requests share among themselves, never with another
    salt's or with unsalted ones, even for the same tokens."""
    tree = LRRadixTree(page_size=page_size)
    tokens = [1, 2, 3, 4, 5, 6]
    tree.insert_base(tokens, slots(10, 6))
    tree.insert_lr(tokens, "a", slots(100, 6))
    tree.insert_base(tokens[:4], slots(20, 4), namespace="tenant-1")
    tree.insert_lr(tokens[:4], "a", slots(200, 4), namespace="tenant-1")
    common = tree.match(tokens, "a")
    salted = tree.match(tokens, "a", namespace="tenant-1")
    assert as_list(common.base_indices) == list(range(10, 16)) and common.lr_len == 6
    assert as_list(salted.base_indices) == [20, 21, 22, 23] and as_list(salted.lr_indices) == [200, 201, 202, 203]
    assert tree.match(tokens, "a", namespace="tenant-2").base_len == 0
    tree.sanity_check()


def test_namespace_splits_and_eviction_keep_the_links() -> None:
    tree = LRRadixTree()
    tree.insert_base([1, 2, 3, 4], slots(0, 4), namespace="s")
    tree.insert_base([1, 2, 9], slots(10, 3), namespace="s")  # splits the salted root child
    tree.insert_base([1, 2, 3, 4], slots(20, 4))
    tree.sanity_check()
    assert tree.match([1, 2, 9], namespace="s").base_len == 3
    freed = tree.evict_base(100)
    assert sorted(as_list(freed.base_indices)) == [0, 1, 2, 3, 12, 20, 21, 22, 23]  # 10, 11: duplicates
    assert not tree.root_node.children
    tree.sanity_check()


# ----------------------------------------------------------------- split consistency


def test_split_splits_base_every_lr_array_and_locks_alike() -> None:
    tree = LRRadixTree(page_size=2)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    tree.insert_base(tokens, slots(0, 8))
    tree.insert_lr(tokens, "a", slots(100, 8))
    tree.insert_lr(tokens, "b", slots(200, 8))
    leaf = tree.match(tokens, "a").last_base_node
    tree.inc_lock_ref(leaf, "a")
    m = tree.match([1, 2, 3, 4, 0, 0], "b")  # splits the single node at 4
    prefix, suffix = m.last_base_node, leaf
    assert suffix.parent is prefix
    assert prefix.key.tolist() == [1, 2, 3, 4] and suffix.key.tolist() == [5, 6, 7, 8]
    assert as_list(prefix.base) == [0, 1, 2, 3] and as_list(suffix.base) == [4, 5, 6, 7]
    assert as_list(prefix.lr["a"]) == [100, 101, 102, 103] and as_list(suffix.lr["a"]) == [104, 105, 106, 107]
    assert as_list(prefix.lr["b"]) == [200, 201, 202, 203] and as_list(suffix.lr["b"]) == [204, 205, 206, 207]
    assert prefix.lock_ref == suffix.lock_ref == 1
    assert prefix.lr_lock_ref == suffix.lr_lock_ref == {"a": 1}
    tree.sanity_check()
    # Releasing through the old handle unlocks both halves.
    assert tree.dec_lock_ref(leaf, "a") == 8
    assert tree.protected_size() == 0 and tree.lr_protected_size("a") == 0
    assert tree.evictable_size() == 8 and tree.lr_evictable_size("a") == 8
    tree.sanity_check()
    assert as_list(tree.match(tokens, "a").lr_indices) == list(range(100, 108))


# ----------------------------------------------------------------- locks


def test_lock_deltas_and_sizes() -> None:
    tree = LRRadixTree()
    tree.insert_base([1, 2, 3, 4], slots(0, 4))
    tree.insert_lr([1, 2, 3, 4], "a", slots(10, 4))
    node = tree.match([1, 2], "a").last_base_node  # splits at 2
    assert tree.inc_lock_ref(node, "a") == -2
    assert (tree.evictable_size(), tree.protected_size()) == (2, 2)
    assert (tree.lr_evictable_size("a"), tree.lr_protected_size("a")) == (2, 2)
    assert tree.inc_lock_ref(node, "a") == 0
    assert tree.dec_lock_ref(node, "a") == 0
    assert tree.dec_lock_ref(node, "a") == 2
    assert (tree.evictable_size(), tree.protected_size()) == (4, 0)
    assert tree.lr_protected_size() == 0
    assert tree.inc_lock_ref(tree.root_node, "a") == 0
    assert tree.dec_lock_ref(tree.root_node, "a") == 0


def test_unbalanced_unlock_and_stale_lock_raise() -> None:
    tree = LRRadixTree()
    tree.insert_base([1, 2], slots(0, 2))
    node = tree.match([1, 2]).last_base_node
    with pytest.raises(RuntimeError):
        tree.dec_lock_ref(node)
    tree.inc_lock_ref(node, None)
    with pytest.raises(RuntimeError):
        tree.dec_lock_ref(node, "a")  # locked for the base only
    tree.dec_lock_ref(node)
    tree.evict_base(2)
    with pytest.raises(ValueError, match="evicted"):
        tree.inc_lock_ref(node)


def test_lock_taken_before_lr_insert_protects_the_new_lr() -> None:
    tree = LRRadixTree()
    tree.insert_base([1, 2, 3], slots(0, 3))
    node = tree.match([1, 2, 3], "a").last_base_node
    tree.inc_lock_ref(node, "a")
    tree.insert_lr([1, 2, 3], "a", slots(10, 3))  # the request's LR re-prefill
    assert tree.lr_protected_size("a") == 3 and tree.lr_evictable_size("a") == 0
    assert tree.evict_lr(100).num_lr_tokens == 0
    tree.dec_lock_ref(node, "a")
    assert tree.lr_evictable_size("a") == 3
    tree.sanity_check()


def test_locked_pages_are_never_evicted() -> None:
    tree = LRRadixTree()
    tree.insert_base([1, 2, 3, 4], slots(0, 4))
    tree.insert_base([1, 2, 7, 8], slots(10, 4))
    tree.insert_lr([1, 2, 3, 4], "a", slots(100, 4))
    tree.insert_lr([1, 2, 3, 4], "b", slots(200, 4))
    locked = tree.match([1, 2, 3, 4], "a").last_base_node
    tree.inc_lock_ref(locked, "a")
    freed = tree.evict_lr(1000)
    # b's LR goes; a's LR (locked) stays.
    assert set(freed.lr_indices) == {"b"}
    assert sorted(as_list(freed.lr_indices["b"])) == [200, 201, 202, 203]
    freed = tree.evict_base(1000)
    assert as_list(freed.base_indices) == [12, 13]
    assert freed.lr_indices == {}
    m = tree.match([1, 2, 3, 4], "a")
    assert (m.base_len, m.lr_len) == (4, 4)
    tree.sanity_check()


def test_locked_lr_parent_is_not_promoted_after_its_child_goes() -> None:
    tree = LRRadixTree()
    tree.insert_base([1, 2, 3, 4], slots(0, 4))
    tree.insert_lr([1, 2], "a", slots(100, 2))
    tree.insert_lr([1, 2, 3, 4], "a", slots(200, 4))
    tree.inc_lock_ref(tree.match([1, 2], "a").last_base_node, "a")
    freed = tree.evict_lr(1000, "a")
    assert as_list(freed.lr_indices["a"]) == [202, 203]
    assert tree.match([1, 2, 3, 4], "a").lr_len == 2


# ----------------------------------------------------------------- eviction


def test_lr_eviction_keeps_base() -> None:
    tree = LRRadixTree(base_bytes_per_token=10, lr_bytes_per_token=1)
    tree.insert_base([1, 2, 3], slots(0, 3))
    tree.insert_lr([1, 2, 3], "a", slots(10, 3))
    freed = tree.evict_lr(1, "a")
    assert len(freed.base_indices) == 0
    assert as_list(freed.lr_indices["a"]) == [10, 11, 12]
    m = tree.match([1, 2, 3], "a")
    assert (m.base_len, m.lr_len, m.lr_gap) == (3, 0, 3)
    assert tree.total_size() == 3 and tree.lr_total_size() == 0


def test_base_eviction_frees_every_lr_array_on_the_node() -> None:
    tree = LRRadixTree()
    tree.insert_base([1, 2, 3], slots(0, 3))
    tree.insert_lr([1, 2, 3], "a", slots(10, 3))
    tree.insert_lr([1, 2, 3], "b", slots(20, 3))
    freed = tree.evict_base(1)
    assert as_list(freed.base_indices) == [0, 1, 2]
    assert {k: as_list(v) for k, v in freed.lr_indices.items()} == {"a": [10, 11, 12], "b": [20, 21, 22]}
    assert (freed.num_base_tokens, freed.num_lr_tokens) == (3, 6)
    assert tree.total_size() == 0 and tree.lr_evictable_size() == 0
    tree.sanity_check()


def test_base_eviction_is_leaf_first_then_lru() -> None:
    tree = LRRadixTree()
    tree.insert_base([1, 2, 3], slots(0, 3))
    tree.insert_base([1, 2, 4], slots(10, 3))  # branches at 2: [1,2] -> [3], [4]
    tree.insert_base([5, 6], slots(20, 2))
    tree.match([1, 2, 3])
    tree.match([5, 6])
    # [1,2]->[4] is least recently used; the shared [1,2] is not a leaf yet.
    assert as_list(tree.evict_base(1).base_indices) == [12]
    assert as_list(tree.evict_base(1).base_indices) == [2]
    # Now [1,2] is a leaf, older than [5,6].
    assert as_list(tree.evict_base(1).base_indices) == [0, 1]
    assert as_list(tree.evict_base(1).base_indices) == [20, 21]


def test_eviction_frees_whole_nodes_until_enough() -> None:
    tree = LRRadixTree()
    tree.insert_base([1, 2, 3, 4], slots(0, 4))
    tree.insert_base([5, 6, 7, 8], slots(10, 4))
    assert tree.evict_base(1).num_base_tokens == 4
    assert tree.evict_base(0).num_base_tokens == 0


def test_lr_eviction_keeps_each_key_contiguous() -> None:
    tree = LRRadixTree()
    tree.insert_base([1, 2, 3, 4, 5, 6], slots(0, 6))
    tree.insert_lr([1, 2], "a", slots(100, 2))
    tree.insert_lr([1, 2, 3, 4, 5, 6], "a", slots(200, 6))  # nodes [1,2] and [3..6]
    tree.match([1, 2, 3, 4, 5, 6], "a")  # the deeper node is the most recent...
    tree.match([1, 2], "a")  # ...until the root-side node is touched again
    # ...but it is the only one with no "a" below it, so it goes first anyway.
    assert as_list(tree.evict_lr(1, "a").lr_indices["a"]) == [202, 203, 204, 205]
    assert tree.match([1, 2, 3, 4, 5, 6], "a").lr_len == 2
    assert as_list(tree.evict_lr(1, "a").lr_indices["a"]) == [100, 101]
    tree.sanity_check()


def test_lr_eviction_lru_across_keys_and_key_filter() -> None:
    tree = LRRadixTree()
    tree.insert_base([1, 2], slots(0, 2))
    tree.insert_lr([1, 2], "a", slots(10, 2))
    tree.insert_lr([1, 2], "b", slots(20, 2))
    tree.insert_lr([1, 2], "c", slots(30, 2))
    tree.match([1, 2], "a")  # "b" is now the least recently used LR array
    assert list(tree.evict_lr(1).lr_indices) == ["b"]
    assert list(tree.evict_lr(1, "a").lr_indices) == ["a"]
    assert tree.evict_lr(1, "zzz").lr_indices == {}
    assert tree.lr_total_size("c") == 2 and tree.total_size() == 2


def test_lfu_policy_and_unknown_policy() -> None:
    tree = LRRadixTree(eviction_policy="lfu")
    tree.insert_base([1], slots(0, 1))
    tree.insert_base([1], slots(5, 1))  # hit_count 2
    tree.insert_base([2], slots(1, 1))  # hit_count 1, more recent
    assert as_list(tree.evict_base(1).base_indices) == [1]
    with pytest.raises(ValueError, match="Unknown eviction policy"):
        LRRadixTree(eviction_policy="random")


def test_evict_to_budget() -> None:
    tree = LRRadixTree()
    for i in range(4):
        tree.insert_base([i, i, i], slots(10 * i, 3))
        tree.insert_lr([i, i, i], "a", slots(100 + 10 * i, 3))
    freed = tree.evict_to_budget(base_tokens=9, lr_tokens=3)
    assert freed.num_lr_tokens == 9
    assert freed.num_base_tokens == 3
    assert tree.total_size() == 9 and tree.lr_total_size() == 3
    assert tree.stats()["lr"]["evicted_tokens"] == 9  # counted once, not again when merged
    assert tree.evict_to_budget(base_tokens=100, lr_tokens=100).num_base_tokens == 0
    tree.sanity_check()


# ----------------------------------------------------------------- statistics


def test_stats_numbers() -> None:
    tree = LRRadixTree(page_size=2, base_bytes_per_token=100, lr_bytes_per_token=3)
    tree.insert_base([1, 2, 3, 4, 5, 6], slots(0, 6))
    tree.insert_lr([1, 2, 3, 4], "a", slots(10, 4))
    tree.match([1, 2, 3, 4, 5, 6, 7], "a")  # requested 7, base 6, lr 4, gap 2
    tree.match([1, 2, 3, 9], "b")  # requested 4, base 2, lr 0, gap 2
    tree.match([1, 2, 3, 4], None)  # base only: no gap
    tree.match([1, 2], "a", record_stats=False)
    tree.evict_lr(1, "a")
    s = tree.stats()
    json.dumps(s)
    assert s["base"] == {
        "tokens": 6,
        "bytes": 600,
        "evictable_tokens": 6,
        "protected_tokens": 0,
        "inserted_tokens": 6,
        "evicted_tokens": 0,
    }
    assert s["lr"]["tokens"] == 2 and s["lr"]["bytes"] == 6
    assert s["lr"]["inserted_tokens"] == 4 and s["lr"]["evicted_tokens"] == 2
    a = s["per_lr_key"]["a"]
    assert (a["match_calls"], a["requested_tokens"], a["base_hit_tokens"]) == (1, 7, 6)
    assert (a["lr_hit_tokens"], a["lr_gap_tokens"]) == (4, 2)
    assert (a["lr_inserted_tokens"], a["lr_evicted_tokens"], a["lr_tokens"], a["lr_bytes"]) == (4, 2, 2, 6)
    b = s["per_lr_key"]["b"]
    assert (b["requested_tokens"], b["base_hit_tokens"], b["lr_hit_tokens"], b["lr_gap_tokens"]) == (4, 2, 0, 2)
    none = s["per_lr_key"]["None"]
    assert (none["requested_tokens"], none["base_hit_tokens"], none["lr_gap_tokens"]) == (4, 4, 0)


def test_stats_count_collateral_lr_eviction_and_reset() -> None:
    tree = LRRadixTree(lr_bytes_per_token=2)
    tree.insert_base([1, 2], slots(0, 2))
    tree.insert_lr([1, 2], "a", slots(10, 2))
    tree.evict_base(2)
    s = tree.stats()
    assert s["base"]["evicted_tokens"] == 2
    assert s["per_lr_key"]["a"]["lr_evicted_tokens"] == 2
    tree.insert_base([3, 4], slots(20, 2))
    tree.insert_lr([3, 4], "a", slots(30, 2))
    tree.reset_stats()
    s = tree.stats()
    assert s["base"]["inserted_tokens"] == 0 and s["base"]["tokens"] == 2
    assert s["per_lr_key"]["a"]["lr_evicted_tokens"] == 0 and s["per_lr_key"]["a"]["lr_tokens"] == 2
    tree.reset()
    s = tree.stats()
    assert s["base"]["tokens"] == 0 and s["per_lr_key"] == {}
    assert tree.match([3, 4], "a").base_len == 0


def test_pretty_print_shows_segments_locks_and_lr_keys() -> None:
    tree = LRRadixTree()
    tree.insert_base([1, 2, 3], slots(0, 3))
    tree.insert_lr([1, 2, 3], "a", slots(10, 3))
    tree.inc_lock_ref(tree.match([1, 2, 3], "a").last_base_node, "a")
    out = io.StringIO()
    tree.pretty_print(file=out)
    text = out.getvalue()
    assert "3 [1, 2, 3] lock=1 lr={\"'a'\": 1}" in text
    assert "#base tokens: 3, #lr tokens: 3" in text


def test_sanity_check_detects_corruption() -> None:
    tree = LRRadixTree()
    tree.insert_base([1, 2], slots(0, 2))
    tree.sanity_check()
    tree.base_evictable_size_ += 1
    with pytest.raises(AssertionError, match="base sizes"):
        tree.sanity_check()
