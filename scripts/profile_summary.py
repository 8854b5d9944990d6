"""Where the time of a trace run goes, from SGLang's profiler output (`/start_profile`
writes a torch.profiler chrome trace per TP rank: `*.trace.json.gz`).

GPU busy fraction: the union of kernel and copy intervals over the profiled window.
Kernel time per class (by kernel name: GEMMs, attention, LoRA, sampling, copies, other;
the heaviest kernels of each class are listed so a misplaced name shows), and the
scheduler's CPU: the union of the CPU op / Python intervals of its busiest thread, and
how much of the window the GPU waited while that thread ran (host-bound time). HTTP time
is not in the scheduler's trace; `bench_trace` measures it from the client side.

    python scripts/profile_summary.py DIR_OR_TRACE [--top 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

# (class, name pattern), first match wins: LoRA before GEMM (LoRA kernels are GEMMs too),
# attention before GEMM (FlashInfer / FA names carry "gemm"-like parts).
CLASSES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("lora", re.compile(r"lora|sgmv|sgemm", re.I)),
    ("attention", re.compile(r"attn|attention|flash|fmha|_fwd_kernel|decode_split|decode_combine|"
                             r"extend_kernel|cascade|batch_prefill|batch_decode|merge_state", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|matmul|_mm_|splitk", re.I)),
    ("sampling", re.compile(r"sampl|softmax|argmax|topk|top_k|top_p|multinomial|logit", re.I)),
)
GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
CPU_CATS = {"cpu_op", "python_function", "user_annotation"}


def load(path: Path) -> dict[str, Any]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def classify(name: str, cat: str) -> str:
    if cat != "kernel":
        return "copies"
    for label, pattern in CLASSES:
        if pattern.search(name):
            return label
    return "other"


def summarise(trace: dict[str, Any], top: int = 3) -> dict[str, Any]:
    """Seconds and fractions of one profiled window (see module docstring)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    if not events:
        raise ValueError("no complete events in the trace")
    t0 = min(e["ts"] for e in events)
    t1 = max(e["ts"] + e["dur"] for e in events)
    wall = (t1 - t0) / 1e6
    gpu = [e for e in events if e.get("cat") in GPU_CATS]
    gpu_iv = [(e["ts"], e["ts"] + e["dur"]) for e in gpu]
    per_class: dict[str, float] = defaultdict(float)
    names: dict[str, Counter[str]] = defaultdict(Counter)
    for e in gpu:
        label = classify(e.get("name", ""), e["cat"])
        per_class[label] += e["dur"] / 1e6
        names[label][e.get("name", "")] += e["dur"] / 1e6
    kernel_s = sum(per_class.values())
    cpu = [e for e in events if e.get("cat") in CPU_CATS]
    threads = Counter((e.get("pid"), e.get("tid")) for e in cpu)
    main = threads.most_common(1)[0][0] if threads else None
    cpu_iv = [(e["ts"], e["ts"] + e["dur"]) for e in cpu if (e.get("pid"), e.get("tid")) == main]
    cpu_s = union_length(cpu_iv) / 1e6
    gpu_s = union_length(gpu_iv) / 1e6
    both_s = (union_length(cpu_iv) + union_length(gpu_iv) - union_length(cpu_iv + gpu_iv)) / 1e6
    return {
        "window_s": wall,
        "gpu_busy_s": gpu_s,
        "gpu_busy_fraction": gpu_s / wall if wall else 0.0,
        "kernel_s": {k: per_class[k] for k in sorted(per_class, key=per_class.get, reverse=True)},
        "kernel_fraction": {k: v / kernel_s for k, v in per_class.items()} if kernel_s else {},
        "top_kernels": {k: [n for n, _ in c.most_common(top)] for k, c in names.items()},
        "scheduler_cpu_s": cpu_s,
        "scheduler_cpu_while_gpu_idle_s": cpu_s - both_s,
    }


def trace_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.trace.json*")) if path.is_dir() else [path]


def format_summary(name: str, s: dict[str, Any]) -> str:
    lines = [f"{name}: window {s['window_s']:.2f} s, GPU busy {s['gpu_busy_fraction']:.1%} "
             f"({s['gpu_busy_s']:.2f} s); scheduler CPU {s['scheduler_cpu_s']:.2f} s, "
             f"{s['scheduler_cpu_while_gpu_idle_s']:.2f} s of it with the GPU idle"]
    for label, sec in s["kernel_s"].items():
        lines.append(f"  {label:10s} {sec:8.3f} s {s['kernel_fraction'][label]:6.1%}  "
                     f"{', '.join(s['top_kernels'][label])[:100]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a trace file or the profile output folder")
    parser.add_argument("--top", type=int, default=3, help="kernels listed per class")
    args = parser.parse_args(argv)
    files = trace_files(args.path)
    if not files:
        parser.error(f"no *.trace.json(.gz) under {args.path}")
    for f in files:
        print(format_summary(f.name, summarise(load(f), args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
