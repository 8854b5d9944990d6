"""On the GPU machine: the schemes through the Flash-LoRA Triton backend against stock.

Writes a random-weight SmolLM2-shaped bf16 checkpoint and three shared-A role adapters,
then for each configuration starts our launcher and sends single-adapter and no-adapter
greedy requests (each prompt family read by one adapter only, so every scheme should agree
with non-shared up to bf16 kernel differences). Configurations: stock non-shared, the
base-sharing schemes with decode CUDA graphs and without, and base-lr-shared with the joint
LR basis over independently initialised adapters against non-shared with those adapters.
Prefill CUDA graphs are off everywhere (our backend refuses them; it saves start-up time).
After its greedy runs every server also gets an out-of-vocabulary request (which killed the
server before the request guards), must answer it with 400 and keep serving. Prints token agreement with
non-shared and with the eager run of the same scheme, and the largest difference of the
chosen tokens' logprobs while the outputs agree (random weights give flat logits, so bf16
noise alone can flip greedy near-ties; the logprobs show whether the numbers agree).

    python3 scripts/device_scheme_check.py --tokenizer-from DIR --work DIR [--family gemma2]

`--family` takes one of scripts/make_tiny_model.py's tiny checkpoints (Gemma-2's head_dim
256, soft-cap and windows, Qwen2's GQA group 7, Phi-3's head_dim 96 and fused qkv, ...)
instead of the SmolLM2-shaped default, so the kernels' model-specific paths run inside
the server too. `--dtype float32 --hf-reference` also compares every shared-A run with
transformers + peft in float32 (eager attention): which run is right when runs disagree.
`--hf-regret` judges bf16 runs where token agreement cannot (the tiny Gemma-2 flips near-ties
from the first token even between transformers' own bf16 and float32 runs): transformers +
peft in float32 scores every token of each shared-A run on the run's own path
(`make_tiny_model.hf_regret`), and a run passes when its mean regret is at most
`REGRET_FACTOR` x that of transformers' own bf16 greedy run, the control.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

from lragent_sglang.adapters.make import make_role_adapters
from lragent_sglang.agents.server_process import ServerProcess

sys.path.insert(0, str(Path(__file__).parent))
from make_random_llama import PRESETS, copy_tokenizer, write_checkpoint  # noqa: E402
from make_tiny_model import FAMILIES, hf_greedy_ids, hf_regret, write_tiny_model  # noqa: E402

FLAGS = ["--sampling-backend", "pytorch", "--grammar-backend", "none", "--lora-backend", "triton",
         "--max-loras-per-batch", "4", "--max-lora-rank", "8", "--mem-fraction-static", "0.5",
         "--cuda-graph-max-bs", "8", "--disable-prefill-cuda-graph", "--skip-tokenizer-init"]
# label: (adapter set, scheme, extra flags); each run is compared with its set's stock run
# and with its own eager run where there is one.
CONFIGS = {
    "non-shared": ("shared-a", "non-shared", []),
    "base-shared": ("shared-a", "base-shared", []),
    "base-shared eager": ("shared-a", "base-shared", ["--disable-cuda-graph"]),
    "base-lr-shared": ("shared-a", "base-lr-shared", []),
    "base-lr-shared eager": ("shared-a", "base-lr-shared", ["--disable-cuda-graph"]),
    "non-shared indep": ("independent", "non-shared", []),
    "joint indep": ("independent", "base-lr-shared", ["--lragent-lr-basis", "joint"]),
}
STOCK = {"shared-a": "non-shared", "independent": "non-shared indep"}
Output = tuple[list[int], list[float]]
CONTROL = "HF bf16 (control)"
# A correct bf16 run's tokens are as good as transformers' own bf16 run's, up to noise; a
# wrong adapter or scale scores ~15x the control on the tiny Gemma-2 (hf_regret).
REGRET_FACTOR = 2.0


def families(seed: int = 0) -> dict[str, list[list[int]]]:
    """Per role a chain of prompts sharing a prefix; no two roles share a first token."""
    rng = random.Random(seed)
    out = {}
    for i, role in enumerate(["plan", "action", "none"]):
        head = [200 + i] + [rng.randrange(300, 30000) for _ in range(200)]
        out[role] = [head, head + [rng.randrange(300, 30000) for _ in range(100)]]
    return out


NEW_TOKENS = 24


def greedy(srv: ServerProcess, ids: list[int], role: str) -> Output:
    payload = {"input_ids": ids, "return_logprob": True,
               "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}}
    if role != "none":
        payload["lora_path"] = role
    out = srv.generate(**payload)
    return out["output_ids"], [lp[0] for lp in out["meta_info"]["output_token_logprobs"]]


def bad_request_probe(srv: ServerProcess, ids: list[int]) -> dict[str, object]:
    """An out-of-vocabulary id with an adapter: the answer's status, and whether a good
    request is served after it (its tokens may differ from the first run's: the prompt
    is cached now, and bf16 near-ties of random weights flip between kernel paths)."""
    bad = {"input_ids": [999999999], "lora_path": "plan", "sampling_params": {"max_new_tokens": 2}}
    status = requests.post(srv.url + "/generate", json=bad, timeout=120).status_code
    try:
        serving = len(greedy(srv, ids, "plan")[0]) > 0
    except requests.RequestException:
        serving = False
    return {"status": status, "serving": serving}


def agreement(outs: dict[str, list[Output]], ref: dict[str, list[Output]]) -> dict[str, float]:
    """Equal tokens, and the largest logprob gap over each output's agreeing prefix."""
    same = total = 0
    gap = 0.0
    for role in ref:
        for (ids, lps), (ref_ids, ref_lps) in zip(outs[role], ref[role]):
            total += len(ref_ids)
            same += sum(x == y for x, y in zip(ids, ref_ids))
            for x, y, lx, ly in zip(ids, ref_ids, lps, ref_lps):
                gap = max(gap, abs(lx - ly))
                if x != y:
                    break
    has_logprobs = any(lps for outs in ref.values() for _, lps in outs)
    return {"same": same, "total": total, "max_dlogp": gap if has_logprobs else None}


def regret_report(model: Path, adapters: dict[str, Path], prompts: dict[str, list[list[int]]],
                  outputs: dict[str, dict[str, list[Output]]]) -> dict[str, dict[str, object]]:
    """Mean and max float32 regret of every shared-A run's tokens and of the control
    (transformers' bf16 greedy run); ``ok``: mean within REGRET_FACTOR x the control's."""
    runs = {label: outs for label, outs in outputs.items() if CONFIGS[label][0] == "shared-a"}
    runs[CONTROL] = {role: [(ids, []) for ids in hf_greedy_ids(model, adapters.get(role), chain, NEW_TOKENS,
                                                                dtype=torch.bfloat16)]
                     for role, chain in prompts.items()}
    report: dict[str, dict[str, object]] = {}
    for label, outs in runs.items():
        regret = [r for role, chain in prompts.items()
                  for r in hf_regret(model, adapters.get(role), chain, [ids for ids, _ in outs[role]])]
        report[label] = {"mean": sum(regret) / len(regret), "max": max(regret), "tokens": len(regret)}
    bound = REGRET_FACTOR * float(report[CONTROL]["mean"])
    for row in report.values():
        row["ok"] = float(row["mean"]) <= bound
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-from", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/scheme-check"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/scheme-check/result.json"))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="runs to make (default: all; comparisons need their reference runs)")
    parser.add_argument("--family", default="smollm2", choices=["smollm2", *sorted(FAMILIES)],
                        help="the model: SmolLM2 shapes (default) or a tiny checkpoint of another family")
    parser.add_argument("--dtype", default=None, help="the servers' --dtype (default: the checkpoint's)")
    parser.add_argument("--hf-reference", action="store_true",
                        help="also compare the shared-A runs with transformers + peft in float32")
    parser.add_argument("--hf-regret", action="store_true",
                        help="also score the shared-A runs' tokens with transformers + peft in float32 "
                             "against its own bf16 run (for bf16 servers)")
    args = parser.parse_args()
    flags = FLAGS + (["--dtype", args.dtype] if args.dtype else [])
    if args.family == "smollm2":
        model = write_checkpoint(dict(PRESETS["smollm2-135m"]), args.work / "model")
        copy_tokenizer(args.tokenizer_from, model)
    else:
        model = write_tiny_model(args.family, args.work / args.family, tokenizer_dir=args.tokenizer_from)
    lora, adapter_dirs = {}, {}
    for name, shared in (("shared-a", True), ("independent", False)):
        adapter_dirs[name] = make_role_adapters(model, args.work / f"adapters-{name}", shared_v_a=shared)
        lora[name] = ["--enable-lora", "--lora-paths", *[f"{r}={p}" for r, p in adapter_dirs[name].items()]]
    prompts = families()
    hf = {}
    if args.hf_reference:
        hf = {role: [(ids, []) for ids in hf_greedy_ids(model, adapter_dirs["shared-a"].get(role), chain, NEW_TOKENS)]
              for role, chain in prompts.items()}
    outputs: dict[str, dict[str, list[Output]]] = {}
    probes: dict[str, dict[str, object]] = {}
    for label in args.configs:
        adapter_set, scheme, extra = CONFIGS[label]
        with ServerProcess(["--model-path", str(model), *lora[adapter_set], *flags, *extra, "--lragent-scheme", scheme],
                           log_path=args.work / f"{label.replace(' ', '-')}.log") as srv:
            jobs = [(role, ids) for role, chain in prompts.items() for ids in chain]
            with ThreadPoolExecutor(len(jobs)) as pool:  # one decode batch: mixed adapters, graph padding
                results = list(pool.map(lambda job: greedy(srv, job[1], job[0]), jobs))
            outputs[label] = {role: [out for (r, _), out in zip(jobs, results) if r == role] for role in prompts}
            probes[label] = bad_request_probe(srv, prompts["plan"][0])
    report = {}
    for label, outs in outputs.items():
        refs = [r for r in (STOCK[CONFIGS[label][0]], f"{label} eager") if r in outputs and r != label]
        report[label] = {f"vs {ref}": agreement(outs, outputs[ref]) for ref in refs}
        if hf and CONFIGS[label][0] == "shared-a":
            report[label]["vs HF float32"] = agreement(outs, hf)
        print(f"{label:22s} " + "  ".join(f"{k}: {v['same']}/{v['total']} tokens" + (
                  "" if v["max_dlogp"] is None else f", max |dlogp| {v['max_dlogp']:.4f}")
                                          for k, v in report[label].items())
              + f"  out-of-vocabulary request: HTTP {probes[label]['status']}, still serving: {probes[label]['serving']}")
    regret = regret_report(model, adapter_dirs["shared-a"], prompts, outputs) if args.hf_regret else {}
    for label, row in regret.items():
        print(f"{label:22s} float32 regret of its tokens: mean {row['mean']:.3f}, max {row['max']:.3f} "
              f"over {row['tokens']} tokens: {'ok' if row['ok'] else 'NOT'} within {REGRET_FACTOR:g}x the control")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"agreement": report, "probes": probes, "regret": regret,
                                    "outputs": outputs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
