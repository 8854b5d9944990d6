"""The CPU compatibility layer: each patch does what SGLang's CUDA path would."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from lragent_sglang.server import cpu_compat


def test_assign_req_to_token_pool_cpu_writes_each_row():
    req_to_token = torch.zeros(4, 10, dtype=torch.int64)
    req_pool_indices = torch.tensor([2, 0])
    start = torch.tensor([3, 0])
    end = torch.tensor([5, 3])
    out_cache_loc = torch.tensor([11, 12, 21, 22, 23])
    cpu_compat.assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start, end, out_cache_loc, 2)
    assert req_to_token[2, 3:5].tolist() == [11, 12]
    assert req_to_token[0, 0:3].tolist() == [21, 22, 23]
    assert int(req_to_token.count_nonzero()) == 5


def test_copy_all_layer_kv_cache_cpu_moves_rows_in_every_layer():
    ks = [torch.randn(8, 2, 4) for _ in range(3)]
    vs = [torch.randn(8, 2, 4) for _ in range(3)]
    before_k = [k.clone() for k in ks]
    src, tgt = torch.tensor([1, 2]), torch.tensor([6, 7])
    cpu_compat.copy_all_layer_kv_cache_cpu(ks, vs, tgt, src)
    for k, k0 in zip(ks, before_k):
        assert torch.equal(k[tgt], k0[src])
        assert torch.equal(k[:6], k0[:6])


def test_stub_imports_any_op_and_names_it_when_called(monkeypatch):
    monkeypatch.delitem(sys.modules, "sgl_kernel", raising=False)
    cpu_compat.install_sgl_kernel_stub()
    from sgl_kernel import assign_req_to_token_pool_cpu, fill_bonus_tokens_cpu

    assert assign_req_to_token_pool_cpu is cpu_compat.assign_req_to_token_pool_cpu
    with pytest.raises(NotImplementedError, match="fill_bonus_tokens_cpu"):
        fill_bonus_tokens_cpu()
    with pytest.raises(AttributeError):
        sys.modules["sgl_kernel"].__path__


@pytest.mark.parametrize(
    ("flag", "expected"), [("1", True), ("0", False), (None, not torch.cuda.is_available())]
)
def test_wanted_follows_env_flag_then_hardware(monkeypatch, flag, expected):
    if flag is None:
        monkeypatch.delenv(cpu_compat.ENV_FLAG, raising=False)
    else:
        monkeypatch.setenv(cpu_compat.ENV_FLAG, flag)
    assert cpu_compat.wanted() is expected


def test_disable_pinning_covers_the_whole_process(monkeypatch):
    """xgrammar's token bitmask and SGLang's LoRA buffers ask torch for pinned memory."""
    for name in cpu_compat.PINNING_FACTORIES:
        monkeypatch.setattr(torch, name, getattr(torch, name))
    monkeypatch.setattr(torch.Tensor, "pin_memory", torch.Tensor.pin_memory)
    cpu_compat.disable_pinning()
    cpu_compat.disable_pinning()  # idempotent: no wrapper around a wrapper
    t = torch.tensor([1, 2], dtype=torch.int32, device="cpu", pin_memory=True)
    assert t.tolist() == [1, 2] and t.dtype == torch.int32
    assert torch.full((2, 3), -1, dtype=torch.int32, pin_memory=True).shape == (2, 3)
    x = torch.zeros((3,), pin_memory=True)
    assert x.pin_memory() is x
    assert torch.full.__wrapped__ is not None and not hasattr(torch.full.__wrapped__, "lragent_unpinned")


def test_support_triton_hook_only_changes_our_backend():
    def original(backend: str) -> bool:
        return backend != "torch_native"

    assert cpu_compat.support_triton(original, "lragent") is False
    assert cpu_compat.support_triton(original, "triton") is True
    assert cpu_compat.support_triton(original, "torch_native") is False


def test_apply_vocab_mask_masks_cpu_logits():
    logits = torch.zeros(2, 40)
    mask = torch.zeros(2, 2, dtype=torch.int32)
    mask[0, 0] = 0b101  # row 0: tokens 0 and 2 allowed
    mask[1, 1] = 1  # row 1: token 32 allowed
    cpu_compat.apply_vocab_mask(lambda *a: pytest.fail("CUDA path taken"), logits, mask)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [0, 2]
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [32]


def test_apply_vocab_mask_takes_the_sampler_keyword_call():
    """SGLang's `GrammarMask.apply` calls `grammar.apply_vocab_mask(logits=..., vocab_mask=...)`
    on the grammar object: the hook then sees the grammar positionally, the tensors by name."""
    logits = torch.zeros(1, 40)
    mask = torch.zeros(1, 2, dtype=torch.int32)
    mask[0, 0] = 0b10  # token 1 allowed
    grammar = object()
    cpu_compat.apply_vocab_mask(lambda *a, **k: pytest.fail("CUDA path taken"), grammar,
                                logits=logits, vocab_mask=mask)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [1]


def test_only_the_dp_controller_goes_to_the_lowest_priority():
    """SGLang's DP controller polls without blocking; on 2 cores it starved the schedulers."""
    import psutil

    titled = "import setproctitle, time; setproctitle.setproctitle({!r}); time.sleep(60)"
    procs = [subprocess.Popen([sys.executable, "-c", titled.format(title)])
             for title in (cpu_compat.DP_CONTROLLER_TITLE, "sglang::scheduler_DP0")]
    try:
        deadline = time.monotonic() + 30
        while not all(" ".join(psutil.Process(p.pid).cmdline()).startswith("sglang::") for p in procs):
            assert time.monotonic() < deadline, "the children never set their titles"
            time.sleep(0.1)
        cpu_compat.lower_dp_controller_priority()
        assert [psutil.Process(p.pid).nice() for p in procs] == [19, os.nice(0)]
    finally:
        for p in procs:
            p.kill()
            p.wait()
