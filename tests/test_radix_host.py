"""Stateful property test of the prefix tree's host tier (issue 16).

Every slot handed to the tree carries the data it would hold in a server: device and
host slots hold the token prefix whose KV they store, LR slots (key, prefix). Copies to
host memory (write-through, write-back at eviction) and load backs move that data as a
server's HiCache does. Whatever sequence of inserts, locks, evictions to host, host
evictions and load backs runs, a match must return device, host and LR slots that hold
exactly the matched prefixes, and no slot may leak or be freed twice.
"""

from __future__ import annotations

import itertools

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

from lragent_sglang.radix import LRRadixTree
from lragent_sglang.radix.node import TreeNode

LR_KEYS = ["a", "b"]
ANY_KEY = st.sampled_from(LR_KEYS + [None])


class Space:
    """One slot space (device, host or LR): what each live slot holds, what was freed."""

    def __init__(self) -> None:
        self.next = itertools.count(1)
        self.data: dict[int, object] = {}
        self.freed: set[int] = set()

    def fresh(self, contents: list[object]) -> torch.Tensor:
        ids = [next(self.next) for _ in contents]
        self.data.update(zip(ids, contents))
        return torch.tensor(ids, dtype=torch.int64)

    def free(self, slots: torch.Tensor | None) -> None:
        for s in [] if slots is None else slots.tolist():
            assert s in self.data, f"slot {s} freed twice or never handed out"
            del self.data[s]
            self.freed.add(s)


class HostTierMachine(RuleBasedStateMachine):
    sequences = Bundle("sequences")

    def __init__(self) -> None:
        super().__init__()
        self.device, self.host, self.lr = Space(), Space(), Space()
        self.locks: list[tuple[TreeNode, object]] = []

    def prefixes(self, tokens: list[int], start: int, end: int) -> list[tuple[int, ...]]:
        return [tuple(tokens[: i + 1]) for i in range(start, end)]

    def copy_to_host(self, node: TreeNode) -> torch.Tensor:
        return self.host.fresh([self.device.data[s] for s in node.base.tolist()])

    @initialize(page_size=st.sampled_from([1, 2]))
    def init_tree(self, page_size: int) -> None:
        self.tree = LRRadixTree(page_size=page_size, base_bytes_per_token=4)

    @rule(target=sequences, tokens=st.lists(st.integers(0, 2), min_size=1, max_size=12))
    def new_sequence(self, tokens: list[int]) -> list[int]:
        return tokens

    @rule(tokens=sequences, lr_key=ANY_KEY)
    def insert(self, tokens: list[int], lr_key: object) -> None:
        n = len(tokens)
        ours = self.device.fresh(self.prefixes(tokens, 0, n))
        self.tree.insert_base(tokens, ours)
        m = self.tree.match(tokens, record_stats=False)
        taken = set(m.base_indices.tolist())
        self.device.free(torch.tensor([s for s in ours.tolist() if s not in taken], dtype=torch.int64))
        if lr_key is None or m.base_len == 0:
            return
        lr = self.lr.fresh([(lr_key, p) for p in self.prefixes(tokens, 0, m.base_len)])
        self.tree.insert_lr(tokens[: m.base_len], lr_key, lr)
        taken = set(self.tree.match(tokens, lr_key, record_stats=False).lr_indices.tolist())
        self.lr.free(torch.tensor([s for s in lr.tolist() if s not in taken], dtype=torch.int64))

    @rule(tokens=sequences, lr_key=ANY_KEY)
    def match(self, tokens: list[int], lr_key: object) -> None:
        m = self.tree.match(tokens, lr_key)
        assert [self.device.data[s] for s in m.base_indices.tolist()] == self.prefixes(tokens, 0, m.base_len)
        host = m.host_indices.tolist()
        assert len(host) == m.host_len
        assert [self.host.data[s] for s in host] == self.prefixes(tokens, m.base_len, m.base_len + m.host_len)
        if lr_key is not None:
            want = [(lr_key, p) for p in self.prefixes(tokens, 0, m.lr_len)]
            assert [self.lr.data[s] for s in m.lr_indices.tolist()] == want
        assert m.lr_len <= m.base_len

    @rule(tokens=sequences)
    def write_through(self, tokens: list[int]) -> None:
        node = self.tree.match(tokens, record_stats=False).last_base_node
        path = []
        while node is not self.tree.root_node:
            path.append(node)
            node = node.parent
        for node in reversed(path):
            if node.host is None:
                self.tree.set_host(node, self.copy_to_host(node))

    @rule(tokens=sequences, lr_key=ANY_KEY)
    def lock(self, tokens: list[int], lr_key: object) -> None:
        node = self.tree.match(tokens, lr_key, record_stats=False).last_base_node
        self.tree.inc_lock_ref(node, lr_key)
        self.locks.append((node, lr_key))

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        node, lr_key = self.locks.pop(data.draw(st.integers(0, len(self.locks) - 1)))
        self.tree.dec_lock_ref(node, lr_key)

    @rule(num_tokens=st.integers(0, 12), data=st.data())
    def evict_base(self, num_tokens: int, data: st.DataObject) -> None:
        """Eviction with a write-back that sometimes finds the host pool full."""
        def offload(node: TreeNode) -> torch.Tensor | None:
            return self.copy_to_host(node) if data.draw(st.booleans()) else None

        res = self.tree.evict_base(num_tokens, offload=offload if data.draw(st.booleans()) else None)
        self.release(res)

    @rule(tokens=sequences)
    def back_up_and_evict_all(self, tokens: list[int]) -> None:
        """A trajectory written through, then the device emptied of everything unlocked."""
        self.write_through(tokens)
        self.release(self.tree.evict_base(10**9))

    @rule(num_tokens=st.integers(0, 12))
    def evict_host(self, num_tokens: int) -> None:
        res = self.tree.evict_host(num_tokens)
        assert res.num_base_tokens == 0
        self.release(res)

    @rule(num_tokens=st.integers(0, 12), lr_key=ANY_KEY)
    def evict_lr(self, num_tokens: int, lr_key: object) -> None:
        self.release(self.tree.evict_lr(num_tokens, lr_key))

    @rule(tokens=sequences)
    def load_back(self, tokens: list[int]) -> None:
        m = self.tree.match(tokens, record_stats=False)
        nodes, above = self.tree.host_path(m.last_node)
        assert above.base is not None or above is self.tree.root_node
        if not nodes:
            return
        host = torch.cat([x.host for x in nodes])
        self.tree.restore(nodes, self.device.fresh([self.host.data[s] for s in host.tolist()]))
        after = self.tree.match(tokens, record_stats=False)
        assert after.base_len == m.base_len + m.host_len and after.host_len == 0
        self.match(tokens, None)

    @rule(tokens=sequences, lr_key=ANY_KEY)
    def round_trip(self, tokens: list[int], lr_key: object) -> None:
        """Evicted to host memory and loaded back: the same data, LR rows kept."""
        self.back_up_and_evict_all(tokens)
        self.match(tokens, lr_key)
        self.load_back(tokens)
        self.match(tokens, lr_key)

    def release(self, res) -> None:
        self.device.free(res.base_indices)
        self.host.free(res.host_indices)
        for slots in res.lr_indices.values():
            self.lr.free(slots)

    @invariant()
    def consistent(self) -> None:
        tree = self.tree
        tree.sanity_check()
        seen = {"device": [], "host": [], "lr": []}
        stack = list(tree.root_node.children.values())
        while stack:
            node = stack.pop()
            if node.base is not None:
                seen["device"] += node.base.tolist()
            if node.host is not None:
                seen["host"] += node.host.tolist()
            for slots in node.lr.values():
                seen["lr"] += slots.tolist()
            stack.extend(node.children.values())
        for name, space in (("device", self.device), ("host", self.host), ("lr", self.lr)):
            assert len(seen[name]) == len(set(seen[name])), f"{name} slot referenced twice"
            assert set(seen[name]) == set(space.data), f"{name} slots leaked or lost"
        assert tree.host_size() == len(seen["host"])
        assert tree.evictable_size() + tree.protected_size() == tree.total_size() == len(seen["device"])

    def teardown(self) -> None:
        for node, lr_key in reversed(self.locks):
            self.tree.dec_lock_ref(node, lr_key)
        self.release(self.tree.evict_base(10**9))
        self.release(self.tree.evict_host(10**9))
        assert not self.device.data and not self.host.data and not self.lr.data
        assert self.tree.total_size() == 0 and self.tree.host_size() == 0


HostTierMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestHostTier = HostTierMachine.TestCase


def test_host_leaf_drop_under_a_host_only_branch_keeps_the_parent_out_of_device_leaves() -> None:
    """Two trajectories [0, 0] and [0, 1] share a host-only [0]; dropping one host leaf
    must not make that host-only parent a device eviction candidate (CI, hypothesis)."""
    tree = LRRadixTree(page_size=1, base_bytes_per_token=4)
    device, host = itertools.count(1), itertools.count(100)
    for tokens in ([0, 0], [0, 1]):
        tree.insert_base(tokens, torch.tensor([next(device) for _ in tokens]))
        node = tree.match(tokens, record_stats=False).last_base_node
        while node is not tree.root_node:
            if node.host is None:
                tree.set_host(node, torch.tensor([next(host) for _ in node.key]))
            node = node.parent
        tree.evict_base(10**9)
    assert tree.evict_host(1).host_indices.numel() == 1
    tree.sanity_check()
    assert tree.evict_base(10**9).base_indices.numel() == 0
    assert tree.evict_host(10**9).host_indices.numel() == 2
    assert tree.host_size() == 0
