"""SGLang's own frontend test programs (`sglang/test/test_programs.py` of the installed
package) against `LRAgentEndpoint` on one real CPU server, on the base model and with every
request on a role adapter (`LRAgentEndpoint(url, adapter="plan")`, checked in the server's
per-adapter statistics).

Every program that needs only the server's features runs in both modes; those whose
assertions need a larger model than SmolLM2-135M, a vision model, the network or another
backend are skipped, each with its reason. `parallel_encoding` must fail at once with our
error (the 0.5.17 server has no `/concate_and_append_request` route), not hang.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable

import pytest
import requests
import sglang as sgl
import sglang.test.test_programs as programs

from lragent_sglang.agents.frontend import (
    PARALLEL_ENCODING_MESSAGE,
    LRAgentEndpoint,
    ParallelEncodingUnsupported,
    Runtime,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODES = {"base": None, "adapter": "plan"}
SMALL_MODEL = "asserts answers that SmolLM2-135M does not know"
RUN: dict[str, Callable[[], object]] = {
    "mt_bench": programs.test_mt_bench,
    "select": lambda: programs.test_select(check_answer=False),  # as SGLang's own suite
    "expert_answer": lambda: programs.test_expert_answer(check_answer=False),
    "decode_json_regex": programs.test_decode_json_regex,
    "decode_json": programs.test_decode_json,
    "regex": programs.test_regex,
    "dtype_gen": programs.test_dtype_gen,
    "parallel_decoding": programs.test_parallel_decoding,
    "stream": programs.test_stream,
    "stream_logprobs": programs.test_stream_logprobs,
    "gen_min_new_tokens": programs.test_gen_min_new_tokens,
}
SKIP = {
    "few_shot_qa": f"{SMALL_MODEL} (the capitals of the US, Japan, the UK and China)",
    "decode_int": f"{SMALL_MODEL} (24 hours a day, 365 days a year); gen_int runs in dtype_gen "
                  "and decode_json",
    "tool_use": f"{SMALL_MODEL}: it must write the expression 257*983 for the calculator",
    "react": f"{SMALL_MODEL} (where the creator of Linux lives)",
    "hellaswag_select": "downloads HellaSwag from GitHub and needs accuracy > 0.6 (SGLang's "
                        "suite), far above a 135M model",
    "image_qa": "needs a vision-language model and example_image.png",
    "completion_speculative": "API speculative execution is for OpenAI-style backends "
                              "(reads backend.token_usage); SGLang's own runtime suite skips it too",
    "chat_completion_speculative": "API speculative execution is for OpenAI-style chat "
                                   "backends; SGLang's own runtime suite skips it too",
}


@pytest.fixture(scope="module")
def runtime():
    with Runtime.smollm2(scheme="base-lr-shared") as rt:
        yield rt


def requests_on(url: str, adapter: str) -> int:
    stats = requests.get(url + "/lragent/stats", timeout=30).json()["schedulers"][0]
    return stats["per_adapter"].get(adapter, {}).get("requests", 0)


@pytest.fixture(params=list(MODES))
def backend(runtime, request):
    """The default backend for one test, in one mode; checks that every request of the
    adapter mode, and none of the base mode, reached the server on the adapter."""
    adapter = MODES[request.param]
    endpoint = LRAgentEndpoint(runtime.url, chat_template_name="chatml", adapter=adapter)
    before = requests_on(runtime.url, "plan")
    sgl.set_default_backend(endpoint)
    yield endpoint
    sgl.set_default_backend(None)
    served = requests_on(runtime.url, "plan") - before
    assert served > 0 if adapter else served == 0, served


@pytest.mark.parametrize("name", list(RUN))
def test_program(backend, name):
    RUN[name]()


@pytest.mark.parametrize("name", list(SKIP))
def test_program_needing_more(name):
    pytest.skip(SKIP[name])


def test_parallel_encoding_fails_fast_with_our_error(backend):
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            programs.test_parallel_encoding(check_answer=False)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    started = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)  # a hang must not block pytest's exit
    worker.start()
    worker.join(timeout=120)
    assert outcome, "parallel_encoding still running after 120 s (the hang of issue 20)"
    assert isinstance(outcome[0], ParallelEncodingUnsupported), outcome[0]
    assert str(outcome[0]) == PARALLEL_ENCODING_MESSAGE
    assert time.monotonic() - started < 60


def test_parallel_encoding_joins_text_when_turned_off(backend, monkeypatch):
    """What the error advises works: SGLang's interpreter then appends the forks' text."""
    monkeypatch.setattr(sgl.global_config, "enable_parallel_encoding", False)
    programs.test_parallel_encoding(check_answer=False)


def test_every_program_is_run_or_skipped_with_a_reason():
    names = {name[len("test_"):] for name, _ in inspect.getmembers(programs, inspect.isfunction)
             if name.startswith("test_")}
    assert names == set(RUN) | set(SKIP) | {"parallel_encoding"}
    assert not set(RUN) & set(SKIP)
