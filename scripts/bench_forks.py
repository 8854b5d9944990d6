"""Decode-phase tokens/s of role forks over one shared trajectory, cascade off and on.

Issue 19: role forks decoding together over one long trajectory on the real server.

One server per `--cascade` value (same scheme and flags). Each repetition commits a fresh
random trajectory of `--context` tokens (one request without an adapter, as an SGLang
program's fork commit does), then sends `--forks` requests at once, each the trajectory
plus a few tokens of its own, with the role adapters in turn, streamed, generating `--gen`
tokens each. The decode phase runs from the moment every fork has its first token to the
last token of any; its tokens/s counts the tokens that arrived in it. Requests go over
HTTP with token ids (`--skip-tokenizer-init`). Prints a table and writes JSON.

    python scripts/bench_forks.py --model-path M --lora-paths plan=P action=P reflect=P \
        --context 32768 --forks 8 --gen 256 [--cascade off auto] [--scheme base-lr-shared] \
        [--out F] [-- extra SGLang flags]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import threading
import time
from pathlib import Path

import requests

from lragent_sglang.agents.server_process import ServerProcess
from lragent_sglang.scheme import Scheme
from lragent_sglang.server.config import CASCADE_MODES

logger = logging.getLogger(__name__)

#: tokens of its own each fork adds after the trajectory (its role's instruction)
OWN_TOKENS = 16


def stream_tokens(url: str, ids: list[int], role: str | None, n_gen: int) -> list[tuple[float, int]]:
    """(arrival time, tokens so far) of every streamed chunk of one greedy request."""
    payload = {"input_ids": ids, "stream": True,
               "sampling_params": {"max_new_tokens": n_gen, "temperature": 0, "ignore_eos": True}}
    if role:
        payload["lora_path"] = role
    arrivals = []
    with requests.post(url + "/generate", json=payload, stream=True, timeout=3600) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(f"server error: {chunk['error']}")
            arrivals.append((time.perf_counter(), len(chunk["output_ids"])))
    return arrivals


def decode_phase(streams: list[list[tuple[float, int]]]) -> dict:
    """From the moment every fork has its first token to the last token of any: tokens that
    arrived in between (each fork's count at the end less its count at the start), seconds,
    and tokens/s."""
    start = max(s[0][0] for s in streams)
    end = max(s[-1][0] for s in streams)
    tokens = sum(s[-1][1] - max(n for t, n in s if t <= start) for s in streams)
    return {"decode_tokens": tokens, "decode_s": end - start,
            "decode_tok_s": tokens / (end - start) if end > start else 0.0}


def run_forks(url: str, seed: int, context: int, forks: int, gen: int, roles: list[str], vocab: int) -> dict:
    """Commit a trajectory, then decode `forks` role forks over it at once."""
    rng = random.Random(seed)
    trajectory = [rng.randrange(100, vocab) for _ in range(context)]
    stream_tokens(url, trajectory, None, 1)
    prompts = [trajectory + [rng.randrange(100, vocab) for _ in range(OWN_TOKENS)] for _ in range(forks)]
    streams: list = [None] * forks
    sent = time.perf_counter()

    def fork(i: int) -> None:
        streams[i] = stream_tokens(url, prompts[i], roles[i % len(roles)], gen)

    threads = [threading.Thread(target=fork, args=(i,)) for i in range(forks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(not s for s in streams):
        raise RuntimeError(f"{sum(not s for s in streams)} forks returned nothing")
    return {**decode_phase(streams), "last_first_token_s": max(s[0][0] for s in streams) - sent}


def summarise(reps: list[dict]) -> dict:
    tokens, seconds = sum(r["decode_tokens"] for r in reps), sum(r["decode_s"] for r in reps)
    return {"decode_tok_s": tokens / seconds if seconds else 0.0, "decode_tokens": tokens, "decode_s": seconds,
            "last_first_token_s": sum(r["last_first_token_s"] for r in reps) / len(reps), "reps": reps}


def print_table(args: argparse.Namespace, runs: dict[str, dict]) -> None:
    off = runs.get("off")
    print(f"\n{args.forks} forks x ({args.context} shared + {OWN_TOKENS} own tokens), {args.gen} generated each, "
          f"scheme {args.scheme}, {args.reps} repetitions")
    print(f"{'cascade':8s} {'decode tok/s':>12s} {'x off':>6s} {'decode s':>9s} {'prefill wait s':>14s}")
    for mode, r in runs.items():
        ratio = r["decode_tok_s"] / off["decode_tok_s"] if off and off["decode_tok_s"] else float("nan")
        print(f"{mode:8s} {r['decode_tok_s']:12.1f} {ratio:6.2f} {r['decode_s']:9.2f} {r['last_first_token_s']:14.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--lora-paths", nargs="+", required=True, help="plan=DIR action=DIR reflect=DIR")
    parser.add_argument("--context", type=int, default=32768, help="tokens of the shared trajectory")
    parser.add_argument("--forks", type=int, default=8)
    parser.add_argument("--gen", type=int, default=256, help="tokens each fork generates")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--cascade", nargs="+", default=["off", "on"], choices=CASCADE_MODES)
    parser.add_argument("--min-shared", type=int, default=256, help="--lragent-cascade-min-shared")
    parser.add_argument("--scheme", default=str(Scheme.BASE_LR_SHARED),
                        choices=[str(s) for s in Scheme if s.shares_base])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench_forks.json"))
    parser.add_argument("server_flags", nargs=argparse.REMAINDER, help="after --: extra SGLang flags")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    extra = [f for f in args.server_flags if f != "--"]
    roles = [pair.split("=", 1)[0] for pair in args.lora_paths]
    base = ["--model-path", args.model_path, "--skip-tokenizer-init", "--enable-lora",
            "--lora-paths", *args.lora_paths, "--lragent-scheme", args.scheme,
            "--lragent-cascade-min-shared", str(args.min_shared), *extra]
    runs: dict[str, dict] = {}
    for mode in args.cascade:
        with ServerProcess([*base, "--lragent-cascade", mode],
                           log_path=args.out.with_suffix(f".cascade-{mode}.log")) as srv:
            stream_tokens(srv.url, [100, 101, 102], None, 2)  # warm the kernels
            reps = []
            for rep in range(args.reps):
                requests.post(srv.url + "/flush_cache", timeout=60).raise_for_status()
                reps.append(run_forks(srv.url, 1000 + rep, args.context, args.forks, args.gen, roles, args.vocab))
                logger.info("cascade %s, repetition %d: %s", mode, rep, reps[-1])
            runs[mode] = summarise(reps)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=2))
    print_table(args, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
