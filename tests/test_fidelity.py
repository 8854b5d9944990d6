"""The pure pieces of the fidelity evaluation (lragent_sglang/fidelity.py and the episode
builder of scripts/eval_fidelity.py): KL from top logprobs, agreement, the first-writer
trie, the Table-1 cosine analysis on a tiny random Llama with PEFT adapters, forcing a
shared v_proj A. No server and no training; the `slow` test at the end runs the script
end to end on tiny settings."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import eval_fidelity
import numpy as np
import pytest
import torch

from lragent_sglang.eval.fidelity import (
    ChatFrame,
    TopLogprobs,
    WriterTrie,
    cross_role_similarity,
    force_shared_a,
    kl_per_position,
    prefix_agreement,
    summarize_similarity,
    top1_agreement,
    top_logprobs_from_meta,
)

VOCAB = 50


def random_logprobs(rng: np.random.Generator, n: int, scale: float = 3.0) -> np.ndarray:
    logits = rng.normal(size=(n, VOCAB)) * scale
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def as_top(lp: np.ndarray, k: int = VOCAB) -> TopLogprobs:
    """What SGLang returns: per row the k best tokens, most likely first."""
    order = np.argsort(-lp, axis=1)[:, :k]
    return TopLogprobs(np.take_along_axis(lp, order, axis=1), order)


def dense_kl(p_lp: np.ndarray, q_lp: np.ndarray) -> np.ndarray:
    return (np.exp(p_lp) * (p_lp - q_lp)).sum(axis=1)


def test_top_logprobs_from_meta_reads_b64_and_plain():
    vals = np.array([[-0.1, -2.5], [-0.7, -0.9]], dtype=np.float32)
    ids = np.array([[4, 9], [1, 3]], dtype=np.int32)
    b64 = {"input_top_logprobs_shape": [2, 2], "input_top_logprobs_null_prefix": 1,
           "input_top_logprobs_val_flat_b64": base64.b64encode(vals.tobytes()).decode(),
           "input_top_logprobs_idx_flat_b64": base64.b64encode(ids.tobytes()).decode(),
           "input_top_logprobs_val_flat_b64_dtype": "float32", "input_top_logprobs_idx_flat_b64_dtype": "int32"}
    plain = {"input_top_logprobs_shape": [2, 2], "input_top_logprobs_null_prefix": 1,
             "input_top_logprobs_val_flat": vals.ravel().tolist(), "input_top_logprobs_idx_flat": ids.ravel().tolist()}
    for meta in (b64, plain):
        top = top_logprobs_from_meta(meta)
        np.testing.assert_allclose(top.logprobs, vals)
        np.testing.assert_array_equal(top.token_ids, ids)
        assert top.argmax().tolist() == [4, 1]


def test_kl_with_the_whole_vocabulary_is_exact():
    rng = np.random.default_rng(0)
    p, q = random_logprobs(rng, 6), random_logprobs(rng, 6)
    got = kl_per_position(as_top(p), as_top(q), VOCAB)
    np.testing.assert_allclose(got, dense_kl(p, q), rtol=1e-10)
    assert (got > 0).all()
    np.testing.assert_allclose(kl_per_position(as_top(p), as_top(p), VOCAB), 0.0, atol=1e-15)


def test_top_k_kl_is_a_lower_bound_that_grows_to_the_exact_value():
    rng = np.random.default_rng(1)
    p, q = random_logprobs(rng, 8), random_logprobs(rng, 8)
    exact = dense_kl(p, q)
    previous = np.zeros(8)
    for k in (1, 3, 10, 30, VOCAB - 1):
        coarse = kl_per_position(as_top(p, k), as_top(q, k), VOCAB)
        assert (coarse <= exact + 1e-12).all(), k
        assert (coarse >= previous - 1e-12).all(), k  # a finer partition never lowers the KL
        previous = coarse
    np.testing.assert_allclose(kl_per_position(as_top(p).truncate(VOCAB), as_top(q), VOCAB), exact, rtol=1e-10)


def test_top_k_kl_is_the_kl_of_the_bucketed_distributions():
    """Top 2 shared, the rest in one bucket: a change inside the tail is invisible, a change
    of the tail's total mass is counted exactly."""
    head = np.log([0.3, 0.2])
    tail = np.full(VOCAB - 2, 0.5 / (VOCAB - 2))
    p = np.concatenate([head, np.log(tail)])[None]
    reshuffled = tail.copy()
    reshuffled[:10] *= 1.5
    reshuffled[10:20] *= 0.5
    q_same_mass = np.concatenate([head, np.log(reshuffled)])[None]
    assert kl_per_position(as_top(p, 2), as_top(p, 2), VOCAB)[0] == pytest.approx(0.0, abs=1e-12)
    assert kl_per_position(as_top(p, 2), as_top(q_same_mass, 2), VOCAB)[0] == pytest.approx(0.0, abs=1e-12)
    assert dense_kl(p, q_same_mass)[0] > 1e-3
    q_head = np.log([0.4, 0.3])
    q = np.concatenate([q_head, np.log(tail * 0.3 / 0.5)])[None]
    expected = 0.3 * np.log(0.3 / 0.4) + 0.2 * np.log(0.2 / 0.3) + 0.5 * np.log(0.5 / 0.3)
    assert kl_per_position(as_top(p, 2), as_top(q, 2), VOCAB)[0] == pytest.approx(expected, rel=1e-9)


def test_kl_refuses_misaligned_positions():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError):
        kl_per_position(as_top(random_logprobs(rng, 3)), as_top(random_logprobs(rng, 4)), VOCAB)


def test_agreement():
    rng = np.random.default_rng(4)
    p = random_logprobs(rng, 5)
    q = p.copy()
    q[2] = p[2][::-1]  # a different argmax at position 2
    assert top1_agreement(as_top(p), as_top(q)).tolist() == [True, True, False, True, True]
    assert prefix_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert prefix_agreement([1, 2], [1, 2, 3]) == 1.0
    assert prefix_agreement([1, 2], []) == 0.0
    assert prefix_agreement([], []) == 1.0


def test_writer_trie_keeps_the_first_writer():
    trie = WriterTrie()
    trie.insert([1, 2, 3], "plan")
    trie.insert([1, 2, 3, 4, 5], "action")
    trie.insert([1, 2, 7], None)
    assert trie.writers([1, 2, 3, 4, 5, 6]) == ["plan", "plan", "plan", "action", "action"]
    assert trie.writers([1, 2, 7, 8]) == ["plan", "plan", None]
    assert trie.writers([9]) == []


# ---------------------------------------------------------------- Table 1 on a tiny model


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def tiny_adapters(tmp_path: Path, names: list[str], seed: int, same: bool = False) -> dict[str, Path]:
    """Random q/v LoRA adapters (B non-zero) saved as PEFT folders; `same`: identical weights."""
    from peft import LoraConfig, get_peft_model

    out = {}
    for i, name in enumerate(names):
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        gen = torch.Generator().manual_seed(seed if same else seed + i)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_" in pname:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        model.save_pretrained(tmp_path / name)
        out[name] = tmp_path / name
    return out


def peft_roles(adapters: dict[str, Path]):
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(tiny_llama(), str(adapters[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(adapters[n]), adapter_name=n)
    return model.eval()


TRAJ = [[3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 38, 4, 6]]


def test_identical_adapters_agree_everywhere(tmp_path):
    model = peft_roles(tiny_adapters(tmp_path, ["a", "b"], seed=5, same=True))
    rows = cross_role_similarity(model, ["a", "b"], TRAJ, shared_lr=True)
    assert len(rows) == 3
    for r in rows:
        for v in (r.key_cos, r.value_base_cos, r.adapter_out_cos, r.value_cos, r.lr_cos):
            assert v == pytest.approx(1.0, abs=1e-5)


def test_independent_adapters_differ_in_the_adapter_part_only_where_expected(tmp_path):
    model = peft_roles(tiny_adapters(tmp_path, ["a", "b", "c"], seed=6))
    rows = cross_role_similarity(model, ["a", "b", "c"], TRAJ * 2, shared_lr=False)
    first = rows[0]
    # Layer 0 reads the embeddings, the same for every role, and k_proj has no LoRA.
    assert first.key_cos == pytest.approx(1.0, abs=1e-5)
    assert first.value_base_cos == pytest.approx(1.0, abs=1e-5)
    assert first.lr_cos is None
    # Independent random B A: adapter outputs far from aligned, base parts close.
    assert all(abs(r.adapter_out_cos) < 0.5 for r in rows)
    assert all(r.value_base_cos > r.adapter_out_cos for r in rows)
    later = rows[-1]
    assert later.key_cos < 1.0 - 1e-6  # the q/v LoRA of earlier layers moved the hidden states
    summary = summarize_similarity(rows)
    assert summary["norm_ratio"] == pytest.approx(
        np.mean([r.value_base_norm for r in rows]) / np.mean([r.adapter_out_norm for r in rows]))
    assert summary["lr_cos"] is None


def test_forced_shared_a_copies_the_first_a_only(tmp_path):
    from safetensors.torch import load_file

    src = tiny_adapters(tmp_path / "src", ["a", "b"], seed=7)
    forced = force_shared_a(src, tmp_path / "forced")
    w = {n: load_file(str(p / "adapter_model.safetensors")) for n, p in src.items()}
    f = {n: load_file(str(p / "adapter_model.safetensors")) for n, p in forced.items()}
    keys = list(w["b"])
    assert any("v_proj.lora_A" in k for k in keys)
    for k in keys:
        expected = w["a"][k] if "v_proj.lora_A" in k else w["b"][k]
        assert torch.equal(f["b"][k], expected), k
        assert torch.equal(f["a"][k], w["a"][k]), k
    assert json.loads((forced["b"] / "adapter_config.json").read_text())["r"] == 4
    model = peft_roles(forced)
    rows = cross_role_similarity(model, ["a", "b"], TRAJ, shared_lr=True)
    assert rows[0].lr_cos == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- episodes


class FakeTokenizer:
    """One token per character; a ChatML-like template."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False) -> str:
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def test_chat_frame_rebuilds_the_template():
    tok = FakeTokenizer()
    frame = ChatFrame.from_tokenizer(tok, "S")
    ids = frame.head + tok("U")["input_ids"] + frame.open_reply + tok("A")["input_ids"] + frame.next_user
    assert tok.decode(ids) == "<system>S</><user>U</><assistant>A</><user>"
    assert tok.decode(frame.open_reply) == "</><assistant>"


def test_episode_prompts_grow_by_appending_the_reference_generations():
    tok = FakeTokenizer()
    frame = ChatFrame.from_tokenizer(tok, "S")
    ep = eval_fidelity.Episode("What is 6 * 7?", ["plan", "action", "reflect", "plan"])
    gens = {"plan": "use the calculator", "action": "TOOL: calculator(6 * 7)", "reflect": "yes"}
    continued, prompts = [], []
    stop = 0
    for role, prompt in eval_fidelity.episode_requests(ep, frame, tok, eval_fidelity.Toolbox(), continued):
        prompts.append(prompt)
        continued.append((tok(gens[role])["input_ids"] + [stop], {"type": "stop", "matched": stop}))
    assert len(prompts) == 4
    for before, after, (gen, finish) in zip(prompts, prompts[1:], continued):
        assert after[: len(before)] == before
        assert after[len(before): len(before) + len(gen) - 1] == gen[:-1]  # the stop token is dropped
    assert "calculator(6 * 7) -> 42" in tok.decode(prompts[2])


@pytest.mark.slow
@pytest.mark.e2e
def test_script_end_to_end_on_tiny_settings(smollm2, role_adapters, tmp_path):
    """Reference and base-shared on one short episode, plus Table 1: the script runs, the
    later roles read KV the plan role wrote, and a role that reads nobody else's KV
    matches non-shared to rounding."""
    pairs = [f"{n}={p}" for n, p in role_adapters.items()]
    out = tmp_path / "fidelity.json"
    rc = eval_fidelity.main(["--model-path", str(smollm2), "--adapters", *pairs, "--runs", "independent/base-shared",
                  "--episodes", "1", "--rounds", "1", "--max-new-tokens", "4", "--work-dir", str(tmp_path),
                  "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    run = report["runs"]["independent/base-shared"]
    assert run["all"]["cross_tokens"] > 0
    stats = run["server_stats"]["per_adapter"]
    assert sum(v["lr_reprefill_tokens"] for v in stats.values()) == run["all"]["cross_tokens"]
    assert run["all"]["kl_mean_own_steps"] < 1e-5
    assert 0.0 <= run["all"]["top1_agreement"] <= 1.0
    assert report["checks"]["independent --lr-basis shared-a"]["exit_code"] == 1  # independent v_proj A
    assert report["checks"]["independent --lr-basis joint"]["exit_code"] == 0
    assert report["table1"]["independent"]["mean"]["key_cos"] > 0.5


def test_paired_ratio_ci():
    from lragent_sglang.eval.fidelity import paired_ratio_ci

    ratio, lo, hi = paired_ratio_ci([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert (ratio, lo, hi) == pytest.approx((2.0, 2.0, 2.0))  # a constant ratio has no spread
    rng = np.random.default_rng(0)
    den = rng.exponential(size=40)
    ratio, lo, hi = paired_ratio_ci(den * rng.uniform(0.5, 1.5, size=40), den)
    assert lo < ratio < hi and lo < 1.0 < hi
    with pytest.raises(ValueError):
        paired_ratio_ci([1.0], [1.0, 2.0])
