"""`lragent-adapters`: prepare and vet LoRA adapters for the LRAgent sharing schemes.

Subcommands:
- `make`: write random role adapters (q/v LoRA with non-zero B) for a checkpoint, from its
  config alone; `--shared-a` gives them one v_proj A (base-lr-shared adapters).
- `train`: train role adapters (q_proj + v_proj LoRA) with PEFT on a role JSONL;
  `--shared-a` trains the first role, then shares its frozen v_proj A with the others
  (base-lr-shared adapters).
- `joint-basis`: per layer, the width k of the joint basis of all adapters' v_proj A rows
  (the LR cache width that serves all of them exactly), and with `--max-k` what a narrower
  basis loses.
- `check`: will the server accept these adapters under a scheme? One verdict per adapter,
  exit code 0 when all are OK, 1 otherwise.

Usage errors (missing files, unreadable data) exit with 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from lragent_sglang import data_path
from lragent_sglang.adapters.check import check_config, check_for_scheme, check_weights, read_adapter
from lragent_sglang.adapters.io import (
    DEFAULT_ROLES,
    DEFAULT_TARGETS,
    AdapterError,
    adapter_tensors,
    lora_matrices,
    lora_pairs,
)
from lragent_sglang.adapters.joint_basis import DEFAULT_RTOL, joint_rank, singular_values, truncation
from lragent_sglang.scheme import DEFAULT_LR_BASIS, DEFAULT_SCHEME, LRBasis, Scheme, check_lr_basis

logger = logging.getLogger(__name__)

DEFAULT_DATA = data_path("roles", "train.jsonl")


def _model_path(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    from lragent_sglang.agents.models import smollm2_checkpoint

    return smollm2_checkpoint()


def cmd_make(args: argparse.Namespace) -> int:
    from lragent_sglang.adapters.make import make_role_adapters

    paths = make_role_adapters(
        _model_path(args.model_path), args.out, tuple(args.roles), args.rank, args.alpha,
        tuple(args.target_modules) if args.target_modules else None, args.shared_a, args.b_std, args.seed,
    )
    for role, path in paths.items():
        print(f"{role}={path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from lragent_sglang.adapters.train import TrainConfig, load_examples, train_role_adapters

    cfg = TrainConfig(
        rank=args.rank, alpha=args.alpha, lr=args.lr, steps=args.steps, batch_size=args.batch_size,
        max_len=args.max_len, seed=args.seed, fmt=args.format, dropout=args.dropout,
        weight_decay=args.weight_decay, shared_a=args.shared_a,
    )
    cfg.validate()
    examples = load_examples(args.data)
    reports = train_role_adapters(
        _model_path(args.model_path), examples, args.out, cfg, roles=args.roles, device=args.device,
        dtype=getattr(torch, args.dtype), progress=not args.no_progress, threads=args.threads,
        save_dtype=getattr(torch, args.save_dtype),
    )
    for r in reports:
        frozen = f", frozen {', '.join(r.frozen)}" if r.frozen else ""
        print(f"# {r.role}: {r.examples} examples, loss {r.losses[0]:.3f} -> {r.losses[-1]:.3f}, "
              f"{r.seconds:.1f} s{frozen}")
    print("--lora-paths " + " ".join(f"{r.role}={r.path}" for r in reports))
    return 0


@dataclass(frozen=True)
class LayerBasis:
    layer: int
    k: int
    stacked_rows: int
    energy_kept: float | None
    rel_errors: dict[str, float]


def joint_basis_report(
    adapters: list[tuple[str, Path]], module: str = "v_proj", max_k: int | None = None,
    rtol: float = DEFAULT_RTOL, progress: bool = True,
) -> list[LayerBasis]:
    """Per layer the joint basis width of the adapters' `module` A rows, and with `max_k`
    the energy kept and each adapter's relative error of B A at that width. A layer counts
    only the adapters that have LoRA there."""
    per_adapter = {}
    for name, path in adapters:
        try:
            pairs = lora_matrices(adapter_tensors(path), module)
        except AdapterError as exc:
            raise AdapterError(f"adapter {name!r}: {exc}") from None
        if not pairs:
            raise AdapterError(f"adapter {name!r} ({path}) has no {module} LoRA weights")
        per_adapter[name] = pairs
    layers = sorted(set().union(*(p.keys() for p in per_adapter.values())))
    rows = []
    for layer in tqdm(layers, desc="joint basis", disable=not progress, leave=False):
        names = [n for n, p in per_adapter.items() if layer in p]
        a_list = [per_adapter[n][layer][0] for n in names]
        k = joint_rank(singular_values(a_list), rtol)
        energy, errors = None, {}
        if max_k is not None:
            t = truncation(a_list, [per_adapter[n][layer][1] for n in names], max_k, rtol)
            energy, errors = t.energy_kept, dict(zip(names, t.rel_errors))
        rows.append(LayerBasis(layer, k, sum(a.shape[0] for a in a_list), energy, errors))
    return rows


def _print_basis_table(rows: list[LayerBasis], names: list[str], module: str, max_k: int | None) -> None:
    head = f"{'layer':>5} {'k':>4} {'n*r':>4}"
    if max_k is not None:
        head += f" {'energy@' + str(max_k):>10} " + " ".join(f"{'err ' + n:>12}" for n in names)
    print(head)
    for row in rows:
        line = f"{row.layer:>5} {row.k:>4} {row.stacked_rows:>4}"
        if max_k is not None:
            errs = " ".join(f"{row.rel_errors[n]:>12.2e}" if n in row.rel_errors else f"{'-':>12}" for n in names)
            line += f" {row.energy_kept:>10.6f} {errs}"
        print(line)
    ks = [r.k for r in rows]
    print(f"# {module} joint basis over {len(names)} adapters: k in [{min(ks)}, {max(ks)}] "
          f"(stacked rows {max(r.stacked_rows for r in rows)}); an exact shared LR cache needs width {max(ks)}")
    if max_k is not None:
        worst = max((e for r in rows for e in r.rel_errors.values()), default=0.0)
        print(f"# at K={max_k}: energy kept >= {min(r.energy_kept for r in rows):.6f}, "
              f"worst relative error of B A {worst:.3e}")


def cmd_joint_basis(args: argparse.Namespace) -> int:
    adapters = [(name, Path(path)) for name, path in lora_pairs(args.adapters)]
    rows = joint_basis_report(adapters, args.module, args.max_k, args.rtol, progress=not args.no_progress)
    names = [n for n, _ in adapters]
    _print_basis_table(rows, names, args.module, args.max_k)
    if args.json:
        args.json.write_text(json.dumps({
            "module": args.module, "rtol": args.rtol, "max_k": args.max_k,
            "adapters": {n: str(p) for n, p in adapters},
            "width_needed": max(r.k for r in rows),
            "layers": [vars(r) for r in rows],
        }, indent=2))
        logger.info("wrote %s", args.json)
    return 0


@dataclass(frozen=True)
class Verdict:
    name: str
    ok: bool
    detail: str


def check_adapters(
    adapters: list[tuple[str, str | Path]], model_path: Path, scheme: Scheme,
    max_lora_rank: int | None = None, progress: bool = True, lr_basis: LRBasis = DEFAULT_LR_BASIS,
) -> list[Verdict]:
    """One verdict per adapter: what the launcher checks plus config and tensor shapes.
    Under base-lr-shared every adapter's v_proj A is compared with the first adapter that
    passes on its own, as the server compares with the first one it loads."""
    verdicts: dict[str, Verdict] = {}
    passed = []
    for name, path in tqdm(adapters, desc="check", disable=not progress, leave=False):
        try:
            info = read_adapter(name, path, model_path)
            check_config(info)
            check_for_scheme([info], scheme, max_lora_rank, lr_basis)
            notes = check_weights(info, model_path)
        except AdapterError as exc:
            verdicts[name] = Verdict(name, False, str(exc))
            continue
        detail = f"r={info.rank}, alpha={info.alpha:g}, {'+'.join(info.target_modules)}"
        verdicts[name] = Verdict(name, True, "; ".join([detail, *notes]))
        passed.append(info)
    if scheme.one_lr_cache and passed:
        ref = passed[0]
        for info in passed[1:]:
            try:
                check_for_scheme([ref, info], scheme, None, lr_basis)
            except AdapterError as exc:
                verdicts[info.name] = Verdict(info.name, False, str(exc))
    return [verdicts[name] for name, _ in adapters]


def cmd_check(args: argparse.Namespace) -> int:
    adapters = lora_pairs(args.adapters)
    names = [n for n, _ in adapters]
    if len(set(names)) != len(names):
        raise AdapterError(f"adapter names must be distinct, got {names}")
    model = _model_path(args.model_path)
    scheme = Scheme(args.scheme)
    lr_basis = check_lr_basis(LRBasis(args.lr_basis), scheme)
    verdicts = check_adapters(adapters, model, scheme, args.max_lora_rank, progress=not args.no_progress,
                              lr_basis=lr_basis)
    width = max(len(v.name) for v in verdicts)
    for v in verdicts:
        print(f"{v.name:<{width}}  {'OK' if v.ok else 'REFUSED'}: {v.detail}")
    refused = sum(not v.ok for v in verdicts)
    print(f"# scheme {scheme} (lr basis {lr_basis}), model {model}: "
          + (f"all {len(verdicts)} adapters OK" if not refused else f"{refused} of {len(verdicts)} refused"))
    return 1 if refused else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lragent-adapters", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = "HF checkpoint folder (default: the embedded SmolLM2-135M-Instruct)"

    make = sub.add_parser("make", help="write random role adapters (q/v LoRA) for a checkpoint")
    make.add_argument("--model-path", type=Path, help=model_help)
    make.add_argument("--out", type=Path, required=True, help="adapters go to OUT/<role>")
    make.add_argument("--roles", nargs="+", default=list(DEFAULT_ROLES))
    make.add_argument("--rank", type=int, default=8)
    make.add_argument("--alpha", type=float, default=16.0)
    make.add_argument("--target-modules", nargs="+",
                      help=f"(default: {' '.join(DEFAULT_TARGETS)}, or qkv_proj where the checkpoint fuses them)")
    make.add_argument("--shared-a", action="store_true", help="one v_proj A for all roles (base-lr-shared adapters)")
    make.add_argument("--b-std", type=float, default=0.05, help="standard deviation of B (default: %(default)s)")
    make.add_argument("--seed", type=int, default=0)
    make.set_defaults(func=cmd_make)

    train = sub.add_parser("train", help="train role adapters with PEFT (q_proj + v_proj LoRA)")
    train.add_argument("--model-path", type=Path, help=model_help)
    train.add_argument("--data", type=Path, default=DEFAULT_DATA,
                       help="JSONL of {role, prompt, completion[, system]} (default: %(default)s)")
    train.add_argument("--out", type=Path, required=True, help="adapters go to OUT/<role>")
    train.add_argument("--roles", nargs="+", help="roles to train, in order (default: as first seen in the data)")
    train.add_argument("--shared-a", action="store_true",
                       help="share the first role's v_proj lora_A (frozen) with the others: base-lr-shared adapters")
    train.add_argument("--rank", type=int, default=8)
    train.add_argument("--alpha", type=float, default=16.0)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--steps", type=int, default=30, help="optimizer steps per role (default: %(default)s)")
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--max-len", type=int, default=256, help="tokens per example (prompt cut from the left)")
    train.add_argument("--format", choices=("chat", "plain"), default="chat",
                       help="chat: prompt as a chat-templated user turn; plain: raw text (default: %(default)s)")
    train.add_argument("--dropout", type=float, default=0.0)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    train.add_argument("--threads", type=int,
                       help="CPU threads for torch (default: torch's; 1 is often faster on busy cores)")
    train.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                       help="base weights' dtype; LoRA weights train in float32")
    train.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                       help="dtype of the saved LoRA weights (float16 halves the files; default: %(default)s)")
    train.set_defaults(func=cmd_train)

    jb = sub.add_parser("joint-basis", help="joint basis width of the adapters' v_proj A, and truncation cost")
    jb.add_argument("adapters", nargs="+", help="[NAME=]PATH of each adapter")
    jb.add_argument("--max-k", type=int, help="report energy kept and B A error at this basis width")
    jb.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                    help="singular values below rtol * largest do not count (default: %(default)g)")
    jb.add_argument("--module", default="v_proj", help="projection whose A rows to analyse (default: %(default)s)")
    jb.add_argument("--json", type=Path, help="also write the table as JSON here")
    jb.set_defaults(func=cmd_joint_basis)

    check = sub.add_parser("check", help="can the server serve these adapters under a scheme? exit 0 if all OK")
    check.add_argument("adapters", nargs="+", help="[NAME=]PATH of each adapter")
    check.add_argument("--model-path", type=Path, help=model_help)
    check.add_argument("--scheme", choices=Scheme.choices(), default=DEFAULT_SCHEME, help="(default: %(default)s)")
    check.add_argument("--max-lora-rank", type=int, help="the server's --max-lora-rank")
    check.add_argument("--lr-basis", choices=LRBasis.choices(), default=DEFAULT_LR_BASIS,
                       help="the server's --lragent-lr-basis (base-lr-shared; default: %(default)s)")
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except (AdapterError, ValueError, FileNotFoundError) as exc:
        print(f"lragent-adapters {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
