"""The LoRA split: q keeps its LoRA, v's `(x A_v) B_v` term leaves the QKV projection.

Two hooks on SGLang's LoRA code (registered through HookRegistry in base-sharing schemes):

- after `LoRAMemoryPool.load_lora_weight_to_buffer`: copy the adapter's v_proj B (times
  alpha/r) into the runtime's `b_v` stack and its v_proj A into `a_v`, then zero B_v in
  SGLang's buffer so the stock QKV LoRA adds nothing to V. In base-lr-shared mode the
  first adapter's A_v becomes the group's and every later adapter must match it.
- around `QKVParallelLinearWithLoRA.forward`: after the stock projection (and its q/k
  LoRA), compute the LR rows `L = x A_v^T` of this layer's tokens and park them for the
  attention backend, which writes them to the LR pool next to K and V_base. Hooked on
  `forward`, not `apply_lora`: SGLang skips `apply_lora` while no batch has had an
  adapter yet, but base-lr-shared must write the shared LR rows for no-adapter requests
  too (a fork's prefix commit), or later roles would read zeros there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch

from lragent_sglang.runtime import LRAgentRuntime, get_runtime

logger = logging.getLogger(__name__)

SHARED_A_RTOL = 1e-3
QKV = "qkv_proj"


class SharedAMismatch(ValueError):
    """An adapter's v_proj A differs from the group's in base-lr-shared (shared-A) mode."""


def tag_layer_ids(lora_modules: list[dict[str, Any]]) -> None:
    """Mark each QKV LoRA module with its layer, which `apply_lora` is not told."""
    for layer_id, modules in enumerate(lora_modules):
        for name, module in modules.items():
            if name.endswith(QKV):
                module.lragent_layer_id = layer_id


def qkv_shard_sizes(pool: Any) -> tuple[int, int, int]:
    """(q, kv, head_dim) output sizes of this TP rank's QKV projection."""
    cfg = pool.base_hf_config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    tp = pool.tp_size
    return heads // tp * head_dim, max(1, kv_heads // tp) * head_dim, head_dim


def ensure_stacks(rt: LRAgentRuntime, pool: Any) -> None:
    if rt.b_v:
        return
    a0 = pool.A_buffer[QKV][0]
    b0 = pool.B_buffer[QKV][0]
    _, kv_size, head_dim = qkv_shard_sizes(pool)
    rt.init_weight_stacks(
        n_slots=a0.shape[0], num_layers=len(pool.A_buffer[QKV]), h_kv=kv_size // head_dim,
        head_dim=head_dim, hidden=a0.shape[2], dtype=b0.dtype, device=b0.device,
    )


def capture_v_weights(result: Any, pool: Any, uid: str | None, buffer_id: int,
                      lora_adapter: Any, lora_modules: list[dict[str, Any]], *args: Any,
                      **kwargs: Any) -> None:
    """AFTER hook of `LoRAMemoryPool.load_lora_weight_to_buffer` (see module docstring)."""
    rt = get_runtime()
    if not rt.enabled or QKV not in pool.A_buffer:
        return
    ensure_stacks(rt, pool)
    rt.slot_uid[buffer_id] = uid
    if uid is None:
        for layer in range(rt.num_layers):
            rt.b_v[layer][buffer_id].zero_()
            if rt.scheme == "base-shared":
                rt.a_v[layer][buffer_id].zero_()
        return
    r = lora_adapter.config.r
    scaling = float(lora_adapter.scaling)
    q_size, kv_size, _ = qkv_shard_sizes(pool)
    h_kv, d = rt.b_v[0].shape[1], rt.b_v[0].shape[3]
    for layer in range(rt.num_layers):
        a_buf = pool.A_buffer[QKV][layer][buffer_id]
        b_buf = pool.B_buffer[QKV][layer][buffer_id]
        a_v = a_buf[2 * r : 3 * r]
        b_v = b_buf[q_size + kv_size : q_size + 2 * kv_size, :r]
        if rt.scheme == "base-lr-shared":
            _check_or_set_group_a(rt, layer, a_v, uid)
        else:
            rt.a_v[layer][buffer_id].zero_()
            rt.a_v[layer][buffer_id, :r] = a_v
        # b_v: [H_kv * D, r] -> [H_kv, r, D]
        rt.b_v[layer][buffer_id].zero_()
        rt.b_v[layer][buffer_id, :, :r] = (b_v.float() * scaling).reshape(h_kv, d, r).transpose(1, 2).to(rt.b_v[layer].dtype)
        b_buf[q_size + kv_size : q_size + 2 * kv_size].zero_()
    logger.info("lragent: adapter %s (r=%d) split into buffer slot %d", uid, r, buffer_id)


def preload_group_a(rt: LRAgentRuntime, lora_paths: Any) -> None:
    """Set the group's A from the first `--lora-paths` adapter at start-up.

    SGLang copies an adapter into its GPU buffers only when a batch first uses it, but the
    shared LR rows must be right from the first request on, including no-adapter ones
    (a fork's prefix commit): with a zero A they would hold zeros for every later role.
    """
    from lragent_sglang.adapter_check import adapter_tensors, lora_matrices, lora_pairs

    pairs = lora_pairs(lora_paths)
    if not pairs:
        return
    name, path = pairs[0]
    for layer, (a, _) in lora_matrices(adapter_tensors(Path(path)), "v_proj").items():
        group = rt.a_v[layer][0]
        group.zero_()
        group[: a.shape[0]] = a.to(group)
    rt.group_owner = name
    logger.info("lragent: shared LR basis = v_proj A of adapter %s", name)


def _check_or_set_group_a(rt: LRAgentRuntime, layer: int, a_v: torch.Tensor, uid: str) -> None:
    group = rt.a_v[layer][0]
    r = a_v.shape[0]
    if rt.group_owner is None or rt.group_owner == uid:
        if layer == rt.num_layers - 1:
            rt.group_owner = uid
        group.zero_()
        group[:r] = a_v
        return
    if not torch.allclose(group[:r].float(), a_v.float(), rtol=SHARED_A_RTOL, atol=1e-6) or group[r:].abs().sum() > 0:
        raise SharedAMismatch(
            f"adapter {uid!r} has a different v_proj A than {rt.group_owner!r} (layer {layer}); "
            "base-lr-shared needs shared-A adapters: use --lragent-scheme base-shared, "
            "or adapters trained with a shared v_proj A"
        )


def split_qkv_lora(original: Callable[..., Any], module: Any, x: torch.Tensor) -> Any:
    """AROUND hook of `QKVParallelLinearWithLoRA.forward` (see module docstring)."""
    out = original(module, x)
    rt = get_runtime()
    layer_id = getattr(module, "lragent_layer_id", None)
    if not rt.enabled or layer_id is None or not rt.a_v:
        return out
    a = rt.a_v[layer_id]  # [slots, R, hidden]
    x2 = x.reshape(-1, x.shape[-1])
    if a.shape[0] == 1:
        lr = x2 @ a[0].to(x2.dtype).T
    else:
        all_lr = (x2 @ a.reshape(-1, a.shape[-1]).to(x2.dtype).T).view(x2.shape[0], a.shape[0], a.shape[1])
        slot = rt.token_slot
        lr = all_lr[torch.arange(x2.shape[0], device=x2.device), slot[: x2.shape[0]].clamp(min=0)]
    rt.pending_lr[layer_id] = lr
    return out


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.lora.mem_pool.LoRAMemoryPool.load_lora_weight_to_buffer",
        capture_v_weights, HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.lora.layers.QKVParallelLinearWithLoRA.forward", split_qkv_lora, HookType.AROUND,
    )
