"""Write a random-weight Llama (or Qwen2: Llama with q/k/v biases) checkpoint from a preset
or a config.json.

The GPU machine cannot download weights; speed work needs real shapes, not real
weights. Tensors are drawn on the GPU when there is one and written shard by shard
(one shard per few layers) so an 8B model never sits in host memory whole.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

logger = logging.getLogger(__name__)

_LLAMA_BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
PRESETS = {
    "smollm2-135m": {
        **_LLAMA_BASE, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "vocab_size": 49152, "max_position_embeddings": 8192, "rope_theta": 100000.0,
        "tie_word_embeddings": True,
    },
    "llama-3.1-8b": {
        **_LLAMA_BASE, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
    # Qwen2.5-7B-Instruct's shapes: GQA group 7 (28 q / 4 kv heads), q/k/v biases; 40k positions (the
    # real 32k plus YaRN) so the paper trace at L = 8k (33.7k tokens) fits.
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 131072,
        "max_window_layers": 28, "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
    },
}
LAYERS_PER_SHARD = 4


def layer_shapes(cfg: dict, layer: int) -> dict[str, tuple[int, ...]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    p = f"model.layers.{layer}"
    biases = {}
    if cfg.get("model_type") == "qwen2" or cfg.get("attention_bias"):
        biases = {f"{p}.self_attn.q_proj.bias": (q,), f"{p}.self_attn.k_proj.bias": (kv,),
                  f"{p}.self_attn.v_proj.bias": (kv,)}
    return biases | {
        f"{p}.self_attn.q_proj.weight": (q, h),
        f"{p}.self_attn.k_proj.weight": (kv, h),
        f"{p}.self_attn.v_proj.weight": (kv, h),
        f"{p}.self_attn.o_proj.weight": (h, q),
        f"{p}.mlp.gate_proj.weight": (i, h),
        f"{p}.mlp.up_proj.weight": (i, h),
        f"{p}.mlp.down_proj.weight": (h, i),
        f"{p}.input_layernorm.weight": (h,),
        f"{p}.post_attention_layernorm.weight": (h,),
    }


def random_tensor(name: str, shape: tuple[int, ...], device: str, gen: torch.Generator) -> torch.Tensor:
    """Norm weights 1, biases 0, matrices with 1/sqrt(fan_in) scale (activations stay finite)."""
    if len(shape) == 1:
        return (torch.zeros if name.endswith(".bias") else torch.ones)(shape, dtype=torch.bfloat16)
    w = torch.randn(shape, device=device, generator=gen, dtype=torch.float32)
    return (w / shape[-1] ** 0.5).to(torch.bfloat16).cpu()


def write_checkpoint(cfg: dict, out: Path, seed: int = 0) -> Path:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    n_layers = cfg["num_hidden_layers"]
    shards: list[dict[str, tuple[int, ...]]] = [
        {"model.embed_tokens.weight": (cfg["vocab_size"], cfg["hidden_size"]),
         "model.norm.weight": (cfg["hidden_size"],)}
    ]
    if not cfg.get("tie_word_embeddings"):
        shards[0]["lm_head.weight"] = (cfg["vocab_size"], cfg["hidden_size"])
    for start in range(0, n_layers, LAYERS_PER_SHARD):
        shard: dict[str, tuple[int, ...]] = {}
        for layer in range(start, min(start + LAYERS_PER_SHARD, n_layers)):
            shard.update(layer_shapes(cfg, layer))
        shards.append(shard)
    weight_map: dict[str, str] = {}
    for idx, shard in enumerate(tqdm(shards, desc="writing shards")):
        name = f"model-{idx + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: random_tensor(k, s, device, gen) for k, s in shard.items()}, str(out / name),
                  metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
    )
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")


def copy_tokenizer(src: Path, out: Path) -> None:
    """Put the tokenizer files found in `src` next to the weights in `out`."""
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy(src / f, out / f)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS))
    src.add_argument("--config", type=Path, help="a config.json to copy the shapes from")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer-from", type=Path, help="copy tokenizer files from this folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    cfg = PRESETS[args.preset] if args.preset else json.loads(args.config.read_text())
    write_checkpoint(dict(cfg), args.out, args.seed)
    if args.tokenizer_from:
        copy_tokenizer(args.tokenizer_from, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
