"""The cascade decode in the real SGLang server on CPU (SmolLM2, float32, base-lr-shared,
`--lragent-cascade on`): role forks over one committed trajectory decode in one batch,
grouped by their shared KV slots (the server logs its first grouped batch), and produce
the tokens each fork produces alone, where its batch of one has no group and takes the
plain decode (what `--lragent-cascade off` runs for every batch).
"""

from __future__ import annotations

import random

import pytest

from lragent_sglang.adapters.make import make_role_adapters
from lragent_sglang.agents.server_process import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROLES = ["plan", "action", "reflect", None]
NEW = 4


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    adapters = make_role_adapters(smollm2, tmp_path_factory.mktemp("cascade"), shared_v_a=True, b_std=0.3)
    args = [
        "--model-path", str(smollm2), "--dtype", "float32", "--enable-lora",
        "--lora-paths", *[f"{r}={p}" for r, p in adapters.items()],
        "--max-loras-per-batch", "4", "--max-lora-rank", "8", "--lragent-scheme", "base-lr-shared",
        "--lragent-cascade", "on", "--lragent-cascade-min-shared", "32",
    ]
    with ServerProcess(args) as srv:
        yield srv


def greedy(srv: ServerProcess, prompts: list[list[int]], roles: list[str | None]) -> list[list[int]]:
    out = srv.generate(input_ids=prompts, lora_path=roles,
                       sampling_params={"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True})
    return [r["output_ids"] for r in out]


def test_forks_decoding_together_equal_each_fork_alone(server):
    rng = random.Random(0)
    trajectory = [rng.randrange(1000, 40000) for _ in range(64)]
    greedy(server, [trajectory], [None])  # commit: base KV and the shared LR rows
    forks = [trajectory + [rng.randrange(1000, 40000) for _ in range(4 + i)] for i in range(len(ROLES))]
    together = greedy(server, forks, ROLES)
    assert "lragent cascade: first grouped decode batch: 4 requests" in server.log_path.read_text()
    alone = [greedy(server, [prompt], [role])[0] for prompt, role in zip(forks, ROLES)]
    assert together == alone
    assert len({tuple(t) for t in together}) == len(ROLES), "each role decodes its own tokens"
