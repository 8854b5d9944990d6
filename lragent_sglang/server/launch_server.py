"""Start the real SGLang server with the LRAgent backends selected.

    python -m lragent_sglang.server.launch_server --model-path M --lora-paths plan=P ... \
        [--lragent-scheme base-lr-shared] [--lragent-lr-basis shared-a|joint] \
        [--lragent-max-body-mb 8] [--lragent-cascade off|auto|on] [--lragent-cascade-min-shared 256] \
        [any other SGLang server flag]

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

from lragent_sglang.adapters.check import check_server_adapters
from lragent_sglang.adapters.io import AdapterError
from lragent_sglang.scheme import DEFAULT_LR_BASIS, DEFAULT_SCHEME, ConfigError, LRBasis, Scheme
from lragent_sglang.server import cpu_compat
from lragent_sglang.server.config import (
    BACKEND_NAME,
    CASCADE_ENV,
    CASCADE_MIN_SHARED_ENV,
    CASCADE_MODES,
    DEFAULT_CASCADE,
    DEFAULT_CASCADE_MIN_SHARED,
    DEFAULT_MAX_BODY_MB,
    LR_BASIS_ENV,
    MAX_BODY_ENV,
    SCHEME_ENV,
    LRAgentConfig,
    parse_cascade,
    parse_cascade_min_shared,
    parse_max_body_mb,
)
from lragent_sglang.server.hicache_check import check_hicache
from lragent_sglang.server.model_check import ModelError, check_model_config, read_config

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


#: SGLang's scheduling policy for our tree (BENCHMARKS.md, issue 16): past the pool's capacity,
#: fcfs admits trajectories whose prefixes were just evicted, each such prefill evicts the
#: next waiting trajectory's prefix, and the cached fraction collapses; lpm admits the
#: requests whose prefixes are still cached first and re-matches the waiting ones every pass.
SHARED_BASE_SCHEDULE_POLICY = "lpm"


def scheme_defaults(argv: list[str], scheme: Scheme, cpu: bool) -> list[str]:
    """The base-sharing schemes' defaults, each only where the user gave no value:
    decode-only CUDA graphs on GPU (Flash-LoRA has no prefill graphs) and the lpm policy."""
    out = list(argv)
    if not scheme.shares_base:
        return out
    if not cpu and not _has_flag(out, "--disable-prefill-cuda-graph"):
        out.append("--disable-prefill-cuda-graph")
    if not _has_flag(out, "--schedule-policy"):
        out.extend(["--schedule-policy", SHARED_BASE_SCHEDULE_POLICY])
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lragent-serve",
        description="SGLang server with LRAgent KV-cache sharing. "
        "Every SGLang server flag is accepted as well (see `sglang serve --help`).",
    )
    parser.add_argument(
        "--lragent-scheme",
        choices=Scheme.choices(),
        default=os.environ.get(SCHEME_ENV, DEFAULT_SCHEME),
        help="what the adapters share (default: %(default)s)",
    )
    parser.add_argument(
        "--lragent-lr-basis",
        choices=LRBasis.choices(),
        default=os.environ.get(LR_BASIS_ENV, DEFAULT_LR_BASIS),
        help="base-lr-shared only: the one LR cache is computed with the adapters' common "
        "v_proj A (shared-a), or with the joint orthonormal basis of all --lora-paths "
        "adapters' v_proj A, exact for any adapters (joint) (default: %(default)s)",
    )
    parser.add_argument(
        "--lragent-max-body-mb",
        default=os.environ.get(MAX_BODY_ENV, str(DEFAULT_MAX_BODY_MB)),
        help="HTTP request bodies above this many MiB are refused with 413 before SGLang "
        "parses and tokenises them (default: %(default)s)",
    )
    parser.add_argument(
        "--lragent-cascade",
        choices=CASCADE_MODES,
        default=os.environ.get(CASCADE_ENV, DEFAULT_CASCADE),
        help="base-sharing schemes: decoding requests that share a prefix of at least "
        "--lragent-cascade-min-shared tokens (role forks over one trajectory) read it once per "
        "step (cascade decode). auto: where at least two requests of a decode batch are that "
        "long; on: every decode batch of two or more requests (default: %(default)s)",
    )
    parser.add_argument(
        "--lragent-cascade-min-shared",
        default=os.environ.get(CASCADE_MIN_SHARED_ENV, str(DEFAULT_CASCADE_MIN_SHARED)),
        help="the fewest tokens a group of decoding requests must share for the cascade "
        "(default: %(default)s)",
    )
    return parser


def lragent_config(parser: argparse.ArgumentParser, ours: argparse.Namespace) -> LRAgentConfig:
    """Check our flags together (an environment default may be any string) and hand them to
    SGLang's processes as variables."""
    try:
        config = LRAgentConfig(Scheme.parse(ours.lragent_scheme), LRBasis.parse(ours.lragent_lr_basis),
                               parse_max_body_mb(ours.lragent_max_body_mb), parse_cascade(ours.lragent_cascade),
                               parse_cascade_min_shared(ours.lragent_cascade_min_shared))
    except ConfigError as exc:
        parser.error(str(exc))
    os.environ.update(config.to_env())
    return config


def check_model(parser: argparse.ArgumentParser, config: LRAgentConfig, server_args: object, cpu: bool) -> None:
    """Refuse a model the server cannot serve exactly before SGLang loads it (one line)."""
    cfg = read_config(server_args.model_path)
    if cfg is None:
        return
    try:
        check_model_config(cfg, config.scheme, server_args.context_length, gpu=not cpu)
    except ModelError as exc:
        parser.exit(2, f"lragent-serve: error: {exc}\n")


def check_data_parallel(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """`--dp-size N` gives each rank its own tree and LR pool (served exactly); DP attention
    splits attention and MLP ranks in ways our backends have never run, so it is refused
    (from the flags: SGLang's own argument checks assert on some of its combinations)."""
    if _has_flag(argv, "--enable-dp-attention"):
        parser.exit(2, "lragent-serve: error: --enable-dp-attention is not supported with the lragent "
                       "backends; use --dp-size N without it (one tree and LR pool per rank)\n")


def check_adapters(parser: argparse.ArgumentParser, config: LRAgentConfig, server_args: object) -> None:
    """Refuse adapters the server cannot serve before SGLang loads them (one-line error),
    and default `--max-lora-rank` to the adapters' largest rank."""
    try:
        infos = check_server_adapters(server_args.lora_paths, server_args.model_path, config.scheme,
                                      server_args.max_lora_rank, config.lr_basis)
    except AdapterError as exc:
        parser.exit(2, f"lragent-serve: error: {exc}\n")
    if config.lr_basis is not DEFAULT_LR_BASIS and not infos:
        parser.error(f"--lragent-lr-basis {config.lr_basis} needs the adapters at start-up (--lora-paths)")
    if infos and server_args.max_lora_rank is None:
        server_args.override("lragent-serve", max_lora_rank=max(info.rank for info in infos))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    ours, rest = parser.parse_known_args(argv)
    config = lragent_config(parser, ours)
    cpu = cpu_compat.wanted()
    if cpu:
        cpu_compat.apply_early()
        os.environ.setdefault("SGLANG_CPU_OMP_THREADS_BIND", "0")

    from sglang.srt.plugins import load_plugins

    load_plugins()
    from sglang.srt.server_args import prepare_server_args

    argv = with_defaults(rest, cpu)
    argv = scheme_defaults(argv, config.scheme, cpu)
    check_data_parallel(parser, argv)
    server_args = prepare_server_args(argv)
    check_model(parser, config, server_args, cpu)
    try:
        check_hicache(config.scheme, server_args, cpu)
    except ConfigError as exc:
        parser.exit(2, f"lragent-serve: error: {exc}\n")
    check_adapters(parser, config, server_args)
    logger.info("lragent scheme %s, lr basis %s, cpu=%s", config.scheme, config.lr_basis, cpu)

    from sglang.launch_server import run_server
    from sglang.srt.utils import kill_process_tree

    from lragent_sglang.server.dashboard import add_dashboard_route
    from lragent_sglang.server.stats import add_stats_route

    add_stats_route()
    add_dashboard_route()

    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
elif __name__ == "__mp_main__" and cpu_compat.wanted():
    # A child spawned by SGLang imports this module first and then unpickles its start
    # function; the data-parallel controller's is SGLang's own, whose imports need the
    # CPU stand-ins already (scheduler and detokenizer starts are swapped for ours).
    cpu_compat.apply_early()
