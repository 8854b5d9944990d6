"""The hostile-client guards without a server (issues 17 and 20): request validation,
the body limit middleware, the LoRA usage ledger and the runtime adapter checks, on
SGLang's real request and registry classes. Seconds."""

from __future__ import annotations

import asyncio
import json
import os
import pkgutil
from types import SimpleNamespace

import pytest
from sglang.srt.lora.lora_registry import LoRARef, LoRARegistry
from sglang.srt.managers.io_struct import GenerateReqInput, LoadLoRAAdapterReqInput

from lragent_sglang.scheme import ConfigError, Scheme
from lragent_sglang.server import body_limit, guards, lora_usage, patches
from lragent_sglang.server.config import LRAgentConfig
from lragent_sglang.server.launch_server import build_parser, lragent_config
from lragent_sglang.server.runtime import LRAgentRuntime

VOCAB, CONTEXT, HIDDEN = 49152, 8192, 576
SELECTED = SimpleNamespace(attention_backend="lragent", radix_cache_backend="lragent", enable_lora=True)


def check(**fields) -> str | None:
    """The guard's one-line refusal of a /generate body, or None."""
    try:
        guards.check_request(GenerateReqInput(**fields), VOCAB, CONTEXT, HIDDEN)
    except guards.BadRequest as exc:
        assert "\n" not in str(exc)
        return str(exc)
    return None


@pytest.mark.parametrize("fields, needles", [
    ({"input_ids": [999999999]}, ["input_ids[0] = 999999999", "[0, 49152)"]),
    ({"input_ids": [-1]}, ["input_ids[0] = -1"]),
    ({"input_ids": [5, VOCAB]}, ["input_ids[1] = 49152"]),
    ({"input_ids": [[1, 2], [3, VOCAB]]}, ["input_ids[1][1] = 49152"]),
    ({"input_ids": [[1, 2], []]}, ["input_ids[1]", "non-empty"]),
    ({"input_embeds": [[0.5] * 3]}, ["input_embeds", "576"]),
    ({"input_embeds": [[0.5] * HIDDEN] * CONTEXT}, ["input_embeds has 8192 rows", "context length"]),
    ({"text": "hi", "lora_path": ["plan"]}, ["lora_path", "single prompt"]),
    ({"text": "hi", "lora_path": ["plan", "action"]}, ["lora_path", "single prompt"]),
    ({"text": ["a", "b"], "lora_path": ["plan"]}, ["lora_path has 1 entries for 2 prompts"]),
    ({"text": "hi", "sampling_params": {"temperature": "hot"}}, ["sampling_params.temperature must be float"]),
    ({"text": "hi", "sampling_params": {"max_new_tokens": "ten"}}, ["sampling_params.max_new_tokens must be int"]),
    ({"text": "hi", "sampling_params": {"max_new_tokens": 3.7}}, ["sampling_params.max_new_tokens must be int",
                                                                  "got float"]),
    ({"text": "hi", "sampling_params": {"top_p": [1]}}, ["sampling_params.top_p must be float", "got array"]),
    ({"text": "hi", "sampling_params": {"stop": 5}}, ["sampling_params.stop must be str | array", "got int"]),
    ({"text": "hi", "sampling_params": {"stop": ["a", 5]}}, ["sampling_params.stop[1] must be str"]),
    ({"text": "hi", "sampling_params": {"tempreature": 0}}, ["sampling_params has an unknown field 'tempreature'"]),
    ({"text": "hi", "sampling_params": {"is_normalized": True}}, ["unknown field 'is_normalized'"]),
    ({"text": "hi", "sampling_params": {"n": "two"}}, ["sampling_params.n must be int"]),
    ({"text": ["a", "b"], "sampling_params": [{}, {"top_k": 1.5}]}, ["sampling_params[1].top_k must be int"]),
    ({"text": ["a", "b"], "sampling_params": [{}]}, ["sampling_params has 1 entries for 2 prompts"]),
    ({"text": "hi", "sampling_params": [{}]}, ["sampling_params must be one object"]),
    ({"text": "hi", "sampling_params": {"stop_token_ids": [2, 60000]}}, ["stop_token_ids[1] = 60000"]),
    ({"text": "hi", "sampling_params": {"logit_bias": {"-3": 1.0}}}, ["logit_bias key '-3'"]),
])
def test_bad_requests_are_one_line_naming_the_field(fields, needles):
    message = check(**fields)
    assert message is not None
    for needle in needles:
        assert needle in message


@pytest.mark.parametrize("fields", [
    {"text": "hi", "lora_path": "plan", "sampling_params": {"max_new_tokens": 4, "temperature": 0}},
    {"input_ids": [0, 5, VOCAB - 1], "lora_path": None},
    {"input_ids": [[1, 2], [3]], "lora_path": ["plan", None], "sampling_params": [{"n": 1}, {"stop": ["x"]}]},
    {"text": ["a", "b"], "lora_path": "plan", "sampling_params": {"stop_token_ids": [2], "logit_bias": {"7": -1}}},
    # SGLang's OpenAI layer sends nulls for unset parameters
    {"text": "hi", "sampling_params": {"temperature": None, "top_k": None, "min_p": None, "json_schema": None,
                                       "custom_params": {"k": [1, "x"]}, "max_new_tokens": None}},
    {"input_embeds": [[0.5] * HIDDEN] * 3},
    {"input_embeds": [[[0.5] * HIDDEN] * 3, [[0.1] * HIDDEN]]},
])
def test_good_requests_pass(fields):
    assert check(**fields) is None


def test_validate_request_acts_only_with_our_backends():
    tm = SimpleNamespace(server_args=SELECTED, context_len=CONTEXT, lora_ref_cache={"plan": None},
                         model_config=SimpleNamespace(vocab_size=VOCAB, hidden_size=HIDDEN))
    with pytest.raises(ValueError, match="input_ids"):  # SGLang answers a ValueError with 400
        guards.validate_request(tm, GenerateReqInput(input_ids=[VOCAB]))
    guards.validate_request(tm, GenerateReqInput(input_ids=[[1], [2]], lora_path=["plan", None]))
    with pytest.raises(ValueError, match=r"^lora_path 'act' is not a loaded adapter \(loaded: plan\)$"):
        guards.validate_request(tm, GenerateReqInput(input_ids=[[1], [2]], lora_path=[None, "act"]))
    tm.server_args = SimpleNamespace(attention_backend="triton", radix_cache_backend=None)
    guards.validate_request(tm, GenerateReqInput(input_ids=[VOCAB]))


def test_explicit_unload_forgets_the_adapter_unless_it_fails():
    ref = LoRARef(lora_name="plan", lora_path="/p")

    async def unload(tm, obj, success):
        assert "plan" not in tm.lora_ref_cache  # forgotten before the unload starts
        return SimpleNamespace(success=success)

    for success, kept in ((True, False), (False, True)):
        tm = SimpleNamespace(server_args=SELECTED, lora_ref_cache={"plan": ref})
        obj = SimpleNamespace(lora_name="plan")
        assert asyncio.run(guards.forget_on_unload(unload, tm, obj, success)).success is success
        assert ("plan" in tm.lora_ref_cache) is kept


# ---- the body limit ----------------------------------------------------------------------


def run_asgi(limit_mb: float, headers: dict[bytes, bytes], chunks: list[bytes]) -> tuple[int, bytes, bytes | None]:
    """(status, response body, the body the app read or None if it was not called)."""
    seen: list[bytes] = []

    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "headers": list(headers.items())}
    asyncio.run(body_limit.BodyLimit(app, limit_mb)(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), seen[0] if seen else None


def test_body_limit_refuses_by_content_length_without_reading():
    status, body, read = run_asgi(1, {b"content-length": str(50 << 20).encode()}, [b"x" * 10])
    assert status == 413 and read is None
    message = json.loads(body)["error"]["message"]
    assert "above this server's limit of 1 MiB" in message and "--lragent-max-body-mb" in message
    assert "LRAGENT_MAX_BODY_MB" in message


def test_body_limit_passes_smaller_bodies_and_counts_chunked_ones():
    assert run_asgi(1, {b"content-length": b"3"}, [b"abc"]) == (200, b"ok", b"abc")
    chunked = {b"transfer-encoding": b"chunked"}
    assert run_asgi(1, chunked, [b"a" * 1000, b"b" * 1000]) == (200, b"ok", b"a" * 1000 + b"b" * 1000)
    status, _, read = run_asgi(0.001, chunked, [b"a" * 1000, b"b" * 1000, b"c"])
    assert status == 413 and read is None


def test_body_limit_setting(monkeypatch):
    assert LRAgentConfig.from_env({}).max_body_mb == 8.0
    assert LRAgentConfig.from_env({"LRAGENT_MAX_BODY_MB": "64"}).max_body_mb == 64.0
    for bad in ("0", "-1", "lots", "inf"):
        with pytest.raises(ConfigError, match="LRAGENT_MAX_BODY_MB"):
            LRAgentConfig.from_env({"LRAGENT_MAX_BODY_MB": bad})
    monkeypatch.setenv("LRAGENT_MAX_BODY_MB", "8")
    parser = build_parser()
    config = lragent_config(parser, parser.parse_known_args(["--lragent-max-body-mb", "0.5"])[0])
    assert config.max_body_mb == 0.5
    assert os.environ["LRAGENT_MAX_BODY_MB"] == "0.5"  # SGLang's processes read it from there


# ---- the LoRA usage ledger ---------------------------------------------------------------


@pytest.fixture
def hooked_release(monkeypatch):
    """`LoRARegistry.release` wrapped as SGLang's HookRegistry wraps it in the server."""
    from sglang.srt.plugins.hook_registry import HookType, _wrap_fn

    wrapped = _wrap_fn(LoRARegistry.release, lora_usage.skip_stock_release, HookType.AROUND)
    monkeypatch.setattr(LoRARegistry, "release", wrapped)


class FakeTokenizerManager:
    """The parts of SGLang's TokenizerManager the ledger reads, with a real LoRARegistry."""

    def __init__(self) -> None:
        self.server_args = SELECTED
        self.lora_registry = LoRARegistry([LoRARef(lora_id="id-plan", lora_name="plan", lora_path="/p")])
        self.child_rid_to_logical_rid: dict[str, str] = {}

    def count(self) -> int:
        return self.lora_registry._counters["id-plan"].value()


async def _acquire(tm: FakeTokenizerManager, rid, lora_path) -> None:
    obj = SimpleNamespace(rid=rid, lora_path=lora_path, lora_id=None)

    async def resolve(tm, obj):
        obj.lora_id = await tm.lora_registry.acquire(obj.lora_path)

    await lora_usage.track_acquire(resolve, tm, obj)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _output(*rids: str, finished: bool = True) -> SimpleNamespace:
    return SimpleNamespace(rids=list(rids), finished_reasons=[{"type": "stop"} if finished else None] * len(rids))


def test_ledger_releases_a_disconnected_request_when_the_scheduler_is_done(hooked_release):
    async def scenario():
        tm = FakeTokenizerManager()
        await _acquire(tm, "r1", "plan")
        lora_usage.track_send_one(None, tm, SimpleNamespace(rid="r1"))
        lora_usage.track_state_removed(object(), tm, "r1")  # the client went away: state dropped
        await _settle()
        assert tm.count() == 1  # still running in the scheduler
        lora_usage.track_outputs(tm, _output("r1", finished=False))
        await _settle()
        assert tm.count() == 1
        lora_usage.track_outputs(tm, _output("r1"))  # "state was deleted": SGLang released nothing
        await _settle()
        assert tm.count() == 0
        await tm.lora_registry.unregister("plan")  # what /unload_lora_adapter waits for
        await asyncio.wait_for(tm.lora_registry.wait_for_unload("id-plan"), 1)

    asyncio.run(scenario())


def test_ledger_releases_once_and_skips_sglangs_own_releases(hooked_release):
    async def scenario():
        tm = FakeTokenizerManager()
        # finished normally: SGLang releases (skipped), the ledger releases once
        await _acquire(tm, "r1", "plan")
        lora_usage.track_send_one(None, tm, SimpleNamespace(rid="r1"))
        lora_usage.track_outputs(tm, _output("r1"))
        lora_usage.track_state_removed(object(), tm, "r1")
        await tm.lora_registry.release("id-plan")
        await tm.lora_registry.release("id-plan")  # the 500/503 abort path releases again
        await _settle()
        assert tm.count() == 0
        # dropped from the waiting queue (abort echo): SGLang never releases
        await _acquire(tm, "r2", "plan")
        lora_usage.track_send_one(None, tm, SimpleNamespace(rid="r2"))
        lora_usage.track_abort(tm, SimpleNamespace(rid="r2"))
        lora_usage.track_state_removed(object(), tm, "r2")
        await _settle()
        assert tm.count() == 0
        # refused after the acquire, never sent
        await _acquire(tm, "r3", "plan")
        lora_usage.track_state_removed(None, tm, "r3")  # nothing removed: no release
        await _settle()
        assert tm.count() == 1
        lora_usage.track_state_removed(object(), tm, "r3")
        await _settle()
        assert tm.count() == 0

    asyncio.run(scenario())


def test_ledger_holds_a_parallel_sampling_request_until_every_child_is_done(hooked_release):
    async def scenario():
        tm = FakeTokenizerManager()
        await _acquire(tm, ["a", "b"], ["plan", None])
        for child in ("a_1", "a_2"):
            tm.child_rid_to_logical_rid[child] = "a"
        lora_usage.track_send_batch(None, tm, [SimpleNamespace(rid="a_1"), SimpleNamespace(rid="a_2"),
                                               SimpleNamespace(rid="b")])
        lora_usage.track_state_removed(object(), tm, "a")  # the logical state goes after expansion
        lora_usage.track_outputs(tm, _output("a_1", "b"))
        await _settle()
        assert tm.count() == 1
        lora_usage.track_outputs(tm, _output("a_2"))
        await _settle()
        assert tm.count() == 0

    asyncio.run(scenario())


def test_ledger_stays_out_without_our_backends():
    tm = FakeTokenizerManager()
    tm.server_args = SimpleNamespace(attention_backend="triton", radix_cache_backend=None, enable_lora=True)
    assert lora_usage.usage(tm) is None
    assert not getattr(tm.lora_registry, "lragent_owned", False)


# ---- runtime adapter loads ---------------------------------------------------------------


def _load(rt, smollm2, name, path) -> tuple[object, bool]:
    called = []

    async def original(tm, obj, *args):
        called.append(obj.lora_name)
        return "loaded"

    tm = SimpleNamespace(server_args=SimpleNamespace(**vars(SELECTED), model_path=str(smollm2), max_lora_rank=8))
    out = asyncio.run(guards.check_adapter_load(rt, original, tm, LoadLoRAAdapterReqInput(lora_name=name,
                                                                                          lora_path=str(path))))
    return out, bool(called)


def test_runtime_load_of_a_missing_folder_names_it(smollm2, tmp_path):
    out, called = _load(LRAgentRuntime(LRAgentConfig()), smollm2, "ghost", tmp_path / "nowhere")
    assert not called and not out.success
    assert "'ghost'" in out.error_message and "does not exist" in out.error_message


def test_runtime_load_follows_the_scheme_rules(smollm2, tmp_path):
    from lragent_sglang.adapters.make import make_role_adapters

    path = make_role_adapters(smollm2, tmp_path, roles=("keys",), target_modules=("q_proj", "k_proj"))["keys"]
    out, called = _load(LRAgentRuntime(LRAgentConfig(Scheme.BASE_SHARED)), smollm2, "keys", path)
    assert not called and "'keys'" in out.error_message and "k_proj" in out.error_message
    assert _load(LRAgentRuntime(LRAgentConfig(Scheme.NON_SHARED)), smollm2, "keys", path) == ("loaded", True)


# ---- the patch rows ----------------------------------------------------------------------


def test_guard_rows_exist_in_this_sglang_and_apply_to_every_scheme():
    for scheme in Scheme:
        rt = LRAgentRuntime(LRAgentConfig(scheme))
        rows = patches.request_guard_patches(rt)
        assert all(row.when(rt.config) for row in rows)
        for row in rows:
            assert callable(pkgutil.resolve_name(row.target)), row.target
            assert row.kind in ("before", "after", "around") and row.why
