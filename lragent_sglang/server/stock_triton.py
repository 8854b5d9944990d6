"""SGLang's Triton attention backend (non-shared and full-shared on GPU), with its
sliding-window decode made exact.

SGLang 0.5.17 stores a layer's window as a radius: Gemma-2/3 pass `sliding_window - 1`
(gemma2.py `get_attention_sliding_window_size`), and a query at position p sees keys
p - w .. p, w + 1 of them, as transformers does (`kv_idx > q_idx - sliding_window`). The
Triton backend's extend kernel masks exactly that, but for decode, whose kernel reads the
gathered window keys without a mask, `update_sliding_window_buffer` gathers only
`min(seq_len, w)` keys: every decode step of a windowed layer past the window drops the
oldest key it should see (the eager and the CUDA-graph decode alike; upstream
sgl-project/sglang#32087). FlashInfer (`sliding_window_size + 1`) and FlashAttention
(`(w, 0)`) read the whole window.

`WindowExactTritonAttnBackend` widens the backend's window buffers by one key where the
decode metadata of this SGLang is one key short (checked on the backend itself at start:
an SGLang that fixes it is left alone). The extend kernel still masks with the layer's own
w, so the one extra prefix key it then gathers is never attended.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import torch
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

logger = logging.getLogger(__name__)


def decode_window_keys(backend: TritonAttnBackend, seq_len: int) -> int:
    """How many keys the backend's decode metadata gathers for a windowed layer of a request
    `seq_len` tokens long (request row 0; nothing is written to the pools)."""
    device = backend.device
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    seq_lens = torch.tensor([seq_len], dtype=torch.int64, device=device)
    fb = SimpleNamespace(
        batch_size=1, forward_mode=ForwardMode.DECODE, spec_info=None,
        req_pool_indices=torch.zeros(1, dtype=torch.int64, device=device), seq_lens=seq_lens,
        seq_lens_sum=seq_len, seq_lens_cpu=seq_lens.cpu(), out_cache_loc=None,
    )
    saved = backend.forward_metadata
    try:
        backend.init_forward_metadata(fb)
        indptr = backend.forward_metadata.window_kv_indptr
        return int(indptr[1] - indptr[0])
    finally:
        backend.forward_metadata = saved


class WindowExactTritonAttnBackend(TritonAttnBackend):
    """See module docstring."""

    def __init__(self, model_runner: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(model_runner, *args, **kwargs)
        self.window_widened = False
        w = self.sliding_window_size
        if w is None or w <= 0 or self.req_to_token.shape[1] < w + 2:
            return
        keys = decode_window_keys(self, w + 2)
        if keys == w:
            self.sliding_window_size = w + 1  # only the window buffers read it; layers keep theirs
            self.window_widened = True
            logger.info("lragent: SGLang's triton decode gathers %d keys per window of %d; widened to %d",
                        w, w + 1, w + 1)
        elif keys != w + 1:
            raise RuntimeError(f"SGLang's triton decode gathers {keys} keys for a window of {w + 1}: "
                               "unknown window convention, not served")
