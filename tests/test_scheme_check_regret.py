"""The GPU scheme check's bf16 verdict (`device_scheme_check.py --hf-regret`), on CPU with
stand-in runs on the tiny Gemma-2, whose near-ties flip even between transformers' own bf16
and float32 runs: a run with float32's tokens passes, a run whose every role answered with
another role's adapter fails, and the control (transformers' bf16 run) sits between."""

from __future__ import annotations

import pytest

import device_scheme_check as check
from lragent_sglang.adapters.make import make_role_adapters
from make_tiny_model import hf_greedy_ids, write_tiny_model

pytestmark = pytest.mark.slow

NEW = 12
WRONG = {"plan": "action", "action": "plan", "none": "plan"}


def test_regret_passes_the_right_adapter_and_fails_the_wrong_one(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(check, "NEW_TOKENS", NEW)
    model = write_tiny_model("gemma2", tmp_path / "gemma2")
    adapters = make_role_adapters(model, tmp_path / "adapters", shared_v_a=True)
    prompts = check.families()

    def run(role_of: dict[str, str]) -> dict[str, list[check.Output]]:
        return {role: [(ids, []) for ids in hf_greedy_ids(model, adapters.get(role_of[role]), chain, NEW)]
                for role, chain in prompts.items()}

    outputs = {"base-lr-shared": run({r: r for r in prompts}), "non-shared": run(WRONG)}
    report = check.regret_report(model, adapters, prompts, outputs)

    right, wrong, control = report["base-lr-shared"], report["non-shared"], report[check.CONTROL]
    assert right["tokens"] == wrong["tokens"] == control["tokens"] == 6 * NEW
    assert right["mean"] < 1e-3 and right["ok"]
    assert not wrong["ok"] and wrong["mean"] > 4 * control["mean"] > 0
    assert control["ok"]
