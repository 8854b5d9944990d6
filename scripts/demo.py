"""README command 1: the multi-agent demo on the embedded SmolLM2 model.

Runs the example agent (plan -> action -> reflect with a calculator and a document
lookup, one LoRA adapter per role, forks over one shared trajectory) on a few questions
against the real SGLang server in base-lr-shared mode, then the same conversation against
a non-shared server, and prints per role and scheme what the server computed, what it
found in its prefix cache, and the KV memory it held.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict

import requests
from example_agent import QUESTIONS, print_result, run_agent
from tqdm import tqdm

from lragent_sglang.agents.frontend import Runtime
from lragent_sglang.agents.tools import Toolbox
from lragent_sglang.scheme import Scheme


def kv_bytes(url: str) -> int:
    """Bytes of KV (base + LR) the server's prefix tree holds now."""
    state = requests.get(url + "/server_info", timeout=60).json()["internal_states"][0]["lragent"]
    return state.get("base", {}).get("bytes", 0) + state.get("lr", {}).get("bytes", 0)


def run_scheme(scheme: Scheme, questions: list[str], max_steps: int, show: bool) -> dict:
    """Per role: prompt, cached and generated tokens; plus the KV bytes held at the end."""
    per_role: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    with Runtime.smollm2(scheme=scheme, chat_template_name="chatml") as rt:
        if show:
            print(f"dashboard while this runs: {rt.url}/lragent/dashboard", flush=True)
        for question in tqdm(questions, desc=f"{scheme}: questions"):
            result = run_agent(question, rt.endpoint, max_steps=max_steps, toolbox=Toolbox())
            if show:
                print_result(result)
            for turn in result.turns:
                row = per_role[turn.role]
                row[0] += turn.prompt_tokens
                row[1] += turn.cached_tokens
                row[2] += turn.completion_tokens
        memory = kv_bytes(rt.url)
    return {"roles": dict(per_role), "kv_bytes": memory}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", type=Scheme, choices=list(Scheme), default=Scheme.BASE_LR_SHARED)
    parser.add_argument("--baseline", type=Scheme, choices=list(Scheme), default=Scheme.NON_SHARED)
    parser.add_argument("--questions", type=int, default=2, help="how many built-in questions")
    parser.add_argument("--max-steps", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    questions = QUESTIONS[: args.questions]
    print("starting the SGLang server on SmolLM2-135M with plan/action/reflect adapters "
          "(about 30 s on CPU; the first run also converts the model) ...", flush=True)
    runs = {scheme: run_scheme(scheme, questions, args.max_steps, show=scheme == args.scheme)
            for scheme in (args.scheme, args.baseline)}

    print("\nscheme          role     prompt  cached  computed  generated   hit")
    for scheme, run in runs.items():
        for role, (prompt, cached, generated) in run["roles"].items():
            print(f"{scheme:15s} {role:8s} {prompt:6d}  {cached:6d}  {prompt - cached:8d}  "
                  f"{generated:9d}  {cached / max(prompt, 1):4.0%}")
    print("\nscheme          prefill tokens computed   KV held")
    for scheme, run in runs.items():
        computed = sum(p - c for p, c, _ in run["roles"].values())
        print(f"{scheme:15s} {computed:23d}   {run['kv_bytes'] / 2**20:6.1f} MiB")
    ours, base = runs[args.scheme], runs[args.baseline]
    saved = 1 - sum(p - c for p, c, _ in ours["roles"].values()) / max(
        1, sum(p - c for p, c, _ in base["roles"].values()))
    print(f"\n{args.scheme} computed {saved:.0%} fewer prefill tokens than {args.baseline} "
          f"and held {ours['kv_bytes'] / max(base['kv_bytes'], 1):.2f}x its KV memory.")
    print("servers stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
