"""Start the real SGLang server with the LRAgent backends selected.

    python -m lragent_sglang.launch_server --model-path M --lora-paths plan=P ... \
        [--lragent-scheme base-lr-shared] [any other SGLang server flag]

Our flags become environment variables (see `config`) that SGLang's scheduler processes
inherit; everything else goes to SGLang's own parser. On a machine without an
accelerator, CPU defaults are added (see `cpu_compat`), each only where the user gave
no value of their own.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lragent_sglang import cpu_compat
from lragent_sglang.adapter_check import AdapterError, check_for_scheme, lora_pairs, read_adapter
from lragent_sglang.backends import BACKEND_NAME
from lragent_sglang.config import DEFAULT_SCHEME, SCHEME_ENV, SCHEMES

logger = logging.getLogger(__name__)

# (flag, value or None for a switch) added on CPU unless the flag is already present.
CPU_DEFAULTS: tuple[tuple[str, str | None], ...] = (
    ("--device", "cpu"),
    ("--lora-backend", "torch_native"),
    ("--max-total-tokens", "16384"),
    ("--sleep-on-idle", None),
)


def _has_flag(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def with_defaults(argv: list[str], cpu: bool) -> list[str]:
    """SGLang argv with our backends selected and, on CPU, the CPU defaults added."""
    out = list(argv)
    defaults: list[tuple[str, str | None]] = [
        ("--attention-backend", BACKEND_NAME),
        ("--radix-cache-backend", BACKEND_NAME),
    ]
    if cpu:
        defaults.extend(CPU_DEFAULTS)
    for flag, value in defaults:
        if not _has_flag(out, flag):
            out.extend([flag] if value is None else [flag, value])
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lragent-serve",
        description="SGLang server with LRAgent KV-cache sharing. "
        "Every SGLang server flag is accepted as well (see `sglang serve --help`).",
    )
    parser.add_argument(
        "--lragent-scheme",
        choices=SCHEMES,
        default=os.environ.get(SCHEME_ENV, DEFAULT_SCHEME),
        help="what the adapters share (default: %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    ours, rest = parser.parse_known_args(argv)
    if ours.lragent_scheme not in SCHEMES:
        parser.error(f"unknown {SCHEME_ENV}={ours.lragent_scheme!r}: choose one of {', '.join(SCHEMES)}")
    os.environ[SCHEME_ENV] = ours.lragent_scheme
    cpu = cpu_compat.wanted()
    if cpu:
        cpu_compat.apply_early()
        os.environ.setdefault("SGLANG_CPU_OMP_THREADS_BIND", "0")

    from sglang.srt.plugins import load_plugins

    load_plugins()
    from sglang.srt.server_args import prepare_server_args

    argv = with_defaults(rest, cpu)
    if not cpu and ours.lragent_scheme in ("base-shared", "base-lr-shared") and not _has_flag(argv, "--disable-cuda-graph"):
        argv.append("--disable-cuda-graph")  # the Flash-LoRA backend has no CUDA-graph path yet
    server_args = prepare_server_args(argv)
    try:
        infos = [read_adapter(name, path, server_args.model_path) for name, path in lora_pairs(server_args.lora_paths)]
        check_for_scheme(infos, ours.lragent_scheme, server_args.max_lora_rank)
        if infos and server_args.max_lora_rank is None:
            server_args.max_lora_rank = max(info.rank for info in infos)
    except AdapterError as exc:
        parser.exit(2, f"lragent-serve: error: {exc}\n")
    logger.info("lragent scheme %s, cpu=%s", ours.lragent_scheme, cpu)

    from sglang.launch_server import run_server
    from sglang.srt.utils import kill_process_tree

    from lragent_sglang.dashboard import add_dashboard_route
    from lragent_sglang.stats import add_stats_route

    add_stats_route()
    add_dashboard_route()

    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
