"""Helpers shared by the Flash-LoRA decode and extend kernels.

Conventions (the same as SGLang's triton backend, page size 1):
- K / V_base pools: ``[slots, H_kv, D]``; a request's tokens live at the slots listed in
  ``kv_indices[kv_indptr[b] : kv_indptr[b + 1]]``.
- LR pool: ``[lr_slots, R]`` (one R-vector per token, shared by all heads); the same token
  order is listed in ``lr_indices`` with the SAME ``kv_indptr`` (LR slots are another pool).
- Adapter up-projections ``B``: ``[n_adapters, H_kv, R, D]``, alpha / r folded in;
  ``adapter_ids[b] = -1`` means the request has no adapter (no LR term).

Scores are kept in the log2 domain inside the kernels (``exp2`` is the fast path), so the
per-split LSE written by the decode kernel is ``log2(sum(exp(s)))``.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)

LOG2E = math.log2(math.e)

#: smallest operand width `tl.dot` accepts; the LR rank is padded up to a power of two >= this
MIN_DOT_DIM = 16
MIN_RANK_PAD = 32


@triton.jit
def soft_cap(x, cap):
    """``cap * tanh(x / cap)``, with tanh through a sigmoid (no libdevice: runs interpreted)."""
    return cap * (2.0 * tl.sigmoid(2.0 * x / cap) - 1.0)


def padded_rank(rank: int) -> int:
    """Width of the LR accumulator: R padded to a power of two >= 32.

    `tl.dot` needs >= 16; at exactly 16 Triton's sm_90 layout for the [BLOCK_H, 16] P @ L
    product made the decode kernel use 255 registers and spill (R = 8), while 32 compiles
    lean. The padding columns re-read the row's own values (no extra DRAM bytes) and meet
    B's zero rows, so they cost registers and tensor-core work only.
    """
    return max(MIN_RANK_PAD, triton.next_power_of_2(max(rank, 1)))


def lr_row_alignment(lr_buffer: torch.Tensor) -> int:
    """Elements every L row start is a multiple of (a power of two, at most 16 bytes' worth).

    Triton only learns 16-element divisibility of strides on its own, so rows of R = 8 or 24
    bf16 values would otherwise be gathered as 2-byte loads, synchronously; with the hint they
    become 16-byte cp.async copies that the software pipeline overlaps like K and V.
    """
    vec = 16 // lr_buffer.element_size()
    stride, base = lr_buffer.stride(0), lr_buffer.data_ptr() // lr_buffer.element_size()
    while vec > 1 and (stride % vec or base % vec):
        vec //= 2
    return vec


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use full-precision FMA dots (Triton's default would be tf32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_head_dim(head_dim: int) -> None:
    """The kernels tile the head dimension whole, so it must be a power of two >= 16."""
    if head_dim < MIN_DOT_DIM or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= {MIN_DOT_DIM}, got {head_dim}")


def score_scale(sm_scale: float, logit_cap: float) -> tuple[float, float]:
    """Return (pre-cap scale, post-cap factor) so that ``score_log2 = post(cap(pre * qk))``.

    Without a cap the log2(e) factor folds into the softmax scale (one multiply per score).
    """
    if logit_cap > 0:
        return sm_scale, LOG2E
    return sm_scale * LOG2E, 1.0


def _patch_interpreter_index() -> None:
    """Let Triton's interpreter take loop bounds from loaded scalars under NumPy >= 2.4.

    The interpreter keeps scalars as 1-element arrays and converts them with
    ``int(array)``, which NumPy 2.4 rejects; `range(lo, hi, BLOCK)` with bounds loaded from
    ``kv_indptr`` then fails. Only active with TRITON_INTERPRET=1 (CPU tests).
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_lragent_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._lragent_patched = True
    interpreter._patch_lang_tensor = patched
    logger.debug("patched triton's interpreter for 1-element loop bounds")


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_index()
