"""Test helpers: run an ASGI app with uvicorn on loopback in a thread; a header-recording upstream."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from streamguard.testing.upstream import keyword_moderation, sse_body, text_chunks


@contextmanager
def serve_in_thread(app: Any, *, lifespan: Literal["auto", "on", "off"] = "on", **options: Any) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 with a free port; yields ``http://127.0.0.1:PORT``.

    ``options`` go to ``uvicorn.Config`` (e.g. ``log_level="debug", log_config=None, access_log=True``).
    """
    settings: dict[str, Any] = {"log_level": "critical", "access_log": False, **options}
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan=lifespan, **settings)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.005)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def recording_upstream(deltas: Sequence[str]) -> tuple[Starlette, list[dict[str, str]]]:
    """An upstream that streams ``deltas``, flags nothing, and records each request's headers (lower-case names)."""
    seen: list[dict[str, str]] = []

    async def chat(request: Request) -> Response:
        seen.append(dict(request.headers))
        await request.body()
        return Response(sse_body(text_chunks(deltas)), media_type="text/event-stream")

    async def moderations(request: Request) -> Response:
        seen.append(dict(request.headers))
        return JSONResponse(keyword_moderation(())(await request.json()).body)

    async def models(request: Request) -> Response:
        seen.append(dict(request.headers))
        return JSONResponse({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/moderations", moderations, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ]
    )
    return app, seen
