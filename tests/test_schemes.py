"""The four sharing schemes inside the real SGLang server (CPU, SmolLM2, float32).

One server per scheme runs: roles over a no-adapter prefix commit; single-adapter and
no-adapter requests that must equal HF + peft exactly (the first writer is the reader
itself); a small plan/action/reflect trace on the server's own outputs (hit rates); the
same trace with prompts fixed to the non-shared run's trajectory (outputs compared step by
step); the trace without adapters; malformed requests.
"""

from __future__ import annotations

import threading

import pytest
import requests

from lragent_sglang.adapters.make import make_role_adapters
from lragent_sglang.agents.server_process import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SCHEMES = ("non-shared", "full-shared", "base-shared", "base-lr-shared")
# One adapter (or none) per prompt family: then the first writer is the reader itself.
SINGLE = {
    "plan": ["Zebras in the savanna", "Zebras in the savanna graze at dawn while lions"],
    None: ["Quokkas on the island", "Quokkas on the island smile at every visitor who"],
}
NEW = 12


@pytest.fixture(scope="module")
def adapters(smollm2, tmp_path_factory):
    """Shared-A role adapters (every scheme can serve them) that differ strongly."""
    return make_role_adapters(smollm2, tmp_path_factory.mktemp("schemes"), shared_v_a=True, b_std=0.3)


def server_args(smollm2, adapters, scheme: str, *extra: str) -> list[str]:
    return [
        "--model-path", str(smollm2), "--dtype", "float32", "--enable-lora",
        "--lora-paths", *[f"{r}={p}" for r, p in adapters.items()],
        "--max-loras-per-batch", "4", "--max-lora-rank", "8", "--lragent-scheme", scheme, *extra,
    ]


def gen(srv: ServerProcess, ids: list[int], role: str | None, n: int) -> dict:
    payload = {"input_ids": ids, "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}}
    if role:
        payload["lora_path"] = role
    return srv.generate(**payload)


def lragent_stats(srv: ServerProcess) -> dict:
    return requests.get(srv.url + "/lragent/stats", timeout=30).json()["schedulers"][0]


@pytest.fixture(scope="module")
def runs(smollm2, adapters, tokenizer_ids, run_trace):
    results: dict[str, dict] = {}
    forced = None
    for scheme in SCHEMES:
        with ServerProcess(server_args(smollm2, adapters, scheme)) as srv:
            res: dict = {"single": {}, "after_commit": after_commit(srv)}
            for role, id_lists in tokenizer_ids.items():
                res["single"][role] = [gen(srv, ids, role, NEW)["output_ids"] for ids in id_lists]
            res["roles"] = run_trace(srv, seed=1, roles=True, forced=None)
            res["forced"] = run_trace(srv, seed=3, roles=True, forced=forced)
            res["plain"] = run_trace(srv, seed=2, roles=False, forced=None)
            res["bad"] = malformed_requests(srv)
            results[scheme] = res
            if forced is None:
                forced = res["forced"]["outputs"]
    return results


@pytest.fixture(scope="module")
def tokenizer_ids(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    return {role: [tok(p).input_ids for p in prompts] for role, prompts in SINGLE.items()}


@pytest.fixture(scope="module")
def hf_single(smollm2, adapters, hf_greedy):
    return {role: hf_greedy(smollm2, adapters[role] if role else None, prompts, NEW)
            for role, prompts in SINGLE.items()}


def after_commit(srv: ServerProcess) -> dict:
    """A fork-style prefix commit without adapter, then each role over it, first thing
    after start-up (before any batch has used an adapter)."""
    ids = [77, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 312]
    gen(srv, ids, None, 0)
    return {role: gen(srv, ids, role, 6)["output_ids"] for role in (None, "plan", "action")}


def malformed_requests(srv: ServerProcess) -> list[int]:
    bad = [
        {"text": "hi", "lora_path": "no-such-role", "sampling_params": {"max_new_tokens": 2}},
        {"text": "hi", "sampling_params": {"max_new_tokens": -3}},
        {"input_ids": "not a list of ids", "sampling_params": {"max_new_tokens": 2}},
    ]
    codes = [requests.post(srv.url + "/generate", json=b, timeout=60).status_code for b in bad]
    gen(srv, [5, 6, 7], "plan", 2)  # still serving
    return codes


@pytest.mark.parametrize("scheme", SCHEMES)
def test_single_adapter_and_no_adapter_equal_hf(runs, hf_single, scheme):
    assert runs[scheme]["single"] == hf_single


@pytest.mark.parametrize("scheme", SCHEMES)
def test_roles_over_a_no_adapter_commit_are_not_the_base_model(runs, scheme):
    outs = runs[scheme]["after_commit"]
    assert outs["plan"] != outs[None] and outs["action"] != outs[None] and outs["plan"] != outs["action"]


@pytest.mark.parametrize("scheme", ["full-shared", "base-shared", "base-lr-shared"])
def test_base_hit_fraction_at_least_no_adapter_run(runs, scheme):
    plain = runs["non-shared"]["plain"]
    no_adapter = plain["cached"] / plain["prompt"]
    roles = runs[scheme]["roles"]
    if scheme == "full-shared":
        hit = roles["cached"] / roles["prompt"]
    else:
        hit = roles["stats"]["base_hit_tokens"] / roles["stats"]["requested_tokens"]
    assert no_adapter > 0.5
    assert hit >= no_adapter


def test_non_shared_hits_less_than_sharing(runs):
    roles = runs["non-shared"]["roles"]
    assert roles["cached"] / roles["prompt"] < runs["full-shared"]["roles"]["cached"] / roles["prompt"]


def test_base_shared_reports_lr_prefill(runs):
    stats = runs["base-shared"]["roles"]["stats"]
    assert stats["lr_gap_tokens"] > 0
    assert stats["lr_hit_tokens"] + stats["lr_gap_tokens"] == stats["base_hit_tokens"]


def test_base_lr_shared_reprefills_nothing(runs):
    roles = runs["base-lr-shared"]["roles"]
    assert roles["stats"]["lr_gap_tokens"] == 0
    assert roles["stats"]["lr_hit_tokens"] == roles["stats"]["base_hit_tokens"]
    assert roles["cached"] >= roles["stats"]["base_hit_tokens"] - len(roles["outputs"])


def divergence(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x != y for sa, sb in zip(a, b) for x, y in zip(sa, sb))


def test_full_shared_diverges_more_than_base_shared(runs):
    ref = runs["non-shared"]["forced"]["outputs"]
    full = divergence(runs["full-shared"]["forced"]["outputs"], ref)
    base = divergence(runs["base-shared"]["forced"]["outputs"], ref)
    assert full > base, (full, base)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_malformed_requests_get_client_errors(runs, scheme):
    assert all(400 <= code < 500 for code in runs[scheme]["bad"]), runs[scheme]["bad"]


def test_tiny_pool_completes_and_leaks_nothing(smollm2, adapters, run_trace):
    args = server_args(smollm2, adapters, "base-shared", "--max-total-tokens", "700")
    with ServerProcess(args) as srv:
        errors: list[BaseException] = []

        def trajectory(seed: int) -> None:
            try:
                run_trace(srv, seed=seed, roles=True, forced=None)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=trajectory, args=(s,)) for s in (10, 11, 12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not errors, errors
        evicted = lragent_stats(srv)["base"]["evicted_tokens"]
        assert requests.post(srv.url + "/flush_cache", timeout=60).status_code == 200
        stats = lragent_stats(srv)
        capacity = requests.get(srv.url + "/server_info", timeout=30).json()["max_total_num_tokens"]
    assert evicted > 0
    assert stats["base"]["tokens"] == 0 and stats["lr"]["tokens"] == 0
    assert stats["kv_pool_available"] == capacity
    assert stats["lr_pool_available"] == stats["lr_pool_size"]


def test_scheme_input_errors_are_one_line(smollm2, tmp_path, run_launcher, assert_one_line_error):
    independent = make_role_adapters(smollm2, tmp_path / "ind", roles=("plan", "action"))
    lora = ["--enable-lora", "--lora-paths", *[f"{r}={p}" for r, p in independent.items()]]
    proc = run_launcher(["--model-path", str(smollm2), *lora, "--lragent-scheme", "base-lr-shared"])
    assert_one_line_error(proc, "'plan'", "'action'", "v_proj A")
    kproj = make_role_adapters(smollm2, tmp_path / "k", roles=("keys",), target_modules=("q_proj", "k_proj", "v_proj"))
    proc = run_launcher(["--model-path", str(smollm2), "--enable-lora", "--lora-paths",
                         f"keys={kproj['keys']}", "--lragent-scheme", "base-shared"])
    assert_one_line_error(proc, "'keys'", "k_proj")
    big = make_role_adapters(smollm2, tmp_path / "big", roles=("big",), rank=16)
    proc = run_launcher(["--model-path", str(smollm2), "--enable-lora", "--lora-paths",
                         f"big={big['big']}", "--max-lora-rank", "8"])
    assert_one_line_error(proc, "'big'", "rank 16", "--max-lora-rank 8")
