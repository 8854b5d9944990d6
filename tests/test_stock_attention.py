"""SGLang's own Triton attention backend, which non-shared and full-shared run on GPU, driven
on CPU as SGLang's model runner drives it (its kernels in Triton's interpreter), on
Gemma-2-shaped layers: head_dim 256, GQA, the `query_pre_attn_scalar` scale, the tanh
logit soft-cap, and on even layers SGLang's window radius `sliding_window - 1`
(gemma2.py), the runner's `sliding_window_size` from the model (`resolve_sliding_window_size`).
Reference: float64 attention with transformers' semantics (masking_utils: a query at i sees
keys j <= i with i - j < sliding_window); our torch backend must equal it too.

Issue 14: on the H200 the tiny Gemma-2 gave other greedy outputs under non-shared than
under our schemes. SGLang 0.5.17's Triton decode gathers `min(seq_len, w)` keys of a
window of w + 1 (`update_sliding_window_buffer`), so past the window every decode step of
a windowed layer drops the oldest key it should see (sgl-project/sglang#32087); the
extend kernel is right. Our factory serves `stock_triton.WindowExactTritonAttnBackend`.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers
from sglang.srt.layers.attention import triton_backend
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.models.gemma2 import get_attention_sliding_window_size

from lragent_sglang.scheme import Scheme
from lragent_sglang.server import backends, cpu_compat
from lragent_sglang.server.attention import LRAgentTorchAttnBackend
from lragent_sglang.server.config import LRAgentConfig
from lragent_sglang.server.runtime import LRAgentRuntime
from lragent_sglang.server.stock_triton import WindowExactTritonAttnBackend, decode_window_keys

pytestmark = [
    pytest.mark.slow,  # head_dim 256 kernels in the interpreter: ~30 s for the module
    # CPU tensors need the interpreter, which conftest.py sets only where there is no CUDA;
    # on the GPU machine scripts/device_scheme_check.py --family gemma2 checks the server
    pytest.mark.skipif(torch.cuda.is_available(), reason="drives SGLang's kernels in Triton's interpreter (CPU only)"),
]

H_Q, H_KV, D = 4, 2, 256
SLOTS, ROWS, CONTEXT = 96, 3, 64
GAIN = 3.0  # q / k scale: scores of std ~ 12-16 reach into the soft-cap
CFG = transformers.Gemma2Config(num_attention_heads=H_Q, num_key_value_heads=H_KV, head_dim=D, sliding_window=16,
                                query_pre_attn_scalar=144, attn_logit_softcapping=50.0)
RADIUS = get_attention_sliding_window_size(CFG)  # 15: SGLang's layer-level window


@pytest.fixture
def runner(monkeypatch):
    """What `TritonAttnBackend.__init__` reads of SGLang's model runner, with the pools of a
    two-layer model holding random K / V (layer 0 windowed, layer 1 full, as Gemma-2)."""
    monkeypatch.setattr(triton_backend, "get_spec", lambda: SimpleNamespace(
        speculative_num_draft_tokens=None, speculative_num_steps=None, speculative_eagle_topk=None))
    monkeypatch.setattr(triton_backend, "get_parallel", lambda: SimpleNamespace(
        attn_dcp_size=1, attn_dcp_rank=0, attn_tp_size=1))
    gen = torch.Generator().manual_seed(0)
    kv = MHATokenToKVPool(SLOTS, page_size=1, dtype=torch.float32, head_num=H_KV, head_dim=D, layer_num=2,
                          device="cpu", enable_memory_saver=False)
    for layer_id in range(2):
        kv.k_buffer[layer_id].copy_(GAIN * torch.randn(kv.k_buffer[layer_id].shape, generator=gen))
        kv.v_buffer[layer_id].copy_(torch.randn(kv.v_buffer[layer_id].shape, generator=gen))
    model_config = SimpleNamespace(
        get_max_num_attention_heads=lambda: H_Q, get_num_kv_heads=lambda tp: H_KV, num_attention_heads=H_Q,
        head_dim=D, v_head_dim=D, swa_v_head_dim=D, context_len=CONTEXT, is_encoder_decoder=False,
        attention_arch=None, linear_attn_registry_result=None, hf_config=CFG)
    server_args = SimpleNamespace(triton_attention_num_kv_splits=8, enable_deterministic_inference=False,
                                  triton_attention_split_tile_size=None, chunked_prefill_size=8192,
                                  cuda_graph_config=None)
    return SimpleNamespace(
        device=torch.device("cpu"), gpu_id=0, page_size=1, is_draft_worker=False, lora_manager=None,
        req_to_token_pool=ReqToTokenPool(ROWS, CONTEXT, "cpu", False), token_to_kv_pool=kv,
        token_to_kv_pool_allocator=SimpleNamespace(), sliding_window_size=RADIUS, model_config=model_config,
        server_args=server_args, ps=SimpleNamespace(tp_size=1), model=SimpleNamespace(modules=lambda: []))


def gemma2_layers() -> list[RadixAttention]:
    """Layers as SGLang's Gemma2Attention builds them."""
    return [RadixAttention(H_Q, D, CFG.query_pre_attn_scalar ** -0.5, num_kv_heads=H_KV, layer_id=i,
                           logit_cap=CFG.attn_logit_softcapping,
                           sliding_window_size=RADIUS if i % 2 == 0 else None)
            for i in range(2)]


def batch(runner, prefix: list[int], extend: list[int], decode: bool) -> SimpleNamespace:
    """Requests with `prefix[i]` cached and `extend[i]` new tokens in shuffled slots; with
    `decode`, the decode step of requests `prefix[i] + extend[i]` long (extend[i] == 1)."""
    slots = iter(torch.randperm(SLOTS - 1, generator=torch.Generator().manual_seed(1)).add(1).tolist())
    rows = list(range(1, len(prefix) + 1))
    table = runner.req_to_token_pool.req_to_token
    for row, p, e in zip(rows, prefix, extend):
        table[row, : p + e] = torch.tensor([next(slots) for _ in range(p + e)], dtype=table.dtype)
    seq = torch.tensor([p + e for p, e in zip(prefix, extend)])
    common = dict(batch_size=len(rows), spec_info=None, req_pool_indices=torch.tensor(rows), seq_lens=seq,
                  seq_lens_sum=int(seq.sum()), rids=[f"r{r}" for r in rows], lora_ids=[None] * len(rows))
    if decode:
        return SimpleNamespace(**common, forward_mode=ForwardMode.DECODE, seq_lens_cpu=seq, positions=seq - 1,
                               out_cache_loc=table[rows, seq - 1].to(torch.int64))
    return SimpleNamespace(
        **common, forward_mode=ForwardMode.EXTEND, extend_prefix_lens=torch.tensor(prefix),
        extend_seq_lens=torch.tensor(extend), extend_prefix_lens_cpu=list(prefix), extend_seq_lens_cpu=list(extend),
        extend_num_tokens=sum(extend), positions=torch.cat([torch.arange(p, p + e) for p, e in zip(prefix, extend)]),
        out_cache_loc=torch.cat([table[r, p : p + e] for r, p, e in zip(rows, prefix, extend)]).to(torch.int64))


def reference(runner, q: torch.Tensor, layer, fb, keys_per_window: int) -> torch.Tensor:
    """float64 attention, transformers' semantics with `sliding_window = keys_per_window`."""
    kv = runner.token_to_kv_pool
    decode = fb.forward_mode.is_decode_or_idle()
    q_lens = [1] * fb.batch_size if decode else fb.extend_seq_lens.tolist()
    windowed = layer.sliding_window_size is not None and layer.sliding_window_size >= 0
    out, start = [], 0
    for row, s, e in zip(fb.req_pool_indices.tolist(), fb.seq_lens.tolist(), q_lens):
        idx = runner.req_to_token_pool.req_to_token[row, :s].long()
        k = kv.k_buffer[layer.layer_id][idx].double().repeat_interleave(H_Q // H_KV, 1)
        v = kv.v_buffer[layer.layer_id][idx].double().repeat_interleave(H_Q // H_KV, 1)
        scores = torch.einsum("ehd,shd->hes", q[start : start + e].view(e, H_Q, D).double(), k) * layer.scaling
        scores = CFG.attn_logit_softcapping * torch.tanh(scores / CFG.attn_logit_softcapping)
        i, j = torch.arange(s - e, s)[:, None], torch.arange(s)[None, :]
        seen = (j <= i) & ((i - j < keys_per_window) if windowed else True)
        p = scores.masked_fill(~seen, float("-inf")).softmax(-1)
        out.append(torch.einsum("hes,shd->ehd", p, v).reshape(e, H_Q * D))
        start += e
    return torch.cat(out)


def attend(backend, runner, layer, fb) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, output) of one layer's forward as RadixAttention calls the backend (K / V of the
    new tokens as [tokens, heads, dim], already in their slots)."""
    decode = fb.forward_mode.is_decode_or_idle()
    n = fb.batch_size if decode else fb.extend_num_tokens
    q = GAIN * torch.randn(n, H_Q * D, generator=torch.Generator().manual_seed(3))
    kv = runner.token_to_kv_pool
    k = kv.k_buffer[layer.layer_id][fb.out_cache_loc]
    v = kv.v_buffer[layer.layer_id][fb.out_cache_loc]
    run = backend.forward_decode if decode else backend.forward_extend
    return q, run(q, k, v, layer, fb, save_kv_cache=False).double()


def served_backend(runner, monkeypatch, scheme: Scheme):
    """The attention backend our factory builds on a GPU for `scheme` (no CUDA needed to
    build SGLang's)."""
    monkeypatch.setattr(cpu_compat, "wanted", lambda: False)
    return backends.create_attention_backend(LRAgentRuntime(LRAgentConfig(scheme=scheme)), runner)


# A prefill of two requests (one with a cached prefix longer than the window, the other
# from scratch), then a decode step of requests 40 (past the window), 16 (exactly the
# window: SGLang 0.5.17 already drops key 0) and 9 tokens long.
CASES = {"extend": ([30, 0], [8, 20]), "decode": ([39, 15, 8], [1, 1, 1])}


@pytest.mark.parametrize("scheme", [Scheme.NON_SHARED, Scheme.FULL_SHARED])
def test_served_stock_backend_attends_like_transformers(runner, monkeypatch, scheme):
    """What non-shared and full-shared serve on GPU equals transformers' Gemma-2 attention
    (window, soft-cap, scale, GQA) in a prefill and a decode step; so does our torch backend."""
    backend = served_backend(runner, monkeypatch, scheme)
    torch_backend = LRAgentTorchAttnBackend(runner, LRAgentRuntime(LRAgentConfig(scheme=scheme)))
    for mode in ("extend", "decode"):
        fb = batch(runner, *CASES[mode], decode=mode == "decode")
        backend.init_forward_metadata(fb)
        torch_backend.init_forward_metadata(fb)
        for layer in gemma2_layers():
            q, out = attend(backend, runner, layer, fb)
            _, ours = attend(torch_backend, runner, layer, fb)
            ref = reference(runner, q, layer, fb, keys_per_window=CFG.sliding_window)
            err = (out - ref).abs().max().item()
            assert err < 1e-4, (
                f"SGLang's triton backend as served for {scheme} on GPU ({type(backend).__name__}) attends unlike "
                f"transformers: {mode}, layer {layer.layer_id} (sliding_window_size {layer.sliding_window_size}, "
                f"transformers' window {CFG.sliding_window}): max |error| {err:.3g} against float64 "
                f"(one-key-short decode window of SGLang 0.5.17's update_sliding_window_buffer?)")
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_sglang_triton_decode_is_one_key_short_and_ours_widens_it(runner, monkeypatch):
    """Documents SGLang 0.5.17: its own backend's decode attends to the last w keys of a
    window of w + 1 (transformers' window minus one). Should an SGLang update fix it, this
    fails, and `WindowExactTritonAttnBackend` already leaves that SGLang alone."""
    stock = triton_backend.TritonAttnBackend(runner)
    fb = batch(runner, *CASES["decode"], decode=True)
    stock.init_forward_metadata(fb)
    layer = gemma2_layers()[0]
    q, out = attend(stock, runner, layer, fb)
    short = reference(runner, q, layer, fb, keys_per_window=CFG.sliding_window - 1)
    right = reference(runner, q, layer, fb, keys_per_window=CFG.sliding_window)
    assert decode_window_keys(stock, 40) == RADIUS, "SGLang's triton decode window changed; see docstring"
    torch.testing.assert_close(out, short, rtol=1e-4, atol=1e-4)
    lost = (out - right).abs().amax(1)
    assert lost[0] > 1e-3 and lost[1] > 1e-3  # 40 and 16 tokens: each lost the oldest key of its window
    torch.testing.assert_close(out[2:], right[2:], rtol=1e-4, atol=1e-4)  # 9 tokens: nothing to drop

    widened = served_backend(runner, monkeypatch, Scheme.NON_SHARED)
    assert isinstance(widened, WindowExactTritonAttnBackend) and widened.window_widened
    assert decode_window_keys(widened, 40) == CFG.sliding_window
    assert [lay.sliding_window_size for lay in gemma2_layers()] == [RADIUS, -1]  # layers keep their radius


def test_served_stock_backend_decodes_like_transformers_in_cuda_graphs(runner, monkeypatch):
    """The CUDA-graph decode path (persistent window buffers, sized from the widened window):
    metadata built at capture for one batch, refilled at replay for another."""
    backend = served_backend(runner, monkeypatch, Scheme.NON_SHARED)
    backend.init_cuda_graph_state(max_bs=ROWS, max_num_tokens=ROWS)
    layer = gemma2_layers()[0]
    for step, (prefix, extend) in enumerate([([8, 15, 20], [1, 1, 1]), CASES["decode"]]):
        fb = batch(runner, prefix, extend, decode=True)
        fb.encoder_lens = None
        backend.init_forward_metadata_out_graph(fb, in_capture=step == 0)
        q, out = attend(backend, runner, layer, fb)
        ref = reference(runner, q, layer, fb, keys_per_window=CFG.sliding_window)
        err = (out - ref).abs().max().item()
        assert err < 1e-4, (f"SGLang's triton CUDA-graph decode as served ({type(backend).__name__}), "
                            f"{'capture' if step == 0 else 'replay'} of requests {fb.seq_lens.tolist()} tokens long: "
                            f"max |error| {err:.3g} against transformers' window of {CFG.sliding_window}")
