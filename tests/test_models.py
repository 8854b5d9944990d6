"""The model families people serve (issue 14), as tiny random-weight checkpoints on the real
CPU server: every (family, scheme) cell either equals HF transformers + peft token for
token in float32 (no adapter and one adapter; cache flushed between, so the first writer
is the reader) or is refused at launch with one line naming the model type and feature.
Base-sharing cells also run three roles over a shared prefix and must report hits.

What a family changes is the attention layer and the projections around it, which every
scheme reaches through the same attention code on CPU (our torch backend, with the LR term
where the scheme has an LR cache). Each family runs base-lr-shared (that code with the LR
split, our tree and its shared prefix); Gemma-2 (soft-cap, windows, extra norms) runs all
four; the schemes' own differences are tested on SmolLM2 in test_schemes. This keeps the
matrix at 11 servers in CI instead of 32 (all 32 passed in the CI run of 2026-12-02).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import requests
from make_tiny_model import FAMILIES, hf_greedy_ids, make_tiny_adapters, random_prompts, write_tiny_model

from lragent_sglang.adapters.check import check_for_scheme, read_adapter
from lragent_sglang.adapters.io import AdapterError, ModelShapes, v_proj_a
from lragent_sglang.agents.server_process import ServerProcess
from lragent_sglang.scheme import Scheme

SCHEMES = [str(s) for s in Scheme]
NEW = 8
PROMPTS = random_prompts(2, lens=(40, 24))  # longer than the windowed families' window (16)
ROLES = ("plan", "action", "reflect")
# (family, feature named in the refusal) of the checkpoints no scheme can serve exactly.
REFUSED = {"mistral-window": "sliding_window"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (checkpoint, shared-A role adapters, HF references), made on first use."""
    root = tmp_path_factory.mktemp("models")
    made: dict[str, tuple[Path, dict[str, Path], dict[str | None, list[list[int]]]]] = {}

    def get(family: str):
        if family not in made:
            model = write_tiny_model(family, root / family)
            adapters = make_tiny_adapters(model, root / f"{family}-adapters", roles=ROLES, shared_v_a=True,
                                          zero_k_b=True)
            refs = {None: hf_greedy_ids(model, None, PROMPTS, NEW), "plan": hf_greedy_ids(model, adapters["plan"], PROMPTS, NEW)}
            made[family] = (model, adapters, refs)
        return made[family]

    return get


def server_args(model: Path, adapters: dict[str, Path], scheme: str) -> list[str]:
    return ["--model-path", str(model), "--dtype", "float32", "--enable-lora", "--max-loras-per-batch", "4",
            "--max-lora-rank", "8", "--lora-paths", *[f"{r}={p}" for r, p in adapters.items()],
            "--lragent-scheme", scheme, "--max-total-tokens", "4096"]


def greedy(srv: ServerProcess, ids: list[int], role: str | None, n: int = NEW) -> dict:
    payload = {"input_ids": ids, "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}}
    if role:
        payload["lora_path"] = role
    return srv.generate(**payload)


def flush(srv: ServerProcess) -> None:
    requests.post(srv.url + "/flush_cache", timeout=60).raise_for_status()


ALL_SCHEMES_FAMILY = "gemma2"
CELLS = [(family, scheme) for family in sorted(FAMILIES)
         for scheme in (SCHEMES if family == ALL_SCHEMES_FAMILY else
                        [str(Scheme.BASE_LR_SHARED)])]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("family, scheme", CELLS)
def test_family_equals_hf_peft_or_is_refused(family, scheme, tiny, run_launcher, assert_one_line_error):
    model, adapters, refs = tiny(family)
    args = server_args(model, adapters, scheme)
    if family in REFUSED:
        proc = run_launcher(args)
        assert_one_line_error(proc, FAMILIES[family].model_type, REFUSED[family])
        return
    with ServerProcess(args) as srv:
        base = [greedy(srv, ids, None)["output_ids"] for ids in PROMPTS]
        flush(srv)
        plan = [greedy(srv, ids, "plan")["output_ids"] for ids in PROMPTS]
        hits = {}
        if Scheme(scheme).shares_base:
            flush(srv)
            prefix = PROMPTS[0]
            greedy(srv, prefix, None, 1)  # the shared trajectory, written without an adapter
            for role in ROLES:
                greedy(srv, prefix + PROMPTS[1][:4], role, 2)
            stats = requests.get(srv.url + "/lragent/stats", timeout=30).json()["schedulers"][0]["per_adapter"]
            hits = {role: stats[role]["base_hit_tokens"] for role in ROLES}
    assert base == refs[None], "no adapter"
    assert plan == refs["plan"], "one adapter"
    assert all(hit >= len(PROMPTS[0]) for hit in hits.values()), hits


@pytest.mark.e2e
@pytest.mark.slow
def test_gemma2_config_written_with_hidden_activation_only_loads(tiny, tmp_path):
    """transformers 5 writes Gemma-2 configs without `hidden_act`; SGLang 0.5.17 read only
    that field and did not start (model_compat.gemma2_hidden_act)."""
    model, adapters, refs = tiny("gemma2")
    copy = tmp_path / "gemma2"
    shutil.copytree(model, copy)
    cfg = json.loads((copy / "config.json").read_text())
    del cfg["hidden_act"]
    (copy / "config.json").write_text(json.dumps(cfg))
    with ServerProcess(server_args(copy, adapters, str(Scheme.NON_SHARED))) as srv:
        assert [greedy(srv, ids, "plan")["output_ids"] for ids in PROMPTS] == refs["plan"]


def test_refusals_name_the_model_type_and_feature():
    """What the matrix expects of the refused families is what the launcher's check says."""
    from lragent_sglang.server.model_check import ModelError, check_model_config

    for family, feature in REFUSED.items():
        cfg = FAMILIES[family].build_config().to_dict()
        with pytest.raises(ModelError, match=f"{FAMILIES[family].model_type}.*{feature}"):
            check_model_config(cfg, Scheme.BASE_LR_SHARED, None, gpu=False)
        check_model_config(cfg, Scheme.BASE_LR_SHARED, cfg["sliding_window"], gpu=False)  # the window never applies


# ---- Phi-3's fused qkv_proj LoRA -------------------------------------------------------


@pytest.fixture(scope="module")
def phi3(tiny, tmp_path_factory):
    model, adapters, _ = tiny("phi3")
    with_keys = tmp_path_factory.mktemp("phi3-keys")
    keys = make_tiny_adapters(model, with_keys, roles=("keys",), zero_k_b=False)["keys"]
    return model, adapters, keys


def test_fused_qkv_adapter_serves_base_sharing_when_its_k_rows_are_zero(phi3):
    model, adapters, keys = phi3
    plan = read_adapter("plan", adapters["plan"], model)
    assert "k_proj" in plan.target_modules  # qkv_proj expanded
    check_for_scheme([plan, read_adapter("action", adapters["action"], model)], Scheme.BASE_LR_SHARED, 8)
    assert v_proj_a(adapters["plan"]), "the fused A is the v A"
    with pytest.raises(AdapterError, match="'keys'.*fused qkv_proj"):
        check_for_scheme([read_adapter("keys", keys, model)], Scheme.BASE_SHARED, 8)
    check_for_scheme([read_adapter("keys", keys, model)], Scheme.NON_SHARED, 8)


def test_make_role_adapters_writes_fused_qkv_for_phi3(phi3, tmp_path):
    from safetensors.torch import load_file

    from lragent_sglang.adapters.make import make_role_adapters

    model, _, _ = phi3
    paths = make_role_adapters(model, tmp_path, roles=("a", "b"), shared_v_a=True)
    cfg = json.loads((paths["a"] / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["qkv_proj"]
    shapes = ModelShapes.from_checkpoint(model)
    q, kv = shapes.num_heads * shapes.head_dim, shapes.num_kv_heads * shapes.head_dim
    b = load_file(str(paths["a"] / "adapter_model.safetensors"))["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"]
    assert b.shape == (q + 2 * kv, 8) and b[:q].any() and b[q + kv :].any() and not b[q : q + kv].any()
    check_for_scheme([read_adapter(n, p, model) for n, p in paths.items()], Scheme.BASE_LR_SHARED, 8)
