"""Our per-request state, kept on SGLang's `Req` as `req.lragent`.

The AFTER hook of `Req.__init__` gives every request one `RequestState`, so the cache,
the allocation hooks and the statistics read typed fields instead of probing optional
attributes. The same hook drops the adapter id that SGLang appends to every request's
cache key (`extra_key`), so that every scheme that shares across adapters keys its tree
by tokens only; `req.lora_id` still names the adapter (its LR rows, its statistics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lragent_sglang.server.config import selected

if TYPE_CHECKING:
    from lragent_sglang.server.runtime import LRAgentRuntime


@dataclass(slots=True)
class RequestState:
    """What LRAgent keeps about one request between scheduling steps."""

    counted: bool = False  # counted in the per-adapter statistics (at its first match)
    gap: torch.Tensor | None = None  # base slots of an LR-prefill gap still to hand out
    lr_prefix: torch.Tensor | None = None  # LR slots of the matched LR prefix (for req_to_lr)
    lr_protected: int = 0  # leading LR slots the tree owns (never freed by the request)
    match_key: tuple[Any, Any] | None = None  # (tokens, namespace) of its last prefix match


def init_request(rt: "LRAgentRuntime", result: Any, req: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER hook of `Req.__init__` (see module docstring)."""
    req.lragent = RequestState()
    if rt.config.scheme.keys_by_adapter:
        return
    from sglang.srt.server_args import get_global_server_args

    lora_id, key = req.lora_id, req.extra_key
    if lora_id and key is not None and key.endswith(lora_id) and selected(get_global_server_args()):
        req.extra_key = key[: -len(lora_id)] or None
