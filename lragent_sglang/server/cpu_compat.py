"""Run the real SGLang 0.5.17 server on a machine with no accelerator (CI, laptops).

Stock 0.5.17 does not start there; five small things block it (see the README section
"SGLang on CPU"). Every patch here is off unless no CUDA device is present, or
`LRAGENT_CPU_COMPAT=1` forces it on (`=0` forces it off):

1. `SGLANG_USE_CPU_ENGINE=1` (SGLang reads it at import time to pick CPU paths).
2. A stand-in `sgl_kernel` module (the CPU build of sgl-kernel is not published): torch
   versions of the two helpers ordinary serving imports; every other op it is asked for
   imports fine and raises NotImplementedError naming itself when called (speculative
   decoding, int8 and MoE CPU kernels are not supported here).
3. Pinned host memory, which needs a driver: made a no-op in SGLang's LoRA modules.
4. xgrammar's logit masking on CPU tensors (SGLang raises "Unsupported device: cpu").
5. Our attention backend's name reaching Triton-only helpers (`support_triton`,
   `get_last_loc`): on CPU they take their torch paths.

Spawned scheduler and detokenizer processes import SGLang modules while unpickling their
start function, before `load_plugins()` runs, so (2) must already be in place then: the
plugin swaps those start functions for the ones below, which patch first.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import types
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

ENV_FLAG = "LRAGENT_CPU_COMPAT"
ATTENTION_BACKEND = "lragent"


def wanted() -> bool:
    """True when the CPU patches should be active in this process."""
    flag = os.environ.get(ENV_FLAG)
    if flag in ("0", "1"):
        return flag == "1"
    return not torch.cuda.is_available()


# --- (2) the sgl_kernel stand-in ------------------------------------------------------


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    batch_size: int,
) -> None:
    """Write each request's new slots into its `req_to_token` row, back to back."""
    pt = 0
    for i in range(batch_size):
        start, end = int(start_offset[i]), int(end_offset[i])
        req_to_token[int(req_pool_indices[i]), start:end] = out_cache_loc[pt : pt + end - start]
        pt += end - start


def copy_all_layer_kv_cache_cpu(
    k_buffers: list[torch.Tensor],
    v_buffers: list[torch.Tensor],
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    """Move KV rows `src_loc -> tgt_loc` in every layer."""
    for k, v in zip(k_buffers, v_buffers):
        k[tgt_loc] = k[src_loc]
        v[tgt_loc] = v[src_loc]


def _missing_op(name: str) -> Callable[..., Any]:
    if name.startswith("__"):
        raise AttributeError(name)

    def op(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"sgl_kernel.{name} has no CPU stand-in in lragent_sglang "
            "(only plain serving is supported on CPU)"
        )

    op.__name__ = name
    return op


def install_sgl_kernel_stub() -> None:
    """Put the stand-in at `sys.modules['sgl_kernel']` unless a real one imports."""
    if "sgl_kernel" in sys.modules:
        return
    try:
        import sgl_kernel  # noqa: F401
        return
    except ImportError:
        pass
    stub = types.ModuleType("sgl_kernel")
    stub.__doc__ = "lragent_sglang CPU stand-in for sgl-kernel (torch implementations)."
    stub.assign_req_to_token_pool_cpu = assign_req_to_token_pool_cpu
    stub.copy_all_layer_kv_cache_cpu = copy_all_layer_kv_cache_cpu
    stub.__getattr__ = _missing_op
    sys.modules["sgl_kernel"] = stub


# --- (3) pinned memory ----------------------------------------------------------------

_PINNING_MODULES = ("sglang.srt.lora.layers", "sglang.srt.lora.backend.torch_backend")


class _UnpinnedTorch:
    """`torch` as seen by SGLang's LoRA modules: factories ignore `pin_memory`."""

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if callable(attr) and name in ("tensor", "empty", "zeros", "ones", "full", "arange"):
            return _drop_pin_memory(attr)
        return attr


@functools.lru_cache(maxsize=None)
def _drop_pin_memory(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def call(*args: Any, pin_memory: bool = False, **kwargs: Any) -> torch.Tensor:
        return factory(*args, **kwargs)

    return call


def _unpinned_pin_memory(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


def disable_pinning() -> None:
    """Pinning needs a driver; without an accelerator there is nothing to pin for."""
    import importlib

    torch.Tensor.pin_memory = _unpinned_pin_memory
    proxy = _UnpinnedTorch()
    for name in _PINNING_MODULES:
        importlib.import_module(name).torch = proxy


# --- (4) and (5): hooks through SGLang's HookRegistry ----------------------------------


def _apply_vocab_mask(original: Callable, *args: Any) -> None:
    logits, vocab_mask = args[-2], args[-1]
    if logits.device.type != "cpu":
        return original(*args)
    import xgrammar

    xgrammar.apply_token_bitmask_inplace(logits, vocab_mask.to(logits.device))


def _support_triton(original: Callable[[str], bool], backend: str) -> bool:
    return False if backend == ATTENTION_BACKEND else original(backend)


def _get_last_loc(original: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
    from sglang.srt.mem_cache.allocation import get_last_loc_torch

    return get_last_loc_torch(*args, **kwargs)


def _launch_subprocesses(original: Callable, *args: Any, **kwargs: Any) -> Any:
    kwargs["run_scheduler_process_func"] = run_scheduler_process
    kwargs["run_detokenizer_process_func"] = run_detokenizer_process
    return original(*args, **kwargs)


def register_hooks() -> None:
    """Register the CPU hooks; SGLang applies them in each process after plugins load."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    xgr = "sglang.srt.constrained.xgrammar_backend"
    HookRegistry.register(f"{xgr}.XGrammarGrammar.apply_vocab_mask", _apply_vocab_mask, HookType.AROUND)
    HookRegistry.register(
        f"{xgr}.XGrammarGrammarBackend.apply_vocab_mask", _apply_vocab_mask, HookType.AROUND
    )
    HookRegistry.register("sglang.srt.utils.common.support_triton", _support_triton, HookType.AROUND)
    HookRegistry.register("sglang.srt.mem_cache.allocation.get_last_loc", _get_last_loc, HookType.AROUND)
    HookRegistry.register(
        "sglang.srt.entrypoints.engine.Engine._launch_subprocesses",
        _launch_subprocesses,
        HookType.AROUND,
    )


def apply_early() -> None:
    """What must hold before any SGLang CPU module is imported in this process."""
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    os.environ[ENV_FLAG] = "1"
    install_sgl_kernel_stub()


# --- process entry points (picklable, imported first by spawned children) --------------


def run_scheduler_process(*args: Any, **kwargs: Any) -> None:
    """SGLang's scheduler process, with the CPU patches applied first."""
    apply_early()
    disable_pinning()
    from sglang.srt.managers.scheduler import run_scheduler_process as run

    run(*args, **kwargs)


def run_detokenizer_process(*args: Any, **kwargs: Any) -> None:
    """SGLang's detokenizer process, with the CPU patches applied first."""
    apply_early()
    from sglang.srt.managers.detokenizer_manager import run_detokenizer_process as run

    run(*args, **kwargs)
