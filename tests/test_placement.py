"""Trajectory placement over data-parallel ranks (issue 15), on fakes of SGLang's
tokenizer manager and request objects: the hook that sets `routed_dp_rank`, in every
process layout SGLang runs it in."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lragent_sglang.server import placement
from lragent_sglang.server.config import BACKEND_NAME


def tokenizer_manager(dp_size: int = 2, workers: int = 1, backend: str = BACKEND_NAME) -> SimpleNamespace:
    args = SimpleNamespace(dp_size=dp_size, tokenizer_worker_num=workers, attention_backend=backend,
                           radix_cache_backend=backend)
    return SimpleNamespace(server_args=args)


def placed(tm: SimpleNamespace, key: str | None = None, header: str | None = None,
           routed_dp_rank: int | None = None) -> SimpleNamespace:
    """A generate request after the hook: `routing_key` field or the router's header."""
    obj = SimpleNamespace(routing_key=key, routed_dp_rank=routed_dp_rank)
    request = SimpleNamespace(headers={placement.ROUTING_KEY_HEADER: header} if header else {})
    placement.place_request(tm, obj, request)
    return obj


def test_one_rank_per_key_and_new_keys_spread_evenly():
    tm = tokenizer_manager(dp_size=2)
    first = [placed(tm, key=f"t{i}").routed_dp_rank for i in range(4)]
    assert sorted(first) == [0, 0, 1, 1]
    again = [placed(tm, header=f"t{i}").routed_dp_rank for i in range(4)]
    assert again == first, "the header and the field name the same trajectory"
    assert placed(tm, header="h").routing_key == "h", "the scheduler counts the header's key"


def test_without_a_key_or_with_a_rank_sglang_places_it():
    tm = tokenizer_manager(dp_size=2)
    assert placed(tm).routed_dp_rank is None
    assert placed(tm, key="t", routed_dp_rank=1).routed_dp_rank == 1
    assert placed(tokenizer_manager(dp_size=1), key="t").routed_dp_rank is None
    assert placed(tokenizer_manager(backend="triton"), key="t").routed_dp_rank is None


@pytest.mark.parametrize("dp_size", [2, 3, 8])
def test_several_tokenizer_workers_agree_on_every_key(dp_size: int):
    """Each tokenizer worker is a process with its own hook state: a key must reach one
    rank whichever worker it lands on, and keys still spread over all ranks."""
    first, second = (tokenizer_manager(dp_size=dp_size, workers=2) for _ in range(2))
    keys = [f"traj-{i}" for i in range(200)]
    ranks = {k: placed(first, key=k).routed_dp_rank for k in keys}
    assert {k: placed(second, key=k).routed_dp_rank for k in reversed(keys)} == ranks, "seen in another order"
    assert set(ranks.values()) == set(range(dp_size))


def test_the_map_forgets_the_oldest_keys_beyond_its_capacity():
    p = placement.TrajectoryPlacement(dp_size=2, capacity=2)
    p.rank("a"), p.rank("b"), p.rank("a"), p.rank("c")
    assert list(p.ranks) == ["a", "c"] and sum(p.keys_per_rank) == 2
