"""SGLang frontend support for agents with one LoRA adapter per role.

SGLang's `gen()` has no adapter argument and its `RuntimeEndpoint` never sends
`lora_path`. Here the adapter is a property of a program state: `set_adapter(s, "plan")`
(or `fork_roles`, which forks one branch per role) stores it in the state's variables,
and `LRAgentEndpoint` sends it as `lora_path` on every `/generate` that state makes.
Variables are copied by `fork`, so a branch keeps its parent's adapter until rebound.

    sgl.set_default_backend(LRAgentEndpoint(url))
    forks = fork_roles(s, ["plan", "action", "reflect"])
    forks += sgl.assistant(sgl.gen("answer", max_tokens=64))
    join_roles(s, forks, "answer")

The fork prefix commit (SGLang sends one when `fork(n)` has n > 1) is a request of the
parent state, so it carries the parent's adapter: none for an unbound shared trajectory.
With the base-lr-shared scheme a request without an adapter still writes the base KV and
the shared LR rows, so every role's branch then hits the whole committed prefix; with
base-shared the roles hit the base pages and re-prefill only their LR rows; with
non-shared only requests without an adapter hit it.

`LRAgentEndpoint(url, adapter="plan")` gives every state that binds no adapter that one,
which runs programs written without adapters (SGLang's own test programs, say) on a role;
`cache_prefix` (SGLang's program prefix caching, which has no state) carries it too.

Every request of a state also carries the state's routing key in the `X-SMG-Routing-Key`
header (`ROUTING_KEY_HEADER`): one key per trajectory, made at its first request (or by
`fork_roles` before it forks) and copied into forks with the other variables. sglang-router's
`manual` policy sends all requests of a key to one worker, and our server's `--dp-size N`
placement to one data-parallel rank, so a trajectory's roles meet its cached prefix
whichever way the server is scaled out (README "Scaling out").

`Runtime` is the counterpart of `sgl.Runtime` for our launcher.
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import requests
import sglang.lang.backend.runtime_endpoint as runtime_endpoint
from sglang.global_config import global_config
from sglang.lang.api import assistant
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint
from sglang.lang.interpreter import ProgramState, ProgramStateGroup, StreamExecutor
from sglang.lang.ir import SglExpr, SglSamplingParams

from lragent_sglang.agents.server_process import ServerProcess
from lragent_sglang.scheme import DEFAULT_SCHEME, Scheme

logger = logging.getLogger(__name__)

# The state variable that holds the adapter name (None: the base model).
ADAPTER_VAR = "__lragent_lora_path__"
# The state variable that holds the trajectory's routing key, and the header that carries it
# (sglang-router's `manual` policy routes by it; our server's DP placement reads it too).
ROUTING_VAR = "__lragent_routing_key__"
ROUTING_KEY_HEADER = "X-SMG-Routing-Key"


def _executor(s: ProgramState | StreamExecutor) -> StreamExecutor:
    return s.stream_executor if isinstance(s, ProgramState) else s


def adapter_of(s: ProgramState | StreamExecutor) -> str | None:
    """The adapter this state's requests carry (None: the base model): the one bound to
    the state, else its `LRAgentEndpoint`'s default."""
    exe = _executor(s)
    if ADAPTER_VAR in exe.variables:
        return exe.variables[ADAPTER_VAR]
    return exe.backend.adapter if isinstance(exe.backend, LRAgentEndpoint) else None


def set_adapter(s: ProgramState, adapter: str | None) -> ProgramState:
    """Bind `adapter` to the state's later requests.

    Waits for the state's queued expressions first: they run on a worker thread and
    must keep the adapter that was bound when they were added.
    """
    exe = _executor(s)
    exe.sync()
    exe.variables[ADAPTER_VAR] = adapter
    return s


def routing_key_of(s: ProgramState | StreamExecutor) -> str:
    """The state's routing key, made on first use; forks made after that share it."""
    return _executor(s).variables.setdefault(ROUTING_VAR, uuid.uuid4().hex)


@contextmanager
def with_adapter(s: ProgramState, adapter: str | None) -> Iterator[ProgramState]:
    """`with with_adapter(s, "reflect"): s += sgl.gen(...)`, then the previous adapter."""
    previous = adapter_of(s)
    set_adapter(s, adapter)
    try:
        yield s
    finally:
        set_adapter(s, previous)


class RoleForks(Mapping[str, ProgramState]):
    """Branches of one trajectory by role name; `+=` adds an expression to every branch
    and `join()` is SGLang's `ProgramStateGroup.join`."""

    def __init__(self, group: ProgramStateGroup, roles: Sequence[str]) -> None:
        self.group = group
        self._states = dict(zip(roles, group.states))

    def __getitem__(self, role: str) -> ProgramState:
        return self._states[role]

    def __iter__(self) -> Iterator[str]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)

    def __iadd__(self, other: Any) -> "RoleForks":
        self.group += other
        return self

    def join(self, mode: str = "gather_variable") -> None:
        self.group.join(mode)


def bind_roles(forks: ProgramStateGroup, roles: Sequence[str | None]) -> RoleForks:
    """Bind `roles[i]` as the adapter of `forks[i]` (from `s.fork(len(roles))`).

    Call `s.sync()` before `s.fork(n)` if `s` was just extended: SGLang's fork skips the
    prefix commit when the parent's queued text has not been written yet.
    """
    if len(roles) != len(forks.states):
        raise ValueError(f"{len(roles)} roles for {len(forks.states)} forks")
    if len(set(roles)) != len(roles):
        raise ValueError(f"roles must be distinct, got {list(roles)}")
    if forks.src_state is not None:
        # A parent that has the variable keeps it on join (SGLang gathers only new names).
        forks.src_state.stream_executor.variables.setdefault(ADAPTER_VAR, adapter_of(forks.src_state))
        routing_key_of(forks.src_state)
    for state, role in zip(forks.states, roles):
        set_adapter(state, role)
    return RoleForks(forks, roles)


def fork_roles(s: ProgramState, roles: Sequence[str | None]) -> RoleForks:
    """One branch of `s` per role, each bound to that role's adapter.

    Syncs `s` first: SGLang's `fork` decides whether to commit the shared prefix by
    reading the parent's text before its queued expressions have run, so without the
    sync the commit is skipped whenever the trajectory was extended just before.
    """
    if not roles:
        raise ValueError("fork_roles needs at least one role")
    s.sync()
    routing_key_of(s)  # before the fork copies the variables: one key for the trajectory
    return bind_roles(s.fork(len(roles)), roles)


def role_turn(role: str | None, text: str) -> SglExpr:
    """How `join_roles` writes a branch's result into the shared trajectory by default."""
    return assistant(f"[{role or 'base'}] {text.strip()}")


def join_roles(
    s: ProgramState,
    forks: RoleForks,
    var: str,
    render: Callable[[str | None, str], SglExpr | str] = role_turn,
) -> dict[str | None, str]:
    """Append each branch's `var` to `s` in role order, join the branches, and return
    the values by role."""
    values = {role: state[var] for role, state in forks.items()}
    for role, value in values.items():
        s += render(role, value)
    forks.join()
    return values


# Streamed meta_info lists that SGLang's interpreter treats as per-chunk (it merges them
# over chunks that carry no text); a server without incremental streaming sends them whole.
PER_CHUNK_META = ("output_token_logprobs", "output_top_logprobs", "output_token_ids_logprobs")


class ParallelEncodingUnsupported(RuntimeError):
    """`forks.join("concate_and_append")` asked the server for a route it lacks."""


PARALLEL_ENCODING_MESSAGE = (
    "parallel encoding (forks.join(mode='concate_and_append')) joins the forks' KV caches "
    "through the server route /concate_and_append_request, which the SGLang 0.5.17 server "
    "does not have; set sglang.global_config.enable_parallel_encoding = False to join the "
    "forks' text instead"
)


class LRAgentEndpoint(RuntimeEndpoint):
    """`RuntimeEndpoint` that sends each state's adapter as `lora_path`.

    In SGLang 0.5.17 every `/generate` made for a state (`generate`, `generate_stream`,
    the three requests of `select`, `commit_lazy_operations`, `fill_image`) passes its
    payload through `_add_images(s, data)`, so that one helper is where the adapter
    joins the payload. A string `lora_path` applies to every prompt of a batched payload.
    `adapter` is the default of states that bind none.
    """

    def __init__(self, base_url: str, api_key: str | None = None, verify: str | None = None,
                 chat_template_name: str | None = None, adapter: str | None = None) -> None:
        super().__init__(base_url, api_key, verify, chat_template_name)
        self.adapter = adapter
        self._lock = threading.Lock()
        # dst rid -> fork rids still to end, of joins refused by `concatenate_and_append`
        self._refused_joins: dict[str, set[str]] = {}

    @property
    def endpoint(self) -> "LRAgentEndpoint":
        """Itself: code written for `sgl.Runtime` reads `backend.endpoint` (SGLang's own
        `run_program` and test programs do), and `sgl.Runtime(...).endpoint` is the backend."""
        return self

    def _add_images(self, s: StreamExecutor, data: dict[str, Any]) -> None:
        super()._add_images(s, data)
        adapter = adapter_of(s)
        if adapter is not None:
            data["lora_path"] = adapter

    def _post(self, s: StreamExecutor, data: dict[str, Any], stream: bool = False) -> requests.Response:
        """POST one request of state `s` to /generate with its adapter and routing key
        (SGLang's `http_request` takes no headers)."""
        self._add_images(s, data)
        headers = {ROUTING_KEY_HEADER: routing_key_of(s)}
        if self.api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key}"
        res = requests.post(self.base_url + "/generate", json=data, headers=headers, stream=stream,
                            verify=True if self.verify is None else self.verify, timeout=None)
        self._assert_success(res)
        return res

    def _payload(self, s: StreamExecutor, sampling_params: SglSamplingParams) -> dict[str, Any]:
        """The /generate body of a `gen` (as SGLang's `RuntimeEndpoint.generate` builds it)."""
        self._handle_dtype_to_regex(sampling_params)
        data: dict[str, Any] = {
            "text": s.text_,
            "sampling_params": {
                "skip_special_tokens": global_config.skip_special_tokens_in_output,
                "spaces_between_special_tokens": global_config.spaces_between_special_tokens_in_out,
                **sampling_params.to_srt_kwargs(),
            },
        }
        for item in ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs"):
            value = getattr(sampling_params, item, None)
            if value is not None:
                data[item] = value
        return data

    def generate(self, s: StreamExecutor, sampling_params: SglSamplingParams) -> tuple[str, dict]:
        obj = self._post(s, self._payload(s, sampling_params)).json()
        return obj["text"], obj["meta_info"]

    def commit_lazy_operations(self, s: StreamExecutor) -> None:
        self._post(s, {"text": s.text_, "sampling_params": {"max_new_tokens": 0}})

    def fill_image(self, s: StreamExecutor) -> None:
        self._post(s, {"text": s.text_, "sampling_params": {"max_new_tokens": 0}})

    def _generate_http_request(self, s: StreamExecutor, data: dict[str, Any]) -> Any:
        """The requests of `select` (SGLang's helper, with our headers). Its scoring batch
        (one text per choice) goes as one request per choice, sent together: sglang-router
        0.3.x refuses a list in `text`, and the server runs a batch as separate requests
        anyway; the answers come back as the batch's list, in order."""
        if not isinstance(data["text"], list):
            return self._post(s, data).json()
        with ThreadPoolExecutor(len(data["text"])) as pool:
            return list(pool.map(lambda text: self._post(s, {**data, "text": text}).json(), data["text"]))

    def cache_prefix(self, prefix_str: str) -> None:
        """SGLang's program prefix caching, with the endpoint's default adapter (a state's
        own binding is unknown here: the prefix comes from tracing, not from a state)."""
        data: dict[str, Any] = {"text": prefix_str, "sampling_params": {"max_new_tokens": 0}}
        if self.adapter is not None:
            data["lora_path"] = self.adapter
        self._assert_success(runtime_endpoint.http_request(
            self.base_url + "/generate", json=data, api_key=self.api_key, verify=self.verify))

    @cached_property
    def incremental_streaming(self) -> bool:
        """Whether the server streams deltas (`--incremental-streaming-output`)."""
        return bool(self.get_server_info().get("incremental_streaming_output", False))

    def generate_stream(self, s: StreamExecutor, sampling_params: SglSamplingParams) -> Iterator[tuple[str, dict]]:
        """SGLang's streaming `gen`, yielding each chunk's new text and per-chunk logprobs
        whichever way the server streams. SGLang 0.5.17's own slices every chunk's text as
        if it held the whole output so far, which drops text from a server that streams
        deltas, and passes a non-incremental server's whole logprob lists on every chunk."""
        data = {**self._payload(s, sampling_params), "stream": True}
        res = self._post(s, data, stream=True)
        yield from self._chunks(res.iter_lines(decode_unicode=False), self.incremental_streaming)

    @staticmethod
    def _chunks(lines: Iterator[bytes], incremental: bool) -> Iterator[tuple[str, dict]]:
        """(new text, meta_info with per-chunk `PER_CHUNK_META`) of each server-sent event."""
        text_pos, meta_pos = 0, dict.fromkeys(PER_CHUNK_META, 0)
        for line in lines:
            line = line.decode("utf-8")
            if not line.startswith("data:"):
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[5:])
            text, meta = chunk["text"], chunk["meta_info"]
            if not incremental:
                text = text[text_pos:]
                text_pos += len(text)
                for key in PER_CHUNK_META:
                    if isinstance(meta.get(key), list):
                        whole = meta[key]
                        meta[key], meta_pos[key] = whole[meta_pos[key]:], len(whole)
            yield text, meta

    def concatenate_and_append(self, src_rids: list[str], dst_rid: str) -> None:
        """Refuse: the server has no route for it. Raised here, on the parent's worker
        thread, the error would only stop that thread and leave the program waiting forever
        for its next variable, so `end_program` raises it again on the caller's thread."""
        with self._lock:
            self._refused_joins[dst_rid] = set(src_rids)
        raise ParallelEncodingUnsupported(PARALLEL_ENCODING_MESSAGE)

    def end_program(self, s: StreamExecutor | list[StreamExecutor]) -> None:
        """When the last fork of a refused join ends (inside `join`, on the program's
        thread, after every fork's worker was told to stop), raise the refusal there."""
        for exe in s if isinstance(s, list) else [s]:
            with self._lock:
                refused = [dst for dst, srcs in self._refused_joins.items() if exe.sid in srcs]
                for dst in refused:
                    self._refused_joins[dst].discard(exe.sid)
                done = [dst for dst in refused if not self._refused_joins[dst]]
                for dst in done:
                    del self._refused_joins[dst]
            if done:
                raise ParallelEncodingUnsupported(PARALLEL_ENCODING_MESSAGE)


def _server_flags(server_args: Mapping[str, Any]) -> list[str]:
    """`sgl.Runtime`-style keyword arguments as launcher flags: `lora_paths={"plan": p}`
    -> `--lora-paths plan=p`, `enable_lora=True` -> `--enable-lora`, None/False dropped."""
    argv: list[str] = []
    for key, value in server_args.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, Mapping):
            argv.extend([flag, *(f"{name}={path}" for name, path in value.items())])
        elif isinstance(value, (list, tuple)):
            argv.extend([flag, *map(str, value)])
        else:
            argv.extend([flag, str(value)])
    return argv


class Runtime:
    """Our launcher in a child process, like `sgl.Runtime`, for scripts and notebooks.

        runtime = Runtime(model_path=m, enable_lora=True, lora_paths={"plan": p})
        sgl.set_default_backend(runtime.endpoint)

    Positional `args` are raw launcher flags; keyword arguments become flags. The server
    stops on `shutdown()`, on leaving a `with` block, and at interpreter exit.
    """

    def __init__(
        self,
        *args: str,
        chat_template_name: str | None = None,
        startup_timeout: float = 300.0,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        **server_args: Any,
    ) -> None:
        self._server = ServerProcess(
            [*args, *_server_flags(server_args)], startup_timeout, env=env, log_path=log_path
        )
        atexit.register(self.shutdown)
        try:
            self._server.start()
            self.url = self._server.url
            self.endpoint = LRAgentEndpoint(self.url, chat_template_name=chat_template_name)
        except BaseException:
            self.shutdown()
            raise

    @classmethod
    def smollm2(cls, scheme: Scheme = DEFAULT_SCHEME, **kwargs: Any) -> "Runtime":
        """The embedded SmolLM2-135M-Instruct with the three trained shared-A role adapters
        shipped in the package (`models.smollm2_role_adapters`)."""
        from lragent_sglang.agents.models import smollm2_checkpoint, smollm2_role_adapters

        server_args: dict[str, Any] = {
            "model_path": smollm2_checkpoint(),
            "dtype": "float32",
            "enable_lora": True,
            "lora_paths": smollm2_role_adapters(),
            "max_loras_per_batch": 4,
            "max_lora_rank": 8,
            "lragent_scheme": str(scheme),
            "chat_template_name": "chatml",
        }
        return cls(**{**server_args, **kwargs})

    @property
    def log_path(self) -> Path:
        return self._server.log_path

    def shutdown(self) -> None:
        """Stop the server and all its processes; safe to call more than once."""
        atexit.unregister(self.shutdown)
        self._server.stop()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
