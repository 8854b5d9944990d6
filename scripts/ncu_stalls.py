"""Summarise ncu's source-level warp sampling: where each profiled kernel launch waits.

Input: ``ncu -i REPORT --page source --csv --print-source sass > sass.csv`` (one block per
kernel launch, each starting with a ``"Kernel Name"`` line). For each launch it prints the
stall samples by reason, by SASS opcode, and the hottest instructions, so two builds (LR
off / on) can be compared line by line, as in kernels/NOTES.md item 6:

    python3 scripts/ncu_stalls.py sass.csv --labels "64x8k off,64x8k R8"
"""

from __future__ import annotations

import argparse
import csv
import io
import re
from collections import Counter
from dataclasses import dataclass, field

SAMPLES = "Warp Stall Sampling (All Samples)"


@dataclass
class LaunchStalls:
    """Stall samples of one kernel launch, per reason, per opcode and per SASS line."""

    kernel: str
    samples: int = 0
    by_reason: Counter = field(default_factory=Counter)
    by_opcode: Counter = field(default_factory=Counter)
    lines: list[tuple[int, str]] = field(default_factory=list)

    def hottest(self, n: int) -> list[tuple[int, int, str]]:
        """The n instructions with the most samples: (samples, line index, SASS)."""
        ranked = sorted(((s, i, src) for i, (s, src) in enumerate(self.lines)), reverse=True)
        return ranked[:n]


def opcode(sass: str) -> str:
    """``@!PT LDS RZ, [RZ]`` -> ``LDS``; ``HGMMA.64x32x16.F32.BF16 ...`` -> ``HGMMA``."""
    words = sass.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else "?"


def parse(text: str) -> list[LaunchStalls]:
    """One LaunchStalls per ``"Kernel Name"`` block of an ncu source-page CSV."""
    launches = []
    for block in re.split(r'^(?="Kernel Name")', text, flags=re.M):
        if not block.startswith('"Kernel Name"'):
            continue
        header, body = block.split("\n", 1)
        kernel = next(csv.reader([header]))[1]
        rows = list(csv.DictReader(io.StringIO(body)))
        if not rows or SAMPLES not in rows[0]:
            raise ValueError(f"no '{SAMPLES}' column for kernel {kernel}: "
                             "export with --page source --csv --print-source sass")
        reasons = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k]
        stalls = LaunchStalls(kernel)
        for row in rows:
            n = int(row[SAMPLES] or 0)
            sass = row["Source"].strip()
            stalls.samples += n
            stalls.by_opcode[opcode(sass)] += n
            stalls.lines.append((n, sass))
            for k in reasons:
                stalls.by_reason[k.removeprefix("stall_")] += int(row[k] or 0)
        launches.append(stalls)
    return launches


def report(stalls: LaunchStalls, label: str, top: int) -> str:
    n = max(stalls.samples, 1)
    out = [f"== {label} ({stalls.kernel}): {stalls.samples} samples, {len(stalls.lines)} SASS lines",
           "   reasons: " + ", ".join(f"{k} {v / n:.1%}" for k, v in stalls.by_reason.most_common(8)),
           "   opcodes: " + ", ".join(f"{k} {v / n:.1%}" for k, v in stalls.by_opcode.most_common(8))]
    for s, i, sass in stalls.hottest(top):
        before = stalls.lines[i - 1][1] if i else ""
        out.append(f"   {s / n:6.1%}  line {i:5d}  {sass[:60]:60s}  after: {before[:40]}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    ap.add_argument("--labels", default="", help="comma-separated names for the launches")
    ap.add_argument("--top", type=int, default=6, help="hottest instructions to list")
    args = ap.parse_args(argv)
    with open(args.csv) as f:
        launches = parse(f.read())
    labels = [x for x in args.labels.split(",") if x]
    for i, stalls in enumerate(launches):
        print(report(stalls, labels[i] if i < len(labels) else f"launch {i}", args.top))


if __name__ == "__main__":
    main()
