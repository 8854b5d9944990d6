"""Hot-swapped adapters never read LR rows computed with other weights (issue 17), on the
real CPU server: the LR cache is keyed by adapter content (base-shared) or by the group
basis (base-lr-shared), not by name.
"""

from __future__ import annotations

import shutil

import pytest
import requests
import torch
from safetensors.torch import load_file, save_file

from lragent_sglang.adapters.make import make_role_adapters
from lragent_sglang.agents.server_process import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPT = "Plan: find the population of Paris and the height of the Eiffel Tower. Step 1:"
NEW = 8


def base_args(smollm2, scheme: str) -> list[str]:
    return ["--model-path", str(smollm2), "--dtype", "float32", "--enable-lora", "--max-loras-per-batch", "4",
            "--max-lora-rank", "8", "--lora-target-modules", "q_proj", "v_proj", "--lragent-scheme", scheme]


def load(srv: ServerProcess, name: str, path) -> None:
    resp = requests.post(srv.url + "/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=300)
    assert resp.status_code == 200, resp.text


def unload(srv: ServerProcess, name: str) -> None:
    resp = requests.post(srv.url + "/unload_lora_adapter", json={"lora_name": name}, timeout=300)
    assert resp.status_code == 200, resp.text


def greedy(srv: ServerProcess, text: str, adapter: str | None) -> dict:
    payload = {"text": text, "sampling_params": {"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}}
    if adapter:
        payload["lora_path"] = adapter
    return srv.generate(**payload)


def per_adapter(srv: ServerProcess) -> dict:
    return requests.get(srv.url + "/lragent/stats", timeout=30).json()["schedulers"][0]["per_adapter"]


def last_layer_only(path) -> None:
    """Zero every LoRA tensor below the last layer: then K and V_base are the base model's
    in every layer whoever wrote them, so sharing them is exact and a wrong output can only
    come from LR rows computed with other weights."""
    file = path / "adapter_model.safetensors"
    weights = load_file(str(file))
    last = max(int(k.split("layers.")[1].split(".")[0]) for k in weights)
    save_file({k: (t if f"layers.{last}." in k else torch.zeros_like(t)) for k, t in weights.items()}, str(file))


@pytest.fixture(scope="module")
def weights(smollm2, tmp_path_factory):
    """Two different 'plan' adapters (LoRA on the last layer only) and a byte copy of the
    first under another name."""
    root = tmp_path_factory.mktemp("reload")
    paths = {v: make_role_adapters(smollm2, root / v, roles=("plan",), b_std=1.0, seed=i)["plan"]
             for i, v in enumerate(("v1", "v2"), start=1)}
    for path in paths.values():
        last_layer_only(path)
    paths["copy"] = shutil.copytree(paths["v1"], root / "copy")
    return paths


def test_base_shared_reload_reads_no_stale_lr_and_a_copy_reuses_it(smollm2, weights, hf_greedy):
    with ServerProcess(base_args(smollm2, "base-shared")) as srv:
        load(srv, "plan", weights["v1"])
        first = greedy(srv, PROMPT, "plan")["output_ids"]
        unload(srv, "plan")
        load(srv, "plan", weights["v2"])
        before = per_adapter(srv).get("plan", {}).get("lr_hit_tokens", 0)
        reloaded = greedy(srv, PROMPT, "plan")["output_ids"]
        stale_hits = per_adapter(srv)["plan"]["lr_hit_tokens"] - before
        load(srv, "copy", weights["copy"])
        copy = greedy(srv, PROMPT, "copy")
        copy_hits = per_adapter(srv)["copy"]["lr_hit_tokens"]
    assert first == hf_greedy(smollm2, weights["v1"], [PROMPT], NEW)[0]
    assert reloaded == hf_greedy(smollm2, weights["v2"], [PROMPT], NEW)[0] and reloaded != first
    assert stale_hits == 0, "the reloaded weights must not read the old weights' LR rows"
    assert copy["output_ids"] == first
    assert copy_hits > 0 and copy["meta_info"]["cached_tokens"] == copy_hits, "same content, same LR rows"


def test_base_lr_shared_group_founded_late_reads_no_rows_from_before(smollm2, weights, hf_greedy):
    """No --lora-paths: requests before the first adapter have no group basis (their LR
    rows would be zeros); the first adapter founds the group and must not read them."""
    with ServerProcess(base_args(smollm2, "base-lr-shared")) as srv:
        greedy(srv, PROMPT, None)
        load(srv, "plan", weights["v1"])
        out = greedy(srv, PROMPT, "plan")["output_ids"]
    assert out == hf_greedy(smollm2, weights["v1"], [PROMPT], NEW)[0]
