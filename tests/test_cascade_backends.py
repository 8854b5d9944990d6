"""The cascade decode in our two attention backends, without a server: role forks whose
`req_to_token` rows start with the same KV slots (as the prefix tree hands them out) decode
in one batch with a request of its own. Cascade on and off must attend alike in the torch
backend (the CPU path) and in the Triton one (its kernels interpreted here), in both
base-sharing schemes (base-shared: the prefix's LR rows are per adapter), and a windowed
layer takes the plain path.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

from lragent_sglang.scheme import ConfigError, Scheme
from lragent_sglang.server.attention import LRAgentTorchAttnBackend
from lragent_sglang.server.attention_triton import LRAgentTritonAttnBackend
from lragent_sglang.server.config import LRAgentConfig
from lragent_sglang.server.launch_server import build_parser, lragent_config
from lragent_sglang.server.lora_split import LRWeights
from lragent_sglang.server.lr_pool import LRTokenPool
from lragent_sglang.server.runtime import LRAgentRuntime

H_Q, H_KV, D, R = 4, 2, 24, 4
SLOTS, ROWS, CONTEXT = 96, 6, 40
PREFIX = 20  # the forks' shared trajectory
# (suffix length, adapter) of each fork, then a request of its own
FORKS = [(3, "u1"), (1, "u2"), (5, None)]
SINGLE = (14, "u1")
ADAPTER_SLOT = {None: 0, "u1": 1, "u2": 2}


def make_runner(scheme: Scheme, cascade: str) -> tuple[SimpleNamespace, LRAgentRuntime]:
    gen = torch.Generator().manual_seed(0)
    kv = MHATokenToKVPool(SLOTS, page_size=1, dtype=torch.float32, head_num=H_KV, head_dim=D, layer_num=1,
                          device="cpu", enable_memory_saver=False)
    kv.k_buffer[0].copy_(torch.randn(kv.k_buffer[0].shape, generator=gen))
    kv.v_buffer[0].copy_(torch.randn(kv.v_buffer[0].shape, generator=gen))
    rt = LRAgentRuntime(LRAgentConfig(scheme, cascade=cascade, cascade_min_shared=8))
    rt.bound = rt.enabled = True
    rt.width = R
    rt.lr_pool = LRTokenPool(3 * SLOTS, R, 1, torch.float32, "cpu", max_reqs=ROWS, max_context_len=CONTEXT)
    rt.lr_pool.lr_buffer[0].copy_(torch.randn(rt.lr_pool.lr_buffer[0].shape, generator=gen))
    b_v = torch.randn(3, H_KV, R, D, generator=gen)
    b_v[0] = 0  # buffer slot 0 holds no adapter (rank 0)
    rt.weights = LRWeights(b_v=[b_v], a_v=[torch.zeros(3, R, 8)], slot_uid={0: None, 1: "u1", 2: "u2"})
    lora_manager = SimpleNamespace(
        memory_pool=SimpleNamespace(uid_to_buffer_id=ADAPTER_SLOT),
        lora_backend=SimpleNamespace(batch_info=SimpleNamespace(req_weight_indices=None, weight_indices=None,
                                                                lora_ranks=torch.tensor([0, R, R]))),
    )
    runner = SimpleNamespace(
        device=torch.device("cpu"), req_to_token_pool=ReqToTokenPool(ROWS, CONTEXT, "cpu", False),
        token_to_kv_pool=kv, lora_manager=lora_manager, ps=SimpleNamespace(tp_size=1),
        model_config=SimpleNamespace(num_attention_heads=H_Q, get_num_kv_heads=lambda tp: H_KV, head_dim=D),
        server_args=SimpleNamespace(cuda_graph_config=None),
    )
    return runner, rt


def fork_batch(runner: SimpleNamespace, rt: LRAgentRuntime) -> SimpleNamespace:
    """The forks list the trajectory's KV slots, and its LR slots: one copy under
    base-lr-shared, one per adapter under base-shared (what the tree hands each LR key)."""
    slots = iter(torch.randperm(SLOTS - 1, generator=torch.Generator().manual_seed(1)).add(1).tolist())
    lr_slots = iter(torch.randperm(3 * SLOTS - 1, generator=torch.Generator().manual_seed(2)).add(1).tolist())
    take = lambda it, n: [next(it) for _ in range(n)]
    trajectory = take(slots, PREFIX)
    lr_copies: dict = {}
    requests = []
    for suffix, adapter in FORKS:
        key = adapter if rt.scheme is Scheme.BASE_SHARED else None
        if key not in lr_copies:
            lr_copies[key] = take(lr_slots, PREFIX)
        requests.append((trajectory + take(slots, suffix), lr_copies[key] + take(lr_slots, suffix), adapter))
    requests.insert(1, (take(slots, SINGLE[0]), take(lr_slots, SINGLE[0]), SINGLE[1]))
    table, lr_table = runner.req_to_token_pool.req_to_token, rt.lr_pool.req_to_lr
    for row, (kv, lr, _) in enumerate(requests, start=1):
        table[row, : len(kv)] = torch.tensor(kv)
        lr_table[row, : len(lr)] = torch.tensor(lr)
    adapters = [a for _, _, a in requests]
    runner.lora_manager.lora_backend.batch_info.weight_indices = torch.tensor([ADAPTER_SLOT[a] for a in adapters])
    seq = torch.tensor([len(kv) for kv, _, _ in requests])
    return SimpleNamespace(
        batch_size=len(requests), forward_mode=SimpleNamespace(is_decode_or_idle=lambda: True),
        req_pool_indices=torch.arange(1, len(requests) + 1), seq_lens=seq, seq_lens_sum=int(seq.sum()),
        seq_lens_cpu=seq, positions=seq - 1, out_cache_loc=torch.zeros(len(requests), dtype=torch.int64),
        rids=[f"r{i}" for i in range(len(requests))], lora_ids=adapters,
    )


def decode(cls: type, scheme: Scheme, cascade: str, window: int = -1) -> tuple[torch.Tensor, object]:
    runner, rt = make_runner(scheme, cascade)
    batch = fork_batch(runner, rt)
    lay = SimpleNamespace(layer_id=0, tp_q_head_num=H_Q, tp_k_head_num=H_KV, head_dim=D, qk_head_dim=D,
                          v_head_dim=D, scaling=D ** -0.5, logit_cap=0.0, sliding_window_size=window)
    q = torch.randn(batch.batch_size, H_Q * D, generator=torch.Generator().manual_seed(3))
    backend = cls(runner, rt)
    backend.init_forward_metadata(batch)
    return backend.forward_decode(q, None, None, lay, batch, save_kv_cache=False), backend


@pytest.mark.parametrize("scheme", [Scheme.BASE_LR_SHARED, Scheme.BASE_SHARED])
def test_cascade_attends_like_the_plain_decode(scheme: Scheme) -> None:
    plain, _ = decode(LRAgentTorchAttnBackend, scheme, "off")
    torch_cascade, backend = decode(LRAgentTorchAttnBackend, scheme, "on")
    assert backend.groups == [([0, 2, 3], PREFIX)]  # the forks, around the single request
    torch.testing.assert_close(torch_cascade, plain, rtol=1e-5, atol=1e-5)
    triton_cascade, backend = decode(LRAgentTritonAttnBackend, scheme, "auto")
    assert backend.decode_wrapper.cascade
    assert backend.decode_wrapper.prefix_lens.tolist() == [PREFIX, 0, PREFIX, PREFIX]
    torch.testing.assert_close(triton_cascade, plain, rtol=1e-4, atol=1e-4)


def test_windowed_layers_attend_without_the_cascade() -> None:
    plain, _ = decode(LRAgentTorchAttnBackend, Scheme.BASE_LR_SHARED, "off", window=6)
    for cls in (LRAgentTorchAttnBackend, LRAgentTritonAttnBackend):
        out, _ = decode(cls, Scheme.BASE_LR_SHARED, "on", window=6)
        torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-4)


def test_cascade_flags_and_variables(monkeypatch) -> None:
    ours, _ = build_parser().parse_known_args(["--lragent-cascade", "on", "--lragent-cascade-min-shared", "64"])
    monkeypatch.setattr("os.environ", {})
    config = lragent_config(build_parser(), ours)
    assert (config.cascade, config.cascade_min_shared) == ("on", 64)
    assert LRAgentConfig.from_env(config.to_env()) == config  # what SGLang's processes read
    assert LRAgentConfig.from_env({}).cascade == "off"
    with pytest.raises(ConfigError, match="LRAGENT_CASCADE.*always"):
        LRAgentConfig.from_env({"LRAGENT_CASCADE": "always"})
    with pytest.raises(ConfigError, match="cascade-min-shared.*-3"):
        LRAgentConfig.from_env({"LRAGENT_CASCADE_MIN_SHARED": "-3"})
