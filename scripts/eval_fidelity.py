"""Fidelity of the sharing schemes: what each one changes in the roles' outputs, measured
on the real server against non-shared, plus the paper's Table-1 analysis on our model.

One set of multi-role episodes (plan -> action -> tool output -> reflect, repeated; real
questions, tool outputs from `data/docs` and the calculator) is grown on a non-shared
server: each role generates greedily on the whole trajectory so far and its generation is
appended. Every other run replays exactly the same requests on its own server: per step
the role generates freely (greedy agreement), then scores the non-shared run's
generation teacher-forced (`return_logprob` from the last prompt token, full-vocabulary
top logprobs by default), so next-token KL(non-shared || run) is taken at aligned
positions. Each step's new tokens are first processed by the role of that step
(`--writer agent`, the agent loop) or by a no-adapter commit (`--writer commit`, the
multi-way fork), so later roles read KV written by others: the only case where sharing
changes anything. The report counts those tokens (client-side, token-keyed) next to the
server's cached tokens and eviction counters.

Adapter sets: `independent` (trained separately; runs: non-shared (reference),
full-shared, base-shared, base-lr-shared with `--lragent-lr-basis joint`), `forced-a`
(the independent set with every v_proj A replaced by the first's: what base-lr-shared
would serve if it took independent adapters; runs: base-lr-shared, and non-shared to
separate the A swap from the sharing; both compared against the independent non-shared
run; `lragent-adapters check` must refuse the independent set) and `shared-a`
(trained with `train --shared-a`; runs: non-shared (reference), full-shared, base-shared,
base-lr-shared). Table 1 runs in-process with HF transformers + PEFT.

    python scripts/eval_fidelity.py \
        --adapters plan=DIR action=DIR reflect=DIR \
        --shared-a-adapters plan=DIR action=DIR reflect=DIR [--model-path M] \
        [--runs independent/base-shared ...] [--writer agent|commit] [-- SGLANG FLAGS]

Writes JSON (default artifacts/fidelity.json) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
from tqdm import tqdm

from lragent_sglang.adapters.io import lora_pairs, max_rank
from lragent_sglang.agents.server_process import ServerError, ServerProcess
from lragent_sglang.agents.tools import Toolbox, ToolError, parse_tool_call
from lragent_sglang.eval.fidelity import (
    ChatFrame,
    TopLogprobs,
    WriterTrie,
    cross_role_similarity,
    force_shared_a,
    kl_per_position,
    paired_ratio_ci,
    prefix_agreement,
    summarize_similarity,
    top1_agreement,
    top_logprobs_from_meta,
)
from lragent_sglang.scheme import Scheme

logger = logging.getLogger("eval_fidelity")

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = ("You are a team of agents solving a question together. The planner writes a plan, "
          "the actor carries out one step, the reflector checks the work.")
QUESTIONS = (
    "How much do 14 pens cost at the stationery shop?",
    "How tall is the Eiffel Tower in metres, and how much taller is it than 300 metres?",
    "What is (17 * 23) + 4?",
    "How long is the Great Wall of China?",
    "How far is the Moon from the Earth, in kilometres?",
    "How high is Mount Everest, and what is that height divided by 1000?",
    "How long does light take to travel from the Sun to the Earth?",
    "How long is the Amazon river?",
)
PLAN = "Planner, write a short plan."
ACT = "Actor, carry out the next step of the plan."
REFLECT = "Reflector, is the answer right? Say why in one sentence."
ROLES = ("plan", "action", "reflect")
TRUNCATED_KS = (20, 100, 1000)  # top-k cuts whose KL error the report measures


@dataclass(frozen=True)
class RunSpec:
    label: str
    adapters: str  # adapter set name
    scheme: Scheme
    flags: tuple[str, ...] = ()
    reference: str | None = None  # label of the run it is compared with (None: it is a reference)


RUNS = (  # in the order they run: a reference before the runs compared with it
    RunSpec("independent/non-shared", "independent", Scheme.NON_SHARED),
    RunSpec("independent/full-shared", "independent", Scheme.FULL_SHARED, reference="independent/non-shared"),
    RunSpec("independent/base-shared", "independent", Scheme.BASE_SHARED, reference="independent/non-shared"),
    RunSpec("independent/joint-basis", "independent", Scheme.BASE_LR_SHARED, ("--lragent-lr-basis", "joint"),
            reference="independent/non-shared"),
    RunSpec("shared-a/non-shared", "shared-a", Scheme.NON_SHARED),
    RunSpec("shared-a/full-shared", "shared-a", Scheme.FULL_SHARED, reference="shared-a/non-shared"),
    RunSpec("shared-a/base-shared", "shared-a", Scheme.BASE_SHARED, reference="shared-a/non-shared"),
    RunSpec("shared-a/base-lr-shared", "shared-a", Scheme.BASE_LR_SHARED, reference="shared-a/non-shared"),
    RunSpec("forced-a/base-lr-shared", "forced-a", Scheme.BASE_LR_SHARED, reference="independent/non-shared"),
    RunSpec("forced-a/non-shared", "forced-a", Scheme.NON_SHARED, reference="independent/non-shared"),
)


@dataclass
class StepResult:
    """One role request of one episode in one run."""

    episode: int
    step: int
    role: str
    prompt_tokens: int
    cached_tokens: int  # server, generation request
    offered_tokens: int  # client: prompt tokens a token-keyed cache holds (at most prompt - 1)
    cross_tokens: int  # client: of those, first written by another role or a no-adapter commit
    generation: list[int]
    scored: TopLogprobs | None = None
    metrics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- server requests


def _post(url: str, payload: dict[str, Any]) -> dict[str, Any]:
    resp = requests.post(url + "/generate", json=payload, timeout=1800)
    if resp.status_code != 200:
        raise RuntimeError(f"/generate answered {resp.status_code}: {resp.text[:500]}")
    return resp.json()


def generate(url: str, ids: list[int], role: str | None, max_new: int) -> dict[str, Any]:
    payload: dict[str, Any] = {"input_ids": ids,
                               "sampling_params": {"max_new_tokens": max_new, "temperature": 0}}
    if role:
        payload["lora_path"] = role
    return _post(url, payload)


def score(url: str, prompt: list[int], continuation: list[int], role: str | None, top_k: int) -> TopLogprobs:
    """Next-token distributions at every token of `continuation` after `prompt`, teacher
    forced. Logprobs start at the last prompt token, which also caps the cached prefix
    there, so the role computes that token and the continuation itself, as when decoding."""
    payload: dict[str, Any] = {
        "input_ids": prompt + continuation, "return_logprob": True,
        "logprob_start_len": len(prompt) - 1, "top_logprobs_num": top_k,
        "return_flat_raw_top_logprobs": True, "return_flat_raw_top_logprobs_b64": True,
        "sampling_params": {"max_new_tokens": 0, "temperature": 0},
    }
    if role:
        payload["lora_path"] = role
    out = _post(url, payload)
    top = top_logprobs_from_meta(out["meta_info"])
    if len(top) != len(continuation):
        raise RuntimeError(f"expected {len(continuation)} scored positions, got {len(top)}")
    return top


def lragent_stats(url: str) -> dict[str, Any]:
    return requests.get(url + "/lragent/stats", timeout=60).json()["schedulers"][0]


# ---------------------------------------------------------------- episodes


def tool_output(toolbox: Toolbox, action_text: str, question: str) -> str:
    """The tool's answer to the action role's call, else a lookup of the question (a
    deterministic function of the reference generation, so every run sees the same)."""
    call = parse_tool_call(action_text)
    if call is not None:
        try:
            return f"{call} -> {toolbox.run(call)}"
        except ToolError as exc:
            logger.debug("tool call %s failed: %s", call, exc)
    try:
        return f"lookup({question}) -> {toolbox.docs.lookup(question)}"
    except ToolError as exc:
        return f"error: {exc}"


def strip_stop(gen: list[int], finish: dict[str, Any] | None) -> list[int]:
    """The generation without its stop token (the chat frame closes the turn itself)."""
    matched = (finish or {}).get("matched")
    if (finish or {}).get("type") == "stop" and isinstance(matched, int) and gen and gen[-1] == matched:
        return gen[:-1]
    return gen


@dataclass(frozen=True)
class Episode:
    question: str
    steps: list[str]  # role per step


def episode_requests(ep: Episode, frame: ChatFrame, tok: Any, toolbox: Toolbox,
                     reference: list[tuple[list[int], dict | None]]) -> Iterator[tuple[str, list[int]]]:
    """Yield (role, prompt ids) per step. The caller appends the reference generation of
    each step (with its finish reason) to `reference` before asking for the next step:
    the trajectory always continues with the reference run's text."""

    def enc(s: str) -> list[int]:
        return list(tok(s, add_special_tokens=False)["input_ids"])

    ids = list(frame.head)
    user = f"Question: {ep.question}\n"
    for i, role in enumerate(ep.steps):
        user += {"plan": PLAN, "action": ACT, "reflect": REFLECT}[role]
        if i:
            ids += frame.next_user
        prompt = ids + enc(user) + frame.open_reply
        yield role, prompt
        gen, finish = reference[i]
        text = tok.decode(strip_stop(gen, finish), skip_special_tokens=True)
        ids = prompt + strip_stop(gen, finish)
        user = f"Tool output: {tool_output(toolbox, text, ep.question)}\n" if role == "action" else ""


@dataclass
class Context:
    """What every run needs: the model, the episodes and how to replay them."""

    model_path: str
    sets: dict[str, dict[str, Path]]
    episodes: list[Episode]
    frame: ChatFrame
    tok: Any
    vocab: int
    top_k: int
    max_new: int
    writer: str
    server_flags: list[str]
    work_dir: Path
    adapter_scale: bool = True  # references also score without adapter: the scale of an adapter's effect
    toolbox: Toolbox = field(default_factory=Toolbox)


Reference = dict[tuple[int, int], tuple[list[int], dict | None]]


@dataclass
class RunOutput:
    steps: list[StepResult]
    reference: Reference  # (episode, step) -> generation and finish reason it continued with
    trajectories: list[list[int]]  # per episode: the last prompt and the generation after it


def adapter_effect(url: str, ctx: Context, prompt: list[int], gen: list[int], scored: TopLogprobs) -> dict[str, float]:
    """KL(role || the same model without adapter) on the role's own generation: how far
    the adapter moves the distributions, the scale a sharing error is small against."""
    base = score(url, prompt, gen, None, ctx.top_k)
    return {"adapter_kl_sum": float(kl_per_position(scored, base, ctx.vocab).sum()),
            "adapter_top1_sum": float(top1_agreement(scored, base).sum()), "adapter_positions": len(gen)}


def run_episodes(url: str, ctx: Context, reference: Reference | None, label: str) -> RunOutput:
    """All episodes, one request at a time, in the order of the agent loop. Without
    `reference` this run is the reference: its own generations continue the trajectory."""
    ref: Reference = {} if reference is None else reference
    trie = WriterTrie()
    out = RunOutput([], ref, [])
    bar = tqdm(total=sum(len(e.steps) for e in ctx.episodes), desc=label, leave=False)
    for e, ep in enumerate(ctx.episodes):
        continued: list[tuple[list[int], dict | None]] = []
        for s, (role, prompt) in enumerate(episode_requests(ep, ctx.frame, ctx.tok, ctx.toolbox, continued)):
            if ctx.writer == "commit":
                generate(url, prompt, None, 0)
                trie.insert(prompt, None)
            offered = trie.writers(prompt)[: len(prompt) - 1]
            answer = generate(url, prompt, role, ctx.max_new)
            gen = list(answer["output_ids"])
            trie.insert(prompt + gen, role)
            if reference is None:
                ref[(e, s)] = (gen, answer["meta_info"].get("finish_reason"))
            ref_gen = ref[(e, s)][0]
            scored = score(url, prompt, ref_gen, role, ctx.top_k) if ref_gen else None
            trie.insert(prompt + ref_gen, role)
            continued.append(ref[(e, s)])
            step = StepResult(e, s, role, len(prompt), answer["meta_info"]["cached_tokens"],
                              len(offered), sum(w != role for w in offered), gen, scored)
            if reference is None and ctx.adapter_scale and scored is not None:
                step.metrics = adapter_effect(url, ctx, prompt, ref_gen, scored)
            out.steps.append(step)
            bar.update(1)
        out.trajectories.append(prompt + ref_gen)
    bar.close()
    return out


# ---------------------------------------------------------------- comparison


def compare(ref: list[StepResult], run: list[StepResult], vocab: int) -> None:
    """Fill each step's metrics of `run` against the reference run's same step."""
    for a, b in zip(ref, run, strict=True):
        ref_gen = a.generation
        b.metrics = {"gen_exact": float(b.generation == ref_gen),
                     "gen_prefix": prefix_agreement(ref_gen, b.generation)}
        if a.scored is None:
            continue
        kl = kl_per_position(a.scored, b.scored, vocab)
        b.metrics.update(kl_sum=float(kl.sum()), positions=len(kl), top1_sum=float(top1_agreement(a.scored, b.scored).sum()))
        for k in TRUNCATED_KS:
            if a.scored.k > k:
                trunc = kl_per_position(a.scored.truncate(k), b.scored.truncate(k), vocab)
                b.metrics[f"kl_top{k}_sum"] = float(trunc.sum())
        b.metrics["kl_max"] = float(kl.max())


def _kl_mean(steps: list[StepResult]) -> float | None:
    pos = sum(s.metrics.get("positions", 0) for s in steps)
    return sum(s.metrics.get("kl_sum", 0.0) for s in steps) / pos if pos else None


def aggregate(steps: list[StepResult], role: str | None = None) -> dict[str, float]:
    """Means over positions (KL, top-1) and over generations (exact, prefix). KL is also
    split by whether the step's prompt held tokens another writer cached first: steps
    without are the numerical floor (different kernels, same math)."""
    sel = [s for s in steps if role is None or s.role == role]
    m = [s.metrics for s in sel]
    pos = sum(x.get("positions", 0) for x in m)
    out = {
        "kl_mean_cross_steps": _kl_mean([s for s in sel if s.cross_tokens]),
        "kl_mean_own_steps": _kl_mean([s for s in sel if not s.cross_tokens]),
        "generations": len(sel),
        "positions": pos,
        "kl_mean": sum(x.get("kl_sum", 0.0) for x in m) / max(pos, 1),
        "kl_max": max((x.get("kl_max", 0.0) for x in m), default=0.0),
        "top1_agreement": sum(x.get("top1_sum", 0.0) for x in m) / max(pos, 1),
        "gen_exact": float(np.mean([x["gen_exact"] for x in m])) if m and "gen_exact" in m[0] else float("nan"),
        "gen_prefix": float(np.mean([x["gen_prefix"] for x in m])) if m and "gen_prefix" in m[0] else float("nan"),
        "prompt_tokens": sum(s.prompt_tokens for s in sel),
        "cached_tokens": sum(s.cached_tokens for s in sel),
        "offered_tokens": sum(s.offered_tokens for s in sel),
        "cross_tokens": sum(s.cross_tokens for s in sel),
    }
    adapter_pos = sum(x.get("adapter_positions", 0) for x in m)
    if adapter_pos:
        out["adapter_kl_mean"] = sum(x["adapter_kl_sum"] for x in m if "adapter_kl_sum" in x) / adapter_pos
        out["adapter_top1_agreement"] = sum(x["adapter_top1_sum"] for x in m if "adapter_top1_sum" in x) / adapter_pos
    for k in TRUNCATED_KS:
        if any(f"kl_top{k}_sum" in x for x in m):
            out[f"kl_mean_top{k}"] = sum(x.get(f"kl_top{k}_sum", 0.0) for x in m) / max(pos, 1)
    return out


# ---------------------------------------------------------------- adapters and check


CHECKS = (  # (adapter set, --lr-basis): base-lr-shared must refuse independent A unless the basis is joint
    ("independent", "shared-a"),
    ("independent", "joint"),
    ("forced-a", "shared-a"),
)


def check_verdict(adapters: dict[str, Path], model_path: str, lr_basis: str) -> dict[str, Any]:
    """`lragent-adapters check` under base-lr-shared: exit code and its report."""
    cmd = [sys.executable, "-m", "lragent_sglang.adapters", "--no-progress", "check",
           *[f"{n}={p}" for n, p in adapters.items()], "--model-path", model_path,
           "--scheme", Scheme.BASE_LR_SHARED, "--lr-basis", lr_basis]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return {"scheme": Scheme.BASE_LR_SHARED, "lr_basis": lr_basis, "exit_code": proc.returncode,
            "output": (proc.stdout + proc.stderr).strip()}


def parse_set(pairs: list[str] | None) -> dict[str, Path] | None:
    return {n: Path(p) for n, p in lora_pairs(pairs)} if pairs else None


# ---------------------------------------------------------------- Table 1


def table1(model_path: str, adapters: dict[str, Path], trajectories: list[list[int]], shared_lr: bool,
           device: str) -> dict[str, Any]:
    """Cross-role similarity on the episodes' full trajectories, HF + PEFT, float32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(adapters[n]), adapter_name=n)
    model.eval()
    rows = cross_role_similarity(model, names, trajectories, shared_lr=shared_lr, progress=True)
    del model, base
    return {"mean": summarize_similarity(rows), "layers": [asdict(r) for r in rows],
            "tokens": sum(len(t) for t in trajectories)}


# ---------------------------------------------------------------- report


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def server_totals(stats: dict[str, Any]) -> dict[str, int]:
    """Per-adapter counters summed over adapters, and evictions, from /lragent/stats."""
    per = stats.get("per_adapter", {}).values()
    out = {f: sum(v.get(f, 0) for v in per) for f in ("base_hit_tokens", "lr_hit_tokens", "lr_reprefill_tokens")}
    out["evicted_tokens"] = sum(stats.get(c, {}).get("evicted_tokens", 0) for c in ("base", "lr"))
    return out


def ratios_to_base_shared(report: dict[str, Any]) -> dict[str, tuple[float, float, float]]:
    """Each compared run's KL over the base-shared run with the same reference (the
    targets are stated relative to base-shared), with a paired bootstrap interval."""
    runs = {k: r for k, r in report["runs"].items() if "error" not in r and r.get("reference")}
    out = {}
    for label, r in runs.items():
        base = next((b for b in runs.values() if b["scheme"] == Scheme.BASE_SHARED and b["reference"] == r["reference"]
                     and b["adapters"] == base_adapters(r["reference"])), None)
        if base is None or base is r:
            continue
        pairs = [(x["metrics"]["kl_sum"], y["metrics"]["kl_sum"]) for x, y in zip(r["steps"], base["steps"])
                 if "kl_sum" in x["metrics"] and "kl_sum" in y["metrics"]]
        if pairs and sum(y for _, y in pairs) > 0:
            out[label] = paired_ratio_ci([x for x, _ in pairs], [y for _, y in pairs])
    return out


def base_adapters(reference_label: str) -> str:
    return reference_label.split("/", 1)[0]


def print_report(report: dict[str, Any]) -> None:
    runs = {k: r for k, r in report["runs"].items() if "error" not in r}
    print("\n### Fidelity against non-shared (teacher-forced on the reference's generations)\n")
    print("| run | scheme | vs | KL mean (nats) | KL, steps reading others' KV | KL, other steps | KL max | "
          "top-1 agree | gen exact | gen prefix |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, r in runs.items():
        if not r.get("reference"):
            continue
        a = r["all"]
        print(f"| {label} | {r['scheme']} | {r['reference']} | {fmt(a['kl_mean'], '.2e')} | "
              f"{fmt(a['kl_mean_cross_steps'], '.2e')} | {fmt(a['kl_mean_own_steps'], '.2e')} | {fmt(a['kl_max'], '.2e')} | "
              f"{fmt(a['top1_agreement'], '.4f')} | {fmt(a['gen_exact'], '.3f')} | {fmt(a['gen_prefix'], '.3f')} |")
    for label, r in report["runs"].items():
        if "error" in r:
            print(f"\n{label} ({r['scheme']}) did not run: {r['error']}")
    scale = [(label, r["all"]) for label, r in runs.items() if "adapter_kl_mean" in r["all"]]
    if scale:
        print("\n### Scale: what the adapters themselves change (reference runs, KL(role || no adapter))\n")
        print("| reference | KL mean (nats) | top-1 agree with the base model |")
        print("|---|---|---|")
        for label, a in scale:
            print(f"| {label} | {a['adapter_kl_mean']:.2e} | {a['adapter_top1_agreement']:.4f} |")
    ratios = ratios_to_base_shared(report)
    if ratios:
        print("\n### KL relative to base-shared on the same reference (paired bootstrap over steps, 90%)\n")
        print("| run | KL / base-shared KL | interval |")
        print("|---|---|---|")
        for label, (ratio, lo, hi) in ratios.items():
            print(f"| {label} | {ratio:.2f}x | {lo:.2f}x - {hi:.2f}x |")
    print("\n### KL per role (nats)\n")
    print("| run | " + " | ".join(ROLES) + " |")
    print("|---|" + "---|" * len(ROLES))
    for label, r in runs.items():
        if r.get("reference"):
            print(f"| {label} | " + " | ".join(fmt(r["roles"][x]["kl_mean"], ".2e") for x in ROLES) + " |")
    print("\n### Did the roles read each other's KV? (generation requests; server counters over all requests)\n")
    print("| run | prompt tokens | cached (server) | in a token-keyed cache | of which written by another "
          "writer | server base hit | server LR hit | server LR re-prefill | evicted |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, r in runs.items():
        a, t = r["all"], server_totals(r["server_stats"])
        print(f"| {label} | {a['prompt_tokens']} | {a['cached_tokens']} | {a['offered_tokens']} | {a['cross_tokens']} | "
              f"{t['base_hit_tokens']} | {t['lr_hit_tokens']} | {t['lr_reprefill_tokens']} | {t['evicted_tokens']} |")
    trunc = [(label, r["all"]) for label, r in runs.items() if any(k.startswith("kl_mean_top") for k in r["all"])]
    if trunc:
        ks = [k for k in TRUNCATED_KS if any(f"kl_mean_top{k}" in a for _, a in trunc)]
        print("\n### KL from the top-k logprobs only (coarsened, a lower bound): shortfall against the exact KL\n")
        print("| run | exact | " + " | ".join(f"top-{k}" for k in ks) + " |")
        print("|---|---|" + "---|" * len(ks))
        for label, a in trunc:
            cells = [fmt((a["kl_mean"] - a[f"kl_mean_top{k}"]) / a["kl_mean"] if a["kl_mean"] else 0.0, ".1%")
                     if f"kl_mean_top{k}" in a else "-" for k in ks]
            print(f"| {label} | {a['kl_mean']:.3e} | " + " | ".join(cells) + " |")
    if report.get("table1"):
        print("\n### Table 1 on our model: mean cosine across roles (mean over layers)\n")
        print("| adapters | keys | base values x W_v | adapter outputs x A_v B_v | values | LR rows x A_v | "
              "norm V_base / norm adapter out |")
        print("|---|---|---|---|---|---|---|")
        for name, t in report["table1"].items():
            m = t["mean"]
            print(f"| {name} | {fmt(m['key_cos'], '.4f')} | {fmt(m['value_base_cos'], '.4f')} | "
                  f"{fmt(m['adapter_out_cos'], '.4f')} | {fmt(m['value_cos'], '.4f')} | {fmt(m['lr_cos'], '.4f')} | "
                  f"{fmt(m['norm_ratio'], '.1f')} |")
    for name, c in report.get("checks", {}).items():
        print(f"\n`lragent-adapters check` {name} under {c['scheme']}: exit {c['exit_code']}\n```\n{c['output']}\n```")


# ---------------------------------------------------------------- main


def server_args(model_path: str, adapters: dict[str, Path], spec: RunSpec, extra: list[str]) -> list[str]:
    """Launcher flags of one run; `--max-lora-rank` is given explicitly (the adapters'
    largest rank) because the launcher cannot set it on SGLang's resolved arguments."""
    paths = [f"{n}={p}" for n, p in adapters.items()]
    rank = [] if "--max-lora-rank" in extra else ["--max-lora-rank", str(max_rank(paths))]
    return ["--model-path", model_path, "--skip-tokenizer-init", "--enable-lora", "--lora-paths", *paths,
            *rank, "--lragent-scheme", spec.scheme, *spec.flags, *extra]


def default_flags(extra: list[str]) -> list[str]:
    """float32 on CPU (the HF reference's precision) unless the caller chose a dtype."""
    import torch

    if "--dtype" not in extra and not torch.cuda.is_available():
        return ["--dtype", "float32", *extra]
    return extra


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Written after every run too, so a long evaluation that stops keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))


def git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty_files": git("status", "--short").splitlines()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", help="Llama-family checkpoint (default: the embedded SmolLM2)")
    p.add_argument("--adapters", nargs="+", help="independently trained role adapters NAME=DIR")
    p.add_argument("--shared-a-adapters", nargs="+", help="shared-A role adapters NAME=DIR (train --shared-a)")
    p.add_argument("--runs", nargs="+", choices=[r.label for r in RUNS],
                   help="runs to do (default: every run whose adapters are given; references are added)")
    p.add_argument("--episodes", type=int, default=6, help=f"questions (at most {len(QUESTIONS)})")
    p.add_argument("--rounds", type=int, default=2, help="plan -> action -> reflect rounds per episode")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--top-k", type=int, default=0, help="logprobs per position; 0: the whole vocabulary (exact KL)")
    p.add_argument("--writer", choices=("agent", "commit"), default="agent",
                   help="who first writes each step's new tokens: the step's role, or a no-adapter commit")
    p.add_argument("--skip-table1", action="store_true")
    p.add_argument("--no-adapter-scale", action="store_true",
                   help="do not score the references without adapter (the KL(role || base model) scale)")
    p.add_argument("--device", help="device for Table 1 (default: cuda if available)")
    p.add_argument("--work-dir", type=Path, default=ROOT / "artifacts" / "fidelity",
                   help="server logs and the forced-A adapters")
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "fidelity.json")
    p.add_argument("--report", type=Path, help="only print the tables of this JSON (an earlier run's --out)")
    p.add_argument("server_flags", nargs=argparse.REMAINDER, help="after --: extra SGLang flags")
    return p.parse_args(argv)


def select_runs(runs: list[str] | None, sets: dict[str, dict[str, Path]]) -> list[RunSpec]:
    """The asked-for runs whose adapters were given, with their references, in RUNS order."""
    wanted = [r for r in RUNS if (runs is None or r.label in runs) and base_set(r) in sets]
    labels = {r.label for r in wanted} | {r.reference for r in wanted if r.reference}
    return [r for r in RUNS if r.label in labels]


def base_set(spec: RunSpec) -> str:
    """The trained set a run's adapters come from (forced-a is made from independent)."""
    return "independent" if spec.adapters == "forced-a" else spec.adapters


def run_one(ctx: Context, spec: RunSpec, reference: Reference | None) -> tuple[RunOutput, dict[str, Any]]:
    """One server, all episodes; the output and the server's statistics."""
    log = ctx.work_dir / (spec.label.replace("/", "_") + ".log")
    flags = server_args(ctx.model_path, ctx.sets[spec.adapters], spec, ctx.server_flags)
    with ServerProcess(flags, log_path=log) as srv:
        run = run_episodes(srv.url, ctx, reference, spec.label)
        return run, lragent_stats(srv.url)


def run_all(ctx: Context, specs: list[RunSpec], report: dict[str, Any], out: Path) -> dict[str, RunOutput]:
    """Every run in order; a run that fails is reported and the others go on."""
    done: dict[str, RunOutput] = {}
    for spec in specs:
        entry: dict[str, Any] = {"scheme": spec.scheme, "adapters": spec.adapters, "flags": list(spec.flags),
                                 "reference": spec.reference}
        report["runs"][spec.label] = entry
        if spec.reference and spec.reference not in done:
            entry["error"] = f"reference {spec.reference} did not run"
            continue
        try:
            run, entry["server_stats"] = run_one(ctx, spec, done[spec.reference].reference if spec.reference else None)
        except (ServerError, RuntimeError, requests.RequestException) as exc:
            logger.error("%s failed: %s", spec.label, exc)
            entry["error"] = (str(exc).strip().splitlines() or [repr(exc)])[-1]
            continue
        if spec.reference:
            compare(done[spec.reference].steps, run.steps, ctx.vocab)
            for step in run.steps:
                step.scored = None  # only the references' distributions are needed later
        done[spec.label] = run
        entry["all"] = aggregate(run.steps)
        entry["roles"] = {role: aggregate(run.steps, role) for role in ROLES}
        entry["steps"] = [{k: v for k, v in asdict(st).items() if k != "scored"} for st in run.steps]
        logger.info("%s: %s", spec.label, {k: entry["all"][k] for k in ("kl_mean", "top1_agreement", "gen_exact")})
        write_report(out, report)
    return done


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.report:
        print_report(json.loads(args.report.read_text()))
        return 0
    from transformers import AutoConfig, AutoTokenizer

    if args.model_path is None:
        from lragent_sglang.agents.models import smollm2_checkpoint

        args.model_path = str(smollm2_checkpoint())
    sets = {name: parse_set(pairs) for name, pairs in
            (("independent", args.adapters), ("shared-a", args.shared_a_adapters)) if pairs}
    specs = select_runs(args.runs, sets)
    if not specs:
        raise SystemExit("no runs: give --adapters and/or --shared-a-adapters")
    if any(r.adapters == "forced-a" for r in specs):
        sets["forced-a"] = force_shared_a(sets["independent"], args.work_dir / "forced-a-adapters")
    tok = AutoTokenizer.from_pretrained(args.model_path)
    vocab = AutoConfig.from_pretrained(args.model_path).vocab_size
    args.work_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.model_path, sets, [Episode(q, list(ROLES) * args.rounds) for q in QUESTIONS[: args.episodes]],
                  ChatFrame.from_tokenizer(tok, SYSTEM), tok, vocab, args.top_k or vocab, args.max_new_tokens,
                  args.writer, default_flags([f for f in args.server_flags if f != "--"]), args.work_dir,
                  adapter_scale=not args.no_adapter_scale)
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "git": git_state(),
        "argv": sys.argv[1:] if argv is None else argv, "model_path": args.model_path, "vocab": vocab,
        "top_k": ctx.top_k, "writer": args.writer, "episodes": len(ctx.episodes), "rounds": args.rounds,
        "max_new_tokens": args.max_new_tokens, "server_flags": ctx.server_flags,
        "adapters": {k: {n: str(p) for n, p in v.items()} for k, v in sets.items()},
        "checks": {f"{name} --lr-basis {basis}": check_verdict(sets[name], args.model_path, basis)
                   for name, basis in CHECKS if name in sets},
        "runs": {}, "table1": {},
    }
    done = run_all(ctx, specs, report, args.out)
    if not args.skip_table1:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        for name in ("independent", "shared-a"):
            ref = done.get(f"{name}/non-shared")
            if ref is not None:
                report["table1"][name] = table1(args.model_path, sets[name], ref.trajectories,
                                                shared_lr=name == "shared-a", device=device)
    write_report(args.out, report)
    print_report(report)
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
