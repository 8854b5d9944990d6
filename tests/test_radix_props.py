"""Stateful property test of the LRAgent prefix tree against a plain reference model.

The model keeps, per component, a dict from each cached page-aligned token prefix
(tuple) to the slots of its last page: base is one dict, LR one dict per ``lr_key``. Matches must agree
with it exactly; evictions are checked against its rules (which pages may go), since
the exact LRU order is covered by the unit tests.
"""

from __future__ import annotations

import itertools
from collections import Counter

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from lragent_sglang.radix import LRRadixTree, MatchResult

LR_KEYS = ["a", "b", "c"]
ANY_KEY = st.sampled_from(LR_KEYS + [None])
VOCAB = 3
Prefix = tuple[int, ...]


class RadixMachine(RuleBasedStateMachine):
    """Random insert_base / insert_lr / match / lock / unlock / evict sequences."""

    sequences = Bundle("sequences")

    def __init__(self) -> None:
        super().__init__()
        self.tree: LRRadixTree
        self.page_size = 1
        self.next_slot = itertools.count()
        self.handed: set[int] = set()
        self.returned: Counter[int] = Counter()
        self.base: dict[Prefix, tuple[int, ...]] = {}
        self.lr: dict[str, dict[Prefix, tuple[int, ...]]] = {k: {} for k in LR_KEYS}
        self.locks: list[tuple[object, object, Prefix]] = []
        self.expected_stats: dict[str, dict[str, int]] = {}
        self.expected_base_evicted = 0

    # ------------------------------------------------------------------ helpers

    def fresh(self, n: int) -> torch.Tensor:
        ids = [next(self.next_slot) for _ in range(n)]
        self.handed.update(ids)
        return torch.tensor(ids, dtype=torch.int64)

    def aligned(self, tokens: list[int]) -> int:
        return len(tokens) - len(tokens) % self.page_size

    def model_base_len(self, tokens: list[int]) -> int:
        n = self.aligned(tokens)
        length = 0
        while length < n and tuple(tokens[: length + self.page_size]) in self.base:
            length += self.page_size
        return length

    def model_lr_len(self, tokens: list[int], lr_key: object, limit: int) -> int:
        if lr_key is None:
            return 0
        length = 0
        while length < limit and tuple(tokens[: length + self.page_size]) in self.lr[lr_key]:
            length += self.page_size
        return length

    def key_stats(self, lr_key: object) -> dict[str, int]:
        return self.expected_stats.setdefault(
            str(lr_key),
            {"requested_tokens": 0, "base_hit_tokens": 0, "lr_hit_tokens": 0, "lr_gap_tokens": 0,
             "lr_inserted_tokens": 0, "lr_evicted_tokens": 0, "match_calls": 0},
        )

    def locked_prefixes(self, lr_key: object = "any") -> set[Prefix]:
        """Every prefix protected by a held lock (of ``lr_key``; of any key for the base)."""
        out: set[Prefix] = set()
        ps = self.page_size
        for _, key, prefix in self.locks:
            if lr_key == "any" or key == lr_key:
                out.update(prefix[:end] for end in range(ps, len(prefix) + 1, ps))
        return out

    def slots_of(self, table: dict[Prefix, tuple[int, ...]], tokens: list[int], length: int) -> list[int]:
        ps = self.page_size
        return [s for end in range(ps, length + 1, ps) for s in table[tuple(tokens[:end])]]

    def store(self, table: dict[Prefix, tuple[int, ...]], tokens: list[int], ids: list[int], start: int, end: int) -> None:
        ps = self.page_size
        for stop in range(start + ps, end + 1, ps):
            table[tuple(tokens[:stop])] = tuple(ids[stop - ps : stop])

    def check_match(self, tokens: list[int], lr_key: object, res: MatchResult) -> None:
        base_len = self.model_base_len(tokens)
        lr_len = self.model_lr_len(tokens, lr_key, base_len)
        assert (res.base_len, res.lr_len) == (base_len, lr_len), (tokens, lr_key, res)
        assert res.lr_gap == (base_len - lr_len if lr_key is not None else 0)
        assert res.base_indices.tolist() == self.slots_of(self.base, tokens, base_len)
        if lr_key is not None:
            assert res.lr_indices.tolist() == self.slots_of(self.lr[lr_key], tokens, lr_len)
        assert len(res.last_base_node.key) == 0 or res.last_base_node.key.tolist() == tokens[
            base_len - len(res.last_base_node.key) : base_len
        ]

    def take_evicted(self, freed: dict[object, torch.Tensor], table_for) -> None:
        """Remove the prefixes whose slots were freed from the model, checking the rules."""
        for lr_key, tensor in freed.items():
            table = table_for(lr_key)
            by_slot = {slot: prefix for prefix, page in table.items() for slot in page}
            ids = tensor.tolist()
            assert len(ids) == len(set(ids)), "slot freed twice in one eviction"
            assert all(slot in by_slot for slot in ids), "evicted slot was not cached"
            pages = {by_slot[slot] for slot in ids}
            assert {s for p in pages for s in table[p]} == set(ids), "page evicted in part"
            for prefix in pages:
                del table[prefix]
            self.returned.update(ids)

    # ------------------------------------------------------------------ rules

    @initialize(page_size=st.sampled_from([1, 2, 3]))
    def init_tree(self, page_size: int) -> None:
        self.page_size = page_size
        self.tree = LRRadixTree(page_size=page_size, base_bytes_per_token=7, lr_bytes_per_token=2)

    @rule(target=sequences, tokens=st.lists(st.integers(0, VOCAB - 1), min_size=0, max_size=14))
    def new_sequence(self, tokens: list[int]) -> list[int]:
        return tokens

    @rule(target=sequences, seq=sequences, cut=st.integers(0, 14),
          tail=st.lists(st.integers(0, VOCAB - 1), max_size=8))
    def branch_sequence(self, seq: list[int], cut: int, tail: list[int]) -> list[int]:
        return seq[:cut] + tail

    @rule(tokens=sequences)
    def insert_base(self, tokens: list[int]) -> None:
        n = self.aligned(tokens)
        new = self.fresh(len(tokens))
        res = self.tree.insert_base(tokens, new)
        present = self.model_base_len(tokens)
        assert (res.prefix_len, res.total_len) == (present, n)
        ids = new.tolist()
        self.returned.update(ids[:present])  # duplicates of the cached prefix
        self.returned.update(ids[n:])  # the partial page the tree never takes
        self.store(self.base, tokens, ids, present, n)

    @rule(tokens=sequences, lr_key=st.sampled_from(LR_KEYS))
    def insert_lr(self, tokens: list[int], lr_key: str) -> None:
        self.do_insert_lr(tokens, lr_key)

    @rule(tokens=sequences, lr_key=st.sampled_from(LR_KEYS))
    def insert_base_and_lr(self, tokens: list[int], lr_key: str) -> None:
        """A finished request: its base (first writer wins), then its own LR."""
        self.insert_base(tokens)
        self.do_insert_lr(tokens, lr_key)

    @rule(tokens=sequences, lr_key=st.sampled_from(LR_KEYS))
    def insert_lr_over_cached_base(self, tokens: list[int], lr_key: str) -> None:
        """A base-shared request re-prefilled its LR over someone else's base."""
        self.do_insert_lr(tokens[: self.model_base_len(tokens)], lr_key)

    def do_insert_lr(self, tokens: list[int], lr_key: str) -> None:
        n = self.aligned(tokens)
        new = self.fresh(len(tokens))
        ids = new.tolist()
        if self.model_base_len(tokens) < n:
            try:
                self.tree.insert_lr(tokens, lr_key, new)
            except ValueError:
                self.returned.update(ids)
                return
            raise AssertionError("insert_lr without base must raise")
        res = self.tree.insert_lr(tokens, lr_key, new)
        present = self.model_lr_len(tokens, lr_key, n)
        assert (res.prefix_len, res.total_len) == (present, n)
        self.returned.update(ids[:present])
        self.returned.update(ids[n:])
        self.store(self.lr[lr_key], tokens, ids, present, n)
        self.key_stats(lr_key)["lr_inserted_tokens"] += n - present

    @rule(tokens=sequences, lr_key=ANY_KEY)
    def match(self, tokens: list[int], lr_key: object) -> None:
        res = self.tree.match(tokens, lr_key)
        self.check_match(tokens, lr_key, res)
        stats = self.key_stats(lr_key)
        stats["match_calls"] += 1
        stats["requested_tokens"] += len(tokens)
        stats["base_hit_tokens"] += res.base_len
        stats["lr_hit_tokens"] += res.lr_len
        stats["lr_gap_tokens"] += res.lr_gap

    @rule(tokens=sequences, lr_key=ANY_KEY)
    def lock(self, tokens: list[int], lr_key: object) -> None:
        res = self.tree.match(tokens, lr_key, record_stats=False)
        self.check_match(tokens, lr_key, res)
        before = self.tree.evictable_size()
        delta = self.tree.inc_lock_ref(res.last_base_node, lr_key)
        assert self.tree.evictable_size() - before == delta <= 0
        self.locks.append((res.last_base_node, lr_key, tuple(tokens[: res.base_len])))

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.locks) - 1))
        node, lr_key, _ = self.locks.pop(index)
        before = self.tree.evictable_size()
        delta = self.tree.dec_lock_ref(node, lr_key)
        assert self.tree.evictable_size() - before == delta >= 0

    @precondition(lambda self: self.base)
    @rule(num_tokens=st.integers(0, 12))
    def evict_base(self, num_tokens: int) -> None:
        evictable = self.tree.evictable_size()
        locked = self.locked_prefixes()
        freed = self.tree.evict_base(num_tokens)
        self.take_evicted({None: freed.base_indices}, lambda _: self.base)
        self.take_evicted(freed.lr_indices, lambda k: self.lr[k])
        for key, table in self.lr.items():
            assert all(p in self.base for p in table), f"LR of {key} left without base"
        assert not (locked - set(self.base)), "a locked base page was evicted"
        assert freed.num_base_tokens >= min(num_tokens, evictable)
        self.expected_base_evicted += freed.num_base_tokens
        for key, tensor in freed.lr_indices.items():
            self.key_stats(key)["lr_evicted_tokens"] += len(tensor)

    @precondition(lambda self: any(self.lr.values()))
    @rule(num_tokens=st.integers(0, 12), lr_key=ANY_KEY)
    def evict_lr(self, num_tokens: int, lr_key: object) -> None:
        evictable = self.tree.lr_evictable_size(lr_key)
        base_before = dict(self.base)
        locked = {k: self.locked_prefixes(k) & set(self.lr[k]) for k in LR_KEYS}
        freed = self.tree.evict_lr(num_tokens, lr_key)
        assert freed.num_base_tokens == 0 and self.base == base_before
        assert lr_key is None or set(freed.lr_indices) <= {lr_key}
        self.take_evicted(freed.lr_indices, lambda k: self.lr[k])
        for key in LR_KEYS:
            assert locked[key] <= set(self.lr[key]), f"a locked LR page of {key} was evicted"
        assert freed.num_lr_tokens >= min(num_tokens, evictable)
        for key, tensor in freed.lr_indices.items():
            self.key_stats(key)["lr_evicted_tokens"] += len(tensor)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def slots_conserved(self) -> None:
        """Each handed slot is referenced by the tree exactly once or returned exactly once."""
        referenced: Counter[int] = Counter()
        stack = list(self.tree.root_node.children.values())
        while stack:
            node = stack.pop()
            referenced.update(node.base.tolist())
            for slots in node.lr.values():
                referenced.update(slots.tolist())
            stack.extend(node.children.values())
        assert max(referenced.values(), default=1) == 1, "slot referenced twice"
        assert max(self.returned.values(), default=1) == 1, "slot returned twice"
        assert not (set(referenced) & set(self.returned)), "slot both referenced and returned"
        assert set(referenced) | set(self.returned) == self.handed, "slot leaked"
        model = {s for table in [self.base, *self.lr.values()] for page in table.values() for s in page}
        assert set(referenced) == model

    @invariant()
    def lr_only_over_base(self) -> None:
        for key, table in self.lr.items():
            for prefix in table:
                assert prefix in self.base, f"LR page of {key} without base"
                assert len(prefix) == self.page_size or prefix[: -self.page_size] in table, "LR not contiguous"

    @invariant()
    def sizes_match(self) -> None:
        tree = self.tree
        tree.sanity_check()
        ps = self.page_size
        locked = self.locked_prefixes()
        assert tree.evictable_size() + tree.protected_size() == tree.total_size() == ps * len(self.base)
        assert tree.protected_size() == ps * len(locked)
        for key in LR_KEYS:
            held = ps * len(self.lr[key])
            assert tree.lr_evictable_size(key) + tree.lr_protected_size(key) == tree.lr_total_size(key) == held
            locked_lr = self.locked_prefixes(key) & set(self.lr[key])
            assert tree.lr_protected_size(key) == ps * len(locked_lr)

    @invariant()
    def stats_match(self) -> None:
        s = self.tree.stats()
        ps = self.page_size
        assert s["base"]["tokens"] == ps * len(self.base)
        assert s["base"]["bytes"] == 7 * ps * len(self.base)
        assert s["base"]["evicted_tokens"] == self.expected_base_evicted
        lr_total = ps * sum(len(t) for t in self.lr.values())
        assert s["lr"]["tokens"] == lr_total and s["lr"]["bytes"] == 2 * lr_total
        for key, expected in self.expected_stats.items():
            got = s["per_lr_key"].get(key)
            if got is None:
                assert not any(expected.values()), f"no stats for {key}"
            else:
                assert {k: got[k] for k in expected} == expected, key
        for key in LR_KEYS:
            if str(key) in s["per_lr_key"]:
                assert s["per_lr_key"][str(key)]["lr_tokens"] == ps * len(self.lr[key])

    def teardown(self) -> None:
        for node, lr_key, _ in reversed(self.locks):
            self.tree.dec_lock_ref(node, lr_key)
        self.locks.clear()
        self.sizes_match()
        assert self.tree.protected_size() == 0
        freed = self.tree.evict_base(10**9)
        assert self.tree.total_size() == 0 and self.tree.lr_total_size() == 0
        ps = self.page_size
        assert freed.num_base_tokens == ps * len(self.base)
        assert freed.num_lr_tokens == ps * sum(len(t) for t in self.lr.values())


RadixMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestRadixMachine = RadixMachine.TestCase
