"""Trajectory placement over data-parallel ranks: every request of one agent trajectory on
the rank whose prefix tree holds it.

SGLang's in-process data parallelism (`--dp-size N`) places each request by round robin or
by load, which scatters a trajectory's plan, action and reflect requests over ranks, and
each rank has its own tree: the roles then miss the pages they would share. SGLang's DP
controller honours a request's `routed_dp_rank` (meant for an external router) under every
`--load-balance-method`, so this sets it, in the HTTP server's process, from the request's
routing key: SGLang's own `routing_key` field, or else the `X-SMG-Routing-Key` header, the
header sglang-router's `manual` policy routes by and forwards to the worker. One key per
trajectory (`LRAgentEndpoint` sends one per program state, and forks inherit it) thus
places the trajectory on one worker behind the router and on one rank inside it.

A key seen first goes to the rank with the fewest keys, so trajectories spread evenly; the
map keeps the `CAPACITY` most recently used keys. With `--tokenizer-worker-num` > 1 each
tokenizer process would keep a map of its own and could send one key to two ranks, so
there the rank is a hash of the key, the same in every process (even only on average). A
request with a `routed_dp_rank` of its own, or without a key, keeps SGLang's placement.

Each scheduler also counts its requests per routing key (`served`, the `SERVED_KEYS` most
recent keys), shown as `routing_keys` in `/lragent/stats`: where each trajectory ran.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from typing import Any

from sglang.srt.constants import HEALTH_CHECK_RID_PREFIX

from lragent_sglang.server.config import selected

logger = logging.getLogger(__name__)

ROUTING_KEY_HEADER = "x-smg-routing-key"
CAPACITY = 65536
SERVED_KEYS = 256


class TrajectoryPlacement:
    """routing key -> DP rank, sticky, new keys to the rank holding the fewest keys."""

    def __init__(self, dp_size: int, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self.keys_per_rank = [0] * dp_size
        self.ranks: OrderedDict[str, int] = OrderedDict()
        self.lock = threading.Lock()

    def rank(self, key: str) -> int:
        with self.lock:
            rank = self.ranks.get(key)
            if rank is not None:
                self.ranks.move_to_end(key)
                return rank
            rank = min(range(len(self.keys_per_rank)), key=self.keys_per_rank.__getitem__)
            self.ranks[key] = rank
            self.keys_per_rank[rank] += 1
            if len(self.ranks) > self.capacity:
                _, old = self.ranks.popitem(last=False)
                self.keys_per_rank[old] -= 1
            return rank


class HashedPlacement:
    """routing key -> DP rank by a stable hash: every tokenizer process agrees, no state."""

    def __init__(self, dp_size: int) -> None:
        self.dp_size = dp_size

    def rank(self, key: str) -> int:
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % self.dp_size


def routing_key(obj: Any, request: Any) -> str | None:
    """The request's routing key: its `routing_key` field, else the header."""
    key = getattr(obj, "routing_key", None)
    if key is None and request is not None:
        key = request.headers.get(ROUTING_KEY_HEADER) or None
    return key


def placement_of(tm: Any) -> TrajectoryPlacement | HashedPlacement | None:
    """The tokenizer manager's placement (created on first use); None with one rank or
    where our backends are not selected."""
    if "lragent_placement" not in tm.__dict__:
        args = tm.server_args
        if args.dp_size < 2 or not selected(args):
            tm.lragent_placement = None
        elif args.tokenizer_worker_num > 1:
            tm.lragent_placement = HashedPlacement(args.dp_size)
        else:
            tm.lragent_placement = TrajectoryPlacement(args.dp_size)
    return tm.lragent_placement


def place_request(tm: Any, obj: Any, request: Any = None, *args: Any, **kwargs: Any) -> None:
    """BEFORE hook of `TokenizerManager.generate_request` (every generation route)."""
    key = routing_key(obj, request)
    if key is None or not hasattr(obj, "routed_dp_rank"):
        return
    obj.routing_key = key
    placement = placement_of(tm)
    if placement is not None and obj.routed_dp_rank is None:
        obj.routed_dp_rank = placement.rank(key)
        logger.debug("routing key %s -> DP rank %d", key, obj.routed_dp_rank)


class ServedKeys:
    """Requests per routing key that this process's scheduler received (bounded LRU)."""

    def __init__(self, capacity: int = SERVED_KEYS) -> None:
        self.capacity = capacity
        self.counts: OrderedDict[str, int] = OrderedDict()

    def add(self, key: str) -> None:
        self.counts[key] = self.counts.pop(key, 0) + 1
        if len(self.counts) > self.capacity:
            self.counts.popitem(last=False)


served = ServedKeys()


def count_request(result: Any, req: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER hook of `Req.__init__` (in the scheduler): count the request under its key."""
    key = getattr(req, "routing_key", None)
    if key is not None and not str(req.rid).startswith(HEALTH_CHECK_RID_PREFIX):
        served.add(key)
