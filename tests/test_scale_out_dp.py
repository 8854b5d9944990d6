"""One SmolLM2 server with `--dp-size 2` (base-lr-shared), issue 15: SGLang's own DP
placement splits a trajectory over ranks; with the routing key (`LRAgentEndpoint`'s header)
our placement keeps each trajectory on one rank, with a single rank's cached fraction;
`/lragent/stats` lists both ranks and their sum, and the Prometheus series carry SGLang's
`dp_rank` label.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
import requests

from lragent_sglang.agents.server_process import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_scale_out_router import run_agents, worker_flags  # noqa: E402


@pytest.fixture(scope="module")
def dp_server(smollm2, tmp_path_factory):
    from lragent_sglang.adapters.make import make_role_adapters

    adapters = make_role_adapters(smollm2, tmp_path_factory.mktemp("shared-a"), shared_v_a=True)
    with ServerProcess([*worker_flags(smollm2, adapters), "--dp-size", "2", "--enable-metrics"],
                       log_path=tmp_path_factory.mktemp("dp") / "server.log") as srv:
        yield srv


def stats(srv) -> dict:
    return requests.get(srv.url + "/lragent/stats", timeout=30).json()


def ranks_of(key: str, body: dict) -> list[int]:
    return [s["dp_rank"] for s in body["schedulers"] if key in s.get("routing_keys", {})]


def per_rank_requests(body: dict) -> list[int]:
    return [sum(a["requests"] for a in s.get("per_adapter", {}).values()) for s in body["schedulers"]]


def test_dp_placement(dp_server, run_keyed_trajectories):
    run = uuid.uuid4().hex[:8]
    requests.post(dp_server.url + "/flush_cache", timeout=60).raise_for_status()
    single = run_keyed_trajectories(dp_server.url, [1], lambda s: f"one-{run}", override_rank=0)["fraction"]

    requests.post(dp_server.url + "/flush_cache", timeout=60).raise_for_status()
    before = per_rank_requests(stats(dp_server))
    stock = run_keyed_trajectories(dp_server.url, [1], lambda s: None)  # SGLang's round robin
    split = [a - b for a, b in zip(per_rank_requests(stats(dp_server)), before)]
    assert all(n > 0 for n in split), split
    assert stock["fraction"] < single - 0.05, (stock["fraction"], single)

    requests.post(dp_server.url + "/flush_cache", timeout=60).raise_for_status()
    placed = run_keyed_trajectories(dp_server.url, [1, 2, 3, 4], lambda s: f"dp-{run}-{s}")
    body = stats(dp_server)
    assert all(len(ranks_of(k, body)) == 1 for k in placed["keys"])
    assert {r for k in placed["keys"] for r in ranks_of(k, body)} == {0, 1}
    assert placed["fraction"] == pytest.approx(single, abs=1e-9)

    known = {k for s in body["schedulers"] for k in s.get("routing_keys", {})}
    run_agents(dp_server.url, 3)
    body = stats(dp_server)
    agent_keys = {k for s in body["schedulers"] for k in s.get("routing_keys", {})} - known
    assert len(agent_keys) == 3
    assert all(len(ranks_of(k, body)) == 1 for k in agent_keys)

    assert [s["dp_rank"] for s in body["schedulers"]] == [0, 1]
    total = body["total"]["per_adapter"]
    for name, entry in total.items():
        assert entry["prompt_tokens"] == sum(s["per_adapter"].get(name, {}).get("prompt_tokens", 0)
                                             for s in body["schedulers"])
    metrics = requests.get(dp_server.url + "/metrics", timeout=30).text
    ranks = {line.split('dp_rank="')[1][0] for line in metrics.splitlines()
             if line.startswith("sglang:lragent_requests_total{")}
    assert ranks == {"0", "1"}


def test_dp_attention_refused(run_launcher, assert_one_line_error, smollm2):
    proc = run_launcher(["--model-path", str(smollm2), "--dp-size", "2", "--enable-dp-attention"])
    assert_one_line_error(proc, "--enable-dp-attention")
