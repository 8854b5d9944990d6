"""The real SGLang server on CPU with the LRAgent backends selected, against HF + peft.

The roles here read the same prompts, so only the non-shared scheme (stock SGLang
behaviour through our backends) must equal HF token for token; the sharing schemes are
tested in test_schemes.py.
"""

from __future__ import annotations

import pytest
import requests
import torch

from lragent_sglang.agents.server_process import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPTS = [
    "The capital of France is",
    "List three uses of a calculator:",
    "Plan: find the population of Paris. Step 1:",
    "Reflect on the last answer and say what went wrong.",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def server(smollm2, role_adapters):
    lora = [f"{name}={path}" for name, path in role_adapters.items()]
    args = [
        "--model-path", str(smollm2), "--dtype", "float32",
        "--enable-lora", "--lora-paths", *lora, "--max-loras-per-batch", "4",
        "--max-lora-rank", "8", "--lragent-scheme", "non-shared",
    ]
    with ServerProcess(args) as srv:
        yield srv


def server_greedy(server, prompts: list[str], lora: str | None) -> list[list[int]]:
    payload = {
        "text": prompts,
        "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True},
    }
    if lora is not None:
        payload["lora_path"] = [lora] * len(prompts)
    return [r["output_ids"] for r in server.generate(**payload)]


@pytest.mark.parametrize("role", [None, "plan", "action", "reflect"])
def test_greedy_matches_hf_peft(server, smollm2, role_adapters, role, hf_greedy):
    expected = hf_greedy(smollm2, role_adapters.get(role), PROMPTS, NEW_TOKENS)
    assert server_greedy(server, PROMPTS, role) == expected


def test_roles_really_differ(server):
    outs = {role: server_greedy(server, PROMPTS, role) for role in (None, "plan", "action", "reflect")}
    distinct = {tuple(map(tuple, o)) for o in outs.values()}
    assert len(distinct) == 4, "role adapters must change the output"


def test_mixed_adapter_batch(server):
    roles = [None, "plan", "action", "reflect"]
    payload = {
        "text": [PROMPTS[0]] * 4,
        "lora_path": roles,
        "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True},
    }
    mixed = [r["output_ids"] for r in server.generate(**payload)]
    single = [server_greedy(server, [PROMPTS[0]], role)[0] for role in roles]
    assert mixed == single


def test_backends_are_ours(server):
    info = requests.get(server.url + "/server_info", timeout=30).json()
    assert info["attention_backend"] == "lragent"
    assert info["radix_cache_backend"] == "lragent"


def test_unknown_adapter_is_rejected_and_server_keeps_serving(server):
    resp = requests.post(
        server.url + "/generate",
        json={"text": "hi", "lora_path": "nope", "sampling_params": {"max_new_tokens": 2}},
        timeout=60,
    )
    assert resp.status_code == 400
    assert "nope" in resp.text
    assert server_greedy(server, PROMPTS[:1], "plan")


def test_bad_scheme_is_one_line_error(smollm2, run_launcher, assert_one_line_error):
    proc = run_launcher(["--model-path", str(smollm2), "--lragent-scheme", "half-shared"])
    assert_one_line_error(proc, "--lragent-scheme", "half-shared")


def test_missing_adapter_path_is_one_line_error(smollm2, tmp_path, run_launcher, assert_one_line_error):
    missing = tmp_path / "no-such-adapter"
    proc = run_launcher(["--model-path", str(smollm2), "--enable-lora", "--lora-paths", f"plan={missing}"])
    assert_one_line_error(proc, "'plan'", str(missing))


def test_unknown_target_module_is_one_line_error(smollm2, tmp_path, run_launcher, assert_one_line_error):
    from lragent_sglang.adapters.make import make_role_adapters

    path = make_role_adapters(smollm2, tmp_path, roles=("odd",), target_modules=("q_proj",))["odd"]
    cfg = (path / "adapter_config.json").read_text().replace('"q_proj"', '"c_attn"')
    (path / "adapter_config.json").write_text(cfg)
    proc = run_launcher(["--model-path", str(smollm2), "--enable-lora", "--lora-paths", f"odd={path}"])
    assert_one_line_error(proc, "'odd'", "'c_attn'")


def test_stock_sglang_launcher_starts_with_our_backends(smollm2, role_adapters, hf_greedy):
    """`python -m sglang.launch_server --attention-backend lragent --radix-cache-backend
    lragent` works through the plugin entry point alone (CPU patches included)."""
    args = [
        "--model-path", str(smollm2), "--device", "cpu", "--dtype", "float32",
        "--attention-backend", "lragent", "--radix-cache-backend", "lragent",
        "--enable-lora", "--lora-paths", f"plan={role_adapters['plan']}",
        "--lora-backend", "torch_native", "--max-total-tokens", "4096",
    ]
    env = {"LRAGENT_SCHEME": "base-lr-shared"}
    with ServerProcess(args, module="sglang.launch_server", env=env) as srv:
        out = srv.generate(
            text=PROMPTS[2], lora_path="plan",
            sampling_params={"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True},
        )
        stats = requests.get(srv.url + "/server_info", timeout=30).json()["internal_states"][0]["lragent"]
    assert out["output_ids"] == hf_greedy(smollm2, role_adapters["plan"], PROMPTS[2:3], NEW_TOKENS)[0]
    assert stats["scheme"] == "base-lr-shared" and stats["lr"]["tokens"] > 0
