"""`--tp-size 2`: the LR rows are the same on every rank and B_v is sliced by the rank's kv
heads, so base-lr-shared over two GPUs must answer like one GPU (up to bf16 reduction order).

Runs only where two CUDA devices exist (the device tool's `nvidia-h200-x2`); a random-weight
Llama small enough to start in seconds, with 8 query / 2 kv heads so each rank holds one kv head.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from make_random_llama import PRESETS, write_checkpoint

from lragent_sglang.adapters.make import make_role_adapters
from lragent_sglang.agents.server_process import ServerProcess

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

TINY = {**PRESETS["smollm2-135m"], "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64}
FLAGS = ["--sampling-backend", "pytorch", "--grammar-backend", "none", "--lora-backend", "triton",
         "--max-loras-per-batch", "4", "--max-lora-rank", "8", "--mem-fraction-static", "0.5",
         "--cuda-graph-max-bs", "8", "--skip-tokenizer-init", "--lragent-scheme", "base-lr-shared"]


def first_tokens(srv: ServerProcess, prompts: list[list[int]], roles: list[str | None]) -> list[tuple[int, float]]:
    """(greedy first token, its logprob) per prompt, the prompt read by `role` after a
    no-adapter request wrote the shared prefix (so the LR rows come from the shared cache)."""
    out = []
    for ids, role in zip(prompts, roles):
        srv.generate(input_ids=ids[:-8], sampling_params={"max_new_tokens": 1, "temperature": 0})
        payload = {"input_ids": ids, "return_logprob": True,
                   "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
        if role:
            payload["lora_path"] = role
        lp, tok = srv.generate(**payload)["meta_info"]["output_token_logprobs"][0][:2]
        out.append((tok, lp))
    return out


def test_tp2_base_lr_shared_matches_one_gpu(tmp_path: Path) -> None:
    model = write_checkpoint(dict(TINY), tmp_path / "model")
    adapters = make_role_adapters(model, tmp_path / "adapters", shared_v_a=True)
    lora = ["--enable-lora", "--lora-paths", *[f"{r}={p}" for r, p in adapters.items()]]
    prompts = [[300 + 7 * i + j for j in range(96)] for i in range(6)]
    roles = ["plan", "action", "reflect", None, "plan", "action"]
    results = {}
    for tp in (1, 2):
        with ServerProcess(["--model-path", str(model), *lora, *FLAGS, "--tp-size", str(tp)],
                           log_path=tmp_path / f"tp{tp}.log") as srv:
            results[tp] = first_tokens(srv, prompts, roles)
    same = sum(a[0] == b[0] for a, b in zip(results[1], results[2]))
    gaps = [abs(a[1] - b[1]) for a, b in zip(results[1], results[2]) if a[0] == b[0]]
    assert same >= 5, (results, "TP 2 picks other first tokens than TP 1")
    assert max(gaps) < 0.1, (results, "TP 2 logprobs differ from TP 1 beyond bf16 noise")
