"""The LoRA split: q keeps its LoRA, v's `(x A_v) B_v` term leaves the QKV projection.

Hooks on SGLang's LoRA code (rows of `patches`, base-sharing schemes only):

- around `LoRAManager.load_lora_weights` (and its from-tensors twin): in base-shared,
  key the adapter's LR rows by the digest of its weights (`LRAgentRuntime.lr_keys`); in
  base-lr-shared, refuse an adapter the group's LR basis cannot serve exactly (a different
  v_proj A under shared-a, A rows outside the start-up joint basis under joint). SGLang
  reports the error as a failed load (`/load_lora_adapter`) or a start-up failure naming
  the adapter.
- after `LoRAMemoryPool.load_lora_weight_to_buffer`: copy the adapter's v_proj B (times
  alpha/r) into the runtime's `b_v` stack and its v_proj A into `a_v`, then zero B_v in
  SGLang's buffer so the stock QKV LoRA adds nothing to V. In base-lr-shared the LR rows
  are `x G^T` with the group's rows G, so the adapter's B is rewritten to `B C` with
  `A = C G` (C = I for shared-A adapters, `A G^T` for the orthonormal joint basis).
- around `QKVParallelLinearWithLoRA.forward`: after the stock projection (and its q/k
  LoRA), compute the LR rows `L = x A_v^T` of this layer's tokens and write them to the
  LR pool at the slots the attention backend prepared (`ForwardState.lr_out_loc`), next to
  where it writes K and V_base. Hooked on `forward`, not `apply_lora`: SGLang skips
  `apply_lora` while no batch has had an adapter yet, but base-lr-shared must write the
  shared LR rows for no-adapter requests too (a fork's prefix commit), or later roles
  would read zeros there.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from lragent_sglang.adapters.joint_basis import (
    GroupBasis,
    LRBasisMismatch,
    coefficients,
    group_b,
    joint_group,
    shared_a_group,
    tensors_digest,
)
from lragent_sglang.scheme import LRBasis

if TYPE_CHECKING:
    from lragent_sglang.server.runtime import LRAgentRuntime

logger = logging.getLogger(__name__)

QKV = "qkv_proj"


@dataclass
class LRWeights:
    """v_proj's LoRA, split off SGLang's QKV LoRA buffers, per layer."""

    # [n_buffer_slots, H_kv, width, D]: each slot's up-projection, alpha / r folded in.
    b_v: list[torch.Tensor]
    # [n_buffer_slots, width, hidden] (base-shared) or [1, width, hidden] (the one group).
    a_v: list[torch.Tensor]
    # LoRA buffer slot -> adapter uid (None: the slot holds no adapter).
    slot_uid: dict[int, str | None] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.b_v)


def start_up_group(lora_paths: Any, lr_basis: LRBasis) -> GroupBasis | None:
    """The group the `--lora-paths` adapters form in base-lr-shared (None without any):
    the first one's v_proj A (shared-a) or the joint basis of all (joint). Built once per
    process; the LR width, the adapter load check and the start-up A stack all read it."""
    from lragent_sglang.adapters.io import lora_pairs

    return _group_of(tuple(lora_pairs(lora_paths)), lr_basis)


@functools.lru_cache(maxsize=4)
def _group_of(pairs: tuple[tuple[str, str], ...], lr_basis: LRBasis) -> GroupBasis | None:
    from lragent_sglang.adapters.io import v_proj_a

    if not pairs:
        return None
    if lr_basis is LRBasis.SHARED_A:
        name, path = pairs[0]
        return shared_a_group(name, v_proj_a(path))
    return joint_group([(name, v_proj_a(path)) for name, path in pairs])


def tag_layer_ids(lora_modules: list[dict[str, Any]]) -> None:
    """Mark each QKV LoRA module with its layer, which its forward is not told."""
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


def weight_stacks(rt: "LRAgentRuntime", pool: Any) -> LRWeights:
    """Zeroed per-layer B_v and A_v stacks shaped for SGLang's LoRA memory pool."""
    a0 = pool.A_buffer[QKV][0]
    b0 = pool.B_buffer[QKV][0]
    _, kv_size, head_dim = qkv_shard_sizes(pool)
    n_slots, hidden, num_layers = a0.shape[0], a0.shape[2], len(pool.A_buffer[QKV])
    a_slots = 1 if rt.scheme.one_lr_cache else n_slots
    like = dict(dtype=b0.dtype, device=b0.device)
    return LRWeights(
        b_v=[torch.zeros(n_slots, kv_size // head_dim, rt.width, head_dim, **like) for _ in range(num_layers)],
        a_v=[torch.zeros(a_slots, rt.width, hidden, **like) for _ in range(num_layers)],
    )


def set_group(rt: "LRAgentRuntime", group: GroupBasis) -> None:
    """Make `group` the one LR cache's basis: its rows G go into the one A stack."""
    rt.group = group
    for layer, stack in enumerate(rt.weights.a_v):
        rows = group.rows.get(layer)
        stack[0].zero_()
        if rows is not None:
            stack[0, : rows.shape[0]] = rows.to(stack)
    logger.info("lragent: shared LR basis = %s", group.describe())


def capture_v_weights(rt: "LRAgentRuntime", result: Any, pool: Any, uid: str | None, buffer_id: int,
                      lora_adapter: Any, lora_modules: list[dict[str, Any]], *args: Any,
                      **kwargs: Any) -> None:
    """AFTER hook of `LoRAMemoryPool.load_lora_weight_to_buffer` (see module docstring)."""
    w = rt.weights
    if w is None or QKV not in pool.A_buffer:
        return
    w.slot_uid[buffer_id] = uid
    if uid is None:
        for layer in range(w.num_layers):
            w.b_v[layer][buffer_id].zero_()
            if not rt.scheme.one_lr_cache:
                w.a_v[layer][buffer_id].zero_()
        return
    r = lora_adapter.config.r
    scaling = float(lora_adapter.scaling)
    q_size, kv_size, _ = qkv_shard_sizes(pool)
    h_kv, d = w.b_v[0].shape[1], w.b_v[0].shape[3]
    for layer in range(w.num_layers):
        a_buf = pool.A_buffer[QKV][layer][buffer_id]
        b_buf = pool.B_buffer[QKV][layer][buffer_id]
        a_v = a_buf[2 * r : 3 * r]
        b_v = b_buf[q_size + kv_size : q_size + 2 * kv_size, :r]
        if rt.scheme.one_lr_cache:
            coeff = coefficients(_served_group(rt), layer, uid, a_v)
        else:
            w.a_v[layer][buffer_id].zero_()
            w.a_v[layer][buffer_id, :r] = a_v
            coeff = torch.eye(r, dtype=torch.float64)
        up = group_b(b_v, scaling, coeff.to(b_v.device))  # [H_kv * D, k]
        k = up.shape[1]
        w.b_v[layer][buffer_id].zero_()
        w.b_v[layer][buffer_id, :, :k] = up.reshape(h_kv, d, k).transpose(1, 2).to(w.b_v[layer].dtype)
        b_buf[q_size + kv_size : q_size + 2 * kv_size].zero_()
    logger.info("lragent: adapter %s (r=%d) split into buffer slot %d", uid, r, buffer_id)


def _served_group(rt: "LRAgentRuntime") -> GroupBasis:
    if rt.group is None:
        raise RuntimeError("lragent: base-lr-shared adapter reached the LoRA buffer before its load check")
    return rt.group


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


def adapter_digest(lora_adapter: Any) -> str:
    """Content hash of an adapter as SGLang holds it: every LoRA tensor and its scaling."""
    named = [(f"{i}.{name}", w) for i, layer in enumerate(lora_adapter.layers) for name, w in sorted(layer.weights.items())]
    return "adapter:" + tensors_digest(repr(float(lora_adapter.scaling)), named)


def on_adapter_load(rt: "LRAgentRuntime", original: Callable[..., Any], manager: Any, lora_ref: Any,
                    *args: Any, **kwargs: Any) -> Any:
    """AROUND hook of `LoRAManager.load_lora_weights[_from_tensors]` (see module docstring).

    Without start-up adapters, the first adapter loaded under shared-a founds the group.
    A refused adapter is dropped from the manager again, so a later load may retry it.
    """
    from sglang.srt.server_args import get_global_server_args

    result = original(manager, lora_ref, *args, **kwargs)
    if not rt.bound:  # start-up adapters load while SGLang builds the model runner, before our attach
        rt.bind(get_global_server_args())
    if not rt.enabled:
        return result
    adapter = manager.loras[lora_ref.lora_id]
    if not rt.scheme.one_lr_cache:
        rt.lr_keys[lora_ref.lora_id] = adapter_digest(adapter)
        return result
    if rt.weights is None:  # a start-up adapter: attach_model_runner builds the group from --lora-paths
        return result
    name = lora_ref.lora_name
    a_by_layer = adapter_v_a(adapter)
    group = rt.group or start_up_group(get_global_server_args().lora_paths, rt.config.lr_basis)
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
        set_group(rt, group)
    return result


def split_qkv_lora(rt: "LRAgentRuntime", original: Callable[..., Any], module: Any, x: torch.Tensor) -> Any:
    """AROUND hook of `QKVParallelLinearWithLoRA.forward` (see module docstring)."""
    out = original(module, x)
    layer_id = getattr(module, "lragent_layer_id", None)
    if rt.weights is None or layer_id is None:
        return out
    a = rt.weights.a_v[layer_id]  # [slots, R, hidden]
    x2 = x.reshape(-1, x.shape[-1])
    if a.shape[0] == 1:
        lr = x2 @ a[0].to(x2.dtype).T
    else:
        all_lr = (x2 @ a.reshape(-1, a.shape[-1]).to(x2.dtype).T).view(x2.shape[0], a.shape[0], a.shape[1])
        slot = rt.forward.token_slot
        lr = all_lr[torch.arange(x2.shape[0], device=x2.device), slot[: x2.shape[0]].clamp(min=0)]
    rt.lr_pool.write(layer_id, rt.forward.lr_out_loc, lr)
    return out
