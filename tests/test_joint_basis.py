"""`--lragent-lr-basis joint`: one LR cache for independently initialised adapters.

The math on random float64 tensors (the rewritten B_i C_i over the joint basis reproduces
every adapter's x A_i^T B_i^T to 1e-10), then one real base-lr-shared server (CPU,
SmolLM2, float32) with independent adapters: single-adapter greedy outputs equal HF +
peft (which the non-shared server equals token for token, see test_schemes), a 3-role
trace re-prefills nothing, and a later adapter is refused or served by the start-up basis.
"""

from __future__ import annotations

import shutil

import pytest
import requests
import torch
from safetensors.torch import load_file, save_file

from lragent_sglang.adapters.make import make_role_adapters
from lragent_sglang.adapters.joint_basis import (
    OutsideJointBasis,
    SharedAMismatch,
    coefficients,
    group_b,
    joint_group,
    shared_a_group,
)
from lragent_sglang.agents.server_process import ServerProcess

RANK, HIDDEN, OUT, LAYERS = 8, 64, 48, 3


def random_adapters(n: int, seed: int = 0) -> list[tuple[str, dict[int, torch.Tensor], dict[int, torch.Tensor]]]:
    """(name, A per layer [r, hidden], B per layer [out, r]) with independent float64 A;
    layer 2 of the second adapter shares half its A rows with the first."""
    gen = torch.Generator().manual_seed(seed)
    adapters = []
    for i in range(n):
        a = {layer: torch.randn(RANK, HIDDEN, generator=gen, dtype=torch.float64) for layer in range(LAYERS)}
        b = {layer: torch.randn(OUT, RANK, generator=gen, dtype=torch.float64) for layer in range(LAYERS)}
        adapters.append((f"role{i}", a, b))
    if n > 1:
        adapters[1][1][2][: RANK // 2] = adapters[0][1][2][: RANK // 2]
    return adapters


def delta_error(group, layer: int, name: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> float:
    """Relative error of the group's LR path against the adapter's own LoRA delta on x."""
    x = torch.randn(16, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(layer))
    want = (x @ a.T) @ (b * scaling).T
    got = (x @ group.rows[layer].T) @ group_b(b, scaling, coefficients(group, layer, name, a)).T
    return float((got - want).norm() / want.norm())


def test_joint_basis_rewrite_is_exact_for_independent_adapters():
    adapters = random_adapters(3)
    group = joint_group([(name, a) for name, a, _ in adapters])
    assert [group.rows[layer].shape[0] for layer in range(LAYERS)] == [24, 24, 20]
    assert group.width == 24
    for layer in range(LAYERS):
        g = group.rows[layer]
        assert torch.allclose(g @ g.T, torch.eye(g.shape[0], dtype=torch.float64), atol=1e-12)
        for name, a, b in adapters:
            assert delta_error(group, layer, name, a[layer], b[layer], scaling=2.0) < 1e-10


def test_joint_basis_serves_a_later_adapter_in_its_span_and_refuses_one_outside():
    adapters = random_adapters(2)
    group = joint_group([(name, a) for name, a, _ in adapters])
    mix = torch.randn(RANK, 2 * RANK, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    inside = mix @ torch.cat([adapters[0][1][0], adapters[1][1][0]])
    b = torch.randn(OUT, RANK, dtype=torch.float64)
    assert delta_error(group, 0, "late", inside, b, scaling=0.5) < 1e-10
    coefficients(group, 0, "late-bf16", inside.to(torch.bfloat16))  # rounding is not a new subspace
    outside = torch.randn(RANK, HIDDEN, dtype=torch.float64)
    with pytest.raises(OutsideJointBasis, match=r"'stranger'.*layer 0.*'role0', 'role1'.*--lora-paths"):
        coefficients(group, 0, "stranger", outside)
    with pytest.raises(OutsideJointBasis, match="'stranger'"):
        coefficients(group, 7, "stranger", outside)  # a layer no start-up adapter has
    assert not coefficients(group, 7, "no-v-lora", torch.zeros(RANK, HIDDEN)).any()


def test_shared_a_group_keeps_b_and_refuses_another_a():
    (name, a, b), (_, other, _) = random_adapters(2)
    group = shared_a_group(name, {layer: t.float() for layer, t in a.items()})
    coeff = coefficients(group, 0, "same-in-bf16", a[0].to(torch.bfloat16))
    assert torch.equal(coeff, torch.eye(RANK, dtype=torch.float64))
    assert torch.equal(group_b(b[0], 2.0, coeff), b[0] * 2.0)
    with pytest.raises(SharedAMismatch, match=r"'other'.*'role0'.*--lragent-lr-basis joint"):
        coefficients(group, 0, "other", other[0])


# ------------------------------------------------------------------ the real server

NEW = 12
# One adapter (or none) per prompt family: the first writer is the reader itself. The
# families share no first token (nor with the trace's, all >= 1000): a shared token would
# hold another adapter's K / V_base, which is first-writer sharing, not an exactness test.
SINGLE = {
    "plan": ["Zebras in the savanna", "Zebras in the savanna graze at dawn while lions"],
    "action": ["Otters in the river", "Otters in the river crack shells on their bellies and"],
    "reflect": ["Bears in the forest", "Bears in the forest sleep through the winter and wake"],
    None: ["Quokkas on the island", "Quokkas on the island smile at every visitor who"],
}


@pytest.fixture(scope="module")
def independent(smollm2, tmp_path_factory):
    """Three role adapters with independently initialised v_proj A that differ strongly."""
    return make_role_adapters(smollm2, tmp_path_factory.mktemp("joint"), shared_v_a=False, b_std=0.3)


@pytest.fixture(scope="module")
def joint_server(smollm2, independent):
    args = [
        "--model-path", str(smollm2), "--dtype", "float32", "--enable-lora",
        "--lora-paths", *[f"{r}={p}" for r, p in independent.items()],
        "--max-loras-per-batch", "4", "--max-lora-rank", "8",
        "--lragent-scheme", "base-lr-shared", "--lragent-lr-basis", "joint",
    ]
    with ServerProcess(args) as srv:
        yield srv


def greedy(srv: ServerProcess, text: str, role: str | None, n: int = NEW) -> list[int]:
    payload = {"text": text, "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}}
    if role:
        payload["lora_path"] = role
    return srv.generate(**payload)["output_ids"]


def adapter_with_new_b(src, dst, seed: int):
    """A copy of adapter `src` (same A, so inside the start-up basis) with fresh B."""
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for key, t in weights.items():
        if "lora_B" in key:
            weights[key] = torch.randn(t.shape, generator=gen) * 0.3
    save_file(weights, str(dst / "adapter_model.safetensors"))
    return dst


@pytest.mark.e2e
@pytest.mark.slow
def test_joint_server_single_adapter_equals_unshared_model(joint_server, smollm2, independent, hf_greedy):
    assert "x 24 wide" in joint_server.log_path.read_text(), "LR width must be the joint basis's (3 x r=8)"
    for role, prompts in SINGLE.items():
        got = [greedy(joint_server, p, role) for p in prompts]
        assert got == hf_greedy(smollm2, independent[role] if role else None, prompts, NEW), role


@pytest.mark.e2e
@pytest.mark.slow
def test_joint_server_roles_over_a_shared_prefix_reprefill_nothing(joint_server, run_trace):
    trace = run_trace(joint_server, seed=1, roles=True, forced=None)
    stats = trace["stats"]
    assert trace["roles"] == {"plan", "action", "reflect"}
    assert stats["lr_gap_tokens"] == 0
    assert stats["lr_hit_tokens"] == stats["base_hit_tokens"]
    assert stats["base_hit_tokens"] > stats["requested_tokens"] / 2


@pytest.mark.e2e
@pytest.mark.slow
def test_joint_server_refuses_an_adapter_outside_its_basis(joint_server, smollm2, independent, tmp_path, hf_greedy):
    stranger = make_role_adapters(smollm2, tmp_path / "s", roles=("stranger",), seed=7)["stranger"]
    resp = requests.post(joint_server.url + "/load_lora_adapter",
                         json={"lora_name": "stranger", "lora_path": str(stranger)}, timeout=120)
    assert resp.status_code == 400
    assert "'stranger'" in resp.text and "joint LR basis" in resp.text, resp.text
    late = adapter_with_new_b(independent["plan"], tmp_path / "late", seed=11)
    resp = requests.post(joint_server.url + "/load_lora_adapter",
                         json={"lora_name": "late", "lora_path": str(late)}, timeout=120)
    assert resp.status_code == 200, resp.text
    prompt = "Horses by the lake"
    assert [greedy(joint_server, prompt, "late")] == hf_greedy(smollm2, late, [prompt], NEW)
