"""Role adapters: shapes, sharing of v_proj A, PEFT loadability, and the pre-flight checks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lragent_sglang.adapters.check import read_adapter
from lragent_sglang.adapters.io import AdapterError, ModelShapes
from lragent_sglang.adapters.make import make_role_adapters

V_A = "base_model.model.model.layers.{}.self_attn.v_proj.lora_A.weight"
Q_A = "base_model.model.model.layers.{}.self_attn.q_proj.lora_A.weight"


def test_shapes_follow_the_checkpoint(smollm2, role_adapters):
    shapes = ModelShapes.from_checkpoint(smollm2)
    assert (shapes.num_heads, shapes.num_kv_heads, shapes.head_dim) == (9, 3, 64)
    w = load_file(str(role_adapters["plan"] / "adapter_model.safetensors"))
    assert len(w) == shapes.num_layers * 2 * 2
    assert w[V_A.format(0)].shape == (8, 576)
    assert w[V_A.format(0).replace("lora_A", "lora_B")].shape == (3 * 64, 8)
    assert w[Q_A.format(0).replace("lora_A", "lora_B")].shape == (9 * 64, 8)
    assert all(t.abs().sum() > 0 for t in w.values())


def test_independent_roles_differ(role_adapters):
    a = load_file(str(role_adapters["plan"] / "adapter_model.safetensors"))
    b = load_file(str(role_adapters["action"] / "adapter_model.safetensors"))
    assert not torch.equal(a[V_A.format(3)], b[V_A.format(3)])


def test_shared_a_shares_only_v_proj_a(smollm2, tmp_path):
    paths = make_role_adapters(smollm2, tmp_path, shared_v_a=True)
    ws = [load_file(str(p / "adapter_model.safetensors")) for p in paths.values()]
    for layer in (0, 29):
        assert torch.equal(ws[0][V_A.format(layer)], ws[2][V_A.format(layer)])
        assert not torch.equal(ws[0][Q_A.format(layer)], ws[2][Q_A.format(layer)])
        b = V_A.format(layer).replace("lora_A", "lora_B")
        assert not torch.equal(ws[0][b], ws[1][b])


def test_peft_loads_them(smollm2, role_adapters):
    from peft import LoraConfig

    cfg = LoraConfig.from_pretrained(str(role_adapters["reflect"]))
    assert cfg.r == 8 and cfg.lora_alpha == 16 and set(cfg.target_modules) == {"q_proj", "v_proj"}


@pytest.mark.parametrize("bad", [{"rank": 0}, {"target_modules": ("qkv",)}, {"roles": ("a", "a")},
                                 {"shared_v_a": True, "target_modules": ("q_proj",)}])
def test_make_rejects_bad_arguments(smollm2, tmp_path, bad):
    with pytest.raises(ValueError):
        make_role_adapters(smollm2, tmp_path, **bad)


def test_read_adapter_reports_rank_and_targets(smollm2, role_adapters):
    info = read_adapter("plan", role_adapters["plan"], smollm2)
    assert (info.rank, info.alpha, info.target_modules) == (8, 16.0, ("q_proj", "v_proj"))


def test_read_adapter_expands_fused_names(smollm2, role_adapters, tmp_path):
    cfg = json.loads((role_adapters["plan"] / "adapter_config.json").read_text())
    cfg["target_modules"] = ["qkv_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    assert read_adapter("x", tmp_path, smollm2).target_modules == ("k_proj", "q_proj", "v_proj")


def test_read_adapter_errors_name_the_problem(smollm2, tmp_path):
    with pytest.raises(AdapterError, match="'a'.*does not exist"):
        read_adapter("a", tmp_path / "missing", smollm2)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        read_adapter("b", tmp_path, smollm2)
    (tmp_path / "adapter_config.json").write_text("{not json")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_adapter("c", tmp_path, smollm2)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["wq"]}))
    with pytest.raises(AdapterError, match="'d' targets module 'wq'"):
        read_adapter("d", tmp_path, smollm2)


def test_converted_checkpoint_ends_turns_with_im_end(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2
    assert (smollm2 / "model.safetensors").stat().st_size > 400_000_000
