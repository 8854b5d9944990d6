"""Tiny random-weight float32 checkpoints of the model families people serve, and PEFT role
adapters for them (issue 14's model matrix).

    python scripts/make_tiny_model.py --family qwen2 --out /tmp/tiny/qwen2 [--adapters plan action]
    python scripts/make_tiny_model.py --all --out /tmp/tiny          # one folder per family
    python scripts/make_tiny_model.py --list

Each checkpoint is written by transformers itself (`AutoModelForCausalLM.from_config` +
`save_pretrained`), so its config.json and tensor names are what the family's real
checkpoints use (Phi-3's fused `qkv_proj` / `gate_up_proj`, Gemma-3's `gemma3_text` config,
...). Every family keeps what the issue's matrix stresses: GQA group (with at least two KV
heads, so a wrong q-head -> kv-head map shows), head_dim where it is the point (Qwen3 128
with hidden != heads x head_dim, Gemma 256, Phi-3 96), qkv bias, q/k norms, windows,
soft-caps, `query_pre_attn_scalar`; depth and width shrink (3-4 layers, 128-256 hidden
units). `Family.real` names the checkpoint each copies and `Family.notes` every deviation.
The vocabulary is the embedded SmolLM2 model's (49152 tokens) and its tokenizer files are
copied next to the weights, so text prompts work too; a checkpoint is 50-70 MB (untied
families use 128 hidden units with an explicit head_dim; OLMo-2 stays square because
SGLang's Olmo2 derives head_dim from the hidden size, and is tied to stay small; Qwen2
stays square because SGLang's Qwen2 on CPU ignores config.head_dim).

Weights are drawn from a seeded generator, not transformers' init (std 0.02 gives near-flat
logits, so greedy ties would decide the comparison): matrices N(0, 1/fan_in), an untied
lm_head N(0, 1), token embeddings N(0, 0.08^2) (Gemma, whose embeddings are scaled by
sqrt(hidden): 0.015) so the layers, not the echo of the last token, decide the next token,
norm weights near 1 (Gemma's `1 + w` norms near 0), biases N(0, 0.1), and in tied models a
final-norm gain that brings the logits to std ~10 (top-2 gaps of 0.01-1 along the greedy
paths, far above float32 noise). Gemma-2's q/k projections are scaled x3 so its attention
soft-cap (50) really changes greedy output, and both Gemma families use a
`query_pre_attn_scalar` != head_dim, so a backend that scales by head_dim ** -0.5
disagrees; windows are 16 tokens, so prompts of 24-60 tokens exceed them. (Gemma-2's final
soft-cap is monotonic: greedy output cannot see it, only logprobs can.) Same family and
seed: byte-identical tensors.

The HF reference must run with `attn_implementation="eager"` (`HF_ATTN_IMPLEMENTATION`,
used by `hf_greedy_ids`): transformers 5.12.1 defaults Gemma-2 to sdpa, which drops the
attention soft-cap without a word.

Role adapters (`make_tiny_adapters`) are made with PEFT on the HF model: q_proj/v_proj LoRA
for most families, the fused `qkv_proj` for Phi-3 (PEFT wraps HF's fused Linear; A is
[r, hidden], B is [q + 2 kv, r], rows q | k | v; SGLang loads it as is, repeating A for the
three slices). `zero_k_b` zeroes the K rows of a fused B (a K delta cannot be shared),
`shared_v_a` gives every role the first role's v A (for the fused projection that is the
whole A).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

VOCAB_SIZE = 49152  # SmolLM2's tokenizer
SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
MARKER = "tiny_model.json"
WINDOW = 16  # sliding window of the windowed families: prompts of ~60 tokens exceed it
HF_ATTN_IMPLEMENTATION = "eager"  # the reference's attention (sdpa drops Gemma-2's soft-cap)


@dataclass(frozen=True)
class Family:
    """One row of the matrix: the transformers config class and its arguments."""

    name: str
    config_class: str
    architecture: str
    stresses: str
    config: dict[str, Any]
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    gemma_norm: bool = False  # RMSNorm weights stored as w in x * (1 + w)
    embed_std: float = 0.08  # std of the token embeddings (and of a tied lm_head)
    final_norm_gain: float = 8.0  # the final norm's weight (tied models: logits std ~ 10)
    qk_gain: float = 1.0  # extra scale of the q and k projections
    real: str = ""  # the real checkpoint whose head layout this copies
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def model_type(self) -> str:
        return self.build_config().model_type

    def build_config(self) -> Any:
        import transformers

        cls = getattr(transformers, self.config_class)
        cfg = cls(vocab_size=VOCAB_SIZE, **SPECIAL_IDS, **self.config)
        cfg.architectures = [self.architecture]
        return cfg


def _mlp(hidden: int) -> dict[str, int]:
    return {"hidden_size": hidden, "intermediate_size": 2 * hidden}


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "llama", "LlamaConfig", "LlamaForCausalLM", "baseline (Llama-3 head layout, llama3 RoPE scaling)",
            {**_mlp(256), "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2,
             "head_dim": 64, "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
             "tie_word_embeddings": True,
             "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192}},
            real="Llama-3.2-1B (32 q / 8 kv, head_dim 64, tied; hidden 2048 = heads x head_dim)",
            notes=("explicit head_dim 64 with hidden 256 (8 x 64 = 512): keeps two KV heads in a small model",),
        ),
        Family(
            "qwen2", "Qwen2Config", "Qwen2ForCausalLM", "qkv bias, GQA group 7",
            {**_mlp(224), "num_hidden_layers": 3, "num_attention_heads": 14, "num_key_value_heads": 2,
             "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
             "tie_word_embeddings": True, "use_sliding_window": False,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
            real="Qwen2.5-0.5B (14 q / 2 kv, head_dim 64, qkv bias, tied)",
            notes=("head_dim 16 = hidden 224 / 14 heads (real: 896 / 14 = 64): SGLang's Qwen2 on CPU ignores "
                   "config.head_dim (qwen2.py reads hidden / original_num_attention_heads, which "
                   "update_config.adjust_config_with_unaligned_cpu_tp always sets on CPU), so the tiny one stays "
                   "square; 14 / 2 heads keep the real group of 7 with two KV heads",),
        ),
        Family(
            "qwen3", "Qwen3Config", "Qwen3ForCausalLM", "q/k RMSNorm per head, head_dim 128 != hidden / heads",
            {**_mlp(256), "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2,
             "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 40960,
             "tie_word_embeddings": True, "attention_bias": False, "use_sliding_window": False,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
            real="Qwen3-4B (32 q / 8 kv, head_dim 128, hidden 2560, tied)",
        ),
        Family(
            "mistral-window", "MistralConfig", "MistralForCausalLM", f"sliding window {WINDOW} on every layer",
            {**_mlp(128), "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2,
             "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 32768,
             "tie_word_embeddings": False, "sliding_window": WINDOW,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
            real="Mistral-7B-v0.1 (32 q / 8 kv, head_dim 128, sliding_window 4096, untied)",
            notes=("hidden 128 with an explicit head_dim 128 (as Mistral-Nemo / Small write it) keeps the "
                   "untied checkpoint near 50 MB",),
        ),
        Family(
            "mistral", "MistralConfig", "MistralForCausalLM", "no window (v0.3)",
            {**_mlp(128), "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2,
             "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 32768,
             "tie_word_embeddings": False, "sliding_window": None,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
            real="Mistral-7B-v0.3 (32 q / 8 kv, head_dim 128, no window, untied)",
        ),
        Family(
            "gemma2", "Gemma2Config", "Gemma2ForCausalLM",
            "head_dim 256, query_pre_attn_scalar != head_dim, attention + final soft-caps, "
            f"window {WINDOW} on even layers",
            {**_mlp(256), "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 256, "query_pre_attn_scalar": 144, "attn_logit_softcapping": 50.0,
             "final_logit_softcapping": 30.0, "sliding_window": WINDOW,
             "layer_types": ["sliding_attention", "full_attention"] * 2,
             "hidden_activation": "gelu_pytorch_tanh",
             # Google's config.json carries both names; transformers 5 writes only hidden_activation,
             # and SGLang 0.5.17's Gemma2 then fails to build (gemma2.py reads config.hidden_act)
             "hidden_act": "gelu_pytorch_tanh",
             "rms_norm_eps": 1e-6, "max_position_embeddings": 8192, "tie_word_embeddings": True,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
            gemma_norm=True, qk_gain=3.0, embed_std=0.015, final_norm_gain=24.0,
            real="Gemma-2-9B (16 q / 8 kv, head_dim 256, soft-caps 50 / 30, window 4096 on even layers); "
                 "query_pre_attn_scalar 144 as in Gemma-2-27B",
            notes=("q/k projections x3 so attention scores reach the soft-cap",
                   "hidden_act written next to hidden_activation, as in Google's config.json"),
        ),
        Family(
            "gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
            f"own layout: q/k RMSNorm, query_pre_attn_scalar, window {WINDOW} on local layers, "
            "local / global RoPE bases",
            {**_mlp(256), "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 256, "query_pre_attn_scalar": 168, "sliding_window": WINDOW,
             "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
             "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
             "max_position_embeddings": 32768, "tie_word_embeddings": True,
             "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                 "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}},
            gemma_norm=True, embed_std=0.015, final_norm_gain=24.0,
            real="Gemma-3-4B (8 q / 4 kv, head_dim 256, window 1024, 5 local : 1 global); "
                 "query_pre_attn_scalar 168 as in Gemma-3-27B",
        ),
        Family(
            "phi3", "Phi3Config", "Phi3ForCausalLM", "head_dim 96, fused qkv_proj and gate_up_proj",
            {**_mlp(128), "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
             "head_dim": 96, "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
             "original_max_position_embeddings": 4096, "tie_word_embeddings": False, "sliding_window": None,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
            lora_targets=("qkv_proj",),
            real="Phi-3.5-mini (32 q / 32 kv, head_dim 96, untied; Phi-3-mini-4k also has sliding_window 2047)",
            notes=("hidden 128 with an explicit head_dim 96 keeps the untied checkpoint near 50 MB",),
        ),
        Family(
            "olmo2", "Olmo2Config", "Olmo2ForCausalLM", "q/k RMSNorm over the whole projection",
            {**_mlp(256), "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 2,
             "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
             "tie_word_embeddings": True, "attention_bias": False,
             "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
            real="OLMo-2-7B (32 q / 32 kv, head_dim 128 = hidden / heads)",
            notes=("tied (the real ones are not) to stay near 50 MB: SGLang's Olmo2 derives head_dim as "
                   "hidden / heads, so hidden 128 would mean one head",),
        ),
    )
}


def _randomize(model: torch.nn.Module, family: Family, seed: int) -> None:
    """Deterministic weights (see module docstring), in name order."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q_rows = cfg.num_attention_heads * head_dim
    k_rows = cfg.num_key_value_heads * head_dim
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * family.embed_std)
            elif name.startswith("lm_head"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
                if family.qk_gain != 1.0:
                    if name.endswith(("q_proj.weight", "k_proj.weight")):
                        p.mul_(family.qk_gain)
                    elif name.endswith("qkv_proj.weight"):
                        p[: q_rows + k_rows].mul_(family.qk_gain)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:  # norm weights
                noise = torch.randn(p.shape, generator=gen) * 0.1
                gain = family.final_norm_gain if name == "model.norm.weight" and cfg.tie_word_embeddings else 1.0
                p.copy_(gain * (1.0 + noise) - (1.0 if family.gemma_norm else 0.0))


def smollm2_tokenizer_dir() -> Path:
    from lragent_sglang.agents.models import smollm2_checkpoint

    return smollm2_checkpoint()


def write_tiny_model(family: str, out_dir: str | Path, seed: int = 0, tokenizer_dir: str | Path | None = None,
                     overwrite: bool = False) -> Path:
    """Write the tiny checkpoint of `family` to `out_dir` and return it. A folder already
    holding the same family and seed is returned as it is (unless `overwrite`)."""
    from transformers import AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    fam = FAMILIES[family]
    out = Path(out_dir)
    marker = {"family": family, "seed": seed, "real": fam.real, "stresses": fam.stresses}
    if not overwrite and (out / MARKER).is_file():
        try:
            if json.loads((out / MARKER).read_text()) == marker:
                return out
        except json.JSONDecodeError:
            pass
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(fam.build_config(), dtype=torch.float32)
    _randomize(model, fam, seed)
    model.config.dtype = "float32"
    model.save_pretrained(out, safe_serialization=True)
    src = Path(tokenizer_dir) if tokenizer_dir is not None else smollm2_tokenizer_dir()
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    (out / MARKER).write_text(json.dumps(marker, indent=2))
    return out


def family_of(model_dir: str | Path) -> Family:
    """The family a folder written by `write_tiny_model` belongs to."""
    return FAMILIES[json.loads((Path(model_dir) / MARKER).read_text())["family"]]


def make_tiny_adapters(model_dir: str | Path, out_dir: str | Path, roles: tuple[str, ...] = ("plan",),
                       rank: int = 8, alpha: float = 16.0, target_modules: tuple[str, ...] | None = None,
                       shared_v_a: bool = False, zero_k_b: bool = False, b_std: float = 0.3,
                       seed: int = 0) -> dict[str, Path]:
    """PEFT LoRA role adapters for a tiny checkpoint: `out_dir/<role>` per role.

    A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform bound), B ~ N(0, b_std^2), one seed
    per role. `target_modules` defaults to the family's (q_proj/v_proj, Phi-3: qkv_proj).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    fam = family_of(model_dir)
    targets = tuple(target_modules or fam.lora_targets)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = base.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q_rows, kv_rows = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    lora_cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                          bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, lora_cfg)
    shared_a: dict[str, torch.Tensor] = {}
    paths: dict[str, Path] = {}
    for role_idx, role in enumerate(roles):
        gen = torch.Generator().manual_seed(seed * 1000 + role_idx)
        with torch.no_grad():
            for name, module in sorted(model.named_modules(), key=lambda kv: kv[0]):
                if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
                    continue
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                bound = 1.0 / math.sqrt(a.shape[1])
                new_a = (torch.rand(a.shape, generator=gen) * 2 - 1) * bound
                new_b = torch.randn(b.shape, generator=gen) * b_std
                if shared_v_a and name.endswith(("v_proj", "qkv_proj")):
                    new_a = shared_a.setdefault(name, new_a)
                if zero_k_b and name.endswith("qkv_proj"):
                    new_b[q_rows : q_rows + kv_rows] = 0
                a.copy_(new_a)
                b.copy_(new_b)
        role_dir = Path(out_dir) / role
        model.save_pretrained(str(role_dir))
        paths[role] = role_dir
    return paths


def random_prompts(n: int = 3, lens: tuple[int, ...] = (60, 45, 24), seed: int = 0,
                   vocab: tuple[int, int] = (1000, 40000)) -> list[list[int]]:
    """Token-id prompts (longer than the windowed families' window)."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(*vocab) for _ in range(lens[i % len(lens)])] for i in range(n)]


def _hf_model(model_dir: str | Path, adapter_dir: str | Path | None, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                 attn_implementation=HF_ATTN_IMPLEMENTATION)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


def hf_greedy_ids(model_dir: str | Path, adapter_dir: str | Path | None, prompts: list[list[int]],
                  new_tokens: int, dtype: torch.dtype = torch.float32) -> list[list[int]]:
    """Greedy continuations of token-id prompts from transformers (+ peft), eager attention
    (in float32: the reference the server must equal token for token)."""
    model = _hf_model(model_dir, adapter_dir, dtype)
    outs = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=SPECIAL_IDS["pad_token_id"])
        outs.append(gen[0, len(ids):].tolist())
    return outs


def hf_regret(model_dir: str | Path, adapter_dir: str | Path | None, prompts: list[list[int]],
              outputs: list[list[int]]) -> list[float]:
    """Per output token, how much worse than float32's own choice it is: transformers (+ peft)
    in float32 reads prompt + output (teacher-forced) and each token scores
    ``max logp - logp(token)`` at its position (0 where float32 would pick it too).

    Unlike token agreement this judges every token of a run on the run's own path, so a
    bf16 run stays comparable after its first near-tie flip: on the tiny Gemma-2, HF's own
    bf16 run scores a mean of ~0.5, a run with the wrong adapter ~9."""
    model = _hf_model(model_dir, adapter_dir, torch.float32)
    regret: list[float] = []
    for ids, out in zip(prompts, outputs, strict=True):
        if not out:
            continue
        with torch.no_grad():
            logp = model(torch.tensor([ids + out])).logits[0, len(ids) - 1:-1].float().log_softmax(-1)
        chosen = logp.gather(1, torch.tensor(out)[:, None])[:, 0]
        regret += (logp.max(-1).values - chosen).tolist()
    return regret


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--family", choices=sorted(FAMILIES))
    which.add_argument("--all", action="store_true", help="every family, each under OUT/<family>")
    which.add_argument("--list", action="store_true", help="print the families and exit")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapters", nargs="*", metavar="ROLE",
                        help="also write PEFT role adapters under OUT/adapters/<role>")
    parser.add_argument("--shared-v-a", action="store_true")
    parser.add_argument("--zero-k-b", action="store_true", help="fused qkv_proj adapters: zero K's B rows")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.list:
        for fam in FAMILIES.values():
            print(f"{fam.name:15s} {fam.architecture:20s} {fam.stresses}")
        return
    if args.out is None:
        parser.error("--out is required")
    names = list(FAMILIES) if args.all else [args.family]
    for name in names:
        out = args.out / name if args.all else args.out
        start = time.monotonic()
        write_tiny_model(name, out, seed=args.seed, overwrite=args.overwrite)
        if args.adapters:
            make_tiny_adapters(out, out / "adapters", roles=tuple(args.adapters), shared_v_a=args.shared_v_a,
                               zero_k_b=args.zero_k_b, seed=args.seed)
        print(f"{name}: {out} ({time.monotonic() - start:.1f} s)")


if __name__ == "__main__":
    main()
