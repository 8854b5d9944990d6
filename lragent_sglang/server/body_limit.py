"""Refuse oversized HTTP request bodies before SGLang reads them (issue 20.3).

SGLang parses and tokenises a request body on the HTTP server's event loop: a 50 MB
text took 80-99 s to be refused and stalled every other request for ~70 s. `BodyLimit`
answers 413 naming the limit from the Content-Length header alone, without parsing the
body (uvicorn reads the rest and discards it, so the client sees the answer); a chunked
body is counted as it arrives and refused once past the limit. The limit is `--lragent-max-body-mb` / `LRAGENT_MAX_BODY_MB`
(default `config.DEFAULT_MAX_BODY_MB`).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Awaitable, Callable

from lragent_sglang.server.config import MAX_BODY_ENV, selected

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
_HTTP_SERVER = "sglang.srt.entrypoints.http_server"
MIB = 1 << 20


class BodyLimit:
    """ASGI middleware: 413 for an HTTP request whose body is above `limit_mb` MiB."""

    def __init__(self, app: Callable[..., Awaitable[None]], limit_mb: float) -> None:
        self.app = app
        self.limit_mb = limit_mb
        self.limit = int(limit_mb * MIB)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.limit:
                return await self.refuse(send, int(length))
            return await self.app(scope, receive, send)
        if dict(scope["headers"]).get(b"transfer-encoding", b"").lower() != b"chunked":
            return await self.app(scope, receive, send)
        messages, size = [], 0
        while True:  # chunked: read up to the limit, then hand the body on
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self.refuse(send, size)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def refuse(self, send: Send, size: int) -> None:
        text = (f"request body of {size} bytes is above this server's limit of {self.limit_mb:g} MiB "
                f"(raise it with --lragent-max-body-mb or {MAX_BODY_ENV})")
        body = json.dumps({"error": {"message": text, "code": 413}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def add_body_limit(rt: Any, result: Any, tm: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER hook of `TokenizerManager.__init__`: in the HTTP server's process (its module
    is loaded, its app not yet started), put `BodyLimit` in front of SGLang's app."""
    http_server = sys.modules.get(_HTTP_SERVER)
    if http_server is None or not selected(tm.server_args):
        return
    app = http_server.app
    if any(m.cls is BodyLimit for m in app.user_middleware):
        return
    try:
        app.add_middleware(BodyLimit, limit_mb=rt.config.max_body_mb)
    except RuntimeError as exc:  # the app already serves (SGLang's multi-tokenizer workers)
        logger.warning("lragent: request body limit not installed: %s", exc)
