"""Launcher argument handling and adapter pre-checks (no server started here)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from lragent_sglang.adapters.io import lora_pairs
from lragent_sglang.scheme import ConfigError, LRBasis, Scheme, check_lr_basis
from lragent_sglang.server.config import LRAgentConfig
from lragent_sglang.server.launch_server import (
    build_parser, check_adapters, lragent_config, scheme_defaults, with_defaults,
)


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


def test_base_sharing_schemes_default_to_lpm_and_decode_only_graphs():
    """lpm keeps the cached fraction past the pool's capacity (BENCHMARKS.md, issue 16)."""
    for scheme in (Scheme.BASE_SHARED, Scheme.BASE_LR_SHARED):
        gpu = scheme_defaults(["--model-path", "m"], scheme, cpu=False)
        assert gpu[gpu.index("--schedule-policy") + 1] == "lpm" and "--disable-prefill-cuda-graph" in gpu
        cpu = scheme_defaults(["--schedule-policy", "fcfs"], scheme, cpu=True)
        assert cpu == ["--schedule-policy", "fcfs"], "the user's policy stays; no CUDA flag on CPU"
    for scheme in (Scheme.NON_SHARED, Scheme.FULL_SHARED):
        assert scheme_defaults(["--model-path", "m"], scheme, cpu=False) == ["--model-path", "m"]


def test_lora_pairs_accepts_every_form():
    class Ref:
        lora_name, lora_path = "c", "/c"

    assert lora_pairs(["a=/a", "/b"]) == [("a", "/a"), ("/b", "/b")]
    assert lora_pairs({"x": "/x"}) == [("x", "/x")]
    assert lora_pairs([{"lora_name": "d", "lora_path": "/d"}, Ref()]) == [("d", "/d"), ("c", "/c")]
    assert lora_pairs(None) == []


def test_scheme_flag_and_env():
    ours, rest = build_parser().parse_known_args(["--lragent-scheme", "full-shared", "--tp-size", "2"])
    assert ours.lragent_scheme == "full-shared" and rest == ["--tp-size", "2"]
    assert LRAgentConfig.from_env({"LRAGENT_SCHEME": "base-shared"}).scheme is Scheme.BASE_SHARED
    assert LRAgentConfig.from_env({}) == LRAgentConfig(Scheme.BASE_LR_SHARED, LRBasis.SHARED_A)
    with pytest.raises(ConfigError, match="everything"):
        LRAgentConfig.from_env({"LRAGENT_SCHEME": "everything"})
    with pytest.raises(ConfigError, match="non-shared"):
        Scheme.parse("nonshared")


def test_lr_basis_flag_env_and_scheme_check():
    ours, _ = build_parser().parse_known_args(["--lragent-scheme", "base-lr-shared", "--lragent-lr-basis", "joint"])
    assert ours.lragent_lr_basis == "joint"
    assert build_parser().parse_known_args([])[0].lragent_lr_basis == "shared-a"
    assert check_lr_basis(LRBasis.JOINT, Scheme.BASE_LR_SHARED) is LRBasis.JOINT
    with pytest.raises(ConfigError, match="base-lr-shared.*base-shared"):
        check_lr_basis(LRBasis.JOINT, Scheme.BASE_SHARED)
    with pytest.raises(ConfigError, match="diagonal"):
        LRAgentConfig.from_env({"LRAGENT_LR_BASIS": "diagonal"})
    with pytest.raises(ConfigError, match="joint.*non-shared"):
        LRAgentConfig.from_env({"LRAGENT_SCHEME": "non-shared", "LRAGENT_LR_BASIS": "joint"})


def test_scheme_properties_define_each_scheme():
    table = {s: (s.keys_by_adapter, s.shares_base, s.one_lr_cache) for s in Scheme}
    assert table == {
        Scheme.NON_SHARED: (True, False, False),
        Scheme.FULL_SHARED: (False, False, False),
        Scheme.BASE_SHARED: (False, True, False),
        Scheme.BASE_LR_SHARED: (False, True, True),
    }


def launcher_error(capsys, fn, *args) -> str:
    """The one-line message of a launcher step that must exit with status 2."""
    with pytest.raises(SystemExit) as exc:
        fn(*args)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_joint_basis_with_another_scheme_is_refused(capsys, monkeypatch):
    monkeypatch.delenv("LRAGENT_SCHEME", raising=False)
    parser = build_parser()
    ours, _ = parser.parse_known_args(["--lragent-scheme", "non-shared", "--lragent-lr-basis", "joint"])
    msg = launcher_error(capsys, lragent_config, parser, ours)
    assert "--lragent-lr-basis joint" in msg and "non-shared" in msg
    assert "LRAGENT_SCHEME" not in os.environ


@pytest.fixture(scope="module")
def independent(smollm2, tmp_path_factory):
    from lragent_sglang.adapters.make import make_role_adapters

    return make_role_adapters(smollm2, tmp_path_factory.mktemp("ind"), roles=("plan", "action"))


def server_args(smollm2, adapters: dict | None) -> SimpleNamespace:
    paths = [f"{r}={p}" for r, p in adapters.items()] if adapters else None
    return SimpleNamespace(lora_paths=paths, model_path=str(smollm2), max_lora_rank=None)


def resolved_server_args(smollm2, adapters: dict) -> object:
    """SGLang's own ServerArgs as the launcher holds them when it checks the adapters."""
    from sglang.srt.server_args import prepare_server_args

    return prepare_server_args(["--model-path", str(smollm2), "--device", "cpu", "--enable-lora",
                                "--lora-paths", *[f"{r}={p}" for r, p in adapters.items()]])


def test_shared_a_default_refuses_independent_adapters_and_suggests_joint(capsys, smollm2, independent):
    parser = build_parser()
    shared_a = LRAgentConfig(Scheme.BASE_LR_SHARED)
    msg = launcher_error(capsys, check_adapters, parser, shared_a, server_args(smollm2, independent))
    assert "'plan'" in msg and "'action'" in msg and "v_proj A" in msg and "--lragent-lr-basis joint" in msg
    joint = LRAgentConfig(Scheme.BASE_LR_SHARED, LRBasis.JOINT)
    args = resolved_server_args(smollm2, independent)  # read-only after resolution, as in the launcher
    check_adapters(parser, joint, args)
    assert args.max_lora_rank == 8
    msg = launcher_error(capsys, check_adapters, parser, joint, server_args(smollm2, None))
    assert "--lragent-lr-basis joint" in msg and "--lora-paths" in msg


def test_launcher_refuses_adapters_sglang_would_serve_differently(capsys, smollm2, tmp_path):
    from lragent_sglang.adapters.make import make_role_adapters

    path = make_role_adapters(smollm2, tmp_path, roles=("rs",))["rs"]
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    msg = launcher_error(capsys, check_adapters, build_parser(), LRAgentConfig(Scheme.NON_SHARED),
                         server_args(smollm2, {"rs": path}))
    assert "'rs'" in msg and "rsLoRA" in msg
