"""`--enable-hierarchical-cache` with our backends (issue 16).

Refusals: settings a scheme cannot serve exactly are one-line launcher errors naming the
flag and the scheme. On the real CPU server: base-lr-shared with a host tier evicts
trajectories to host memory under a small KV pool (`--max-total-tokens`) and loads them
back, and its greedy outputs equal the same trace on a server without the host tier,
token for token; statistics count the host tier; `/flush_cache` empties every pool.

The reference server's pool holds the whole trace, so both servers reuse the same
prefixes (the host tier's by loading them back) and compute the same suffixes: a prefix
recomputed instead of reused may differ in the last bits of float32 and flip a greedy
near-tie on random tokens, which would say nothing about the host tier.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import requests

from lragent_sglang.adapters.make import make_role_adapters
from lragent_sglang.agents.server_process import ServerProcess
from lragent_sglang.scheme import ConfigError, Scheme
from lragent_sglang.server.hicache_check import check_hicache

POOL = 256  # KV tokens: the trace's three trajectories need 300 after the first round
TRAJECTORIES = 3
ROUNDS = 2
NEW_TOKENS = 4
ROLES = ("plan", "action", "reflect")


def hicache_args(**kw: object) -> SimpleNamespace:
    base = dict(enable_hierarchical_cache=True, hicache_storage_backend=None, hicache_mem_layout="page_first")
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("scheme", list(Scheme))
def test_check_hicache_per_scheme(scheme):
    check_hicache(scheme, hicache_args(), cpu=True)
    check_hicache(scheme, hicache_args(enable_hierarchical_cache=False, hicache_storage_backend="file"), cpu=True)
    storage = hicache_args(hicache_storage_backend="file")
    if scheme.shares_base:
        with pytest.raises(ConfigError, match=f"--hicache-storage-backend file .*--lragent-scheme {scheme}"):
            check_hicache(scheme, storage, cpu=False)
    else:
        check_hicache(scheme, storage, cpu=False)
    with pytest.raises(ConfigError, match=f"--hicache-mem-layout page_head .*--lragent-scheme {scheme}"):
        check_hicache(scheme, hicache_args(hicache_mem_layout="page_head"), cpu=True)
    check_hicache(scheme, hicache_args(hicache_mem_layout="page_head"), cpu=False)


def test_launcher_refuses_storage_tier_under_base_sharing(smollm2, run_launcher, assert_one_line_error):
    proc = run_launcher(["--model-path", str(smollm2), "--lragent-scheme", "base-lr-shared",
                         "--enable-hierarchical-cache", "--hicache-storage-backend", "file"])
    assert_one_line_error(proc, "--hicache-storage-backend file", "--lragent-scheme base-lr-shared")


def trace() -> list[tuple[int, str, list[int]]]:
    """(trajectory, role, new prompt tokens) per request: every trajectory grows by one
    step per round, so a later round reads prefixes that were evicted meanwhile."""
    rng = random.Random(16)
    steps = []
    for r in range(ROUNDS):
        for t in range(TRAJECTORIES):
            new = [rng.randrange(1000, 40000) for _ in range(96 if r == 0 else 24)]
            steps.append((t, ROLES[(r + t) % len(ROLES)], new))
    return steps


def run(srv: ServerProcess) -> tuple[list[list[int]], list[int]]:
    """Greedy outputs of the trace, one request at a time, and each request's cached tokens."""
    trajs: dict[int, list[int]] = {}
    outs, cached = [], []
    for t, role, new in trace():
        trajs[t] = trajs.get(t, []) + new
        out = requests.post(srv.url + "/generate", timeout=300, json={
            "input_ids": trajs[t], "lora_path": role,
            "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}}).json()
        outs.append(out["output_ids"])
        cached.append(out["meta_info"]["cached_tokens"])
        trajs[t] += out["output_ids"]
    return outs, cached


def stats(srv: ServerProcess) -> dict:
    return requests.get(srv.url + "/lragent/stats", timeout=30).json()["schedulers"][0]


@pytest.fixture(scope="module")
def shared_a(smollm2, tmp_path_factory):
    return make_role_adapters(smollm2, tmp_path_factory.mktemp("hicache"), shared_v_a=True, b_std=0.3)


@pytest.fixture(scope="module")
def runs(smollm2, shared_a):
    """The trace on base-lr-shared without and with the host tier (one server at a time)."""
    lora = [f"{name}={path}" for name, path in shared_a.items()]
    common = ["--model-path", str(smollm2), "--dtype", "float32", "--enable-lora", "--lora-paths", *lora,
              "--max-loras-per-batch", "4", "--max-lora-rank", "8", "--lragent-scheme", "base-lr-shared"]
    out = {}
    for name, extra in (("device", ["--max-total-tokens", str(8 * POOL)]),
                        ("host", ["--max-total-tokens", str(POOL), "--enable-hierarchical-cache",
                                  "--hicache-ratio", "4"])):
        with ServerProcess(common + extra) as srv:
            outputs, cached = run(srv)
            after = stats(srv)
            assert requests.post(srv.url + "/flush_cache", timeout=60).status_code == 200
            out[name] = SimpleNamespace(outputs=outputs, cached=cached, stats=after, flushed=stats(srv))
    return out


@pytest.mark.e2e
@pytest.mark.slow
def test_host_tier_loads_back_and_outputs_equal_the_device_only_run(runs):
    device, host = runs["device"], runs["host"]
    assert device.stats["base"]["evicted_tokens"] == 0
    assert host.stats["base"]["evicted_tokens"] > 0, "the trace must overflow the small pool"
    assert host.stats["host"]["written_tokens"] > 0 and host.stats["host"]["loaded_back_tokens"] > 0
    assert host.cached == device.cached, "every prefix the big pool keeps comes back from host memory"
    assert host.outputs == device.outputs
    for run_, pool in ((device, 8 * POOL), (host, POOL)):
        flushed = run_.flushed
        assert flushed["kv_pool_available"] >= pool - 1 and flushed["lr_pool_available"] == flushed["lr_pool_size"]
    assert host.flushed["host"]["tokens"] == 0
    assert host.flushed["host"]["pool_available_tokens"] == host.flushed["host"]["pool_tokens"]
