"""A cap on JSON request bodies, applied before anything reads, parses or authenticates them.

Blob uploads (``PUT /v1/blobs/...``) stream to disk under their own cap
(``Settings.max_upload_bytes``) and are left alone; every other body larger than
``Settings.max_body_bytes`` is answered 413 as soon as its declared length, or the bytes
received so far, pass the cap: the API never holds more than the cap of a request body.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fimntk.contract import problems
from fimntk.contract.problems import problem

_UPLOAD_PREFIX = "/v1/blobs/"


class BodyLimitMiddleware:
    """ASGI middleware refusing request bodies past ``max_bytes`` with a 413 problem.

    Args:
        app: The wrapped application.
        max_bytes: Largest body accepted.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(_UPLOAD_PREFIX):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send)
            return
        # Read the body here, up to the cap, then replay it: a body past the cap is refused
        # before the app (or FastAPI's own body parsing, which turns read errors into 400s)
        # sees any of it.
        chunks: list[bytes] = []
        received = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away: nothing to answer
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            problem(
                problems.PAYLOAD_TOO_LARGE,
                f"request bodies are at most {self.max_bytes} bytes (FIMNTK_MAX_BODY_BYTES)",
            )
        ).encode()
        headers: list[Any] = [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
