"""Two SmolLM2 workers (base-lr-shared) behind the real SGLang router (PyPI sglang-router
0.3.2), issue 15: where each policy sends the requests of one trajectory, and that the
`manual` policy with the routing key `LRAgentEndpoint` sends keeps every trajectory on one
worker, with the cached fraction of a single server.

The workers are shared by the module; each test starts its own router over them (a few
seconds) and flushes the workers first. Where a request ran is read from each worker's
`/lragent/stats` `routing_keys` (requests per routing key).
"""

from __future__ import annotations

import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from lragent_sglang.agents.cluster import RouterProcess
from lragent_sglang.agents.frontend import LRAgentEndpoint
from lragent_sglang.agents.server_process import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from example_agent import QUESTIONS, run_agent  # noqa: E402

ROUTER_FLAGS = ("--disable-health-check", "--disable-circuit-breaker")


@pytest.fixture(scope="module")
def shared_a_adapters(smollm2, tmp_path_factory):
    from lragent_sglang.adapters.make import make_role_adapters

    return make_role_adapters(smollm2, tmp_path_factory.mktemp("shared-a"), shared_v_a=True)


def worker_flags(model, adapters) -> list[str]:
    return ["--model-path", str(model), "--dtype", "float32", "--enable-lora",
            "--lora-paths", *(f"{n}={p}" for n, p in adapters.items()), "--max-loras-per-batch", "4",
            "--max-lora-rank", "8", "--max-total-tokens", "8192", "--lragent-scheme", "base-lr-shared"]


@pytest.fixture(scope="module")
def workers(smollm2, shared_a_adapters, tmp_path_factory):
    logs = tmp_path_factory.mktemp("workers")
    procs = [ServerProcess(worker_flags(smollm2, shared_a_adapters), log_path=logs / f"w{i}.log") for i in range(2)]
    try:
        for proc in procs:
            proc.start()
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def flush(workers) -> None:
    for w in workers:
        requests.post(w.url + "/flush_cache", timeout=60).raise_for_status()


def keys_by_worker(workers) -> list[dict[str, int]]:
    return [requests.get(w.url + "/lragent/stats", timeout=30).json()["total"].get("routing_keys", {})
            for w in workers]


def workers_of(key: str, tallies: list[dict[str, int]]) -> list[int]:
    return [i for i, t in enumerate(tallies) if key in t]


@pytest.fixture(scope="module")
def single_server_fraction(workers, run_keyed_trajectories):
    """The cached fraction of the trace on one server (worker 0 alone)."""
    flush(workers)
    return run_keyed_trajectories(workers[0].url, [1], lambda s: None)["fraction"]


def router(workers, policy: str, tmp_path) -> RouterProcess:
    flush(workers)
    return RouterProcess([w.url for w in workers], policy, ROUTER_FLAGS, log_path=tmp_path / "router.log").start()


def fresh(tag: str):
    run = uuid.uuid4().hex[:8]
    return lambda seed: f"{tag}-{run}-{seed}"


def run_agents(url: str, n: int) -> None:
    """`n` example-agent trajectories at once through `LRAgentEndpoint` (the agent unchanged)."""
    def one(question: str) -> None:
        run_agent(question, LRAgentEndpoint(url, chat_template_name="chatml"), max_steps=1, max_new_tokens=6)

    with ThreadPoolExecutor(n) as pool:  # the first failure is raised once all are done
        list(pool.map(one, QUESTIONS[:n]))


def test_round_robin_splits_a_trajectory(workers, single_server_fraction, run_keyed_trajectories, tmp_path):
    """Today, round_robin: consecutive requests of one trajectory go to alternate workers,
    so each worker's tree misses the prefix the other holds."""
    with_router = router(workers, "round_robin", tmp_path)
    try:
        run = run_keyed_trajectories(with_router.url, [1], fresh("rr"))
    finally:
        with_router.stop()
    assert workers_of(run["keys"][0], keys_by_worker(workers)) == [0, 1]
    assert run["fraction"] < single_server_fraction - 0.05, (run["fraction"], single_server_fraction)


def test_cache_aware_follows_text_not_ids(workers, run_keyed_trajectories, tmp_path):
    """Today, cache_aware: its radix tree is over request text per model and ignores
    lora_path, so a text trajectory (example agent, roles on adapters) stays on one worker
    while the load is balanced; input_ids requests have no text to match, so every one goes
    to the least-loaded worker (at idle, one and the same), whatever its trajectory."""
    with_router = router(workers, "cache_aware", tmp_path)
    try:
        before = keys_by_worker(workers)
        run_agents(with_router.url, 2)
        tallies = keys_by_worker(workers)
        agent_keys = {k for t in tallies for k in t} - {k for t in before for k in t}
        # one at a time, so every request finds both workers idle
        keys = fresh("ids")
        ids = [run_keyed_trajectories(with_router.url, [seed], keys)["keys"][0] for seed in (1, 2)]
    finally:
        with_router.stop()
    assert len(agent_keys) == 2, agent_keys
    assert all(len(workers_of(k, tallies)) == 1 for k in agent_keys), [workers_of(k, tallies) for k in agent_keys]
    after = keys_by_worker(workers)
    # no text to match: at idle one worker takes every request, whatever its trajectory (which
    # one varied between runs: worker 0 once, worker 1 once)
    placed = [workers_of(k, after) for k in ids]
    assert placed[0] == placed[1] and len(placed[0]) == 1, placed


def test_manual_policy_places_each_trajectory(workers, single_server_fraction, run_keyed_trajectories, tmp_path):
    """Our placement: the manual policy routes by the X-SMG-Routing-Key header; every
    trajectory stays on one worker (new keys go to the worker with the fewest) and the
    cached fraction across workers equals a single server's."""
    with_router = router(workers, "manual", tmp_path)
    try:
        run = run_keyed_trajectories(with_router.url, [1, 2, 3, 4], fresh("manual"))
        before = keys_by_worker(workers)
        run_agents(with_router.url, 3)
    finally:
        with_router.stop()
    tallies = keys_by_worker(workers)
    assert all(len(workers_of(k, tallies)) == 1 for k in run["keys"])
    assert {w for k in run["keys"] for w in workers_of(k, tallies)} == {0, 1}
    assert run["fraction"] == pytest.approx(single_server_fraction, abs=1e-9)
    agent_keys = {k for t in tallies for k in t} - {k for t in before for k in t}
    assert len(agent_keys) == 3  # one key per trajectory: forks inherit it
    assert all(len(workers_of(k, tallies)) == 1 for k in agent_keys)
