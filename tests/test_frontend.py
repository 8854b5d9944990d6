"""The SGLang frontend with per-role adapters, the example agent and its tools.

The server tests share one real CPU server (base-lr-shared, the three trained shared-A
role adapters shipped in the package) started through `frontend.Runtime`. Each compares what a program state
does through `LRAgentEndpoint` with a direct `/generate` carrying `lora_path`, or records
the payloads the endpoint sends. The tool tests need no server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import example_agent
import pytest
import requests
import sglang as sgl
import sglang.lang.backend.runtime_endpoint as runtime_endpoint

from lragent_sglang.agents.frontend import (
    LRAgentEndpoint,
    Runtime,
    _server_flags,
    adapter_of,
    bind_roles,
    fork_roles,
    join_roles,
    set_adapter,
    with_adapter,
)
from lragent_sglang.agents.tools import (
    DEFAULT_DOCS_DIR,
    DocumentStore,
    ToolCall,
    Toolbox,
    ToolError,
    calculate,
    parse_tool_call,
)

ROLES = ["plan", "action", "reflect"]
# A prompt on which the default role adapters change SmolLM2's greedy output.
PREFIX = "Plan: find the population of Paris. Step 1:"
TOKENS = 6
GREEDY = {"max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}


def on_server(test):
    """Marks a test that talks to the shared real server."""
    return pytest.mark.e2e(pytest.mark.slow(test))


@pytest.fixture(scope="module")
def runtime():
    rt = Runtime.smollm2(scheme="base-lr-shared")
    # Load every adapter once: on a fresh server, an adapter's first request that hits a
    # cached prefix runs without the adapter (a backend issue, reported separately); the
    # tests here are about what the frontend sends.
    requests.post(rt.url + "/generate", timeout=300, json={
        "text": ["Hello"] * len(ROLES), "lora_path": ROLES, "sampling_params": {"max_new_tokens": 1},
    }).raise_for_status()
    yield rt
    pid = rt._server.proc.pid
    rt.shutdown()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


@pytest.fixture()
def endpoint(runtime):
    requests.post(runtime.url + "/flush_cache", timeout=30).raise_for_status()
    return runtime.endpoint


@pytest.fixture()
def sent(monkeypatch):
    """(payload, response) of every /generate the SGLang frontend sends in the test: a state's
    requests (`LRAgentEndpoint._post`, which adds headers) and SGLang's own `http_request`."""
    calls: list[tuple[dict, requests.Response]] = []
    real = runtime_endpoint.http_request
    real_post = LRAgentEndpoint._post

    def spy(url, *args, **kwargs):
        res = real(url, *args, **kwargs)
        if url.endswith("/generate"):
            calls.append((kwargs["json"], res))
        return res

    def post_spy(self, s, data, stream=False):
        res = real_post(self, s, data, stream)
        calls.append((data, res))
        return res

    monkeypatch.setattr(runtime_endpoint, "http_request", spy)
    monkeypatch.setattr(LRAgentEndpoint, "_post", post_spy)
    return calls


def payloads_of(sent: list[tuple[dict, requests.Response]]) -> list[dict]:
    return [payload for payload, _ in sent]


def direct(runtime, text: str, roles: list[str | None]) -> dict[str | None, str]:
    """Greedy continuations of `text` per role from one batched /generate with lora_path."""
    payload = {
        "text": [text] * len(roles),
        "lora_path": roles,
        "sampling_params": {"max_new_tokens": TOKENS, "temperature": 0, "ignore_eos": True},
    }
    resp = requests.post(runtime.url + "/generate", json=payload, timeout=300)
    resp.raise_for_status()
    return {role: out["text"] for role, out in zip(roles, resp.json())}


@sgl.function
def roles_program(s, prefix):
    s += prefix
    forks = fork_roles(s, ROLES)
    forks += sgl.gen("answer", **GREEDY)
    s["meta"] = {role: forks[role].get_meta_info("answer") for role in ROLES}
    join_roles(s, forks, "answer")


@on_server
def test_each_fork_generates_with_its_role_adapter_after_one_commit(runtime, endpoint, sent):
    state = roles_program.run(prefix=PREFIX, backend=endpoint)
    answers = {role: state.get_var("answer")[i] for i, role in enumerate(ROLES)}
    expected = direct(runtime, PREFIX, [None, *ROLES])
    assert answers == {role: expected[role] for role in ROLES}
    assert set(answers.values()) != {expected[None]}, "the roles must change the output"
    gens = [p for p in payloads_of(sent) if p["sampling_params"].get("max_new_tokens") == TOKENS]
    assert sorted(p["lora_path"] for p in gens) == sorted(ROLES)
    for role in ROLES:
        assert f"[{role}] {answers[role].strip()}" in state.text()
    assert adapter_of(state) is None, "join must not leak the roles into the parent"

    # SGLang's fork prefix commit: once, without an adapter, and every role hits it.
    commits = [(p, r) for p, r in sent if p["sampling_params"] == {"max_new_tokens": 0}]
    assert len(commits) == 1 and commits[0][0]["text"] == PREFIX
    assert "lora_path" not in commits[0][0]
    committed = commits[0][1].json()["meta_info"]["prompt_tokens"]
    for role, meta in state["meta"].items():
        assert meta["cached_tokens"] >= committed - 1, (role, meta, committed)


@sgl.function
def bound_parent_program(s, prefix):
    set_adapter(s, "plan")
    s += prefix
    s.sync()  # else SGLang's fork may see no text yet and skip the commit
    forks = s.fork(2)
    roles = bind_roles(forks, ["action", "reflect"])
    roles += sgl.gen("answer", **GREEDY)
    roles.join()


@on_server
def test_fork_commit_of_a_bound_parent_carries_its_adapter(endpoint, sent):
    bound_parent_program.run(prefix=PREFIX, backend=endpoint)
    commits = [p for p in payloads_of(sent) if p["sampling_params"] == {"max_new_tokens": 0}]
    assert [c.get("lora_path") for c in commits] == ["plan"]
    gens = [p for p in payloads_of(sent) if p["sampling_params"].get("max_new_tokens") == TOKENS]
    assert sorted(p["lora_path"] for p in gens) == ["action", "reflect"]


@sgl.function
def select_program(s, prefix, role):
    set_adapter(s, role)
    s += prefix + "The next tool is "
    s += sgl.select("tool", ["calculator", "lookup", "nothing"])


@on_server
def test_select_sends_the_adapter_and_it_changes_the_scores(endpoint, sent):
    scores = {}
    for role in [None, "plan", "action"]:
        sent.clear()
        state = select_program.run(prefix=PREFIX, role=role, backend=endpoint)
        meta = state.get_meta_info("tool")
        scores[role] = tuple(round(x, 5) for x in meta["normalized_prompt_logprobs"])
        best = max(range(3), key=scores[role].__getitem__)
        assert state["tool"] == ["calculator", "lookup", "nothing"][best]
        assert len(sent) >= 2
        assert all(p.get("lora_path") == role for p in payloads_of(sent)), payloads_of(sent)
        # one text per request: sglang-router 0.3.x refuses a batch (a list in `text`)
        assert all(isinstance(p["text"], str) for p in payloads_of(sent)), payloads_of(sent)
    assert len(set(scores.values())) == 3, scores


@sgl.function
def stream_program(s, prefix, role):
    with with_adapter(s, role):
        s += prefix + sgl.gen("answer", **GREEDY)
    s += sgl.gen("after", **GREEDY)


@on_server
def test_streaming_with_an_adapter(runtime, endpoint, sent):
    state = stream_program.run(prefix=PREFIX, role="action", stream=True, backend=endpoint)
    chunks = list(state.text_iter("answer"))
    expected = direct(runtime, PREFIX, ["action", None])
    assert "".join(chunks) == expected["action"] != expected[None]
    state.sync()
    assert [p.get("stream") for p in payloads_of(sent)] == [True, True]
    assert [p.get("lora_path") for p in payloads_of(sent)] == ["action", None]
    assert adapter_of(state) is None


@on_server
def test_example_agent_runs_every_role_and_the_tools(endpoint, sent):
    result = example_agent.run_agent("What is (17 * 23) + 4?", endpoint,
                                     max_steps=1, max_new_tokens=6)
    assert [t.role for t in result.turns] == ROLES
    assert all(t.completion_tokens > 0 for t in result.turns)
    assert [t.cached_tokens > 0 for t in result.turns[1:]] == [True, True], result.turns
    (run,) = result.tool_runs
    assert run.ok and run.call.tool == "calculator" and run.output == "395"
    assert result.answer == "395"
    for needle in ("Plan: ", "Action: TOOL: calculator(", "Tool output: 395\n", "Reflection: "):
        assert needle in result.trajectory
    gens = [p for p in payloads_of(sent) if p["sampling_params"].get("max_new_tokens")]
    assert {p.get("lora_path") for p in gens} == set(ROLES)


@on_server
def test_shipped_role_adapters_write_in_their_roles_format(endpoint):
    """The trained adapters shipped for the demo: plan writes a plan, action a tool call
    the agent parses (no fallback), reflect judges and gives the answer."""
    result = example_agent.run_agent(example_agent.QUESTIONS[0], endpoint, max_steps=1)
    plan, action, reflect = (t.text for t in result.turns)
    assert plan.startswith("1. ") and "calculator" in plan, plan
    (run,) = result.tool_runs
    assert not run.fallback and run.call == ToolCall("calculator", "14 * 3"), (action, run)
    assert reflect.startswith("Yes") and result.answer == "42", reflect


@on_server
def test_example_agent_command_line(runtime, capsys):
    assert example_agent.main([
        "--url", runtime.url, "--max-steps", "1", "--max-new-tokens", "4",
        "--question", "How tall is the Eiffel Tower?",
    ]) == 0
    out = capsys.readouterr().out
    assert "] lookup(How tall is the Eiffel Tower?) -> Eiffel Tower:" in out
    assert "answer: Eiffel Tower:" in out and "330 metres" in out
    assert example_agent.FALLBACK_NOTE in out  # 4 tokens cannot hold the role's own call
    assert "step role" in out and "prefix hit rate" in out


# --- no server below ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "value"),
    [("2 + 3 * 4", 14), ("(17 * 23) + 4", 395), ("2^10", 1024), ("1,000 / 8", 125),
     ("-3 ** 2", -9), ("7 // 2", 3), ("7 % 4", 3), ("1 / 4", 0.25), ("14 × 3", 42)],
)
def test_calculator(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize(
    "expression",
    ["__import__('os').system('true')", "x + 1", "9 ** 9 ** 9", "1 / 0", "'a' * 3",
     "", "(1).real", "[1, 2]", "10 ** 400 ** 1", "2 ** 0.5j"],
)
def test_calculator_refuses_anything_but_arithmetic(expression):
    with pytest.raises(ToolError):
        calculate(expression)


@pytest.mark.parametrize(
    ("text", "call"),
    [
        ("TOOL: calculator(3 * 14)", ToolCall("calculator", "3 * 14")),
        ("tool: Calc(2 * (3 + 4)) and more", ToolCall("calculator", "2 * (3 + 4)")),
        ("lookup: Eiffel Tower height", ToolCall("lookup", "Eiffel Tower height")),
        ("TOOL: search('speed of light')", ToolCall("lookup", "speed of light")),
        ("first calculator() then lookup(moon)", ToolCall("lookup", "moon")),
    ],
)
def test_parse_tool_call(text, call):
    assert parse_tool_call(text) == call


@pytest.mark.parametrize(
    "text", ["TOOL: 14 * 3 = 38", "I will calculate it", "calculator()", "", "recalculate(3)"]
)
def test_parse_tool_call_rejects_malformed_calls(text):
    assert parse_tool_call(text) is None


def test_lookup_over_the_shipped_documents():
    store = DocumentStore()
    assert len(store.docs) == len(list(DEFAULT_DOCS_DIR.glob("*.md"))) >= 12
    assert "330 metres" in store.lookup("How tall is the Eiffel Tower?")
    assert store.lookup("price of a pen").startswith("Stationery shop prices:")
    assert "8,849" in Toolbox(store).run(ToolCall("lookup", "Everest height"))
    with pytest.raises(ToolError):
        store.lookup("zebra quantum")


def test_fallback_tool_calls():
    run_tool = example_agent.run_tool
    box = Toolbox()
    good = run_tool(box, 1, "TOOL: calculator(6 * 7)", "What is 2 + 2?", [])
    assert (good.output, good.fallback) == ("42", False)
    malformed = run_tool(box, 1, "TOOL: 14 * 3 = 38", "What is 2 + 2?", [])
    assert malformed.fallback and malformed.call == ToolCall("calculator", "2 + 2")
    assert malformed.output == "4"
    second = run_tool(box, 2, "TOOL: calculator(abc)", "What is 2 + 2?", [malformed])
    assert second.fallback and second.call == ToolCall("lookup", "What is 2 + 2?")
    failing = run_tool(box, 1, "TOOL: lookup(zebra)", "zebra quantum?", [])
    assert failing.fallback and not failing.ok and failing.output.startswith("error: no document")
    words = run_tool(box, 1, "nonsense", "How far away is the Moon?", [])
    assert words.ok and words.fallback and "384,400" in words.output


def _sse(*chunks: tuple[str, list[int]]) -> list[bytes]:
    events = [f"data: {json.dumps({'text': t, 'meta_info': {'output_token_logprobs': lp}})}" for t, lp in chunks]
    return [e.encode() for e in [*events, "", "data: [DONE]"]]


@pytest.mark.parametrize("incremental", [False, True])
def test_stream_chunks_are_new_text_and_per_chunk_logprobs(incremental):
    """Whichever way the server streams, the frontend gets each chunk's new text and its
    own logprobs (SGLang's interpreter merges those over text-less chunks)."""
    if incremental:
        lines = _sse(("He", [1]), ("llo", [2]), (" world", [3, 4]))
    else:  # the whole output so far in every event
        lines = _sse(("He", [1]), ("Hello", [1, 2]), ("Hello world", [1, 2, 3, 4]))
    chunks = list(LRAgentEndpoint._chunks(iter(lines), incremental))
    assert [(t, m["output_token_logprobs"]) for t, m in chunks] == [
        ("He", [1]), ("llo", [2]), (" world", [3, 4])]


def test_server_flags_follow_sgl_runtime_keywords():
    assert _server_flags({
        "model_path": Path("/m"), "enable_lora": True, "disable_radix_cache": False,
        "lora_paths": {"plan": "/a/plan", "action": "/a/action"}, "max_lora_rank": 8,
        "chunked_prefill_size": None, "tp_size": 1, "stop_ids": [1, 2],
    }) == [
        "--model-path", "/m", "--enable-lora", "--lora-paths", "plan=/a/plan",
        "action=/a/action", "--max-lora-rank", "8", "--tp-size", "1", "--stop-ids", "1", "2",
    ]
