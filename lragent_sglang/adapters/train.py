"""Train role LoRA adapters (q_proj and v_proj) with PEFT, optionally with a shared v_proj A.

The data is a JSONL of `{"role", "prompt", "completion"}` objects (an optional "system"
string is used as the chat system message). Loss is on the completion tokens only, so an
adapter learns what its role answers, not the shared context it reads.

Formats:
- `chat` (default): the prompt becomes a user message (after the optional system message)
  rendered by the tokenizer's chat template with the generation prompt; the completion is
  the assistant's text followed by the eos token (`<|im_end|>` for SmolLM2), as the server
  sees it when an agent sends the chat-formatted trajectory and generates one turn.
- `plain`: prompt text (with the tokenizer's usual special tokens) then completion text and
  eos, for prompts that already are the full formatted trajectory.

`shared_a` is the LRAgent paper's recipe for base-lr-shared adapters: train the first role
normally, then give every other role that role's v_proj `lora_A` (frozen) and train only
its v_proj B and its q_proj A and B. All roles then write the same low-rank value cache
`X A_v`, so one LR cache serves all of them.

All roles live as named adapters on one PEFT model over one copy of the base weights, so
an 8B model on a GPU needs no second copy; each is saved as its own PEFT folder.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from lragent_sglang.adapters.io import DEFAULT_TARGETS, WEIGHT_FILES

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SHARED_A_SUFFIX = "v_proj.lora_A"
FORMATS = ("chat", "plain")
TRAIN_LOG = "train_log.json"
IGNORE_INDEX = -100
# Role names become PEFT adapter names, parameter-name parts and folder names.
_ROLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class RoleExample:
    role: str
    prompt: str
    completion: str
    system: str | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters shared by every role."""

    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-3
    steps: int = 30
    batch_size: int = 4
    max_len: int = 256
    seed: int = 0
    fmt: str = "chat"
    dropout: float = 0.0
    weight_decay: float = 0.0
    shared_a: bool = False

    def validate(self) -> None:
        if self.rank < 1 or self.steps < 1 or self.batch_size < 1 or self.max_len < 2:
            raise ValueError(f"rank, steps, batch_size must be >= 1 and max_len >= 2: {self}")
        if self.fmt not in FORMATS:
            raise ValueError(f"format {self.fmt!r} is not one of {', '.join(FORMATS)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class RoleReport:
    """What happened to one role: its loss per step and how far each parameter group moved
    (Frobenius norm of the change summed over layers; 0.0 for a frozen group)."""

    role: str
    path: str
    examples: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    update_norms: dict[str, float] = field(default_factory=dict)
    frozen: list[str] = field(default_factory=list)


def load_examples(path: Path) -> list[RoleExample]:
    """Read and validate the JSONL; ValueError naming the line of the first bad record."""
    examples = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not JSON ({exc})") from None
        missing = [k for k in ("role", "prompt", "completion") if not isinstance(rec.get(k), str) or not rec[k]]
        if missing:
            raise ValueError(f"{path}:{lineno}: needs non-empty string fields {missing}")
        examples.append(RoleExample(rec["role"], rec["prompt"], rec["completion"], rec.get("system")))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def encode(tokenizer: PreTrainedTokenizerBase, example: RoleExample, fmt: str, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels IGNORE_INDEX on the prompt; the prompt is cut from the
    left when too long, so the completion (what is learnt) survives."""
    if fmt == "chat":
        messages = ([{"role": "system", "content": example.system}] if example.system else []) + [
            {"role": "user", "content": example.prompt}
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(example.prompt)["input_ids"]
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    completion_ids = (completion_ids + [tokenizer.eos_token_id])[: max_len - 1]
    prompt_ids = prompt_ids[-(max_len - len(completion_ids)):]
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def _collate(batch: Sequence[tuple[list[int], list[int]]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (x, y) in enumerate(batch):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def _batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """Index batches over reshuffled epochs: every example once per epoch, reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < min(batch_size, n):
            order += torch.randperm(n, generator=gen).tolist()
        take = min(batch_size, n)
        yield order[:take]
        order = order[take:]


def _role_params(model: PeftModel, role: str) -> dict[str, torch.nn.Parameter]:
    """The role's LoRA parameters by PEFT key without the adapter name."""
    suffix = f".{role}.weight"
    return {
        name[: -len(suffix)] + ".weight": p
        for name, p in model.named_parameters()
        if name.endswith(suffix) and ".lora_" in name
    }


def _group(name: str) -> str:
    """`...layers.3.self_attn.v_proj.lora_A.weight` -> `v_proj.lora_A`."""
    parts = name.split(".")
    return ".".join(parts[-3:-1])


def _cast_saved(path: Path, dtype: torch.dtype) -> None:
    """Rewrite a saved adapter's weights in `dtype` (shared A stays shared: the cast is
    deterministic)."""
    from safetensors.torch import load_file, save_file

    save_file({k: v.to(dtype) for k, v in load_file(path).items()}, path, metadata={"format": "pt"})


def _train_one(model: PeftModel, role: str, data: list[tuple[list[int], list[int]]], cfg: TrainConfig,
               pad_id: int, seed: int, progress: bool) -> tuple[list[float], dict[str, float], list[str]]:
    params = _role_params(model, role)
    start = {k: p.detach().clone() for k, p in params.items()}
    trainable = [p for p in params.values() if p.requires_grad]
    frozen = sorted({_group(k) for k, p in params.items() if not p.requires_grad})
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    device = next(model.parameters()).device
    model.train()
    losses = []
    bar = tqdm(_batches(len(data), cfg.batch_size, cfg.steps, seed), total=cfg.steps,
               desc=f"train {role}", disable=not progress, leave=True)
    for idx in bar:
        out = model(**_collate([data[i] for i in idx], pad_id, device))
        if not math.isfinite(out.loss.item()):
            raise FloatingPointError(f"role {role!r}: loss is {out.loss.item()} at step {len(losses)}; lower --lr")
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    moved: dict[str, float] = {}
    for k, p in params.items():
        g = _group(k)
        moved[g] = moved.get(g, 0.0) + float((p.detach() - start[k]).float().square().sum())
    return losses, {g: math.sqrt(v) for g, v in sorted(moved.items())}, frozen


def train_role_adapters(
    model_path: Path,
    examples: list[RoleExample],
    out_dir: Path,
    cfg: TrainConfig = TrainConfig(),
    roles: Sequence[str] | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    threads: int | None = None,
    save_dtype: torch.dtype = torch.float32,
) -> list[RoleReport]:
    """Train one adapter per role and save each as a PEFT folder `out_dir/<role>`.

    `roles` picks and orders the roles (default: order of first appearance in the data);
    with `cfg.shared_a` the first one supplies the shared v_proj A. Also writes
    `out_dir/train_log.json` (config, per-role losses, timings, parameter movement).
    `threads` sets torch's CPU threads for the run (on cores busy with other work, 1 thread
    ran SmolLM2 steps 5x faster than 2). `save_dtype` is the saved weights' dtype (training
    is in float32; float16 halves the files, for adapters shipped in a repository).
    """
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train_role_adapters(model_path, examples, Path(out_dir), cfg, roles, device, dtype, progress,
                                    save_dtype)
    finally:
        torch.set_num_threads(previous_threads)


def _train_role_adapters(model_path: Path, examples: list[RoleExample], out_dir: Path, cfg: TrainConfig,
                         roles: Sequence[str] | None, device: str | None, dtype: torch.dtype,
                         progress: bool, save_dtype: torch.dtype) -> list[RoleReport]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg.validate()
    by_role: dict[str, list[RoleExample]] = {}
    for ex in examples:
        by_role.setdefault(ex.role, []).append(ex)
    roles = list(roles or by_role)
    if len(set(roles)) != len(roles) or not all(_ROLE_NAME.fullmatch(r) for r in roles):
        raise ValueError(f"roles must be distinct names of letters, digits, _ or -, got {roles}")
    absent = [r for r in roles if r not in by_role]
    if absent:
        raise ValueError(f"no examples for roles {absent} (the data has {sorted(by_role)})")
    if cfg.shared_a and len(roles) < 2:
        logger.warning("--shared-a with one role: nothing to share")

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    lora = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(DEFAULT_TARGETS),
        lora_dropout=cfg.dropout, bias="none", task_type="CAUSAL_LM",
        base_model_name_or_path=str(model_path),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = []
    peft_model = None
    for idx, role in enumerate(roles):
        torch.manual_seed(cfg.seed * 1000 + idx)  # the role's LoRA init
        if peft_model is None:
            peft_model = get_peft_model(model, lora, adapter_name=role)
        else:
            peft_model.add_adapter(role, lora)
        peft_model.set_adapter(role)  # makes exactly this role's LoRA trainable
        if cfg.shared_a and idx > 0:
            source = _role_params(peft_model, roles[0])
            for key, p in _role_params(peft_model, role).items():
                if SHARED_A_SUFFIX in key:
                    with torch.no_grad():
                        p.copy_(source[key])
                    p.requires_grad_(False)
        data = [encode(tokenizer, ex, cfg.fmt, cfg.max_len) for ex in by_role[role]]
        started = time.monotonic()
        losses, moved, frozen = _train_one(peft_model, role, data, cfg, pad_id, cfg.seed * 1000 + idx, progress)
        seconds = time.monotonic() - started
        peft_model.save_pretrained(str(out_dir), selected_adapters=[role])
        if save_dtype != torch.float32:
            _cast_saved(out_dir / role / WEIGHT_FILES[0], save_dtype)
        reports.append(RoleReport(role, str(out_dir / role), len(data), losses, seconds, moved, frozen))
        logger.info("role %s: %d steps in %.1f s, loss %.3f -> %.3f, saved to %s",
                    role, cfg.steps, seconds, losses[0], losses[-1], out_dir / role)
    log = {"model_path": str(model_path), "device": device, "config": asdict(cfg),
           "save_dtype": str(save_dtype).removeprefix("torch."), "roles": [asdict(r) for r in reports]}
    (out_dir / TRAIN_LOG).write_text(json.dumps(log, indent=2))
    return reports
