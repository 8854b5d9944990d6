"""Our two attention backends against each other without a server: the Triton one (the GPU
path; its kernels run in Triton's interpreter here) and the torch one (the CPU path) build
their metadata from the same SGLang-shaped forward batches and must attend alike, with
the layer's own scale, soft-cap and sliding window, LR term on and off, extend and decode.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

from lragent_sglang.server.attention import LRAgentTorchAttnBackend, visible_keys
from lragent_sglang.server.attention_triton import LRAgentTritonAttnBackend
from lragent_sglang.server.config import LRAgentConfig
from lragent_sglang.server.lora_split import LRWeights
from lragent_sglang.server.lr_pool import LRTokenPool
from lragent_sglang.server.runtime import LRAgentRuntime

H_Q, H_KV, D, R = 4, 2, 24, 4  # head_dim 24: the kernels pad it (Phi-3 style, not a power of two)
SLOTS, ROWS, CONTEXT = 64, 4, 32


def make_runner(seed: int) -> tuple[SimpleNamespace, LRAgentRuntime]:
    gen = torch.Generator().manual_seed(seed)
    kv = MHATokenToKVPool(SLOTS, page_size=1, dtype=torch.float32, head_num=H_KV, head_dim=D, layer_num=1,
                          device="cpu", enable_memory_saver=False)
    kv.k_buffer[0].copy_(torch.randn(kv.k_buffer[0].shape, generator=gen))
    kv.v_buffer[0].copy_(torch.randn(kv.v_buffer[0].shape, generator=gen))
    rt = LRAgentRuntime(LRAgentConfig())
    rt.bound = rt.enabled = True
    rt.width = R
    rt.lr_pool = LRTokenPool(2 * SLOTS, R, 1, torch.float32, "cpu", max_reqs=ROWS + 1, max_context_len=CONTEXT)
    rt.lr_pool.lr_buffer[0].copy_(torch.randn(rt.lr_pool.lr_buffer[0].shape, generator=gen))
    # Buffer slot 0 holds no adapter (rank 0), slot 1 the adapter "u1".
    b_v = torch.randn(2, H_KV, R, D, generator=gen)
    b_v[0] = 0
    rt.weights = LRWeights(b_v=[b_v], a_v=[torch.zeros(2, R, 8)], slot_uid={0: None, 1: "u1"})
    lora_manager = SimpleNamespace(
        memory_pool=SimpleNamespace(uid_to_buffer_id={None: 0, "u1": 1}),
        lora_backend=SimpleNamespace(batch_info=SimpleNamespace(req_weight_indices=None, weight_indices=None,
                                                                lora_ranks=torch.tensor([0, R]))),
    )
    runner = SimpleNamespace(
        device=torch.device("cpu"), req_to_token_pool=ReqToTokenPool(ROWS, CONTEXT, "cpu", False),
        token_to_kv_pool=kv, lora_manager=lora_manager, ps=SimpleNamespace(tp_size=1),
        model_config=SimpleNamespace(num_attention_heads=H_Q, get_num_kv_heads=lambda tp: H_KV, head_dim=D),
        server_args=SimpleNamespace(cuda_graph_config=None),
    )
    return runner, rt


def layer(scaling: float, logit_cap: float, window: int) -> SimpleNamespace:
    return SimpleNamespace(layer_id=0, tp_q_head_num=H_Q, tp_k_head_num=H_KV, head_dim=D, qk_head_dim=D,
                           v_head_dim=D, scaling=scaling, logit_cap=logit_cap, sliding_window_size=window)


def extend_batch(runner: SimpleNamespace, rt: LRAgentRuntime, prefix: list[int], extend: list[int],
                 adapters: list[str | None]) -> SimpleNamespace:
    """Requests with `prefix[i]` cached tokens and `extend[i]` new ones in distinct slots."""
    slots = iter(torch.randperm(SLOTS - 1, generator=torch.Generator().manual_seed(1)).add(1).tolist())
    lr_slots = iter(torch.randperm(2 * SLOTS - 1, generator=torch.Generator().manual_seed(2)).add(1).tolist())
    rows, out_loc, positions = [], [], []
    for i, (p, e) in enumerate(zip(prefix, extend)):
        row = i + 1
        rows.append(row)
        for pos in range(p + e):
            runner.req_to_token_pool.req_to_token[row, pos] = next(slots)
            rt.lr_pool.req_to_lr[row, pos] = next(lr_slots)
        out_loc += runner.req_to_token_pool.req_to_token[row, p : p + e].tolist()
        positions += list(range(p, p + e))
    weight_indices = torch.tensor([1 if a else 0 for a in adapters])
    runner.lora_manager.lora_backend.batch_info.weight_indices = weight_indices
    seq = [p + e for p, e in zip(prefix, extend)]
    return SimpleNamespace(
        batch_size=len(prefix), forward_mode=SimpleNamespace(is_decode_or_idle=lambda: False),
        req_pool_indices=torch.tensor(rows), seq_lens=torch.tensor(seq), extend_prefix_lens=torch.tensor(prefix),
        extend_seq_lens=torch.tensor(extend), extend_prefix_lens_cpu=list(prefix), extend_seq_lens_cpu=list(extend),
        extend_num_tokens=sum(extend), positions=torch.tensor(positions), out_cache_loc=torch.tensor(out_loc),
        rids=[f"r{i}" for i in range(len(prefix))], lora_ids=list(adapters),
    )


def decode_batch(extend: SimpleNamespace) -> SimpleNamespace:
    """The next step of the same requests: one token each at their last extended position."""
    seq = extend.seq_lens
    return SimpleNamespace(
        batch_size=extend.batch_size, forward_mode=SimpleNamespace(is_decode_or_idle=lambda: True),
        req_pool_indices=extend.req_pool_indices, seq_lens=seq, seq_lens_sum=int(seq.sum()), seq_lens_cpu=seq,
        positions=seq - 1, out_cache_loc=torch.tensor([0] * extend.batch_size), rids=extend.rids,
        lora_ids=extend.lora_ids,
    )


def both(runner: SimpleNamespace, rt: LRAgentRuntime, batch: SimpleNamespace, lay: SimpleNamespace,
         decode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    n = batch.batch_size if decode else batch.extend_num_tokens
    q = torch.randn(n, H_Q * D, generator=gen)
    kv = runner.token_to_kv_pool
    # The new tokens' K / V_base as the projection made them (already in their slots).
    k, v = (None, None) if decode else (kv.k_buffer[0][batch.out_cache_loc].flatten(1),
                                        kv.v_buffer[0][batch.out_cache_loc].flatten(1))
    outs = []
    for cls in (LRAgentTorchAttnBackend, LRAgentTritonAttnBackend):
        backend = cls(runner, rt)
        backend.init_forward_metadata(batch)
        run = backend.forward_decode if decode else backend.forward_extend
        outs.append(run(q, k, v, lay, batch, save_kv_cache=False))
    return outs[0], outs[1]


@pytest.mark.parametrize("scaling, logit_cap, window", [
    (D ** -0.5, 0.0, -1),
    (0.11, 0.0, -1),  # a scale of its own (Gemma's query_pre_attn_scalar), not head_dim ** -0.5
    (D ** -0.5, 2.0, -1),  # soft-capped logits (Gemma-2)
    (D ** -0.5, 0.0, 3),  # a sliding window shorter than the prefix
])
def test_triton_backend_attends_like_the_torch_backend(scaling, logit_cap, window):
    runner, rt = make_runner(seed=0)
    lay = layer(scaling, logit_cap, window)
    batch = extend_batch(runner, rt, prefix=[9, 0], extend=[5, 6], adapters=["u1", None])
    torch_out, triton_out = both(runner, rt, batch, lay, decode=False)
    torch.testing.assert_close(triton_out, torch_out, rtol=1e-4, atol=1e-4)
    torch_out, triton_out = both(runner, rt, decode_batch(batch), lay, decode=True)
    torch.testing.assert_close(triton_out, torch_out, rtol=1e-4, atol=1e-4)


def test_the_lr_term_and_the_window_change_the_output():
    """The comparison above can fail: the adapter's B and the window each move the result."""
    runner, rt = make_runner(seed=0)
    batch = extend_batch(runner, rt, prefix=[9], extend=[5], adapters=["u1"])
    with_lr, _ = both(runner, rt, batch, layer(D ** -0.5, 0.0, -1), decode=False)
    windowed, _ = both(runner, rt, batch, layer(D ** -0.5, 0.0, 3), decode=False)
    rt.weights.b_v[0][1] = 0
    without_lr, _ = both(runner, rt, batch, layer(D ** -0.5, 0.0, -1), decode=False)
    assert (with_lr - without_lr).abs().max() > 0.1
    assert (with_lr - windowed).abs().max() > 0.1


def test_visible_keys_follows_sglangs_window_convention():
    mask = visible_keys(seq_len=6, q_len=2, window=2, device=torch.device("cpu"))
    assert mask.int().tolist() == [[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    assert visible_keys(4, 4, -1, torch.device("cpu")).int().tolist() == [
        [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
