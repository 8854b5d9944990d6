"""Run the real SGLang 0.5.17 server on a machine with no accelerator (CI, laptops).

Stock 0.5.17 does not start there; five small things block it (see the README section
"SGLang on CPU"). Every patch here is off unless no CUDA device is present, or
`LRAGENT_CPU_COMPAT=1` forces it on (`=0` forces it off); `EARLY` below and
`patches.cpu_patches` list them with their reasons:

1. `SGLANG_USE_CPU_ENGINE=1` (SGLang reads it at import time to pick CPU paths).
2. A stand-in `sgl_kernel` module (the CPU build of sgl-kernel is not published): torch
   versions of the two helpers ordinary serving imports; every other op it is asked for
   imports fine and raises NotImplementedError naming itself when called (speculative
   decoding, int8 and MoE CPU kernels are not supported here).
3. Pinned host memory, which needs a driver: turned off for the whole scheduler process
   (torch's tensor factories ignore `pin_memory=True`, `Tensor.pin_memory` returns the
   tensor), which covers the LoRA modules and xgrammar's token bitmask alike.
4. xgrammar's logit masking on CPU tensors (SGLang raises "Unsupported device: cpu").
5. Our attention backend's name reaching Triton-only helpers (`support_triton`,
   `get_last_loc`): on CPU they take their torch paths.

With `--dp-size` > 1 the data-parallel controller, which never stops polling, runs at the
lowest CPU priority (`lower_dp_controller_priority`).

Spawned scheduler and detokenizer processes import SGLang modules while unpickling their
start function, before `load_plugins()` runs, so (2) must already be in place then: a
hook on `Engine.launch_subprocesses` swaps those start functions for the ones below,
which patch first.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lragent_sglang.server.config import BACKEND_NAME

logger = logging.getLogger(__name__)

ENV_FLAG = "LRAGENT_CPU_COMPAT"


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

#: torch factories SGLang and xgrammar call with `pin_memory=True`
PINNING_FACTORIES = ("tensor", "empty", "zeros", "ones", "full", "arange", "empty_like", "zeros_like", "full_like")


@functools.lru_cache(maxsize=None)
def _drop_pin_memory(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def call(*args: Any, pin_memory: bool = False, **kwargs: Any) -> torch.Tensor:
        return factory(*args, **kwargs)

    call.lragent_unpinned = True
    return call


def _unpinned_pin_memory(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


def disable_pinning() -> None:
    """Pinning needs a driver; without an accelerator there is nothing to pin for."""
    torch.Tensor.pin_memory = _unpinned_pin_memory
    for name in PINNING_FACTORIES:
        factory = getattr(torch, name)
        if not getattr(factory, "lragent_unpinned", False):
            setattr(torch, name, _drop_pin_memory(factory))


# --- (4) and (5): hooks through SGLang's HookRegistry (rows of `patches.cpu_patches`) ---


def apply_vocab_mask(original: Callable, *args: Any, **kwargs: Any) -> None:
    """SGLang's sampler calls `grammar.apply_vocab_mask(logits=..., vocab_mask=...)`, other
    callers the backend's static `apply_vocab_mask(logits, vocab_mask)`: take both forms."""
    named = [kwargs[k] for k in ("logits", "vocab_mask") if k in kwargs]
    logits, vocab_mask = [a for a in args if isinstance(a, torch.Tensor)] + named
    if logits.device.type != "cpu":
        return original(*args, **kwargs)
    import xgrammar

    xgrammar.apply_token_bitmask_inplace(logits, vocab_mask.to(logits.device))


def support_triton(original: Callable[[str], bool], backend: str) -> bool:
    return False if backend == BACKEND_NAME else original(backend)


def get_last_loc(original: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
    from sglang.srt.mem_cache.allocation import get_last_loc_torch

    return get_last_loc_torch(*args, **kwargs)


def launch_subprocesses(original: Callable, *args: Any, **kwargs: Any) -> Any:
    kwargs["run_scheduler_process_func"] = run_scheduler_process
    kwargs["run_detokenizer_process_func"] = run_detokenizer_process
    result = original(*args, **kwargs)
    lower_dp_controller_priority()
    return result


DP_CONTROLLER_TITLE = "sglang::data_parallel_controller"


def lower_dp_controller_priority() -> None:
    """SGLang's data-parallel controller (`--dp-size` > 1) polls its socket without ever
    blocking: a core at 100% even when idle. On a CPU machine that core is one the
    schedulers need to run the model (2 cores: requests 3x slower). At the lowest
    priority it takes only what they leave. Its schedulers, started before, keep theirs."""
    import psutil

    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if DP_CONTROLLER_TITLE in " ".join(proc.cmdline()):
                proc.nice(19)
                logger.info("data-parallel controller (pid %d) at the lowest CPU priority", proc.pid)


def use_cpu_engine() -> None:
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    os.environ[ENV_FLAG] = "1"  # spawned children patch too


@dataclass(frozen=True)
class EarlyPatch:
    """A change that must be in place before SGLang's modules import."""

    name: str
    apply: Callable[[], None]
    every_process: bool  # else the scheduler process only
    why: str


EARLY = (
    EarlyPatch("SGLANG_USE_CPU_ENGINE=1", use_cpu_engine, True,
               "SGLang reads it at import time to pick its CPU paths"),
    EarlyPatch("sgl_kernel stand-in", install_sgl_kernel_stub, True,
               "the CPU build of sgl-kernel is not published; plain serving imports two of its helpers"),
    EarlyPatch("no pinned memory", disable_pinning, False,
               "pinning needs an NVIDIA driver; the LoRA buffers and xgrammar's bitmask ask for it"),
)


def apply_early() -> None:
    """What must hold before any SGLang CPU module is imported in this process."""
    for patch in EARLY:
        if patch.every_process:
            patch.apply()


# --- process entry points (picklable, imported first by spawned children) --------------


def run_scheduler_process(*args: Any, **kwargs: Any) -> None:
    """SGLang's scheduler process, with the CPU patches applied first."""
    for patch in EARLY:
        patch.apply()
    from sglang.srt.managers.scheduler import run_scheduler_process as run

    run(*args, **kwargs)


def run_detokenizer_process(*args: Any, **kwargs: Any) -> None:
    """SGLang's detokenizer process, with the CPU patches applied first."""
    apply_early()
    from sglang.srt.managers.detokenizer_manager import run_detokenizer_process as run

    run(*args, **kwargs)
