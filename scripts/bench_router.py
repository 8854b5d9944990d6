"""The paper's trace through SGLang's router over N workers (issue 15): does placing each
trajectory on one worker keep LRAgent's sharing when a deployment scales out?

Three runs, each a fresh cluster (`lragent_sglang.agents.cluster`: N workers started by our
launcher, then `python -m sglang_router.launch_router`): base-lr-shared with trajectory
placement (router policy `manual`, each trajectory's requests carrying its routing key in
`X-SMG-Routing-Key`, as `LRAgentEndpoint` sends it), the same with `round_robin`, and stock
non-shared with placement. `--in-flight` trajectories of the 17-step trace run at once
through the router (`bench_trace.run_trajectories`). Prints a table (throughput, summed TTFT
per trajectory, cached fraction, and each worker's cached fraction from its
`/lragent/stats`) and writes JSON.

    python scripts/bench_router.py --model-path M --lora-paths plan=P action=P reflect=P \
        --workers 2 --context 8192 --in-flight 16 --out artifacts/bench_router.json \
        -- --mem-fraction-static 0.4          # two workers on one GPU share its memory
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import requests

from bench_trace import paper_trace, run_trajectories, stream_generate
from lragent_sglang.agents.cluster import Cluster

logger = logging.getLogger(__name__)

ROUTING_KEY_HEADER = "X-SMG-Routing-Key"


@dataclass(frozen=True)
class Run:
    label: str
    scheme: str
    policy: str


RUNS = (
    Run("base-lr-shared placement", "base-lr-shared", "manual"),
    Run("base-lr-shared round-robin", "base-lr-shared", "round_robin"),
    Run("non-shared placement", "non-shared", "manual"),
)


def worker_hits(url: str) -> tuple[int, int]:
    """(prompt tokens, cached tokens) a worker counted over all its DP ranks."""
    total = requests.get(url + "/lragent/stats", timeout=60).json()["total"]
    per = total.get("per_adapter", {}).values()
    return sum(a["prompt_tokens"] for a in per), sum(a["lr_hit_tokens"] for a in per)


def run_cell(router_url: str, worker_urls: list[str], steps: list, in_flight: int, vocab: int,
             label: str) -> dict:
    """All trajectories at once through the router; each its own routing key."""
    before = [worker_hits(u) for u in worker_urls]
    run = uuid.uuid4().hex[:8]
    results, wall = run_trajectories(router_url, steps, in_flight, True, vocab, label,
                                     headers=lambda i: {ROUTING_KEY_HEADER: f"{run}-{i}"})
    per_worker = []
    for url, (p0, h0) in zip(worker_urls, before):
        p1, h1 = worker_hits(url)
        per_worker.append({"prompt_tokens": p1 - p0, "cached_fraction": (h1 - h0) / (p1 - p0) if p1 > p0 else 0.0})
    tokens = sum(r["tokens"] for r in results.values())
    return {
        "throughput_tok_s": tokens / wall,
        "wall_s": wall,
        "ttft_sum_s": sum(r["ttft_sum_s"] for r in results.values()) / in_flight,
        "cached_fraction": sum(r["cached"] for r in results.values()) / sum(r["prompt"] for r in results.values()),
        "workers": per_worker,
    }


def print_table(rows: dict[str, dict], context: int, in_flight: int, workers: int) -> None:
    ref = rows.get(RUNS[1].label)
    print(f"\ntrace L={context}, {in_flight} in flight, {workers} workers behind sglang-router")
    print(f"{'run':28s} {'tok/s':>9s} {'x rr':>6s} {'TTFT sum s':>10s} {'cached':>7s}  cached per worker")
    for label, r in rows.items():
        ratio = r["throughput_tok_s"] / ref["throughput_tok_s"] if ref else float("nan")
        per = " ".join(f"{w['cached_fraction']:.2f}" for w in r["workers"])
        print(f"{label:28s} {r['throughput_tok_s']:9.0f} {ratio:6.2f} {r['ttft_sum_s']:10.2f} "
              f"{r['cached_fraction']:7.2f}  {per}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--lora-paths", nargs="+", required=True, help="plan=DIR action=DIR reflect=DIR")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--context", type=int, default=8192, help="L, the tool-output length")
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--runs", nargs="+", default=[r.label for r in RUNS], choices=[r.label for r in RUNS])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench_router.json"))
    parser.add_argument("server_flags", nargs=argparse.REMAINDER, help="after --: extra flags for every worker")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.in_flight < 1:
        parser.error("--workers and --in-flight must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    extra = [f for f in args.server_flags if f != "--"]
    steps = paper_trace(args.context)
    rows: dict[str, dict] = {}
    for run in (r for r in RUNS if r.label in args.runs):
        worker_args = ["--model-path", args.model_path, "--skip-tokenizer-init", "--enable-lora",
                       "--lora-paths", *args.lora_paths, "--lragent-scheme", run.scheme, *extra]
        log_dir = args.out.parent / f"{args.out.stem}.{run.scheme}.{run.policy}"
        with Cluster(worker_args, args.workers, run.policy, log_dir=log_dir) as cluster:
            urls = [w.url for w in cluster.workers]
            for url in urls:
                stream_generate(url, [100, 101, 102], None, 2)  # warm the kernels
                requests.post(url + "/flush_cache", timeout=60).raise_for_status()
            rows[run.label] = run_cell(cluster.url, urls, steps, args.in_flight, args.vocab, run.label)
        logger.info("%s: %s", run.label, rows[run.label])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"context": args.context, "in_flight": args.in_flight,
                                        "workers": args.workers, "runs": rows}, indent=2))
    print_table(rows, args.context, args.in_flight, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
