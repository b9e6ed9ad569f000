"""A recording upstream for the proxy's route tests: any method and path, answers scripted per (method, path)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send


@dataclass
class Seen:
    """One request as upstream received it."""

    method: str
    path: str
    raw_path: bytes
    query: bytes
    headers: dict[str, str]
    body: bytes
    client: tuple[str, int] | None = None  # the peer's address: one per connection


Answer = Callable[[Request, bytes], Response]


@dataclass
class RecordingUpstream:
    """An ASGI app that records every request and answers from ``answers`` (404 otherwise)."""

    answers: dict[tuple[str, str], Answer] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        body = await request.body()
        self.seen.append(
            Seen(
                scope["method"],
                scope["path"],
                scope.get("raw_path") or b"",
                scope.get("query_string", b""),
                {k.lower(): v for k, v in request.headers.items()},
                body,
                tuple(scope["client"]) if scope.get("client") else None,
            )
        )
        answer = self.answers.get((scope["method"], scope["path"]))
        response = answer(request, body) if answer else Response(b'{"error":{"message":"nope"}}', 404)
        await response(scope, receive, send)

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]


def slow_reply(upstream: RecordingUpstream, seconds: float, body: bytes) -> Answer:
    """An answer that takes ``seconds``, and records in ``upstream.cancelled`` when its caller left first."""

    class Slow(Response):
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            with anyio.move_on_after(seconds):
                while (await receive())["type"] != "http.disconnect":
                    pass
                upstream.cancelled.set()
                return
            await Response(body, media_type="application/json")(scope, receive, send)

    return lambda request, raw: Slow()


def streamed(parts: list[bytes], *, media_type: str, headers: dict[str, str] | None = None) -> Answer:
    """An answer streamed in ``parts``, with ``headers``."""

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part
            await anyio.sleep(0.001)

    return lambda request, raw: StreamingResponse(body(), media_type=media_type, headers=headers)


def fixed(
    content: bytes, *, status: int = 200, media_type: str = "application/json", headers: dict[str, str] | None = None
) -> Answer:
    """A fixed answer."""
    return lambda request, raw: Response(content, status, media_type=media_type, headers=headers)


def echo_answer(request: Request, raw: bytes) -> Any:
    return Response(raw, media_type="application/json")
