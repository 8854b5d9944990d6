"""Adapter tooling (issue 7): joint-basis math, shared-A training on SmolLM2, the shipped
role data and role adapters, and the `lragent-adapters` CLI's verdicts and exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lragent_sglang import data_path
from lragent_sglang.adapters.cli import main
from lragent_sglang.adapters.joint_basis import joint_basis, truncation
from lragent_sglang.adapters.make import make_role_adapters
from lragent_sglang.adapters.train import (
    IGNORE_INDEX,
    RoleExample,
    TrainConfig,
    encode,
    load_examples,
    train_role_adapters,
)
from lragent_sglang.agents.models import smollm2_role_adapters

REPO = Path(__file__).resolve().parent.parent
KEY = "base_model.model.model.layers.{}.self_attn.{}.lora_{}.weight"


def _random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ---- joint basis math


def test_joint_basis_of_independent_a_is_exact_with_width_n_r():
    a_list = [_random(8, 64, seed=i) for i in range(3)]
    b_list = [_random(32, 8, seed=10 + i) for i in range(3)]
    a_s, coeffs = joint_basis(a_list)
    assert a_s.shape == (24, 64)
    assert torch.allclose(a_s @ a_s.T, torch.eye(24, dtype=torch.float64), atol=1e-12)
    x = _random(5, 64, seed=99)
    for a, b, c in zip(a_list, b_list, coeffs):
        assert c.shape == (8, 24)
        assert torch.allclose(b @ a, (b @ c) @ a_s, atol=1e-12)
        # what the server computes: one shared LR cache x A_s^T, then each role's B C
        assert torch.allclose(x @ a.T @ b.T, (x @ a_s.T) @ (b @ c).T, atol=1e-12)


def test_joint_basis_width_is_r_for_shared_a_and_counts_partial_overlap():
    a = _random(8, 64, seed=0)
    a_s, coeffs = joint_basis([a, a.clone(), a.clone()])
    assert a_s.shape == (8, 64)
    assert all(torch.allclose(c @ a_s, a, atol=1e-12) for c in coeffs)
    half_shared = torch.cat([a[:4], _random(4, 64, seed=1)])
    assert joint_basis([a, half_shared])[0].shape == (12, 64)
    # a shared A scaled per role spans the same rows: still width r
    assert joint_basis([a, 3 * a])[0].shape == (8, 64)


def test_joint_basis_keeps_the_input_dtype_and_caps_at_max_k():
    a_list = [_random(4, 32, seed=i).float() for i in range(2)]
    a_s, coeffs = joint_basis(a_list, max_k=5)
    assert a_s.dtype == torch.float32 and a_s.shape == (5, 32) and coeffs[0].shape == (4, 5)
    a_full, c_full = joint_basis(a_list)
    assert torch.allclose(c_full[1] @ a_full, a_list[1], atol=1e-5)


def test_truncation_energy_grows_with_k_and_is_exact_at_full_width():
    a_list = [_random(8, 64, seed=i) * (i + 1) for i in range(3)]
    b_list = [_random(32, 8, seed=10 + i) for i in range(3)]
    runs = [truncation(a_list, b_list, k) for k in range(0, 27)]
    energies = [t.energy_kept for t in runs]
    assert energies[0] == 0.0 and energies[-1] == pytest.approx(1.0, abs=1e-12)
    assert all(e2 > e1 for e1, e2 in zip(energies[:24], energies[1:25]))
    assert all(t.full_k == 24 for t in runs) and runs[-1].k == 24
    assert max(runs[24].rel_errors) < 1e-10 and min(runs[8].rel_errors) > 1e-3
    assert runs[0].rel_errors == pytest.approx((1.0, 1.0, 1.0))


# ---- role data


def test_shipped_role_data_is_what_the_generator_writes(tmp_path):
    out = tmp_path / "train.jsonl"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_role_data.py"), "--out", str(out)], check=True)
    shipped = data_path("roles", "train.jsonl")
    assert out.read_bytes() == shipped.read_bytes()
    examples = load_examples(shipped)
    assert 60 <= len(examples) <= 150
    assert [e.role for e in examples[:3]] == ["plan", "action", "reflect"]
    assert {e.role for e in examples} == {"plan", "action", "reflect"}
    calls = [e.completion for e in examples if e.role == "action"]
    assert all(re.fullmatch(r"TOOL: (calculator|lookup)\([^()]+\)", c) for c in calls)
    for ex in examples:
        match = re.search(r"computed (.+) = (\d+),", ex.completion)
        if match:  # the reflector's arithmetic is right
            assert re.fullmatch(r"[\d +*/-]+", match[1])
            assert eval(match[1].replace("/", "//")) == int(match[2])


def test_load_examples_names_the_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"role": "plan", "prompt": "p", "completion": "c"}\n{"role": "plan", "prompt": "p"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: .*completion"):
        load_examples(path)


def test_encode_masks_the_prompt_and_keeps_the_completion(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    ex = RoleExample("plan", "What is 2 + 3?", "TOOL: calculator(2 + 3)", system="Be brief.")
    ids, labels = encode(tok, ex, "chat", 256)
    n_prompt = labels.count(IGNORE_INDEX)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and IGNORE_INDEX not in labels[n_prompt:]
    assert tok.decode(ids[:n_prompt]).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert tok.decode(ids[:n_prompt]).endswith("<|im_start|>assistant\n")
    assert tok.decode(labels[n_prompt:]) == "TOOL: calculator(2 + 3)<|im_end|>"
    short_ids, short_labels = encode(tok, ex, "chat", 12)
    assert len(short_ids) == 12 and short_labels[-len(labels[n_prompt:]):] == labels[n_prompt:]
    plain_ids, plain_labels = encode(tok, ex, "plain", 256)
    assert tok.decode(plain_ids) == "What is 2 + 3?TOOL: calculator(2 + 3)<|im_end|>"


# ---- shared-A training (one tiny run shared by the tests below)

STEPS = 5


@pytest.fixture(scope="module")
def trained(smollm2, tmp_path_factory):
    """3 roles x 5 steps of batch 2 on two short examples each, with --shared-a."""
    examples = [
        RoleExample(role, f"Question {i}: what is {i} + {i}?", completion)
        for role, completion in (("plan", "Use the calculator."), ("action", "TOOL: calculator(1 + 1)"),
                                 ("reflect", "Final answer: 2."))
        for i in (1, 2)
    ]
    out = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig(rank=4, alpha=8, lr=5e-3, steps=STEPS, batch_size=2, max_len=48, shared_a=True)
    reports = train_role_adapters(smollm2, examples, out, cfg, progress=False, threads=1,
                                  save_dtype=torch.float16)
    return out, reports


def test_shared_a_training_shares_exactly_the_v_proj_a(trained):
    out, reports = trained
    assert [r.role for r in reports] == ["plan", "action", "reflect"]
    ws = {r.role: load_file(str(out / r.role / "adapter_model.safetensors")) for r in reports}
    for layer in (0, 15, 29):
        v_a = [w[KEY.format(layer, "v_proj", "A")] for w in ws.values()]
        assert v_a[0].shape == (4, 576) and v_a[0].dtype == torch.float16  # --save-dtype
        assert all(torch.equal(v_a[0], other) for other in v_a[1:])
        for module, ab in (("v_proj", "B"), ("q_proj", "A"), ("q_proj", "B")):
            mats = [w[KEY.format(layer, module, ab)] for w in ws.values()]
            assert not torch.equal(mats[0], mats[1]) and not torch.equal(mats[1], mats[2])
            if ab == "B":  # PEFT starts B at zero: non-zero means trained
                assert all(m.abs().sum() > 0 for m in mats)
    first, *others = reports
    assert first.frozen == [] and all(v > 0 for v in first.update_norms.values())
    for r in others:
        assert r.frozen == ["v_proj.lora_A"] and r.update_norms["v_proj.lora_A"] == 0.0
        assert all(r.update_norms[g] > 0 for g in ("q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_B"))


def test_training_lowers_the_loss(trained):
    _, reports = trained
    for r in reports:
        assert len(r.losses) == STEPS
        assert r.losses[-1] < 0.8 * r.losses[0], (r.role, r.losses)


def test_trained_adapters_load_in_peft_and_pass_base_lr_shared(trained, smollm2, capsys):
    from peft import LoraConfig

    out, reports = trained
    cfg = LoraConfig.from_pretrained(str(out / "action"))
    assert (cfg.r, cfg.lora_alpha, set(cfg.target_modules)) == (4, 8, {"q_proj", "v_proj"})
    log = json.loads((out / "train_log.json").read_text())
    assert [r["role"] for r in log["roles"]] == ["plan", "action", "reflect"] and log["config"]["shared_a"]
    assert log["save_dtype"] == "float16"
    rc = main(["--no-progress", "check", *[f"{r.role}={r.path}" for r in reports],
               "--model-path", str(smollm2), "--scheme", "base-lr-shared", "--max-lora-rank", "8"])
    assert rc == 0, capsys.readouterr().out


def test_shipped_smollm2_role_adapters_are_small_shared_a_and_recorded(smollm2, capsys):
    """The demo's trained adapters in the package: what `Runtime.smollm2` serves."""
    adapters = smollm2_role_adapters()
    assert list(adapters) == ["plan", "action", "reflect"]
    folder = adapters["plan"].parent
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 3.5 * 2**20, "keep the repository small"
    log = json.loads((folder / "train_log.json").read_text())
    assert (log["config"]["shared_a"], log["config"]["seed"], log["save_dtype"]) == (True, 0, "float16")
    readme = (folder / "README.md").read_text()
    for r in log["roles"]:  # the README states the recorded losses
        assert f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}" in readme, r["role"]
    ws = [load_file(str(p / "adapter_model.safetensors")) for p in adapters.values()]
    assert all(t.dtype == torch.float16 for w in ws for t in w.values())
    rc, verdicts = _check(capsys, adapters, "--model-path", str(smollm2), "--scheme", "base-lr-shared",
                          "--max-lora-rank", "8")
    assert rc == 0, verdicts


def test_train_cli_rejects_unknown_roles(smollm2, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"role": "plan", "prompt": "p", "completion": "c"}\n')
    rc = main(["train", "--model-path", str(smollm2), "--data", str(data), "--out", str(tmp_path / "o"),
               "--roles", "plan", "critic"])
    assert rc == 2 and "critic" in capsys.readouterr().err


# ---- check CLI


@pytest.fixture(scope="module")
def shared_a_adapters(smollm2, tmp_path_factory):
    return make_role_adapters(smollm2, tmp_path_factory.mktemp("shared"), shared_v_a=True)


def _check(capsys, adapters: dict[str, Path], *flags: str) -> tuple[int, dict[str, str]]:
    rc = main(["--no-progress", "check", *[f"{n}={p}" for n, p in adapters.items()], *flags])
    lines = capsys.readouterr().out.splitlines()
    verdicts = {line.split()[0]: line.split(None, 1)[1] for line in lines if not line.startswith("#")}
    return rc, verdicts


def test_check_accepts_a_shared_a_set(smollm2, shared_a_adapters, capsys):
    rc, verdicts = _check(capsys, shared_a_adapters, "--model-path", str(smollm2), "--max-lora-rank", "8")
    assert rc == 0
    assert all(v.startswith("OK: r=8, alpha=16, q_proj+v_proj") for v in verdicts.values()) and len(verdicts) == 3


def test_check_refuses_k_proj_for_base_sharing_only(smollm2, tmp_path, capsys):
    k = make_role_adapters(smollm2, tmp_path, roles=("keys",), target_modules=("q_proj", "k_proj", "v_proj"))
    rc, verdicts = _check(capsys, k, "--model-path", str(smollm2), "--scheme", "base-shared")
    assert rc == 1 and re.match(r"REFUSED: .*'keys' puts LoRA on k_proj", verdicts["keys"])
    rc, verdicts = _check(capsys, k, "--model-path", str(smollm2), "--scheme", "non-shared")
    assert rc == 0 and verdicts["keys"].startswith("OK")


def test_check_refuses_a_rank_above_the_server_limit(smollm2, shared_a_adapters, tmp_path, capsys):
    big = make_role_adapters(smollm2, tmp_path, roles=("big",), rank=16)
    rc, verdicts = _check(capsys, {"plan": shared_a_adapters["plan"], **big},
                          "--model-path", str(smollm2), "--scheme", "base-shared", "--max-lora-rank", "8")
    assert rc == 1 and verdicts["plan"].startswith("OK")
    assert verdicts["big"] == "REFUSED: adapter 'big' has rank 16, above --max-lora-rank 8"


def test_check_refuses_independent_a_under_base_lr_shared(smollm2, role_adapters, capsys):
    rc, verdicts = _check(capsys, role_adapters, "--model-path", str(smollm2), "--scheme", "base-lr-shared")
    assert rc == 1 and verdicts["plan"].startswith("OK")
    assert all(re.match(r"REFUSED: adapters 'plan' and '\w+' have different v_proj A", verdicts[n])
               for n in ("action", "reflect"))
    rc, _ = _check(capsys, role_adapters, "--model-path", str(smollm2), "--scheme", "base-shared")
    assert rc == 0
    rc, verdicts = _check(capsys, role_adapters, "--model-path", str(smollm2), "--scheme", "base-lr-shared",
                          "--lr-basis", "joint")
    assert rc == 0 and all(v.startswith("OK") for v in verdicts.values())


def _copy_adapter(src: Path, dst: Path, **config: object) -> Path:
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    return dst


def test_check_refuses_configs_and_shapes_the_server_would_get_wrong(smollm2, shared_a_adapters, tmp_path, capsys):
    src = shared_a_adapters["plan"]
    bad = {
        "rslora": _copy_adapter(src, tmp_path / "rslora", use_rslora=True),
        "wrong_r": _copy_adapter(src, tmp_path / "wrong_r", r=4),
        "no_alpha": _copy_adapter(src, tmp_path / "no_alpha"),
        "half": _copy_adapter(src, tmp_path / "half"),
        "zero_b": _copy_adapter(src, tmp_path / "zero_b"),
    }
    cfg = json.loads((src / "adapter_config.json").read_text())
    del cfg["lora_alpha"]
    (bad["no_alpha"] / "adapter_config.json").write_text(json.dumps(cfg))
    w = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: v for k, v in w.items() if k != KEY.format(3, "v_proj", "B")}, str(bad["half"] / "adapter_model.safetensors"))
    save_file({k: (v * 0 if "lora_B" in k else v) for k, v in w.items()}, str(bad["zero_b"] / "adapter_model.safetensors"))
    rc, verdicts = _check(capsys, bad, "--model-path", str(smollm2), "--scheme", "base-shared")
    assert rc == 1
    assert "rsLoRA" in verdicts["rslora"] and verdicts["rslora"].startswith("REFUSED")
    assert "expected A (4, 576)" in verdicts["wrong_r"]
    assert "no lora_alpha" in verdicts["no_alpha"]
    assert "layer 3 v_proj has lora_A but not both" in verdicts["half"]
    assert verdicts["zero_b"].startswith("OK") and "B is all zero" in verdicts["zero_b"]


def test_check_usage_errors_exit_2(smollm2, shared_a_adapters, capsys):
    p = shared_a_adapters["plan"]
    assert main(["--no-progress", "check", f"a={p}", f"a={p}", "--model-path", str(smollm2)]) == 2
    assert "distinct" in capsys.readouterr().err
    assert main(["--no-progress", "check", f"a={p}", "--model-path", str(smollm2), "--scheme", "base-shared",
                 "--lr-basis", "joint"]) == 2
    assert "needs --lragent-scheme base-lr-shared" in capsys.readouterr().err
    rc, verdicts = _check(capsys, {"gone": p.parent / "gone"}, "--model-path", str(smollm2))
    assert rc == 1 and "does not exist" in verdicts["gone"]


# ---- joint-basis CLI


def test_joint_basis_cli_widths_and_truncation(role_adapters, shared_a_adapters, tmp_path, capsys):
    out = tmp_path / "jb.json"
    args = [f"{n}={p}" for n, p in role_adapters.items()]
    assert main(["--no-progress", "joint-basis", *args, "--max-k", "24", "--json", str(out)]) == 0
    full = json.loads(out.read_text())
    assert full["width_needed"] == 24 and len(full["layers"]) == 30
    assert all(row["k"] == 24 and row["stacked_rows"] == 24 for row in full["layers"])
    assert all(row["energy_kept"] == pytest.approx(1.0) for row in full["layers"])
    assert max(e for row in full["layers"] for e in row["rel_errors"].values()) < 1e-5
    assert main(["--no-progress", "joint-basis", *args, "--max-k", "8", "--json", str(out)]) == 0
    cut = json.loads(out.read_text())
    assert all(0.2 < row["energy_kept"] < 0.6 for row in cut["layers"])
    assert min(e for row in cut["layers"] for e in row["rel_errors"].values()) > 0.3
    assert "an exact shared LR cache needs width 24" in capsys.readouterr().out
    shared = [f"{n}={p}" for n, p in shared_a_adapters.items()]
    assert main(["--no-progress", "joint-basis", *shared, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["width_needed"] == 8


def test_joint_basis_cli_needs_v_proj(smollm2, tmp_path, capsys):
    q_only = make_role_adapters(smollm2, tmp_path, roles=("q",), target_modules=("q_proj",))
    assert main(["--no-progress", "joint-basis", f"q={q_only['q']}"]) == 2
    assert "no v_proj LoRA weights" in capsys.readouterr().err
