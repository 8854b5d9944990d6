"""The LoRA split: q keeps its LoRA, v's `(x A_v) B_v` term leaves the QKV projection.

Hooks on SGLang's LoRA code (registered through HookRegistry in base-sharing schemes):

- around `LoRAManager.load_lora_weights` (and its from-tensors twin): in base-lr-shared,
  refuse an adapter the group's LR basis cannot serve exactly (a different v_proj A under
  shared-a, A rows outside the start-up joint basis under joint). SGLang reports the
  error as a failed load (`/load_lora_adapter`) or a start-up failure naming the adapter.
- after `LoRAMemoryPool.load_lora_weight_to_buffer`: copy the adapter's v_proj B (times
  alpha/r) into the runtime's `b_v` stack and its v_proj A into `a_v`, then zero B_v in
  SGLang's buffer so the stock QKV LoRA adds nothing to V. In base-lr-shared the LR rows
  are `x G^T` with the group's rows G, so the adapter's B is rewritten to `B C` with
  `A = C G` (C = I for shared-A adapters, `A G^T` for the orthonormal joint basis).
- around `QKVParallelLinearWithLoRA.forward`: after the stock projection (and its q/k
  LoRA), compute the LR rows `L = x A_v^T` of this layer's tokens and park them for the
  attention backend, which writes them to the LR pool next to K and V_base. Hooked on
  `forward`, not `apply_lora`: SGLang skips `apply_lora` while no batch has had an
  adapter yet, but base-lr-shared must write the shared LR rows for no-adapter requests
  too (a fork's prefix commit), or later roles would read zeros there.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from lragent_sglang.joint_basis import GroupBasis, LRBasisMismatch, coefficients, group_b, shared_a_group
from lragent_sglang.runtime import LRAgentRuntime, get_runtime, start_up_group

logger = logging.getLogger(__name__)

QKV = "qkv_proj"


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
            coeff = coefficients(_served_group(rt), layer, uid, a_v)
        else:
            rt.a_v[layer][buffer_id].zero_()
            rt.a_v[layer][buffer_id, :r] = a_v
            coeff = torch.eye(r, dtype=torch.float64)
        up = group_b(b_v, scaling, coeff.to(b_v.device))  # [H_kv * D, k]
        k = up.shape[1]
        # b_v stack: [H_kv, width, D]
        rt.b_v[layer][buffer_id].zero_()
        rt.b_v[layer][buffer_id, :, :k] = up.reshape(h_kv, d, k).transpose(1, 2).to(rt.b_v[layer].dtype)
        b_buf[q_size + kv_size : q_size + 2 * kv_size].zero_()
    logger.info("lragent: adapter %s (r=%d) split into buffer slot %d", uid, r, buffer_id)


def _served_group(rt: LRAgentRuntime) -> GroupBasis:
    if rt.group is None:
        raise RuntimeError("lragent: base-lr-shared adapter reached the LoRA buffer before its load check")
    return rt.group


def write_group_rows(rt: LRAgentRuntime) -> None:
    """Copy the group's rows G into the one A stack the LR rows are computed with."""
    if rt.group is None or not rt.a_v:
        return
    for layer, stack in enumerate(rt.a_v):
        rows = rt.group.rows.get(layer)
        stack[0].zero_()
        if rows is not None:
            stack[0, : rows.shape[0]] = rows.to(stack)


def preload_group_a(rt: LRAgentRuntime, lora_paths: Any) -> None:
    """Set the group's LR basis from the `--lora-paths` adapters at start-up.

    SGLang copies an adapter into its GPU buffers only when a batch first uses it, but the
    shared LR rows must be right from the first request on, including no-adapter ones
    (a fork's prefix commit): with a zero A they would hold zeros for every later role.
    """
    group = start_up_group(lora_paths, rt.lr_basis)
    if group is None:
        return
    rt.group = group
    write_group_rows(rt)
    logger.info("lragent: shared LR basis = %s", group.describe())


def adapter_v_a(lora_adapter: Any) -> dict[int, torch.Tensor]:
    """Per layer, the v_proj A [r, hidden] of an adapter SGLang holds in CPU memory (its
    q/k/v A are stacked into qkv_proj there, v last)."""
    r = lora_adapter.config.r
    out = {}
    for layer_id, layer in enumerate(lora_adapter.layers):
        for name, weight in layer.weights.items():
            if "qkv_proj.lora_A" in name:
                out[layer_id] = weight[2 * r : 3 * r]
            elif "v_proj.lora_A" in name:
                out[layer_id] = weight
    return out


def check_new_adapter(original: Callable[..., Any], manager: Any, lora_ref: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND hook of `LoRAManager.load_lora_weights[_from_tensors]` (see module docstring).

    Without start-up adapters, the first adapter loaded under shared-a founds the group.
    A refused adapter is dropped from the manager again, so a later load may retry it.
    """
    result = original(manager, lora_ref, *args, **kwargs)
    rt = get_runtime()
    if not rt.enabled or rt.scheme != "base-lr-shared":
        return result
    from sglang.srt.server_args import get_global_server_args

    name = lora_ref.lora_name
    a_by_layer = adapter_v_a(manager.loras[lora_ref.lora_id])
    group = rt.group or start_up_group(get_global_server_args().lora_paths, rt.lr_basis)
    group = group or shared_a_group(name, a_by_layer)
    try:
        for layer, a in a_by_layer.items():
            coefficients(group, layer, name, a)
    except LRBasisMismatch as exc:
        logger.warning("lragent: refused adapter %s: %s", name, exc)
        manager.loras.pop(lora_ref.lora_id, None)
        manager.configs.pop(lora_ref.lora_id, None)
        raise
    if rt.group is None:
        rt.group = group
        write_group_rows(rt)
    return result


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

    for method in ("load_lora_weights", "load_lora_weights_from_tensors"):
        HookRegistry.register(f"sglang.srt.lora.lora_manager.LoRAManager.{method}", check_new_adapter, HookType.AROUND)
    HookRegistry.register(
        "sglang.srt.lora.mem_pool.LoRAMemoryPool.load_lora_weight_to_buffer",
        capture_v_weights, HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.lora.layers.QKVParallelLinearWithLoRA.forward", split_qkv_lora, HookType.AROUND,
    )
