"""What KV sharing costs in output quality: the pure pieces of `scripts/eval_fidelity.py`.

Sharing changes what a role sees only where it reads KV that another role (or a
no-adapter request) wrote first. The evaluation therefore replays one fixed multi-role
trajectory through every scheme's server and compares, position by position, the
next-token distributions each role assigns to the non-shared run's own generations
(teacher forcing, so positions align even after the free-running outputs diverge).

Here:
- `TopLogprobs` and `kl_per_position`: next-token KL from SGLang's top logprobs. With
  the full vocabulary returned the KL is exact; with a top-k cut it is the KL of a coarser
  distribution (each token in both top-k sets on its own, everything else in one bucket),
  which by the data-processing inequality is a lower bound of the true KL.
- agreement of greedy tokens, teacher-forced and free-running;
- `WriterTrie`: which request first wrote each token of a prompt in a cache keyed by
  tokens only, to show that the measured requests really read other roles' KV;
- `cross_role_similarity`: the paper's Table 1 on any HF + PEFT model: cosine similarity
  across roles of keys, base values `x W_v`, adapter outputs `x A_v^T B_v^T` and LR rows
  `x A_v^T`, each role running the trajectory with its own adapter;
- `force_shared_a`: independent adapters with every v_proj A replaced by the first
  adapter's, i.e. what base-lr-shared would serve if it accepted them.
"""

from __future__ import annotations

import base64
import logging
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Hashable

import numpy as np

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

SHARED_A_KEY = "v_proj.lora_A"
_ATTN_PROJ = re.compile(r"layers\.(\d+)\.self_attn\.(k_proj|v_proj)$")


@dataclass(frozen=True)
class TopLogprobs:
    """Per scored position the k most likely next tokens, most likely first."""

    logprobs: np.ndarray  # [positions, k] (float32 as served; KL is summed in float64)
    token_ids: np.ndarray  # [positions, k]

    @property
    def k(self) -> int:
        return int(self.logprobs.shape[1])

    def __len__(self) -> int:
        return int(self.logprobs.shape[0])

    def truncate(self, k: int) -> "TopLogprobs":
        """The top-k view: what a server returning only k logprobs per position gives."""
        return TopLogprobs(self.logprobs[:, :k], self.token_ids[:, :k])

    def argmax(self) -> np.ndarray:
        return self.token_ids[:, 0]


def top_logprobs_from_meta(meta: dict[str, Any]) -> TopLogprobs:
    """Prompt top logprobs of a `/generate` answer made with `return_flat_raw_top_logprobs`
    (b64 or not), without the leading null rows (positions SGLang cannot score)."""
    rows, k = meta["input_top_logprobs_shape"]
    if "input_top_logprobs_val_flat_b64" in meta:
        vals = np.frombuffer(base64.b64decode(meta["input_top_logprobs_val_flat_b64"]),
                             dtype=meta.get("input_top_logprobs_val_flat_b64_dtype", "float32"))
        ids = np.frombuffer(base64.b64decode(meta["input_top_logprobs_idx_flat_b64"]),
                            dtype=meta.get("input_top_logprobs_idx_flat_b64_dtype", "int32"))
    else:
        vals = np.asarray(meta["input_top_logprobs_val_flat"])
        ids = np.asarray(meta["input_top_logprobs_idx_flat"])
    return TopLogprobs(vals.reshape(rows, k), ids.reshape(rows, k))


def _kl_dense(ref_lp: np.ndarray, ref_ids: np.ndarray, lp: np.ndarray, ids: np.ndarray, vocab: int) -> float:
    p_lp = np.empty(vocab)
    q_lp = np.empty(vocab)
    p_lp[ref_ids] = ref_lp
    q_lp[ids] = lp
    return float(np.sum(np.exp(p_lp) * (p_lp - q_lp)))


def _kl_coarse(ref_lp: np.ndarray, ref_ids: np.ndarray, lp: np.ndarray, ids: np.ndarray) -> float:
    common, ir, io = np.intersect1d(ref_ids, ids, assume_unique=True, return_indices=True)
    p_lp, q_lp = ref_lp[ir], lp[io]
    p = np.exp(p_lp)
    kl = float(np.sum(p * (p_lp - q_lp)))
    p_rest = max(0.0, 1.0 - float(p.sum()))
    q_rest = max(0.0, 1.0 - float(np.exp(q_lp).sum()))
    if p_rest > 0.0:
        kl += p_rest * (np.log(p_rest) - np.log(max(q_rest, np.finfo(np.float64).tiny)))
    return kl


def kl_per_position(ref: TopLogprobs, other: TopLogprobs, vocab_size: int) -> np.ndarray:
    """KL(ref || other) in nats at every position.

    Exact when both hold the whole vocabulary. Otherwise the KL between the two
    distributions coarsened to {each token in both top-k sets} + {the rest}: a lower
    bound that reaches the true KL as k grows (see `truncation_gap` for checking it).
    """
    if len(ref) != len(other):
        raise ValueError(f"position counts differ: {len(ref)} vs {len(other)}")
    complete = ref.k == vocab_size and other.k == vocab_size
    out = np.empty(len(ref))
    for i in range(len(ref)):
        args = (ref.logprobs[i].astype(np.float64), ref.token_ids[i],
                other.logprobs[i].astype(np.float64), other.token_ids[i])
        out[i] = _kl_dense(*args, vocab_size) if complete else _kl_coarse(*args)
    return np.maximum(out, 0.0)


def top1_agreement(ref: TopLogprobs, other: TopLogprobs) -> np.ndarray:
    """Per position: does `other`'s most likely token equal `ref`'s (teacher-forced greedy)?"""
    return ref.argmax() == other.argmax()


def prefix_agreement(ref: Sequence[int], other: Sequence[int]) -> float:
    """Fraction of `ref`'s tokens that `other` reproduces before their first difference:
    how far a free-running greedy generation follows the reference."""
    if not ref:
        return 1.0 if not other else 0.0
    n = 0
    for a, b in zip(ref, other):
        if a != b:
            break
        n += 1
    return n / len(ref)


class WriterTrie:
    """First writer of every token in a prefix cache keyed by tokens only (what the
    sharing schemes' trees do), so a client can say whose KV a request will read.
    Eviction is not modelled: check the server's evicted counters are zero."""

    def __init__(self) -> None:
        self._root: dict[int, list] = {}  # token -> [writer, children]

    def insert(self, token_ids: Iterable[int], writer: Hashable) -> None:
        node = self._root
        for tok in token_ids:
            entry = node.get(tok)
            if entry is None:
                entry = node[tok] = [writer, {}]
            node = entry[1]

    def writers(self, token_ids: Iterable[int]) -> list[Hashable]:
        """Writers of the cached prefix of `token_ids`, one per matched token."""
        out, node = [], self._root
        for tok in token_ids:
            entry = node.get(tok)
            if entry is None:
                break
            out.append(entry[0])
            node = entry[1]
        return out


@dataclass(frozen=True)
class LayerSimilarity:
    """One layer of the Table-1 analysis: mean cosine over role pairs, tokens and kv heads
    (LR rows: over role pairs and tokens), and mean vector norms over roles."""

    layer: int
    key_cos: float
    value_base_cos: float
    adapter_out_cos: float
    value_cos: float
    lr_cos: float | None
    value_base_norm: float
    adapter_out_norm: float


def _pairwise_cos(per_role: list[torch.Tensor]) -> float:
    """Mean cosine over role pairs and leading positions of same-shaped [..., d] tensors."""
    import torch

    sims = [torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12).mean()
            for i, a in enumerate(per_role) for b in per_role[i + 1:]]
    return float(torch.stack(sims).mean())


class _Capture:
    """Forward hooks on every layer's k_proj and v_proj (and v_proj's PEFT parts): keys,
    base values, full values and the active adapter's LR rows, as the model computes them."""

    def __init__(self, model: Any) -> None:
        self.out: dict[tuple[int, str], Any] = {}
        self.handles = []
        self.adapter: str | None = None
        for name, module in model.named_modules():
            m = _ATTN_PROJ.search(name)
            if m is None:
                continue
            layer, proj = int(m.group(1)), m.group(2)
            if proj == "k_proj":
                self._hook(module, (layer, "k"))
                continue
            base = getattr(module, "base_layer", None)
            self._hook(module, (layer, "v"))
            self._hook(base if base is not None else module, (layer, "v_base"))
            for adapter, lora_a in getattr(module, "lora_A", {}).items():
                self._hook(lora_a, (layer, "lr"), adapter)

    def _hook(self, module: Any, key: tuple[int, str], adapter: str | None = None) -> None:
        def fn(_mod: Any, _inp: Any, output: Any) -> None:
            if adapter is None or adapter == self.adapter:
                self.out[key] = output.detach()
        self.handles.append(module.register_forward_hook(fn))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _role_projections(model: Any, capture: _Capture, role: str, token_ids: list[int],
                      kv_heads: int) -> dict[tuple[int, str], Any]:
    """One role's forward over the trajectory: per layer k, v_base, delta [T, H_kv, D]
    and lr [T, r] (float32, on CPU)."""
    import torch

    model.set_adapter(role)
    capture.adapter = role
    capture.out.clear()
    device = next(model.parameters()).device
    with torch.no_grad():
        model(input_ids=torch.tensor([token_ids], device=device))
    res = {}
    for (layer, kind), t in capture.out.items():
        t = t[0].float().cpu()
        res[(layer, kind)] = t if kind == "lr" else t.reshape(t.shape[0], kv_heads, -1)
    for layer in {layer for layer, _ in res}:
        res[(layer, "delta")] = res[(layer, "v")] - res[(layer, "v_base")]
    return res


def cross_role_similarity(model: Any, roles: Sequence[str], trajectories: Sequence[list[int]],
                          shared_lr: bool, progress: bool = False) -> list[LayerSimilarity]:
    """The paper's Table 1 on a PEFT model holding `roles` as named adapters: each role
    runs each trajectory with its own adapter (its own hidden states, as when it computes
    the cache itself); per layer, cosine across roles of keys (before RoPE, which rotates
    both roles' keys alike and so keeps their cosine), of base values, of adapter outputs,
    of whole values, and (when the roles share v_proj A, `shared_lr`) of LR rows."""
    from tqdm.auto import tqdm

    if len(roles) < 2:
        raise ValueError("cross-role similarity needs at least two roles")
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    capture = _Capture(model)
    sums: dict[tuple[int, str], list[float]] = {}
    try:
        for ids in tqdm(trajectories, desc="table 1", disable=not progress, leave=False):
            per_role = [_role_projections(model, capture, r, ids, kv_heads) for r in roles]
            layers = sorted({layer for layer, _ in per_role[0]})
            for layer in layers:
                kinds = {"key_cos": "k", "value_base_cos": "v_base", "adapter_out_cos": "delta", "value_cos": "v"}
                if shared_lr and (layer, "lr") in per_role[0]:
                    kinds["lr_cos"] = "lr"
                for field, kind in kinds.items():
                    sums.setdefault((layer, field), []).append(_pairwise_cos([p[(layer, kind)] for p in per_role]))
                for field, kind in (("value_base_norm", "v_base"), ("adapter_out_norm", "delta")):
                    norm = float(np.mean([float(p[(layer, kind)].norm(dim=-1).mean()) for p in per_role]))
                    sums.setdefault((layer, field), []).append(norm)
    finally:
        capture.remove()
    layers = sorted({layer for layer, _ in sums})

    def mean(layer: int, field: str) -> float | None:
        vals = sums.get((layer, field))
        return float(np.mean(vals)) if vals else None

    return [LayerSimilarity(layer, mean(layer, "key_cos"), mean(layer, "value_base_cos"),
                            mean(layer, "adapter_out_cos"), mean(layer, "value_cos"), mean(layer, "lr_cos"),
                            mean(layer, "value_base_norm"), mean(layer, "adapter_out_norm"))
            for layer in layers]


def summarize_similarity(rows: Sequence[LayerSimilarity]) -> dict[str, float | None]:
    """Layer means, as the paper's table reports, plus the base/adapter norm ratio
    (mean norm of base values over mean norm of adapter outputs)."""
    out: dict[str, float | None] = {}
    for field in ("key_cos", "value_base_cos", "adapter_out_cos", "value_cos", "lr_cos"):
        vals = [getattr(r, field) for r in rows if getattr(r, field) is not None]
        out[field] = float(np.mean(vals)) if vals else None
    base = float(np.mean([r.value_base_norm for r in rows]))
    delta = float(np.mean([r.adapter_out_norm for r in rows]))
    out["norm_ratio"] = base / delta if delta > 0 else float("inf")
    return out


def force_shared_a(adapters: dict[str, Path], out_dir: Path) -> dict[str, Path]:
    """Copies of `adapters` in `out_dir/<name>` whose v_proj lora_A tensors are all the
    first adapter's (B and the q_proj LoRA untouched): the adapters base-lr-shared would
    effectively serve if it accepted independently trained ones."""
    from safetensors.torch import load_file, save_file

    names = list(adapters)
    if not names:
        raise ValueError("no adapters to force")
    first = load_file(str(Path(adapters[names[0]]) / "adapter_model.safetensors"))
    shared = {k: v for k, v in first.items() if SHARED_A_KEY in k}
    if not shared:
        raise ValueError(f"adapter {names[0]!r} has no {SHARED_A_KEY} tensors")
    out = {}
    for name in names:
        src, dst = Path(adapters[name]), Path(out_dir) / name
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / "adapter_config.json", dst / "adapter_config.json")
        weights = load_file(str(src / "adapter_model.safetensors"))
        missing = [k for k in weights if SHARED_A_KEY in k and k not in shared]
        if missing:
            raise ValueError(f"adapter {name!r} has {SHARED_A_KEY} tensors {names[0]!r} lacks: {missing[:3]}")
        weights.update({k: v.clone() for k, v in shared.items() if k in weights})
        save_file(weights, str(dst / "adapter_model.safetensors"))
        out[name] = dst
    logger.info("forced %s's v_proj A onto %s in %s", names[0], ", ".join(names[1:]), out_dir)
    return out


@dataclass(frozen=True)
class ChatFrame:
    """Token ids of the chat template's frame, so a multi-turn trajectory can be grown by
    appending ids (generated ids go in verbatim: re-tokenizing text would change them and
    break the shared prefix)."""

    head: list[int]  # up to the first user message's content (system turn included)
    open_reply: list[int]  # end of a user turn and start of an assistant turn
    next_user: list[int]  # end of an assistant turn and start of a user turn

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, system: str) -> "ChatFrame":
        marks = ("@@USER-1@@", "@@REPLY-1@@", "@@USER-2@@")
        messages = [{"role": "system", "content": system}, {"role": "user", "content": marks[0]},
                    {"role": "assistant", "content": marks[1]}, {"role": "user", "content": marks[2]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        at = [text.index(m) for m in marks]
        head = text[:at[0]]
        open_reply = text[at[0] + len(marks[0]):at[1]]
        next_user = text[at[1] + len(marks[1]):at[2]]
        generation_prompt = text[at[2] + len(marks[2]):]
        if generation_prompt != open_reply:
            logger.warning("chat template: generation prompt %r differs from a reply's opening %r; using the "
                           "generation prompt", generation_prompt, open_reply)

        def enc(s: str) -> list[int]:
            return list(tokenizer(s, add_special_tokens=False)["input_ids"])

        return cls(enc(head), enc(generation_prompt), enc(next_user))


def paired_ratio_ci(num: Sequence[float], den: Sequence[float], n_boot: int = 2000, level: float = 0.9,
                    seed: int = 0) -> tuple[float, float, float]:
    """sum(num) / sum(den) and a paired bootstrap interval over items (steps): two runs
    scored at the same positions are compared step by step, so the interval reflects
    which steps the episodes happened to contain, not noise the pairing removes."""
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two equal, non-empty sequences, got {a.shape} and {b.shape}")
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
    sums_b = b[idx].sum(axis=1)
    ratios = np.where(sums_b > 0, a[idx].sum(axis=1) / np.where(sums_b > 0, sums_b, 1.0), np.inf)
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(a.sum() / b.sum()) if b.sum() > 0 else float("inf"), float(lo), float(hi)
