"""Benchmark the LRAgent prefix tree (radix/) against SGLang's own RadixCache.

Workload: the LRAgent paper's emulated agent trace (see bench_trace.py): per trajectory a shared system
prompt plus a question, then 17 plan / action / reflect steps whose prompt is the whole
trajectory so far, with tool outputs of ``--tool-len`` tokens; a few trajectories are in
flight at once, and at the end every adapter forks a private branch off the trajectory.
Each request does what the serving path does: match its prompt, then insert prompt +
generated tokens (base, then its own LR).

Part 1 replays the single-adapter workload on SGLang's ``RadixCache`` (``--page-size``,
no pools, a no-op allocator free) and on ``LRRadixTree`` in the same run, op by op, and compares time per op.
Part 2 replays the workload with 1, 2, 4 and 8 adapters on ``LRRadixTree`` (more adapters
means more LR re-prefill to insert and more LR arrays to evict). Part 3 isolates the
per-adapter overhead: one base tree with every adapter's LR on every node, where only the
size of the LR mapping changes. Every part ends by evicting its tree in chunks.

    python scripts/bench_radix.py --out artifacts/bench_radix.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import platform
import random
import statistics
import subprocess
import time
from array import array
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lragent_sglang.radix import LRRadixTree

logger = logging.getLogger("bench_radix")

VOCAB = 32000
SYSTEM_PROMPT = 448
QUESTION = 64
PRIVATE_PROMPT = 32
PRIVATE_GEN = 32
EVICT_CHUNK = 1024
# (role, new prompt tokens, generated tokens); "L" is the tool-output length.
TRACE_STEPS: list[tuple[int, int | str, int]] = (
    [(0, QUESTION, 32), (0, 8, 8), (1, 8, 8)]
    + [(0, "L", 32), (0, 8, 8), (1, 8, 8)] * 4
    + [(2, 32, 32), (2, 8, 8)]
)


@dataclasses.dataclass(slots=True)
class Request:
    prompt: array
    full: array
    lr_key: int


def agent_trace(num_adapters: int, target_tokens: int, tool_len: int, concurrency: int, seed: int) -> list[Request]:
    """Requests of interleaved trajectories whose distinct tokens add up to ``target_tokens``.

    Roles plan / action / reflect of trajectory ``t`` map to adapters ``(3t + role) % N``
    so every adapter meets contexts written by the others.
    """
    rng = random.Random(seed)

    def tokens(n: int) -> array:
        return array("q", rng.choices(range(VOCAB), k=n))

    per_traj = sum(tool_len if p == "L" else p for _, p, _ in TRACE_STEPS) + sum(g for _, _, g in TRACE_STEPS)
    per_traj += num_adapters * (PRIVATE_PROMPT + PRIVATE_GEN)
    num_traj = max(1, math.ceil((target_tokens - SYSTEM_PROMPT) / per_traj))
    system = tokens(SYSTEM_PROMPT)
    requests: list[Request] = []
    for group in range(0, num_traj, concurrency):
        trajs = list(range(group, min(group + concurrency, num_traj)))
        contexts = {t: array("q", system) for t in trajs}
        for role, new, gen in TRACE_STEPS:
            for t in trajs:
                prompt = contexts[t] + tokens(tool_len if new == "L" else new)
                full = prompt + tokens(gen)
                requests.append(Request(prompt, full, (3 * t + role) % num_adapters))
                contexts[t] = full
        for t in trajs:
            for adapter in range(num_adapters):
                prompt = contexts[t] + tokens(PRIVATE_PROMPT)
                requests.append(Request(prompt, prompt + tokens(PRIVATE_GEN), adapter))
    return requests


class SlotCounter:
    """Hands out fresh slot indices (an allocator that never runs out)."""

    def __init__(self) -> None:
        self.next = 1

    def take(self, prefix: torch.Tensor, total: int) -> torch.Tensor:
        n = total - len(prefix)
        fresh = torch.arange(self.next, self.next + n, dtype=torch.int64)
        self.next += n
        return torch.cat([prefix, fresh])


class Timer:
    """Nanosecond timings per op name."""

    def __init__(self) -> None:
        self.ns: dict[str, list[int]] = defaultdict(list)

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter_ns()
        out = fn()
        self.ns[name].append(time.perf_counter_ns() - start)
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            name: {"ops": len(v), "mean_us": statistics.fmean(v) / 1e3, "median_us": statistics.median(v) / 1e3}
            for name, v in self.ns.items()
        }


class NoopAllocator:
    """What SGLang's simulated RadixCache needs to evict: a free that does nothing."""

    device = "cpu"

    def free_segment(self, indices: torch.Tensor, start_pos: int = 0) -> None:
        return None


def run_side_by_side(requests: list[Request], page_size: int) -> dict[str, dict[str, float]]:
    """Replay one-adapter requests on SGLang's RadixCache and LRRadixTree, op by op."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

    sgl = RadixCache.create_simulated(mock_allocator=NoopAllocator(), page_size=page_size)
    ours = LRRadixTree(page_size=page_size)
    timer = Timer()
    sgl_slots, our_slots, our_lr_slots = SlotCounter(), SlotCounter(), SlotCounter()
    for i, req in enumerate(requests):
        match_params = MatchPrefixParams(key=RadixKey(req.prompt))
        # Alternate who goes first so neither tree always runs with a warm cache.
        for side in (("sgl", "ours") if i % 2 == 0 else ("ours", "sgl")):
            if side == "sgl":
                m = timer("sglang.match", lambda: sgl.match_prefix(match_params))
                params = InsertParams(key=RadixKey(req.full), value=sgl_slots.take(m.device_indices, len(req.full)))
                timer("sglang.insert", lambda: sgl.insert(params))
            else:
                r = timer("ours.match", lambda: ours.match(req.prompt, req.lr_key))
                base = our_slots.take(r.base_indices, len(req.full))
                lr = our_lr_slots.take(r.lr_indices, len(req.full))
                timer("ours.insert_base", lambda: ours.insert_base(req.full, base))
                timer("ours.insert_lr", lambda: ours.insert_lr(req.full, req.lr_key, lr))
    if sgl.total_size() != ours.total_size():
        raise RuntimeError(f"trees differ: sglang {sgl.total_size()} vs ours {ours.total_size()} tokens")
    tokens = ours.total_size()
    for req in requests[:: max(1, len(requests) // 200)]:
        m = timer("sglang.match_lock", lambda: sgl.match_prefix(MatchPrefixParams(key=RadixKey(req.prompt))))
        timer("sglang.inc_lock_ref", lambda: sgl.inc_lock_ref(m.last_device_node))
        timer("sglang.dec_lock_ref", lambda: sgl.dec_lock_ref(m.last_device_node))
        r = ours.match(req.prompt, req.lr_key, record_stats=False)
        timer("ours.inc_lock_ref", lambda: ours.inc_lock_ref(r.last_base_node, req.lr_key))
        timer("ours.dec_lock_ref", lambda: ours.dec_lock_ref(r.last_base_node, req.lr_key))
    while sgl.evictable_size() > 0 or ours.evictable_size() > 0:
        timer("sglang.evict", lambda: sgl.evict(EvictParams(num_tokens=EVICT_CHUNK)))
        timer("ours.evict_base", lambda: ours.evict_base(EVICT_CHUNK))
    out = timer.summary()
    out["tree_tokens"] = {"base": tokens}
    return out


def run_adapters(requests: list[Request], page_size: int) -> dict[str, Any]:
    """Replay multi-adapter requests on LRRadixTree; evict LR, then base, in chunks."""
    tree = LRRadixTree(page_size=page_size, base_bytes_per_token=2 * 8 * 128 * 2 * 32, lr_bytes_per_token=8 * 2 * 32)
    timer = Timer()
    base_slots, lr_slots = SlotCounter(), SlotCounter()
    for req in requests:
        r = timer("match", lambda: tree.match(req.prompt, req.lr_key))
        base = base_slots.take(r.base_indices, len(req.full))
        lr = lr_slots.take(r.lr_indices, len(req.full))
        timer("insert_base", lambda: tree.insert_base(req.full, base))
        timer("insert_lr", lambda: tree.insert_lr(req.full, req.lr_key, lr))
    stats = tree.stats()
    while tree.lr_evictable_size() > 0:
        timer("evict_lr", lambda: tree.evict_lr(EVICT_CHUNK))
    while tree.evictable_size() > 0:
        timer("evict_base", lambda: tree.evict_base(EVICT_CHUNK))
    out: dict[str, Any] = timer.summary()
    per_key = stats["per_lr_key"].values()
    requested = sum(s["requested_tokens"] for s in per_key)
    out["tree"] = {
        "requests": len(requests),
        "base_tokens": stats["base"]["tokens"],
        "lr_tokens": stats["lr"]["tokens"],
        "base_bytes": stats["base"]["bytes"],
        "lr_bytes": stats["lr"]["bytes"],
        "base_hit_rate": sum(s["base_hit_tokens"] for s in per_key) / requested,
        "lr_hit_rate": sum(s["lr_hit_tokens"] for s in per_key) / requested,
        "lr_gap_tokens": sum(s["lr_gap_tokens"] for s in per_key),
    }
    return out


def run_fixed_tree(requests: list[Request], num_adapters: int, page_size: int) -> dict[str, Any]:
    """One base tree with every adapter's LR on every node: the pure per-adapter overhead.

    Matches hit the same base and LR lengths whatever the number of adapters (nodes are
    split beforehand), and insert_lr finds everything cached (a walk), so only the size
    of each node's LR mapping changes.
    """
    tree = LRRadixTree(page_size=page_size)
    base_slots, lr_slots = SlotCounter(), SlotCounter()
    empty = torch.empty(0, dtype=torch.int64)
    for req in requests:
        r = tree.match(req.prompt, None, record_stats=False)
        tree.insert_base(req.full, base_slots.take(r.base_indices, len(req.full)))
    for adapter in range(num_adapters):
        for req in requests:
            r = tree.match(req.full, adapter, record_stats=False)
            tree.insert_lr(req.full, adapter, lr_slots.take(r.lr_indices, len(req.full)))
    for req in requests:  # split at every prompt end now, so the timed matches only look up
        tree.match(req.prompt, None, record_stats=False)
    # Two passes, the first untimed: a bigger tree is colder in the CPU caches after the
    # build, which is not what this part measures.
    for timer in (Timer(), Timer()):
        for i, req in enumerate(requests):
            adapter = i % num_adapters
            r = timer("match", lambda: tree.match(req.prompt, adapter))
            lr = torch.cat([r.lr_indices, empty.new_zeros(len(req.full) - r.lr_len)])
            timer("insert_lr", lambda: tree.insert_lr(req.full, adapter, lr))
            timer("inc_lock_ref", lambda: tree.inc_lock_ref(r.last_base_node, adapter))
            timer("dec_lock_ref", lambda: tree.dec_lock_ref(r.last_base_node, adapter))
    while tree.lr_evictable_size() > 0:
        timer("evict_lr", lambda: tree.evict_lr(EVICT_CHUNK))
    return timer.summary()


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per op, the run with the lowest mean (the least disturbed by other load)."""
    out = dict(runs[0])
    for name, value in runs[0].items():
        if isinstance(value, dict) and "mean_us" in value:
            out[name] = min((r[name] for r in runs), key=lambda v: v["mean_us"])
    return out


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "radix"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run with the cyclic GC off (it would fire at random points in either tree)."""
    gc.collect()
    gc.disable()
    try:
        return fn()
    finally:
        gc.enable()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=120_000, help="distinct tokens per tree")
    parser.add_argument("--tool-len", type=int, default=1024, help="tool-output length L of the trace")
    parser.add_argument("--concurrency", type=int, default=4, help="trajectories in flight at once")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is kept")
    parser.add_argument("--page-size", type=int, default=1, help="page size of every tree, SGLang's included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench_radix.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    # Warm both trees' code paths (lazy imports, torch dispatch) outside the measurements.
    run_side_by_side(agent_trace(1, 5_000, args.tool_len, args.concurrency, args.seed + 1), args.page_size)
    single = agent_trace(1, args.tokens, args.tool_len, args.concurrency, args.seed)
    side = best_of([timed(lambda: run_side_by_side(single, args.page_size)) for _ in range(args.repeat)])
    scaling = {}
    for n in args.adapters:
        reqs = agent_trace(n, args.tokens, args.tool_len, args.concurrency, args.seed)
        scaling[n] = best_of([timed(lambda: run_adapters(reqs, args.page_size)) for _ in range(args.repeat)])
    fixed = {n: best_of([timed(lambda: run_fixed_tree(single, n, args.page_size)) for _ in range(args.repeat)]) for n in args.adapters}

    rows = [
        ("match", "sglang.match", "ours.match"),
        ("insert (base)", "sglang.insert", "ours.insert_base"),
        ("insert_lr (no SGLang analogue)", None, "ours.insert_lr"),
        ("inc_lock_ref", "sglang.inc_lock_ref", "ours.inc_lock_ref"),
        ("dec_lock_ref", "sglang.dec_lock_ref", "ours.dec_lock_ref"),
        (f"evict {EVICT_CHUNK} tokens", "sglang.evict", "ours.evict_base"),
    ]
    print(f"\nOne adapter, {len(single)} requests, {side['tree_tokens']['base']} tokens in each tree, page size {args.page_size} "
          f"(best of {args.repeat} runs, mean per op)")
    print(f"| op | SGLang RadixCache (us) | LRRadixTree (us) | ratio |")
    print("|---|---|---|---|")
    comparison = []
    for label, sgl_name, our_name in rows:
        ours_us = side[our_name]["mean_us"]
        sgl_us = side[sgl_name]["mean_us"] if sgl_name else None
        ratio = ours_us / sgl_us if sgl_us else None
        comparison.append({"op": label, "sglang_us": sgl_us, "ours_us": ours_us, "ratio": ratio, "ops": side[our_name]["ops"]})
        print(f"| {label} | {'-' if sgl_us is None else f'{sgl_us:.2f}'} | {ours_us:.2f} | "
              f"{'-' if ratio is None else f'{ratio:.2f}x'} |")

    ops = ["match", "insert_base", "insert_lr", "evict_lr", "evict_base"]
    print(f"\nLRRadixTree against the number of adapters (mean us per op, best of {args.repeat})")
    print("| adapters | requests | base tokens | LR tokens | base hit | LR hit | " + " | ".join(ops) + " |")
    print("|---" * (6 + len(ops)) + "|")
    for n, res in scaling.items():
        t = res["tree"]
        cells = [f"{res[op]['mean_us']:.2f}" for op in ops]
        print(f"| {n} | {t['requests']} | {t['base_tokens']} | {t['lr_tokens']} | {t['base_hit_rate']:.1%} | "
              f"{t['lr_hit_rate']:.1%} | " + " | ".join(cells) + " |")

    fixed_ops = ["match", "insert_lr", "inc_lock_ref", "dec_lock_ref", "evict_lr"]
    print(f"\nOne {side['tree_tokens']['base']}-token base tree, every adapter's LR on every node "
          f"(mean us per op, best of {args.repeat})")
    print("| adapters | " + " | ".join(fixed_ops) + " |")
    print("|---" * (1 + len(fixed_ops)) + "|")
    for n, res in fixed.items():
        print(f"| {n} | " + " | ".join(f"{res[op]['mean_us']:.2f}" for op in fixed_ops) + " |")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "commit": git_commit(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "single_adapter": {"requests": len(single), "tree_tokens": side["tree_tokens"]["base"], "ops": side,
                           "comparison": comparison},
        "adapters": {str(n): res for n, res in scaling.items()},
        "fixed_tree": {str(n): res for n, res in fixed.items()},
    }, indent=2))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
