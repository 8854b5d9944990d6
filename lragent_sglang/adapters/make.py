"""Make role adapters (PEFT LoRA format) for any Llama-architecture checkpoint.

The adapters are written from the checkpoint's `config.json` alone, so this works for a
135M model on a laptop and for an 8B model on the GPU machine without loading weights.
`peft.LoraConfig` writes the config, and the tensors use PEFT's key names, so both
`peft.PeftModel.from_pretrained` and SGLang's `--lora-paths` load them.

B is non-zero (unlike PEFT's training init) so that every role really differs from the
base model and from the others. With `shared_v_a`, all roles get the first role's v_proj
A: the "shared-A" adapters of LRAgent's base-lr-shared scheme.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

DEFAULT_ROLES = ("plan", "action", "reflect")
DEFAULT_TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class LlamaShapes:
    """Linear-layer shapes of a Llama checkpoint, read from its config.json."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_checkpoint(cls, model_path: Path) -> "LlamaShapes":
        cfg = json.loads((Path(model_path) / "config.json").read_text())
        heads = cfg["num_attention_heads"]
        return cls(
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        )

    def in_out(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one projection; ValueError for unknown ones."""
        h, q, kv, i = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        )
        shapes = {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        if module not in shapes:
            raise ValueError(
                f"target module {module!r} does not exist in a Llama model "
                f"(known: {', '.join(shapes)})"
            )
        return shapes[module]


def _module_prefix(module: str) -> str:
    return "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def make_role_adapters(
    model_path: Path,
    out_dir: Path,
    roles: tuple[str, ...] = DEFAULT_ROLES,
    rank: int = 8,
    alpha: float = 16.0,
    target_modules: tuple[str, ...] = DEFAULT_TARGETS,
    shared_v_a: bool = False,
    b_std: float = 0.05,
    seed: int = 0,
) -> dict[str, Path]:
    """Write one PEFT adapter per role under `out_dir/<role>` and return their paths.

    A is drawn like PEFT's kaiming-uniform init, B ~ N(0, b_std^2); each role has its own
    seed. With `shared_v_a`, every role's v_proj `lora_A` equals the first role's.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not roles or len(set(roles)) != len(roles):
        raise ValueError(f"roles must be distinct and non-empty, got {roles}")
    if shared_v_a and "v_proj" not in target_modules:
        raise ValueError("shared_v_a needs v_proj among the target modules")
    shapes = LlamaShapes.from_checkpoint(model_path)
    for module in target_modules:
        shapes.in_out(module)

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
                if shared_v_a and module == "v_proj":
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Make role LoRA adapters for a Llama checkpoint.")
    parser.add_argument("--model-path", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--roles", nargs="+", default=list(DEFAULT_ROLES))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--target-modules", nargs="+", default=list(DEFAULT_TARGETS))
    parser.add_argument("--shared-a", action="store_true", help="share v_proj A across roles")
    parser.add_argument("--b-std", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        paths = make_role_adapters(
            args.model_path, args.out, tuple(args.roles), args.rank, args.alpha,
            tuple(args.target_modules), args.shared_a, args.b_std, args.seed,
        )
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    for role, path in paths.items():
        print(f"{role}={path}")


if __name__ == "__main__":
    main()
