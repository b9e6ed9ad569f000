"""A web app that streams moderated chat completions, with GuardedSSEResponse.

Run it offline (a scripted loopback upstream and a keyword moderator):

    python examples/fastapi_app.py
    curl -N localhost:8000/chat -d '{"messages": [{"role": "user", "content": "Tell me a story."}]}'

or against a real API: ``STREAMGUARD_UPSTREAM=https://api.openai.com/v1 OPENAI_API_KEY=... python
examples/fastapi_app.py`` (then the OpenAI Moderation endpoint judges the text).

Written with Starlette so it runs with the ``[server]`` extra alone. In FastAPI the handler is the
same, since ``GuardedSSEResponse`` is a Starlette ``Response``:

    @app.post("/chat")
    async def chat(request: Request) -> GuardedSSEResponse:
        ...
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from openai import AsyncOpenAI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from streamguard import KeywordModerator, Moderator, OpenAIModerator, Policy
from streamguard.integrations.starlette import GuardedSSEResponse
from streamguard.testing.upstream import LoopbackUpstream, Script, text_chunks

STORY = "Once upon a time the model said it would attack the castle at dawn, but the guard stopped it."


def create_app(base_url: str, api_key: str, moderator: Moderator | None = None) -> Starlette:
    """The app: ``POST /chat`` with ``{"messages": [...]}`` streams a guarded answer as SSE."""
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncOpenAI(api_key=api_key, base_url=base_url) as client:
            state["client"] = client
            # One moderator for the whole app: windows of concurrent streams are batched.
            state["moderator"] = moderator or OpenAIModerator(client)
            yield

    async def chat(request: Request) -> GuardedSSEResponse:
        body = await request.json()
        client: AsyncOpenAI = state["client"]
        messages = body["messages"]
        model = body.get("model", "gpt-4o-mini")
        return GuardedSSEResponse(
            # Called inside the response, so the upstream request starts only when streaming does,
            # and a client that leaves closes it.
            lambda: client.chat.completions.create(
                model=model, messages=messages, stream=True, stream_options={"include_usage": True}
            ),
            moderator=state["moderator"],
            policy=Policy(mode="holdback", action="cutoff"),
            model=model,
            messages=messages,
        )

    return Starlette(routes=[Route("/chat", chat, methods=["POST"])], lifespan=lifespan)


@contextlib.contextmanager
def offline_upstream() -> Iterator[LoopbackUpstream]:
    """A scripted OpenAI-compatible server on loopback, telling the same story every time."""
    words = STORY.split(" ")
    deltas = [words[0]] + [" " + w for w in words[1:]]
    with LoopbackUpstream(chat=lambda body: Script(text_chunks(deltas), delay=0.05)) as upstream:
        yield upstream


def main() -> None:
    base_url = os.environ.get("STREAMGUARD_UPSTREAM")
    if base_url:
        uvicorn.run(create_app(base_url, os.environ.get("OPENAI_API_KEY", "")), host="127.0.0.1", port=8000)
        return
    with offline_upstream() as upstream:
        app = create_app(upstream.base_url, "offline", KeywordModerator(["attack"]))
        uvicorn.run(app, host="127.0.0.1", port=8000)


if __name__ == "__main__":
    main()
