"""README command 1: the multi-agent demo on the embedded SmolLM2 model.

Runs the example agent (plan -> action -> reflect with a calculator and a document
lookup, one trained LoRA adapter per role, forks over one shared trajectory) on a few
questions against the real SGLang server in base-lr-shared mode, then the same
conversation against a non-shared server, and prints what each role wrote, and per role
and scheme what the server computed, what it found in its prefix cache, and the KV memory
it held. The first server, and its dashboard, stays up until the demo ends.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import defaultdict

import requests
from example_agent import QUESTIONS, print_result, run_agent
from tqdm import tqdm

from lragent_sglang.agents.frontend import Runtime
from lragent_sglang.agents.tools import Toolbox
from lragent_sglang.scheme import Scheme


def server_state(url: str) -> dict:
    """Our statistics from the server: per adapter (all its requests) and the KV held."""
    return requests.get(url + "/lragent/stats", timeout=60).json()["schedulers"][0]


def run_scheme(rt: Runtime, scheme: Scheme, questions: list[str], max_steps: int, show: bool) -> dict:
    """Per role, the server's count of prompt and computed tokens over all the role's
    requests (a `select` makes three) and the tokens it generated; the KV bytes held."""
    before = server_state(rt.url)["per_adapter"]
    generated: dict[str, int] = defaultdict(int)
    for question in tqdm(questions, desc=f"{scheme}: questions"):
        result = run_agent(question, rt.endpoint, max_steps=max_steps, toolbox=Toolbox())
        if show:
            print_result(result)
        for turn in result.turns:
            generated[turn.role] += turn.completion_tokens
    after = server_state(rt.url)
    roles = {}
    for role, gen in generated.items():
        old = before.get(role, {})
        prompt, computed = (after["per_adapter"][role][k] - old.get(k, 0) for k in ("prompt_tokens", "computed_tokens"))
        roles[role] = (prompt, computed, gen)
    held = after.get("base", {}).get("bytes", 0) + after.get("lr", {}).get("bytes", 0)
    return {"roles": roles, "kv_bytes": held}


def shared(scheme: Scheme) -> str:
    """What a scheme declares shared across adapters (`Scheme`'s properties)."""
    if scheme.keys_by_adapter:
        return "nothing (its prefix cache is keyed by adapter)"
    if not scheme.shares_base:
        return "K and the whole V, the writing adapter's delta included"
    if scheme.one_lr_cache:
        return "K, V_base and one LR cache"
    return "K and V_base (each adapter keeps its own LR cache)"


def generated_note(runs: dict[Scheme, dict], scheme: Scheme, baseline: Scheme) -> str:
    same = all(runs[scheme]["roles"][r][2] == runs[baseline]["roles"][r][2] for r in runs[scheme]["roles"])
    return (
        ("Generated tokens are the same in both runs here; they can differ" if same else
         "Generated tokens differ between the runs") +
        f" because of what each scheme declares shared: {scheme} shares {shared(scheme)} across "
        f"adapters, {baseline} shares {shared(baseline)}. Under sharing a role reads cached rows "
        f"that another request computed (an earlier turn, on another role's adapter), whose "
        f"hidden states differ slightly from its own, so greedy text can take another path "
        f"and stop at another length. FIDELITY.md measures that gap."
    )


def print_summary(runs: dict[Scheme, dict], scheme: Scheme, baseline: Scheme) -> None:
    print("\nper role, all its requests (reflect's select adds a prefix and a scoring request):")
    print("scheme          role     prompt  cached  computed  generated   hit")
    for name, run in runs.items():
        for role, (prompt, computed, generated) in run["roles"].items():
            print(f"{name:15s} {role:8s} {prompt:6d}  {prompt - computed:6d}  {computed:8d}  "
                  f"{generated:9d}  {(prompt - computed) / max(prompt, 1):4.0%}")
    print("\nscheme          prefill tokens computed   KV held")
    total = {name: sum(c for _, c, _ in run["roles"].values()) for name, run in runs.items()}
    for name, run in runs.items():
        print(f"{name:15s} {total[name]:23d}   {run['kv_bytes'] / 2**20:6.1f} MiB")
    saved = 1 - total[scheme] / max(1, total[baseline])
    ratio = runs[scheme]["kv_bytes"] / max(runs[baseline]["kv_bytes"], 1)
    print(f"\n{scheme} computed {saved:.0%} fewer prefill tokens than {baseline} "
          f"and held {ratio:.2f}x its KV memory.")
    print(generated_note(runs, scheme, baseline))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", type=Scheme, choices=list(Scheme), default=Scheme.BASE_LR_SHARED)
    parser.add_argument("--baseline", type=Scheme, choices=list(Scheme), default=Scheme.NON_SHARED)
    parser.add_argument("--questions", type=int, default=2, help="how many built-in questions")
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--hold", type=float, default=0.0, metavar="SECONDS",
                        help="keep the dashboard up this long after the summary (Ctrl-C ends it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    questions = list(QUESTIONS[: args.questions])
    print("starting the SGLang server on SmolLM2-135M with the trained plan/action/reflect "
          "adapters (30-60 s on 2 CPU cores; the first run also converts the model) ...", flush=True)
    runs: dict[Scheme, dict] = {}
    with Runtime.smollm2(scheme=args.scheme, chat_template_name="chatml") as rt:
        up = time.monotonic()
        hold = f", then {args.hold:.0f} s more" if args.hold else " (--hold SECONDS keeps it longer)"
        print(f"dashboard: {rt.url}/lragent/dashboard - reachable until this demo ends: through "
              f"this {args.scheme} run and the {args.baseline} run that follows (a few minutes on "
              f"2 CPU cores; the end says how long){hold}", flush=True)
        runs[args.scheme] = run_scheme(rt, args.scheme, questions, args.max_steps, show=True)
        print(f"\nstarting a {args.baseline} server for the same conversation ...", flush=True)
        with Runtime.smollm2(scheme=args.baseline, chat_template_name="chatml") as baseline:
            runs[args.baseline] = run_scheme(baseline, args.baseline, questions, args.max_steps, show=False)
        print_summary(runs, args.scheme, args.baseline)
        if args.hold:
            print(f"\ndashboard still at {rt.url}/lragent/dashboard for {args.hold:.0f} s (Ctrl-C ends it)",
                  flush=True)
            try:
                time.sleep(args.hold)
            except KeyboardInterrupt:
                pass
        print(f"\nthe dashboard was reachable for {time.monotonic() - up:.0f} s.")
    print("servers stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
