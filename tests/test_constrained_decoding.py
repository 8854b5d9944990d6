"""Constrained decoding on the real CPU server (issue 20, item 1), with and without a role
adapter: `regex` and `json_schema` on `/generate`, the frontend's `gen_int` / `gen(dtype=...)`
/ `gen(regex=...)` through `LRAgentEndpoint`, and OpenAI `response_format` json_schema.

Each of these once killed the scheduler on CPU: first xgrammar's token bitmask asked for
pinned memory ("Found no NVIDIA driver"), then SGLang's sampler called our CPU mask hook
with keyword arguments it did not take. The last test checks the server still serves.
"""

from __future__ import annotations

import json
import re

import pytest
import requests
import sglang as sgl

from lragent_sglang.agents.frontend import LRAgentEndpoint, Runtime, set_adapter

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ADAPTERS = [None, "plan"]
IP = r"((25[0-5]|2[0-4]\d|[01]?\d\d?)\.){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)"
# Bounded, so that a 135M model's runaway digits end inside the token budget.
CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "population": {"type": "integer", "minimum": 0, "maximum": 100_000_000},
    },
    "required": ["name", "population"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def runtime():
    with Runtime.smollm2(scheme="base-lr-shared") as rt:
        yield rt


def generate(url: str, adapter: str | None, text: str, **sampling: object) -> str:
    payload = {"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": 48, **sampling}}
    if adapter:
        payload["lora_path"] = adapter
    resp = requests.post(url + "/generate", json=payload, timeout=120)
    resp.raise_for_status()
    return resp.json()["text"]


def check_city(text: str) -> None:
    city = json.loads(text)
    assert set(city) == {"name", "population"}, city
    assert isinstance(city["name"], str) and len(city["name"]) <= 24, city
    assert isinstance(city["population"], int) and 0 <= city["population"] <= 100_000_000, city


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_regex(runtime, adapter):
    text = generate(runtime.url, adapter, "Q: What is the IP address of the Google DNS servers?\nA: ",
                    regex=IP)
    assert re.fullmatch(IP, text), text


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_json_schema(runtime, adapter):
    check_city(generate(runtime.url, adapter, "Paris as a JSON object:\n", json_schema=json.dumps(CITY),
                        max_new_tokens=64))


@sgl.function
def typed_answers(s, adapter):
    set_adapter(s, adapter)
    s += "Q: How many hours are in a day?\nA: " + sgl.gen_int("hours") + "\n"
    s += "Q: What is the value of pi?\nA: " + sgl.gen("pi", dtype=float) + "\n"
    s += "Q: Is the sky blue?\nA: " + sgl.gen("blue", dtype=bool) + "\n"
    s += "Q: What is the IP address of the Google DNS servers?\nA: " + sgl.gen("ip", regex=IP)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_frontend_typed_gen(runtime, adapter):
    state = typed_answers.run(adapter=adapter, temperature=0, max_new_tokens=16,
                              backend=LRAgentEndpoint(runtime.url))
    assert state.error() is None, state.error()
    int(state["hours"]), float(state["pi"])
    assert state["blue"] in ("True", "False"), state["blue"]
    assert re.fullmatch(IP, state["ip"]), state["ip"]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_openai_response_format_json_schema(runtime, adapter):
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Describe Paris as a JSON object."}],
        "max_tokens": 64,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}},
    }
    if adapter:
        body["lora_path"] = adapter
    resp = requests.post(runtime.url + "/v1/chat/completions", json=body, timeout=120)
    resp.raise_for_status()
    check_city(resp.json()["choices"][0]["message"]["content"])


def test_server_still_serves(runtime):
    assert requests.get(runtime.url + "/health", timeout=30).status_code == 200
    assert generate(runtime.url, "action", "Hello", max_new_tokens=2)
