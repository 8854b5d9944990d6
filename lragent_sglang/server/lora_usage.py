"""Release each request's LoRA usage count exactly once (issue 20.2).

SGLang counts the requests using an adapter (`LoRARegistry.acquire` when a request
resolves its `lora_path`) and `/unload_lora_adapter` waits for that count to reach zero.
It releases the count only when a finished output finds the request's state still in
the tokenizer manager. A client that disconnects or times out has its state dropped
first ("Received output for rid=... but the state was deleted"), and so has a request
aborted in the waiting queue or refused after the acquire: the count is never released,
the unload never returns and, holding SGLang's LoRA update lock, blocks every later load
and unload. (The 500/503 abort path releases twice; parallel sampling once per child.)

Here a `LoRAUsage` ledger per tokenizer manager owns the release instead: a request
holds its count from the acquire until its state is gone and the scheduler has reported
every rid it was sent (a finished output or an abort echo); SGLang's own releases are
skipped once the ledger owns the registry.
"""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass, field
from typing import Any

from lragent_sglang.server.config import selected

_LEDGER_RELEASE: contextvars.ContextVar[bool] = contextvars.ContextVar("lragent_ledger_release", default=False)


@dataclass(slots=True)
class Hold:
    """One logical request's usage counts."""

    rid: str
    lora_ids: list[str]
    in_scheduler: set[str] = field(default_factory=set)  # rids sent, not yet reported done
    state_gone: bool = False


class LoRAUsage:
    """The holds of one tokenizer manager, by logical rid and by rid sent."""

    def __init__(self, tm: Any) -> None:
        self.tm = tm
        self.holds: dict[str, Hold] = {}
        self.sent: dict[str, Hold] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        tm.lora_registry.lragent_owned = True

    def acquired(self, rids: list[str], lora_ids: list[Any]) -> None:
        for rid, ids in zip(rids, lora_ids):
            ids = [i for i in (ids if isinstance(ids, list) else [ids]) if i is not None]
            if ids:
                self.holds[rid] = Hold(rid, ids)

    def dispatched(self, rid: str) -> None:
        hold = self.holds.get(rid) or self.holds.get(self.tm.child_rid_to_logical_rid.get(rid))
        if hold is not None:
            hold.in_scheduler.add(rid)
            self.sent[rid] = hold

    def done(self, rid: str) -> None:
        """The scheduler will not run `rid` any more."""
        hold = self.sent.pop(rid, None)
        if hold is not None:
            hold.in_scheduler.discard(rid)
            self._maybe_release(hold)

    def state_removed(self, rid: str) -> None:
        hold = self.holds.get(rid)
        if hold is not None:
            hold.state_gone = True
            self._maybe_release(hold)

    def _maybe_release(self, hold: Hold) -> None:
        if not hold.state_gone or hold.in_scheduler:
            return
        if self.holds.get(hold.rid) is hold:
            del self.holds[hold.rid]
        token = _LEDGER_RELEASE.set(True)
        try:
            release = self.tm.lora_registry.release(hold.lora_ids)
        finally:
            _LEDGER_RELEASE.reset(token)
        task = asyncio.get_running_loop().create_task(release)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def usage(tm: Any) -> LoRAUsage | None:
    """The tokenizer manager's ledger (created on first use); None where our backends are
    not selected or LoRA is off: SGLang's own counting stays."""
    if "lragent_lora_usage" not in tm.__dict__:
        on = selected(tm.server_args) and tm.server_args.enable_lora
        tm.lragent_lora_usage = LoRAUsage(tm) if on else None
    return tm.lragent_lora_usage


def _rids(obj: Any) -> list[str]:
    return [obj.rid] if isinstance(obj.rid, str) else list(obj.rid)


async def track_acquire(original: Any, tm: Any, obj: Any, *args: Any, **kwargs: Any) -> None:
    """AROUND hook of `TokenizerManager._resolve_lora_path` (where SGLang acquires)."""
    await original(tm, obj, *args, **kwargs)
    ledger = usage(tm)
    if ledger is not None:
        single = isinstance(obj.rid, str)
        ledger.acquired(_rids(obj), [obj.lora_id] if single else list(obj.lora_id))


def track_send_one(result: Any, tm: Any, tokenized_obj: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER hook of `TokenizerManager._send_one_request`."""
    if (ledger := usage(tm)) is not None:
        ledger.dispatched(tokenized_obj.rid)


def track_send_batch(result: Any, tm: Any, tokenized_objs: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER hook of `TokenizerManager._send_batch_request`."""
    if (ledger := usage(tm)) is not None:
        for tokenized_obj in tokenized_objs:
            ledger.dispatched(tokenized_obj.rid)


def track_outputs(tm: Any, recv_obj: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE hook of `TokenizerManager._handle_batch_output`: finished rids are done,
    whether or not their state is still there."""
    if (ledger := usage(tm)) is not None:
        for rid, reason in zip(recv_obj.rids, recv_obj.finished_reasons):
            if reason is not None:
                ledger.done(rid)


def track_abort(tm: Any, recv_obj: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE hook of `TokenizerManager._handle_abort_req` (the scheduler dropped a
    waiting request)."""
    if (ledger := usage(tm)) is not None:
        ledger.done(recv_obj.rid)


def track_state_removed(result: Any, tm: Any, rid: str, *args: Any, **kwargs: Any) -> None:
    """AFTER hook of `TokenizerManager._remove_req_state` (result: the removed state)."""
    if result is not None and (ledger := usage(tm)) is not None:
        ledger.state_removed(rid)


def skip_stock_release(original: Any, registry: Any, lora_id: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND hook of `LoRARegistry.release`: once a ledger owns the registry only the
    ledger releases (SGLang's calls would release some requests twice)."""
    if getattr(registry, "lragent_owned", False) and not _LEDGER_RELEASE.get():
        return _nothing()
    return original(registry, lora_id, *args, **kwargs)


async def _nothing() -> None:
    return None
