"""Refuse hostile or malformed requests in the process that receives them (issue 17).

SGLang 0.5.17 passes client token ids to the model unchecked (it defines
`_validate_input_ids_in_vocab` but never calls it): an id outside the vocabulary, a
`lora_path` list for a single prompt or a float `max_new_tokens` kills the scheduler, and
wrong JSON types in `sampling_params` end in a bare 500. `check_request` looks at the
request as the client sent it, before SGLang normalises it, registers its state or takes
an adapter's usage count, and raises `BadRequest` (a ValueError: SGLang answers 400) with
one line naming the field. Lengths of tokenised prompts against the context are SGLang's
own check (`_validate_one_request`); input_embeds, which it does not count, are ours.
`/load_lora_adapter` gets our launcher's adapter checks (issue 20.4).
"""

from __future__ import annotations

import asyncio
import functools
import re
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import msgspec

from lragent_sglang.adapters.check import check_server_adapters
from lragent_sglang.adapters.io import AdapterError
from lragent_sglang.scheme import Scheme
from lragent_sglang.server.config import selected

if TYPE_CHECKING:
    from lragent_sglang.server.runtime import LRAgentRuntime

# Fields of SGLang's SamplingParams that its normalize() fills in, not a client.
_INTERNAL = frozenset({"stop_strs", "stop_regex_strs", "stop_str_max_len", "stop_regex_max_len", "is_normalized"})
_MSGSPEC_TYPE = re.compile(r"Expected `(?P<want>[^`]+)`, got `(?P<got>[^`]+)`(?: - at `\$(?P<at>.*)`)?$")
_MSGSPEC_UNKNOWN = re.compile(r"Object contains unknown field `(?P<name>[^`]+)`(?: - at `\$(?P<at>.*)`)?$")


class BadRequest(ValueError):
    """A request SGLang must not run; the message is one line naming the field."""


@functools.cache
def sampling_schema() -> type[msgspec.Struct]:
    """SGLang's SamplingParams fields as a strict schema: the same JSON types, each also
    null (SGLang maps null to the default), unknown and internal fields refused."""
    from sglang.srt.sampling.sampling_params import SamplingParams

    hints = typing.get_type_hints(SamplingParams)
    fields = [(f, Optional[hints[f]], None) for f in SamplingParams.__struct_fields__ if f not in _INTERNAL]
    return msgspec.defstruct("SamplingParamsSchema", fields, kw_only=True, forbid_unknown_fields=True)


def _schema_error(exc: msgspec.ValidationError, where: str) -> BadRequest:
    text = str(exc)
    if m := _MSGSPEC_TYPE.match(text):
        return BadRequest(f"{where}{m['at'] or ''} must be {m['want']}, got {m['got']}")
    if m := _MSGSPEC_UNKNOWN.match(text):
        return BadRequest(f"{where}{m['at'] or ''} has an unknown field {m['name']!r}")
    return BadRequest(f"{where}: {text}")


def _check_ids(ids: Any, vocab: int, where: str) -> None:
    """A non-empty list of token ids, each an int in [0, vocab)."""
    if not isinstance(ids, list) or not ids:
        raise BadRequest(f"{where} must be a non-empty list of token ids")
    if all(type(t) is int for t in ids) and 0 <= min(ids) and max(ids) < vocab:
        return
    i, t = next((i, t) for i, t in enumerate(ids) if type(t) is not int or not 0 <= t < vocab)
    if type(t) is not int:
        raise BadRequest(f"{where}[{i}] must be an integer token id, got {type(t).__name__}")
    raise BadRequest(f"{where}[{i}] = {t} is outside the vocabulary [0, {vocab})")


def check_sampling(params: Any, vocab: int, where: str = "sampling_params") -> None:
    """One prompt's sampling parameters: SGLang's fields with their JSON types, and
    token ids (stop_token_ids, logit_bias keys) inside the vocabulary."""
    if params is None:
        return
    if not isinstance(params, dict):
        raise BadRequest(f"{where} must be an object, got {type(params).__name__}")
    try:
        msgspec.convert(params, sampling_schema(), strict=True)
    except msgspec.ValidationError as exc:
        raise _schema_error(exc, where) from None
    if params.get("stop_token_ids"):
        _check_ids(list(params["stop_token_ids"]), vocab, f"{where}.stop_token_ids")
    for key in params.get("logit_bias") or {}:
        if not str(key).isdigit() or int(key) >= vocab:
            raise BadRequest(f"{where}.logit_bias key {key!r} must be a token id in [0, {vocab})")


def _prompts(obj: Any, vocab: int, context_len: int, hidden_size: int) -> tuple[bool, int]:
    """Check the prompt fields; return (single prompt, number of prompts)."""
    if obj.text is not None:
        return isinstance(obj.text, str), 1 if isinstance(obj.text, str) else len(obj.text)
    if obj.input_ids is not None:
        ids = obj.input_ids
        if isinstance(ids, list) and ids and all(isinstance(row, list) for row in ids):
            for b, row in enumerate(ids):
                _check_ids(row, vocab, f"input_ids[{b}]")
            return False, len(ids)
        _check_ids(ids, vocab, "input_ids")
        return True, 1
    embeds = getattr(obj, "input_embeds", None)
    if embeds is None:
        return True, 1  # nothing to check: SGLang refuses a request without a prompt
    if not isinstance(embeds, list) or not embeds or not isinstance(embeds[0], list) or not embeds[0]:
        raise BadRequest("input_embeds must be a list of rows, or a list of such lists for a batch")
    single = not isinstance(embeds[0][0], list)
    for b, rows in enumerate([embeds] if single else embeds):
        where = "input_embeds" if single else f"input_embeds[{b}]"
        if not isinstance(rows, list) or not rows or any(not isinstance(r, list) or len(r) != hidden_size
                                                         for r in rows):
            raise BadRequest(f"{where} must be a non-empty list of rows of {hidden_size} numbers (the hidden size)")
        if len(rows) >= context_len:
            raise BadRequest(f"{where} has {len(rows)} rows; the model's context length is {context_len} tokens")
    return single, 1 if single else len(embeds)


def _check_lora_path(lora_path: Any, single: bool, n_prompts: int) -> None:
    if lora_path is None or isinstance(lora_path, str):
        return
    if not isinstance(lora_path, list):
        raise BadRequest(f"lora_path must be an adapter name or a list of them, got {type(lora_path).__name__}")
    if single:
        raise BadRequest("lora_path must be one adapter name (a string) for a single prompt; "
                         "a list needs a batch of prompts, one entry per prompt")
    if len(lora_path) != n_prompts:
        raise BadRequest(f"lora_path has {len(lora_path)} entries for {n_prompts} prompts (one per prompt)")
    if not all(p is None or isinstance(p, str) for p in lora_path):
        raise BadRequest("lora_path entries must be adapter names (strings) or null")


def check_request(obj: Any, vocab: int, context_len: int, hidden_size: int) -> None:
    """Every check above on one /generate (or /encode) request as received; BadRequest
    naming the first bad field."""
    single, n_prompts = _prompts(obj, vocab, context_len, hidden_size)
    params = getattr(obj, "sampling_params", None)
    if isinstance(params, list):
        if single:
            raise BadRequest("sampling_params must be one object for a single prompt, got a list")
        if len(params) != n_prompts:
            raise BadRequest(f"sampling_params has {len(params)} entries for {n_prompts} prompts (one per prompt)")
        for i, p in enumerate(params):
            check_sampling(p, vocab, f"sampling_params[{i}]")
    else:
        check_sampling(params, vocab)
    _check_lora_path(getattr(obj, "lora_path", None), single, n_prompts)


def check_adapter_names(lora_path: Any, known: Any) -> None:
    """Every adapter a (well-formed) `lora_path` names is one the server knows."""
    for name in [lora_path] if isinstance(lora_path, str) else lora_path or []:
        if name is not None and name not in known:
            raise BadRequest(f"lora_path {name!r} is not a loaded adapter (loaded: {', '.join(sorted(known))})")


def validate_request(tm: Any, obj: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE hook of `TokenizerManager.generate_request` (every route and the Engine API
    pass through it): `check_request` with this model's sizes, then the adapter names
    against those loaded or evicted by --max-loaded-loras (SGLang's `lora_ref_cache`)."""
    if selected(tm.server_args):
        cfg = tm.model_config
        check_request(obj, cfg.vocab_size, tm.context_len, cfg.hidden_size)
        if tm.server_args.enable_lora:
            check_adapter_names(getattr(obj, "lora_path", None), tm.lora_ref_cache)


async def forget_on_unload(original: Any, tm: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND hook of `TokenizerManager.unload_lora_adapter` (the /unload_lora_adapter
    route; --max-loaded-loras eviction calls the locked helper and is left alone).

    SGLang remembers every adapter it loaded (`lora_ref_cache`) and loads an unloaded one
    again from its old folder when a request names it. After an explicit unload that
    serves the old weights, and under traffic that names the adapter the next
    /load_lora_adapter of the name fails ("already loaded") again and again: a hot swap
    never lands (the GPU soak, issue 17). The name is forgotten before the unload starts,
    so requests naming it get a 400 until it is loaded again."""
    if not selected(tm.server_args):
        return await original(tm, obj, *args, **kwargs)
    ref = tm.lora_ref_cache.pop(obj.lora_name, None)
    result = await original(tm, obj, *args, **kwargs)
    if not result.success and ref is not None:
        tm.lora_ref_cache.setdefault(obj.lora_name, ref)
    return result


def _vet_adapter(name: str, path: str, server_args: Any, scheme: Scheme) -> None:
    """Our launcher's start-up checks (adapters.check) on one adapter loaded at run time;
    the one-LR-cache basis is checked where it lives, in the scheduler (lora_split)."""
    if Path(server_args.model_path, "config.json").is_file():  # a local checkpoint to check against
        check_server_adapters({name: path}, server_args.model_path, scheme, server_args.max_lora_rank)


async def check_adapter_load(rt: "LRAgentRuntime", original: Any, tm: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND hook of `TokenizerManager.load_lora_adapter`: refuse (400, one line naming
    the adapter) what our launcher refuses at start-up, before SGLang tries a missing
    folder as a Hugging Face repo id or loads k_proj LoRA into a base-sharing scheme."""
    if selected(tm.server_args):
        try:
            await asyncio.to_thread(_vet_adapter, obj.lora_name, obj.lora_path, tm.server_args, rt.config.scheme)
        except AdapterError as exc:
            from sglang.srt.managers.io_struct import LoadLoRAAdapterReqOutput

            return LoadLoRAAdapterReqOutput(success=False, error_message=str(exc))
    return await original(tm, obj, *args, **kwargs)
