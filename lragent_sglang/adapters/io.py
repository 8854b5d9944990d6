"""Reading adapters and model shapes: plain files and tensors, no PEFT, no SGLang.

The launcher, the scheduler's adapter checks and the offline tools all read adapters
through here, so importing it stays cheap (torch and safetensors only).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
#: the demo's roles and the paper's LoRA targets, used by `make` and `train`
DEFAULT_ROLES = ("plan", "action", "reflect")
DEFAULT_TARGETS = ("q_proj", "v_proj")
_LORA_KEY = re.compile(r"\blayers\.(?P<layer>\d+)\.(?:.*\.)?(?P<module>\w+)\.lora_(?P<ab>[AB])(?:\.\w+)?\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be served; the message names it and the problem."""


#: model types whose checkpoints (and PEFT adapters) fuse q/k/v into `qkv_proj`
FUSED_QKV_TYPES = frozenset({"phi3"})


@dataclass(frozen=True)
class ModelShapes:
    """Linear-layer shapes of a decoder checkpoint, read from its config.json (the text
    part of a multimodal one); every family served names these fields alike."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    model_type: str = "llama"

    @classmethod
    def from_checkpoint(cls, model_path: str | Path) -> "ModelShapes":
        cfg = json.loads((Path(model_path) / "config.json").read_text())
        cfg = cfg.get("text_config") or cfg
        heads = cfg["num_attention_heads"]
        return cls(
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            model_type=cfg.get("model_type", "llama"),
        )

    @property
    def fused_qkv(self) -> bool:
        return self.model_type in FUSED_QKV_TYPES

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
            "qkv_proj": (h, q + 2 * kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "gate_up_proj": (h, 2 * i),
            "down_proj": (i, h),
        }
        if module not in shapes:
            raise ValueError(
                f"target module {module!r} does not exist in this model "
                f"(known: {', '.join(shapes)})"
            )
        return shapes[module]


def lora_pairs(lora_paths: object) -> list[tuple[str, str]]:
    """(name, path) of each `--lora-paths` entry, in any form SGLang accepts."""
    if isinstance(lora_paths, dict):
        return [(str(k), str(v)) for k, v in lora_paths.items()]
    pairs = []
    for item in lora_paths or []:
        if isinstance(item, str):
            name, _, path = item.partition("=")
            pairs.append((name, path or name))
        elif isinstance(item, dict):
            pairs.append((item.get("lora_name", "?"), item.get("lora_path", "")))
        else:
            pairs.append((item.lora_name, item.lora_path))
    return pairs


def max_rank(lora_paths: object) -> int:
    """The largest rank among the `--lora-paths` adapters (0 without adapters)."""
    ranks = [
        int(json.loads((Path(path) / "adapter_config.json").read_text()).get("r", 0))
        for _, path in lora_pairs(lora_paths)
        if (Path(path) / "adapter_config.json").is_file()
    ]
    return max(ranks, default=0)


def adapter_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a PEFT adapter folder (safetensors preferred, else the .bin)."""
    path = Path(path)
    if (path / WEIGHT_FILES[0]).is_file():
        from safetensors.torch import load_file

        return load_file(str(path / WEIGHT_FILES[0]))
    return torch.load(path / WEIGHT_FILES[1], map_location="cpu", weights_only=True)


def lora_modules(weights: dict[str, torch.Tensor]) -> set[str]:
    """The module names that carry LoRA tensors (q_proj, v_proj, qkv_proj, ...)."""
    return {m.group("module") for m in map(_LORA_KEY.search, weights) if m}


def lora_matrices(weights: dict[str, torch.Tensor], module: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the (A [r, in], B [out, r]) of one target module; AdapterError if a layer
    has only one of the two."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = _LORA_KEY.search(key)
        if match and match["module"] == module:
            found.setdefault(int(match["layer"]), {})[match["ab"]] = tensor
    pairs = {}
    for layer, ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"layer {layer} {module} has lora_{''.join(ab)} but not both A and B")
        pairs[layer] = (ab["A"], ab["B"])
    return pairs


def v_proj_a(path: str | Path) -> dict[int, torch.Tensor]:
    """Per layer, the v_proj A [r, hidden] of the adapter in folder `path`; for a fused
    `qkv_proj` LoRA (Phi-3) that is the whole A, which q, k and v share."""
    weights = adapter_tensors(path)
    pairs = lora_matrices(weights, "v_proj") or lora_matrices(weights, "qkv_proj")
    return {layer: a for layer, (a, _) in pairs.items()}
