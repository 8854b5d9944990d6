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

Head dims that are not a power of two (80, 96, 112, ...) are tiled at the next power of two
(``BLOCK_D``) with the loads and stores masked to the real ``D``, as SGLang's triton kernels
do; for a power-of-two ``D`` the mask is a compile-time constant and folds away.

Sliding window (``window``, SGLang's ``RadixAttention.sliding_window_size``): a query at
position p sees the keys at positions ``p - window .. p``, i.e. ``window + 1`` keys with
itself; ``window < 0`` means no window. This is FlashInfer's ``window_left`` (SGLang's
flashinfer backend passes ``window_left=layer.sliding_window_size``), SGLang's
torch_native mask ``k >= q - sliding_window_size`` and its triton extend mask
``q <= k + SLIDING_WINDOW_SIZE``. Models set it to ``config.sliding_window - 1``
(Gemma-2/3, OLMo-2), so it is HF's ``sliding_window`` keys counting the query's own.
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


#: largest head dim the default tiles are sized for (Gemma-2/3's 256)
MAX_HEAD_DIM = 256


def check_head_dim(head_dim: int) -> None:
    """Any head dim up to 256: it is padded to a power of two in the kernels, and the
    default tiles (shared memory, registers) are sized up to 256."""
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")


def head_dim_block(head_dim: int) -> int:
    """``BLOCK_D``: the head dim padded to a power of two that `tl.dot` accepts (>= 16)."""
    return max(MIN_DOT_DIM, triton.next_power_of_2(head_dim))


@triton.jit
def head_dim_mask(HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[BLOCK_D]`` mask of the real head dims. For a power-of-two D it is a constant
    all-true splat, which Triton folds out of every mask it is and-ed into (the unpadded
    build compiles to the same loads as without it)."""
    if BLOCK_D == HEAD_DIM:
        return tl.full([BLOCK_D], 1, tl.int1)
    return tl.arange(0, BLOCK_D) < HEAD_DIM


def window_or_none(window: int | None) -> int:
    """A sliding window as the kernels take it: -1 for none (None or any negative value)."""
    return -1 if window is None or window < 0 else window


def score_scale(sm_scale: float, logit_cap: float) -> tuple[float, float]:
    """Return (pre-cap scale, post-cap factor) so that ``score_log2 = post(cap(pre * qk))``.

    Without a cap the log2(e) factor folds into the softmax scale (one multiply per score).
    """
    if logit_cap > 0:
        return sm_scale, LOG2E
    return sm_scale * LOG2E, 1.0


def interpreter_compat() -> None:
    """Let Triton's interpreter take loop bounds from loaded scalars under NumPy >= 2.4.

    The interpreter keeps scalars as 1-element arrays and converts them with
    ``int(array)``, which NumPy 2.4 rejects; `range(lo, hi, BLOCK)` with bounds loaded from
    ``kv_indptr`` then fails. The launchers call this before each kernel; it changes
    nothing unless TRITON_INTERPRET=1 (the CPU tests) and patches the interpreter once.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
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
