"""README command 1: a short multi-role agent conversation against the real SGLang server.

Starts our launcher on the embedded SmolLM2 checkpoint with three role adapters
(plan / action / reflect), runs one plan -> action -> reflect round on one shared
trajectory, prints each role's answer and SGLang's prefix-cache numbers per request,
then stops the server.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from lragent_sglang.adapters import default_role_adapters
from lragent_sglang.config import DEFAULT_SCHEME, SCHEMES
from lragent_sglang.models import default_cache_dir, smollm2_checkpoint
from lragent_sglang.server_process import ServerProcess

SYSTEM = (
    "You are a team of agents solving a question together. The planner writes a plan, "
    "the actor carries out one step, the reflector checks the work."
)
QUESTION = "A shop sells pens at 3 dollars each. How much do 14 pens cost?"
STEPS = (
    ("plan", "Planner, write a short plan."),
    ("action", "Actor, carry out the first step of the plan."),
    ("reflect", "Reflector, is the answer right? Say why in one sentence."),
)


def turn(role: str, text: str) -> str:
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", choices=SCHEMES, default=DEFAULT_SCHEME)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--question", default=QUESTION)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    print("preparing the embedded SmolLM2-135M-Instruct checkpoint and three role adapters ...")
    model = smollm2_checkpoint()
    adapters = default_role_adapters(model, default_cache_dir())
    server_args = [
        "--model-path", str(model), "--dtype", "float32", "--enable-lora",
        "--lora-paths", *[f"{role}={path}" for role, path in adapters.items()],
        "--max-loras-per-batch", "4", "--max-lora-rank", "8", "--lragent-scheme", args.scheme,
    ]
    print(f"starting the SGLang server (scheme {args.scheme}); this takes about 30 s on CPU ...")
    trajectory = turn("system", SYSTEM) + turn("user", args.question)
    rows = []
    with ServerProcess(server_args) as server:
        for role, instruction in STEPS:
            prompt = trajectory + turn("user", instruction) + "<|im_start|>assistant\n"
            start = time.monotonic()
            out = server.generate(
                text=prompt, lora_path=role,
                sampling_params={"max_new_tokens": args.max_new_tokens, "temperature": 0},
            )
            meta = out["meta_info"]
            answer = out["text"].strip()
            rows.append((role, meta["prompt_tokens"], meta["cached_tokens"],
                         meta["completion_tokens"], time.monotonic() - start))
            print(f"\n[{role}] {answer}")
            trajectory = prompt + answer + "<|im_end|>\n"
    print("\nrole     prompt tokens  cached (prefix hit)  generated  seconds")
    for role, prompt_tokens, cached, generated, secs in rows:
        print(f"{role:8s} {prompt_tokens:13d}  {cached:19d}  {generated:9d}  {secs:7.1f}")
    total_prompt = sum(r[1] for r in rows)
    total_cached = sum(r[2] for r in rows)
    print(f"total    {total_prompt:13d}  {total_cached:19d}   "
          f"hit rate {total_cached / max(total_prompt, 1):.0%}")
    print("server stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
