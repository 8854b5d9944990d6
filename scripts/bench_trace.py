"""The paper's 17-step plan/action/reflect trace against the real server, one server per
scheme, all in one run (the LRAgent paper's emulated trace, README "Benchmarks").

Every trajectory has its own random tokens and runs its 17 steps in order (each prompt is
the whole trajectory so far plus the new tokens); `--in-flight` trajectories run at once.
Several `--context` / `--in-flight` values form a grid that every server runs in turn (cache
flushed before each cell), so one script run with four server starts covers them all.
Requests go over HTTP with token ids (`--skip-tokenizer-init`), streamed, so TTFT is the
arrival of the first chunk. The `no-adapters` run is the same server with every request
sent without an adapter (cache flushed first): the upper bound of sharing. Prints a table,
writes JSON and, next to it, a PNG of throughput and cached fraction against trajectories
in flight (one line per run, one panel pair per context).

`--host-tier off on` starts every server twice, without and with SGLang's hierarchical
cache (`--enable-hierarchical-cache --hicache-ratio R`; its runs are labelled "+host"):
`--schemes base-lr-shared --no-adapter-run --host-tier off on --in-flight 8 16 32 64` is
one script run of base-lr-shared with the host tier off and on and stock SGLang without
adapters with and without HiCache. Each run records the tokens its host tier loaded back.
`--profile-dir D` profiles the first cell of the runs labelled `--profile-label` with
SGLang's profiler (`/start_profile`, `--profile-steps` forward steps) and stores
`profile_summary`'s time breakdown in the JSON, with the HTTP share of TTFT (client TTFT
minus the server's own, from `/metrics`).

    python scripts/bench_trace.py --model-path M --lora-paths plan=P action=P reflect=P \
        --context 2048 8192 --in-flight 1 8 [--schemes non-shared base-lr-shared ...] [--out F]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests
from profile_summary import format_summary, load, summarise, trace_files
from tqdm import tqdm

from lragent_sglang.agents.server_process import ServerProcess
from lragent_sglang.scheme import Scheme

logger = logging.getLogger(__name__)

HOST_SUFFIX = " +host"
TTFT_SUM = "sglang:time_to_first_token_seconds_sum"


def paper_trace(context: int) -> list[tuple[str, int, int]]:
    """(role, new prompt tokens, generated tokens) of the 17 steps; total 912 + 4 L."""
    steps = [("plan", 512, 32), ("plan", 8, 8), ("action", 8, 8)]
    for _ in range(4):
        steps += [("plan", context, 32), ("plan", 8, 8), ("action", 8, 8)]
    return steps + [("reflect", 32, 32), ("reflect", 8, 8)]


def stream_generate(url: str, ids: list[int], role: str | None, n_gen: int,
                    headers: dict[str, str] | None = None) -> tuple[list[int], float, int]:
    """(output ids, TTFT seconds, cached tokens) of one streamed greedy request."""
    payload = {"input_ids": ids, "stream": True,
               "sampling_params": {"max_new_tokens": n_gen, "temperature": 0, "ignore_eos": True}}
    if role:
        payload["lora_path"] = role
    start = time.perf_counter()
    ttft, last = None, None
    with requests.post(url + "/generate", json=payload, headers=headers, stream=True, timeout=3600) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - start
            last = json.loads(line[5:])
            if "error" in last:
                raise RuntimeError(f"server error: {last['error']}")
    return last["output_ids"], ttft or 0.0, last["meta_info"]["cached_tokens"]


def run_trajectory(url: str, seed: int, steps: list, roles: bool, vocab: int, out: dict, bar: tqdm,
                   headers: dict[str, str] | None = None) -> None:
    rng = random.Random(seed)
    traj: list[int] = []
    ttft = cached = prompt = 0.0
    for role, n_new, n_gen in steps:
        traj += [rng.randrange(100, vocab) for _ in range(n_new)]
        gen, t, c = stream_generate(url, traj, role if roles else None, n_gen, headers)
        ttft += t
        cached += c
        prompt += len(traj)
        traj += gen
        bar.update(1)
    out[seed] = {"tokens": len(traj), "ttft_sum_s": ttft, "cached": cached, "prompt": prompt}


def server_state(url: str) -> dict:
    """Our statistics of the server's (first) scheduler: /server_info's `lragent` entry."""
    return requests.get(url + "/server_info", timeout=60).json()["internal_states"][0].get("lragent", {})


def prefill_writes(state: dict) -> tuple[int, int]:
    """(KV slots, LR rows) all prefills so far wrote: every computed token gets an LR row,
    and a KV slot unless it was an LR re-prefill (whose K / V_base stay the cached ones)."""
    per = state.get("per_adapter", {}).values()
    computed = sum(c["computed_tokens"] for c in per)
    return computed - sum(c["lr_reprefill_tokens"] for c in per), computed


def bytes_per_token(state: dict, part: str) -> float:
    held = state.get(part, {})
    return held.get("bytes", 0) / held["tokens"] if held.get("tokens") else 0.0


def kv_bytes_written(before: dict, after: dict, decode_tokens: int) -> float:
    """Bytes of base KV and LR rows the run wrote, prefill and decode: what it cost to store,
    even where the pool evicted it again (the bytes held at the end cannot show that)."""
    kv0, lr0 = prefill_writes(before)
    kv1, lr1 = prefill_writes(after)
    lr_bpt = bytes_per_token(after, "lr")
    return ((kv1 - kv0 + decode_tokens) * bytes_per_token(after, "base")
            + (lr1 - lr0 + decode_tokens) * lr_bpt)


def run_trajectories(url: str, steps: list, in_flight: int, roles: bool, vocab: int, label: str,
                     headers: Callable[[int], dict[str, str]] | None = None) -> tuple[dict[int, dict], float]:
    """`in_flight` trajectories at once (seeds 1000 + i, trajectory i's request headers
    `headers(i)`): their results and the wall time; an error if any failed."""
    results: dict[int, dict] = {}
    bar = tqdm(total=len(steps) * in_flight, desc=label, leave=False)
    start = time.perf_counter()
    threads = [threading.Thread(target=run_trajectory, args=(url, 1000 + i, steps, roles, vocab, results, bar),
                                kwargs={"headers": headers(i)} if headers else {})
               for i in range(in_flight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    bar.close()
    if len(results) != in_flight:
        raise RuntimeError(f"{label}: {in_flight - len(results)} trajectories failed")
    return results, wall


def run_scheme(url: str, steps: list, in_flight: int, roles: bool, vocab: int, label: str) -> dict:
    before = server_state(url)
    results, wall = run_trajectories(url, steps, in_flight, roles, vocab, label)
    info = server_state(url)
    kv_bytes = info.get("base", {}).get("bytes", 0) + info.get("lr", {}).get("bytes", 0)
    decode_tokens = in_flight * sum(n_gen - 1 for _, _, n_gen in steps)
    tokens = sum(r["tokens"] for r in results.values())
    loaded = info.get("host", {}).get("loaded_back_tokens", 0) - before.get("host", {}).get("loaded_back_tokens", 0)
    return {
        "throughput_tok_s": tokens / wall,
        "wall_s": wall,
        "ttft_sum_s": sum(r["ttft_sum_s"] for r in results.values()) / in_flight,
        "cached_fraction": sum(r["cached"] for r in results.values()) / sum(r["prompt"] for r in results.values()),
        "kv_bytes_per_trajectory": kv_bytes / in_flight,
        "kv_bytes_written_per_trajectory": kv_bytes_written(before, info, decode_tokens) / in_flight,
        "host_loaded_back_tokens": loaded,
    }


def metric_sum(url: str, name: str) -> float:
    """The sum of a Prometheus sample over its label sets (0 without --enable-metrics)."""
    text = requests.get(url + "/metrics", timeout=60).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def profiled(url: str, out_dir: Path, steps: int, in_flight: int, run: Callable[[], dict]) -> dict:
    """`run()`'s row with the time breakdown of SGLang's profiler over its first `steps`
    forward steps (the profiler stops itself after them) and the HTTP share of its TTFT."""
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(trace_files(out_dir))
    server_ttft = metric_sum(url, TTFT_SUM)
    requests.post(url + "/start_profile", timeout=60, json={
        "output_dir": str(out_dir.resolve()), "num_steps": steps, "activities": ["CPU", "GPU"]}).raise_for_status()
    row = run()
    requests.post(url + "/stop_profile", timeout=600)  # an error only says it stopped already
    server_ttft = metric_sum(url, TTFT_SUM) - server_ttft
    row["http_ttft_s"] = row["ttft_sum_s"] * in_flight - server_ttft
    new = [f for f in trace_files(out_dir) if f not in before]
    if new:
        row["profile"] = {**summarise(load(new[0])), "trace": str(new[0])}
    return row


def server_configs(schemes: list[Scheme], wanted: list[str], no_adapter_run: bool,
                   host_tiers: list[str]) -> list[tuple[Scheme, bool, list[tuple[str, bool]]]]:
    """(scheme, host tier on, [(run label, with adapters)]) for every server to start."""
    out = []
    for host in host_tiers:
        suffix = HOST_SUFFIX if host == "on" else ""
        for scheme in schemes:
            runs = [(str(scheme) + suffix, True)] if str(scheme) in wanted else []
            if no_adapter_run and (scheme.keys_by_adapter or scheme.one_lr_cache):
                # Same server, cache flushed in between: stock kernels, and ours.
                no_adapters = "no-adapters" if scheme.keys_by_adapter else "no-adapters lragent"
                runs.append((no_adapters + suffix, False))
            out.append((scheme, host == "on", runs))
    return out


def save(out: Path, tables: dict[tuple[int, int], dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    cells = [{"context": c, "in_flight": f, "runs": runs} for (c, f), runs in tables.items()]
    out.write_text(json.dumps({"cells": cells}, indent=2))


def plot(out: Path, tables: dict[tuple[int, int], dict]) -> None:
    """Throughput and cached fraction against trajectories in flight, per context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({c for c, _ in tables})
    fig, axes = plt.subplots(2, len(contexts), figsize=(5 * len(contexts), 7), squeeze=False)
    for col, context in enumerate(contexts):
        cells = sorted((f, runs) for (c, f), runs in tables.items() if c == context)
        labels = dict.fromkeys(label for _, runs in cells for label in runs)
        for label in labels:
            points = [(f, runs[label]) for f, runs in cells if label in runs]
            xs = [f for f, _ in points]
            axes[0][col].plot(xs, [r["throughput_tok_s"] for _, r in points], marker="o", label=label)
            axes[1][col].plot(xs, [r["cached_fraction"] for _, r in points], marker="o", label=label)
        axes[0][col].set_title(f"L = {context} ({912 + 4 * context} tokens per trajectory)")
        axes[0][col].set_ylabel("tokens / s")
        axes[1][col].set_ylabel("cached fraction of prompt tokens")
        axes[1][col].set_ylim(0, 1)
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("trajectories in flight")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def print_table(context: int, in_flight: int, table: dict) -> None:
    ref = table.get(Scheme.NON_SHARED)
    print(f"\ntrace L={context} ({912 + 4 * context} tokens), {in_flight} in flight")
    print(f"{'run':26s} {'tok/s':>9s} {'x non-sh':>8s} {'TTFT sum s':>10s} {'cached':>7s} "
          f"{'KV MiB held/traj':>16s} {'KV MiB written/traj':>19s} {'loaded back':>11s}")
    for label, r in table.items():
        ratio = r["throughput_tok_s"] / ref["throughput_tok_s"] if ref else float("nan")
        print(f"{label:26s} {r['throughput_tok_s']:9.0f} {ratio:8.2f} {r['ttft_sum_s']:10.2f} "
              f"{r['cached_fraction']:7.2f} {r['kv_bytes_per_trajectory'] / 2**20:16.1f} "
              f"{r['kv_bytes_written_per_trajectory'] / 2**20:19.1f} {r.get('host_loaded_back_tokens', 0):11d}")
        if "profile" in r:
            print(format_summary(label, r["profile"]))
            print(f"  HTTP share of the TTFT sum: {r['http_ttft_s']:.2f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--lora-paths", nargs="+", required=True, help="plan=DIR action=DIR reflect=DIR")
    parser.add_argument("--context", type=int, nargs="+", default=[2048], help="L, the tool-output length")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1])
    parser.add_argument("--schemes", nargs="+", default=list(Scheme.choices()), choices=Scheme.choices())
    parser.add_argument("--no-adapter-run", action="store_true", help="also run the trace without adapters")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--host-tier", nargs="+", default=["off"], choices=["off", "on"],
                        help="start every server without and/or with SGLang's hierarchical cache")
    parser.add_argument("--hicache-ratio", type=float, default=2.0, help="host pool / device pool, host tier on")
    parser.add_argument("--profile-dir", type=Path, help="profile the first cell of the --profile-label runs")
    parser.add_argument("--profile-label", default="base-lr-shared", help="the run label to profile")
    parser.add_argument("--profile-steps", type=int, default=300, help="forward steps the profiler records")
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench_trace.json"))
    parser.add_argument("server_flags", nargs=argparse.REMAINDER, help="after --: extra SGLang flags")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    extra = [f for f in args.server_flags if f != "--"]
    base = ["--model-path", args.model_path, "--skip-tokenizer-init", "--enable-lora",
            "--lora-paths", *args.lora_paths, *extra]
    schemes = [Scheme(s) for s in args.schemes]
    if args.no_adapter_run and Scheme.NON_SHARED not in schemes:
        schemes.append(Scheme.NON_SHARED)
    cells = [(c, f) for c in args.context for f in args.in_flight]
    tables: dict[tuple[int, int], dict] = {cell: {} for cell in cells}
    for scheme, host, runs in server_configs(schemes, args.schemes, args.no_adapter_run, args.host_tier):
        flags = ["--lragent-scheme", str(scheme)]
        if host:
            flags += ["--enable-hierarchical-cache", "--hicache-ratio", str(args.hicache_ratio)]
        if args.profile_dir:
            flags.append("--enable-metrics")
        log = args.out.with_suffix(f".{scheme}{'-host' if host else ''}.log")
        with ServerProcess([*base, *flags], log_path=log) as srv:
            for i, (context, in_flight) in enumerate(cells):
                for label, roles in runs:
                    requests.post(srv.url + "/flush_cache", timeout=60).raise_for_status()
                    stream_generate(srv.url, [100, 101, 102], None, 2)  # warm the kernels

                    def run(label: str = label, roles: bool = roles) -> dict:
                        return run_scheme(srv.url, paper_trace(context), in_flight, roles, args.vocab,
                                          f"{label} L={context} x{in_flight}")

                    if args.profile_dir and i == 0 and label == args.profile_label:
                        out_dir = args.profile_dir / label.replace(" ", "_")
                        row = profiled(srv.url, out_dir, args.profile_steps, in_flight, run)
                    else:
                        row = run()
                    tables[(context, in_flight)][label] = row
                    logger.info("%s L=%d x%d: %s", label, context, in_flight, row)
                    save(args.out, tables)  # a cut-off run keeps its rows
    plot(args.out.with_suffix(".png"), tables)
    for (context, in_flight), table in tables.items():
        print_table(context, in_flight, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
