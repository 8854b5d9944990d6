"""Hostile and careless clients against the real CPU server (issues 17 and 20).

Each probe below killed the server, hung it or answered a bare 500 before the guards
(`server/guards.py`, `body_limit.py`, `lora_usage.py`). One server per scheme runs every
probe: non-shared through our launcher (stock SGLang's cache), base-lr-shared through the
stock `python -m sglang.launch_server` with our backends and the plugin alone (body limit
lowered to 1 MiB through LRAGENT_MAX_BODY_MB). Afterwards each still serves and, after
/flush_cache, holds no KV.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests
from safetensors.torch import load_file, save_file

from lragent_sglang.adapters.make import make_role_adapters
from lragent_sglang.agents.server_process import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

VOCAB = 49152  # SmolLM2's
SHORT = {"max_new_tokens": 2}


def with_k_proj(src: Path, dst: Path) -> Path:
    """A copy of adapter `src` (the same v_proj A) that also puts LoRA on k_proj."""
    shutil.copytree(src, dst)
    weights = load_file(dst / "adapter_model.safetensors")
    for key in [k for k in weights if ".v_proj." in k]:  # k_proj has v_proj's shapes
        weights[key.replace(".v_proj.", ".k_proj.")] = weights[key].clone()
    save_file(weights, dst / "adapter_model.safetensors")
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["target_modules"] = sorted({*cfg["target_modules"], "k_proj"})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def adapters(smollm2, tmp_path_factory):
    """Shared-A plan/action adapters (every scheme serves them) and plan plus k_proj LoRA
    (breaks only the base-sharing schemes' keys rule)."""
    folder = tmp_path_factory.mktemp("hostile")
    roles = make_role_adapters(smollm2, folder / "roles", roles=("plan", "action"), shared_v_a=True)
    return {**roles, "keys": with_k_proj(roles["plan"], folder / "keys")}


@pytest.fixture(scope="module", params=["non-shared", "base-lr-shared"])
def server(request, smollm2, adapters):
    scheme = request.param
    lora = ["--enable-lora", "--lora-paths", f"plan={adapters['plan']}", f"action={adapters['action']}",
            "--max-loras-per-batch", "4", "--max-lora-rank", "8"]
    common = ["--model-path", str(smollm2), "--dtype", "float32", *lora]
    if scheme == "non-shared":
        srv = ServerProcess([*common, "--lragent-scheme", scheme])
        srv.body_limit_mb = 8
    else:
        stock = ["--device", "cpu", "--attention-backend", "lragent", "--radix-cache-backend", "lragent",
                 "--lora-backend", "torch_native", "--max-total-tokens", "8192", "--sleep-on-idle"]
        srv = ServerProcess([*common, *stock], module="sglang.launch_server",
                            env={"LRAGENT_SCHEME": scheme, "LRAGENT_MAX_BODY_MB": "1"})
        srv.body_limit_mb = 1
    srv.scheme = scheme
    with srv:
        yield srv


def post(srv: ServerProcess, path: str, body: object, timeout: float = 120) -> requests.Response:
    return requests.post(srv.url + path, json=body, timeout=timeout)


def refusal(resp: requests.Response, status: int = 400) -> str:
    """The one-line message of an error answer (SGLang's native, OpenAI or adapter-update shape)."""
    assert resp.status_code == status, resp.text[:500]
    body = resp.json()
    message = body["error"]["message"] if "error" in body else body.get("message") or body["error_message"]
    assert "\n" not in message and "Traceback" not in message
    return message


def serves(srv: ServerProcess) -> None:
    out = srv.generate(text="The capital of France is", lora_path="plan",
                       sampling_params={"max_new_tokens": 3, "temperature": 0})
    assert out["meta_info"]["completion_tokens"] == 3


# ---- issue 17: token ids, lora_path, sampling parameters, lengths ------------------------


@pytest.mark.parametrize("body, needle", [
    ({"input_ids": [999999999], "lora_path": "plan"}, "input_ids[0] = 999999999 is outside the vocabulary"),
    ({"input_ids": [-1]}, "input_ids[0] = -1"),
    ({"input_ids": [1, 2, VOCAB]}, f"input_ids[2] = {VOCAB}"),
    ({"input_ids": [[1, 2], [3, VOCAB]], "lora_path": ["plan", None]}, f"input_ids[1][1] = {VOCAB}"),
])
def test_out_of_vocabulary_ids_get_400(server, body, needle):
    assert needle in refusal(post(server, "/generate", {**body, "sampling_params": SHORT}))
    serves(server)


def test_out_of_vocabulary_ids_on_the_openai_route_and_in_a_stream(server):
    resp = post(server, "/v1/completions", {"model": "default", "prompt": [999999999], "max_tokens": 2})
    assert "input_ids[0] = 999999999" in refusal(resp)
    resp = post(server, "/generate", {"input_ids": [VOCAB], "stream": True, "sampling_params": SHORT})
    event = json.loads(resp.text.split("data: ")[1])  # SGLang streams errors as an event
    assert event["error"]["code"] == 400 and f"input_ids[0] = {VOCAB}" in event["error"]["message"]
    serves(server)


@pytest.mark.parametrize("lora_path", [["plan"], ["plan", "action"]])
def test_lora_path_list_for_one_prompt_gets_400(server, lora_path):
    message = refusal(post(server, "/generate", {"text": "hi", "lora_path": lora_path, "sampling_params": SHORT}))
    assert message.startswith("lora_path must be one adapter name")
    serves(server)


@pytest.mark.parametrize("params, needle", [
    ({"temperature": "hot"}, "sampling_params.temperature must be float | null, got str"),
    ({"max_new_tokens": "ten"}, "sampling_params.max_new_tokens must be int | null, got str"),
    ({"max_new_tokens": 3.7}, "sampling_params.max_new_tokens must be int | null, got float"),
    ({"top_p": [1]}, "sampling_params.top_p must be float | null, got array"),
    ({"stop": 5}, "sampling_params.stop must be str | array | null, got int"),
    ({"max_new_tokens": 2, "tempreature": 0.5}, "sampling_params has an unknown field 'tempreature'"),
    ({"max_new_tokens": 2, "min_new_tokens": 1, "stop_token_ids": [60000]}, "stop_token_ids[0] = 60000"),
])
def test_mistyped_sampling_params_get_400_naming_the_field(server, params, needle):
    assert needle in refusal(post(server, "/generate", {"text": "hi", "lora_path": "plan", "sampling_params": params}))
    serves(server)


def test_lengths_against_the_context(server):
    """SGLang's own length checks (tokenised prompts) and ours (input_embeds) answer 400."""
    assert "longer than the model's context length" in refusal(
        post(server, "/generate", {"input_ids": [5] * 9000, "sampling_params": SHORT}))
    assert "maximum context length" in refusal(
        post(server, "/generate", {"input_ids": [5] * 8000, "sampling_params": {"max_new_tokens": 500}}))
    assert "576 numbers" in refusal(post(server, "/generate", {"input_embeds": [[0.5] * 3], "sampling_params": SHORT}))
    serves(server)


# ---- issue 20.3: oversized bodies ---------------------------------------------------------


def test_oversized_body_is_refused_at_once_without_blocking_others(server):
    big = json.dumps({"text": "a " * (25 << 20), "sampling_params": SHORT})  # 50 MB
    small: list[float] = []

    def small_requests() -> None:
        for _ in range(3):
            start = time.monotonic()
            serves(server)
            small.append(time.monotonic() - start)

    others = threading.Thread(target=small_requests)
    start = time.monotonic()
    others.start()
    resp = requests.post(server.url + "/generate", data=big, headers={"Content-Type": "application/json"}, timeout=60)
    refused_after = time.monotonic() - start
    others.join(timeout=120)
    message = refusal(resp, 413)
    assert f"limit of {server.body_limit_mb} MiB" in message and "--lragent-max-body-mb" in message
    assert refused_after < 15, refused_after
    assert len(small) == 3 and max(small) < 15, small


# ---- issue 20.4 and 17: runtime adapter loads ---------------------------------------------


def test_runtime_load_of_a_missing_folder_says_so(server, tmp_path):
    missing = tmp_path / "no-such-adapter"
    message = refusal(post(server, "/load_lora_adapter", {"lora_name": "ghost", "lora_path": str(missing)}))
    assert "'ghost'" in message and str(missing) in message and "does not exist" in message
    assert "Repo id" not in message


def test_runtime_load_follows_the_scheme_rules(server, adapters):
    body = {"lora_name": "keys", "lora_path": str(adapters["keys"])}
    if server.scheme == "non-shared":  # keys are not shared: k_proj LoRA serves
        assert post(server, "/load_lora_adapter", body).status_code == 200
        assert post(server, "/unload_lora_adapter", {"lora_name": "keys"}).status_code == 200
    else:
        message = refusal(post(server, "/load_lora_adapter", body))
        assert "'keys'" in message and "k_proj" in message
    serves(server)


# ---- issue 20.2: clients that go away -----------------------------------------------------


def test_disconnected_adapter_requests_release_the_adapter(server, adapters):
    """A client timing out and a streaming client leaving both held the adapter's usage
    count: /unload_lora_adapter never returned and blocked every later load."""
    body = {"text": "Count from one to one thousand:", "lora_path": "plan",
            "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}
    with pytest.raises(requests.Timeout):
        post(server, "/generate", body, timeout=2)
    with requests.post(server.url + "/generate", json={**body, "stream": True}, stream=True, timeout=60) as resp:
        assert next(resp.iter_lines()).startswith(b"data:")
    time.sleep(6)  # SGLang notices a gone client within its 4 s wait
    resp = post(server, "/unload_lora_adapter", {"lora_name": "plan"}, timeout=180)  # the scheduler ends both first
    assert resp.status_code == 200, resp.text
    resp = post(server, "/load_lora_adapter", {"lora_name": "plan", "lora_path": str(adapters["plan"])}, timeout=60)
    assert resp.status_code == 200, resp.text
    serves(server)


def test_unloaded_adapter_stays_unloaded_until_loaded_again(server, adapters):
    """SGLang loaded an unloaded adapter again from its old folder when a request named it
    (`lora_ref_cache`): the request got the old weights and the next load of the name was
    refused as "already loaded" (the GPU soak's hot swap never landed)."""
    assert post(server, "/unload_lora_adapter", {"lora_name": "action"}).status_code == 200
    body = {"input_ids": [100, 101, 102], "lora_path": "action", "sampling_params": SHORT}
    assert refusal(post(server, "/generate", body)).startswith("lora_path 'action' is not a loaded adapter (loaded: ")
    resp = post(server, "/load_lora_adapter", {"lora_name": "action", "lora_path": str(adapters["action"])})
    assert resp.status_code == 200, resp.text
    assert post(server, "/generate", body).status_code == 200
    assert "'nobody' is not a loaded adapter" in refusal(post(server, "/generate", {**body, "lora_path": "nobody"}))


# ---- last: still serving, nothing held ------------------------------------------------------


def test_still_serving_and_the_pools_whole(server):
    serves(server)
    assert requests.post(server.url + "/flush_cache", timeout=60).status_code == 200
    info = requests.get(server.url + "/server_info", timeout=30).json()
    capacity, stats = info["max_total_num_tokens"], info["internal_states"][0]["lragent"]  # any launcher
    if server.scheme == "non-shared":  # SGLang's own cache: its load report counts the KV in use
        load = requests.get(server.url + "/v1/loads", timeout=30).json()["loads"][0]
        assert load["num_used_tokens"] == 0, load
        assert stats["base"]["tokens"] == 0
    else:
        assert stats["kv_pool_available"] == capacity
        assert stats["lr_pool_available"] == stats["lr_pool_size"]
