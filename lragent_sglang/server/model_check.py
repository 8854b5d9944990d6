"""Refuse, with one line naming the model type and the feature, what our backends (or
SGLang 0.5.17 on the path they choose) would serve differently from the unshared model.

Two checks: `check_model_config` reads the checkpoint's config.json in the launcher,
before SGLang loads anything (a clean one-line error); `check_attention_layers` looks at
the attention layers SGLang built, in the scheduler, for what a config does not show.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lragent_sglang.scheme import Scheme

#: model types whose SGLang 0.5.17 class passes the config's sliding window to its
#: attention layers (gemma2.py, gemma3_causal.py); the Llama-family classes (Mistral,
#: Phi-3, Qwen2 ...) build every layer without one and attend to the whole context.
WINDOW_HONOURED = frozenset({"gemma2", "gemma3", "gemma3_text"})
#: widest head the Triton Flash-LoRA kernels tile (kernels/common.py)
MAX_TRITON_HEAD_DIM = 256


class ModelError(ValueError):
    """A model the server cannot serve exactly; the message names the type and feature."""


def read_config(model_path: str | Path) -> dict[str, Any] | None:
    """The checkpoint's config.json (its text part for multimodal ones), or None where the
    model is not a local folder (SGLang resolves it; the scheduler-side check remains)."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    return cfg.get("text_config") or cfg


def declared_window(cfg: dict[str, Any]) -> int | None:
    """The sliding window transformers applies to this model (keys per query), or None."""
    window = cfg.get("sliding_window")
    if not window:
        return None
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    return None if cfg.get("use_sliding_window") is False else window


def check_model_config(cfg: dict[str, Any], scheme: Scheme, context_length: int | None, gpu: bool) -> None:
    """ModelError for what the config shows we cannot serve exactly (see module docstring)."""
    model_type = cfg.get("model_type", "?")
    if cfg.get("kv_lora_rank") or cfg.get("q_lora_rank"):
        raise ModelError(f"model type {model_type}: multi-head latent attention (MLA) is not served by the "
                         "lragent backends; use stock SGLang without --attention-backend lragent")
    if cfg.get("cross_attention_layers") or cfg.get("is_encoder_decoder"):
        raise ModelError(f"model type {model_type}: cross-attention is not served by the lragent backends")
    window = declared_window(cfg)
    context = context_length or cfg.get("max_position_embeddings")
    if window and model_type not in WINDOW_HONOURED and (context is None or context > window):
        raise ModelError(
            f"model type {model_type} declares sliding_window {window}, which SGLang 0.5.17's model class "
            f"ignores: prompts longer than {window} tokens would be served wrong; pass --context-length "
            f"{window} (then the window never applies) or use a checkpoint without a window")
    heads = cfg.get("num_attention_heads") or 1
    head_dim = cfg.get("head_dim") or cfg.get("hidden_size", 0) // heads
    if gpu and scheme.shares_base and head_dim > MAX_TRITON_HEAD_DIM:
        raise ModelError(f"model type {model_type}: head_dim {head_dim} is above the {MAX_TRITON_HEAD_DIM} the "
                         f"Flash-LoRA kernels tile; use --lragent-scheme {Scheme.NON_SHARED}")


def check_attention_layers(model: Any, kv_pool: Any, scheme: Scheme) -> None:
    """ModelError for attention layers or a KV pool our Flash-LoRA backend cannot serve."""
    from sglang.srt.layers.radix_attention import AttentionType, RadixAttention
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if scheme.shares_base and type(kv_pool) is not MHATokenToKVPool:
        raise ModelError(f"model type {model_type}: its KV pool {type(kv_pool).__name__} (e.g. hybrid sliding-window "
                         f"memory) is not served by --lragent-scheme {scheme}; use {Scheme.NON_SHARED}")
    for layer in model.modules():
        if not isinstance(layer, RadixAttention):
            continue
        problem = None
        if layer.is_cross_attention:
            problem = "cross-attention"
        elif layer.attn_type != AttentionType.DECODER:
            problem = f"{layer.attn_type.name.lower()} attention (not causal decoder attention)"
        elif layer.qk_head_dim != layer.v_head_dim:
            problem = f"value head dim {layer.v_head_dim} != key head dim {layer.qk_head_dim}"
        elif layer.logit_cap and layer.logit_capping_method != "tanh":
            problem = f"logit capping method {layer.logit_capping_method!r}"
        elif layer.use_irope:
            problem = "chunked (iRoPE) attention"
        if problem:
            raise ModelError(f"model type {model_type}, attention layer {layer.layer_id}: {problem} is not served by "
                             "the lragent attention backend")
