"""Check LoRA adapters against a model and a sharing scheme before the server loads them.

SGLang reports a missing adapter or an unknown target module from deep inside the
scheduler process; these checks run first (in our launcher, and in `lragent-adapters
check`) and fail with one line naming the adapter.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from lragent_sglang.adapters.io import (
    WEIGHT_FILES,
    AdapterError,
    ModelShapes,
    adapter_tensors,
    lora_matrices,
    lora_modules,
    lora_pairs,
    v_proj_a,
)
from lragent_sglang.adapters.joint_basis import same_a
from lragent_sglang.scheme import DEFAULT_LR_BASIS, LRBasis, Scheme

logger = logging.getLogger(__name__)

# SGLang fuses projections under these names; PEFT adapters may target either spelling.
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class AdapterInfo:
    """What the server needs to know about one adapter."""

    name: str
    path: Path
    rank: int
    alpha: float
    target_modules: tuple[str, ...]  # fused names expanded (qkv_proj -> q_proj, k_proj, v_proj)
    shapes: ModelShapes  # of the model it is checked against


def _targets(raw: object) -> tuple[str, ...]:
    if raw == "all-linear":
        return ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    if isinstance(raw, str):
        raw = [raw]
    modules: list[str] = []
    for module in raw or ():
        modules.extend(_FUSED.get(module, (module,)))
    return tuple(sorted(set(modules)))


def read_adapter(name: str, path: str | Path, model_path: str | Path) -> AdapterInfo:
    """Read and check one adapter; AdapterError if it cannot be served with this model."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter {name!r}: path {str(path)!r} does not exist or is not a folder")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterError(f"adapter {name!r}: {str(path)!r} has no adapter_config.json")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise AdapterError(f"adapter {name!r}: {str(path)!r} has no {' or '.join(WEIGHT_FILES)}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"adapter {name!r}: adapter_config.json is not valid JSON ({exc})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {cfg.get('peft_type')!r} is not LORA")
    shapes = ModelShapes.from_checkpoint(model_path)
    modules = _targets(cfg.get("target_modules"))
    if not modules:
        raise AdapterError(f"adapter {name!r}: adapter_config.json names no target_modules")
    for module in modules:
        try:
            shapes.in_out(module)
        except ValueError:
            raise AdapterError(
                f"adapter {name!r} targets module {module!r}, which the model at "
                f"{str(model_path)!r} does not have"
            ) from None
    return AdapterInfo(
        name=name,
        path=path,
        rank=int(cfg.get("r", 0)),
        alpha=float(cfg.get("lora_alpha", cfg.get("r", 1))),
        target_modules=modules,
        shapes=shapes,
    )


def changes_keys(info: AdapterInfo) -> bool:
    """LoRA on k_proj, or a fused qkv_proj LoRA (Phi-3) whose B has non-zero K rows: the
    adapter's keys would differ from the base model's."""
    if "k_proj" not in info.target_modules:
        return False
    weights = adapter_tensors(info.path)
    if lora_matrices(weights, "k_proj"):
        return True
    q = info.shapes.num_heads * info.shapes.head_dim
    kv = info.shapes.num_kv_heads * info.shapes.head_dim
    return any(b[q : q + kv].any() for _, b in lora_matrices(weights, "qkv_proj").values())


def check_config(info: AdapterInfo) -> None:
    """Refuse adapter settings that SGLang would serve differently from PEFT: it scales
    every layer by lora_alpha / r and reads neither rsLoRA, DoRA nor per-layer patterns."""
    cfg = json.loads((info.path / "adapter_config.json").read_text())
    if info.rank < 1:
        raise AdapterError(f"adapter {info.name!r}: rank r={cfg.get('r')!r} must be >= 1")
    if "lora_alpha" not in cfg:
        raise AdapterError(f"adapter {info.name!r}: adapter_config.json has no lora_alpha (SGLang needs it)")
    if cfg.get("use_rslora"):
        raise AdapterError(
            f"adapter {info.name!r} uses rsLoRA (scale alpha/sqrt(r)); SGLang scales by alpha/r, "
            "so it would serve a different model"
        )
    if cfg.get("use_dora"):
        raise AdapterError(f"adapter {info.name!r} is a DoRA adapter, which SGLang does not serve")
    for field in ("rank_pattern", "alpha_pattern"):
        if cfg.get(field):
            raise AdapterError(
                f"adapter {info.name!r} sets {field}; SGLang uses one r and alpha for all layers"
            )


def check_weights(info: AdapterInfo, model_path: str | Path) -> list[str]:
    """Check every LoRA tensor's shape against the model and the adapter's rank (AdapterError
    on a mismatch); return notes on things that serve but are probably unintended."""
    shapes = ModelShapes.from_checkpoint(model_path)
    try:
        weights = adapter_tensors(info.path)
    except Exception as exc:  # a truncated or foreign file: report it, whatever the loader raised
        raise AdapterError(f"adapter {info.name!r}: cannot read its weights ({exc})") from None
    notes = []
    modules = lora_modules(weights)
    for module in sorted(modules):
        parts = _FUSED.get(module, (module,))
        if not set(parts) <= set(info.target_modules):
            raise AdapterError(f"adapter {info.name!r} has {module} weights but does not target it")
        fan_in = shapes.in_out(parts[0])[0]
        fan_out = sum(shapes.in_out(part)[1] for part in parts)
        try:
            pairs = lora_matrices(weights, module)
        except AdapterError as exc:
            raise AdapterError(f"adapter {info.name!r}: {exc}") from None
        for layer, (a, b) in pairs.items():
            if layer >= shapes.num_layers:
                raise AdapterError(
                    f"adapter {info.name!r} has weights for layer {layer}, the model has {shapes.num_layers}"
                )
            if tuple(a.shape) != (info.rank, fan_in) or tuple(b.shape) != (fan_out, info.rank):
                raise AdapterError(
                    f"adapter {info.name!r} layer {layer} {module}: A {tuple(a.shape)}, B {tuple(b.shape)}; "
                    f"expected A ({info.rank}, {fan_in}), B ({fan_out}, {info.rank}) for r={info.rank} "
                    "and this model (an adapter for another model size?)"
                )
        if pairs and all(not b.any() for _, b in pairs.values()):
            notes.append(f"{module} B is all zero (an untrained adapter: the base model)")
    if not modules:
        raise AdapterError(f"adapter {info.name!r} has no LoRA weights")
    return notes


def check_for_scheme(infos: list[AdapterInfo], scheme: Scheme, max_lora_rank: int | None,
                     lr_basis: LRBasis = DEFAULT_LR_BASIS) -> None:
    """What the sharing scheme needs of the adapters; AdapterError naming the first offender.

    Base-sharing schemes keep keys shared, so no adapter may change them (k_proj, or the
    K rows of a fused qkv_proj), and base-lr-shared with the shared-a LR basis keeps one LR
    cache computed with one v_proj A, so every adapter must have it (the joint basis serves
    any adapters).
    """
    for info in infos:
        if max_lora_rank is not None and info.rank > max_lora_rank:
            raise AdapterError(
                f"adapter {info.name!r} has rank {info.rank}, above --max-lora-rank {max_lora_rank}"
            )
        if scheme.shares_base and changes_keys(info):
            raise AdapterError(
                f"adapter {info.name!r} puts LoRA on k_proj (or non-zero K rows of a fused qkv_proj), "
                f"which {scheme} cannot share "
                "(RoPE sits between its B and the attention scores); use --lragent-scheme "
                f"{Scheme.NON_SHARED} or {Scheme.FULL_SHARED}, or an adapter without k_proj"
            )
    if not scheme.one_lr_cache or lr_basis is not DEFAULT_LR_BASIS or len(infos) < 2:
        return
    first = infos[0]
    ref = v_proj_a(first.path)
    for info in infos[1:]:
        other = v_proj_a(info.path)
        if ref.keys() != other.keys() or not all(same_a(ref[layer], other[layer]) for layer in ref):
            raise AdapterError(
                f"adapters {first.name!r} and {info.name!r} have different v_proj A, but "
                f"{scheme} shares one LR cache: use --lragent-lr-basis {LRBasis.JOINT} (exact for any "
                "adapters), shared-A adapters (lragent-adapters train --shared-a), or "
                f"--lragent-scheme {Scheme.BASE_SHARED}"
            )


def check_server_adapters(lora_paths: object, model_path: str | Path, scheme: Scheme,
                          max_lora_rank: int | None, lr_basis: LRBasis = DEFAULT_LR_BASIS) -> list[AdapterInfo]:
    """Every check of this module on the `--lora-paths` adapters, as a server about to load
    them needs (AdapterError naming the first offender); notes on adapters that serve but
    look unintended are logged as warnings."""
    infos = []
    for name, path in lora_pairs(lora_paths):
        info = read_adapter(name, path, model_path)
        check_config(info)
        for note in check_weights(info, model_path):
            logger.warning("adapter %r: %s", name, note)
        infos.append(info)
    check_for_scheme(infos, scheme, max_lora_rank, lr_basis)
    return infos
