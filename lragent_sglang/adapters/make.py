"""Make random role adapters (PEFT LoRA format) for a checkpoint (`lragent-adapters make`).

The adapters are written from the checkpoint's `config.json` alone, so this works for a
135M model on a laptop and for an 8B model on the GPU machine without loading weights.
`peft.LoraConfig` writes the config, and the tensors use PEFT's key names, so both
`peft.PeftModel.from_pretrained` and SGLang's `--lora-paths` load them.

B is non-zero (unlike PEFT's training init) so that every role really differs from the
base model and from the others. With `shared_v_a`, all roles get the first role's v_proj
A: the "shared-A" adapters of LRAgent's base-lr-shared scheme.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from lragent_sglang.adapters.io import DEFAULT_ROLES, DEFAULT_TARGETS, ModelShapes

logger = logging.getLogger(__name__)

_ATTENTION = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")


def _module_prefix(module: str) -> str:
    return "self_attn" if module in _ATTENTION else "mlp"


def make_role_adapters(
    model_path: Path,
    out_dir: Path,
    roles: tuple[str, ...] = DEFAULT_ROLES,
    rank: int = 8,
    alpha: float = 16.0,
    target_modules: tuple[str, ...] | None = None,
    shared_v_a: bool = False,
    b_std: float = 0.05,
    seed: int = 0,
) -> dict[str, Path]:
    """Write one PEFT adapter per role under `out_dir/<role>` and return their paths.

    A is drawn like PEFT's kaiming-uniform init, B ~ N(0, b_std^2); each role has its own
    seed. The targets default to q_proj and v_proj, or to the fused qkv_proj where the
    checkpoint fuses them (Phi-3), whose B gets zero K rows (the keys stay the base
    model's, so every scheme can share them). With `shared_v_a`, every role's v A (the
    whole A of a fused qkv_proj) equals the first role's.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not roles or len(set(roles)) != len(roles):
        raise ValueError(f"roles must be distinct and non-empty, got {roles}")
    shapes = ModelShapes.from_checkpoint(model_path)
    if target_modules is None:
        target_modules = ("qkv_proj",) if shapes.fused_qkv else DEFAULT_TARGETS
    v_module = "qkv_proj" if "qkv_proj" in target_modules else "v_proj"
    if shared_v_a and v_module not in target_modules:
        raise ValueError("shared_v_a needs v_proj (or the fused qkv_proj) among the target modules")
    for module in target_modules:
        shapes.in_out(module)
    q_size, kv_size = shapes.in_out("q_proj")[1], shapes.in_out("k_proj")[1]

    shared_a: dict[int, torch.Tensor] = {}
    paths: dict[str, Path] = {}
    for role_idx, role in enumerate(roles):
        gen = torch.Generator().manual_seed(seed * 1000 + role_idx)
        tensors: dict[str, torch.Tensor] = {}
        for layer in range(shapes.num_layers):
            for module in target_modules:
                fan_in, fan_out = shapes.in_out(module)
                bound = 1.0 / math.sqrt(fan_in)
                a = (torch.rand(rank, fan_in, generator=gen) * 2 - 1) * bound
                b = torch.randn(fan_out, rank, generator=gen) * b_std
                if module == "qkv_proj":
                    b[q_size : q_size + kv_size] = 0
                if shared_v_a and module == v_module:
                    a = shared_a.setdefault(layer, a)
                key = f"base_model.model.model.layers.{layer}.{_module_prefix(module)}.{module}"
                tensors[f"{key}.lora_A.weight"] = a.contiguous()
                tensors[f"{key}.lora_B.weight"] = b.contiguous()
        role_dir = Path(out_dir) / role
        role_dir.mkdir(parents=True, exist_ok=True)
        LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=list(target_modules),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=str(model_path),
        ).save_pretrained(str(role_dir))
        save_file(tensors, str(role_dir / "adapter_model.safetensors"))
        paths[role] = role_dir
        logger.info("wrote adapter %s (r=%d, %s) to %s", role, rank, target_modules, role_dir)
    return paths


def default_role_adapters(model_path: Path, cache_dir: Path, shared_v_a: bool = True) -> dict[str, Path]:
    """The demo's three role adapters for `model_path`, made once under `cache_dir`;
    shared-A by default so that every scheme, base-lr-shared included, can serve them."""
    out = Path(cache_dir) / ("role-adapters-shared-a" if shared_v_a else "role-adapters")
    paths = {role: out / role for role in DEFAULT_ROLES}
    if all((p / "adapter_model.safetensors").is_file() for p in paths.values()):
        return paths
    return make_role_adapters(model_path, out, shared_v_a=shared_v_a)
