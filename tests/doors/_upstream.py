"""A loopback upstream for the door tests: any path, any method, a scripted answer per request.

Every request is answered by ``Doors.answer(method, path, body)``: a dict (a JSON body) or a list of
events (an SSE body, sent as real ``text/event-stream`` bytes).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from streamguard.testing.upstream import keyword_moderation, sse_body
from tests.integration._servers import serve_in_thread

FLAG = "bomb"  # what KeywordModerator([FLAG]) flags; it must never reach the caller
Answer = dict[str, Any] | list[dict[str, Any]]


@dataclass
class Doors:
    """The server's state: what to answer, and every request seen."""

    base_url: str = ""
    answer: Callable[[str, str, dict[str, Any]], Answer] = lambda method, path, body: {}
    requests: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)


@contextmanager
def doors_upstream() -> Iterator[Doors]:
    """Serve a :class:`Doors` on 127.0.0.1 (free port); ``base_url`` ends in ``/v1``."""
    state = Doors()
    moderation = keyword_moderation([FLAG])

    async def endpoint(request: Request) -> Response:
        raw = await request.body()
        body = json.loads(raw) if raw else {}
        path = request.url.path
        state.requests.append((request.method, path, body))
        if path == "/v1/moderations":
            reply = moderation(body)
            return JSONResponse(reply.body, status_code=reply.status)
        query = request.url.query
        answer = state.answer(request.method, f"{path}?{query}" if query else path, body)
        if isinstance(answer, list):
            return Response(sse_body(answer), media_type="text/event-stream")
        return JSONResponse(answer)

    app = Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "POST", "DELETE"])])
    with serve_in_thread(app) as url:
        state.base_url = url + "/v1"
        yield state
