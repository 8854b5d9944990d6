"""Launcher argument handling (no server started here)."""

from __future__ import annotations

import pytest

from lragent_sglang.config import ConfigError, check_scheme, scheme_from_env
from lragent_sglang.adapter_check import lora_pairs
from lragent_sglang.launch_server import build_parser, with_defaults


def test_with_defaults_selects_our_backends_and_keeps_user_values():
    argv = with_defaults(["--model-path", "m", "--device=cpu", "--max-total-tokens", "99"], cpu=True)
    assert argv[argv.index("--attention-backend") + 1] == "lragent"
    assert argv[argv.index("--radix-cache-backend") + 1] == "lragent"
    assert argv.count("--device=cpu") == 1 and "--device" not in argv
    assert argv[argv.index("--max-total-tokens") + 1] == "99"
    assert argv.count("--max-total-tokens") == 1
    assert "--sleep-on-idle" in argv


def test_with_defaults_on_gpu_adds_no_cpu_flags():
    argv = with_defaults(["--model-path", "m", "--attention-backend", "triton"], cpu=False)
    assert "--device" not in argv and "--lora-backend" not in argv
    assert argv[argv.index("--attention-backend") + 1] == "triton"


def test_lora_pairs_accepts_every_form():
    class Ref:
        lora_name, lora_path = "c", "/c"

    assert lora_pairs(["a=/a", "/b"]) == [("a", "/a"), ("/b", "/b")]
    assert lora_pairs({"x": "/x"}) == [("x", "/x")]
    assert lora_pairs([{"lora_name": "d", "lora_path": "/d"}, Ref()]) == [("d", "/d"), ("c", "/c")]
    assert lora_pairs(None) == []


def test_scheme_flag_and_env(monkeypatch):
    ours, rest = build_parser().parse_known_args(["--lragent-scheme", "full-shared", "--tp-size", "2"])
    assert ours.lragent_scheme == "full-shared" and rest == ["--tp-size", "2"]
    monkeypatch.setenv("LRAGENT_SCHEME", "base-shared")
    assert scheme_from_env() == "base-shared"
    monkeypatch.setenv("LRAGENT_SCHEME", "everything")
    with pytest.raises(ConfigError, match="everything"):
        scheme_from_env()
    with pytest.raises(ConfigError, match="non-shared"):
        check_scheme("nonshared")
