"""GuardedSSEResponse: OpenAI's wire format over real HTTP, pings, errors, and disconnects."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx2
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Message

from streamguard import Policy
from streamguard.integrations.starlette import GuardedSSEResponse
from streamguard.testing import FakeModerator
from streamguard.testing.upstream import LoopbackUpstream, Reply, Script, text_chunks
from tests.conftest import other_tasks
from tests.helpers import words
from tests.integration._servers import serve_in_thread

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story."}]
CLEAN = "A calm answer about gardens and rivers and the long light of summer evenings, told slowly."
USAGE = {"prompt_tokens": 12, "completion_tokens": 40, "total_tokens": 52}

App = Callable[..., str]


def sse_app(upstream: LoopbackUpstream, responses: list[GuardedSSEResponse], **options: Any) -> Starlette:
    """An app whose /v1/chat/completions streams the upstream's answer through GuardedSSEResponse."""
    clients: list[AsyncOpenAI] = []

    async def chat(request: Request) -> GuardedSSEResponse:
        body = await request.json()
        client = clients[0]
        response = GuardedSSEResponse(
            lambda: client.chat.completions.create(model="gpt-4o-mini", messages=body["messages"], stream=True),
            moderator=options.pop("moderator", FakeModerator(["attack"])),
            messages=body["messages"],
            **options,
        )
        responses.append(response)
        return response

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncOpenAI(api_key="test", base_url=upstream.base_url, max_retries=0, timeout=10) as client:
            clients.append(client)
            yield

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])], lifespan=lifespan)


@pytest.fixture
def start_app(upstream: LoopbackUpstream) -> Iterator[tuple[App, list[GuardedSSEResponse]]]:
    """Serve ``sse_app`` on loopback; returns (start(**options) -> /v1 base URL, responses made)."""
    responses: list[GuardedSSEResponse] = []
    with contextlib.ExitStack() as stack:

        def start(**options: Any) -> str:
            return stack.enter_context(serve_in_thread(sse_app(upstream, responses, **options))) + "/v1"

        yield start, responses


async def raw_post(url: str) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=10) as http:
        return await http.post(url + "/chat/completions", json={"model": "m", "messages": MESSAGES})


def data_events(body: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, asserting every event is well framed."""
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    return [e.removeprefix("data: ") for e in events if not e.startswith(":")]


async def test_wire_format_matches_openai(upstream: LoopbackUpstream, start_app: tuple[App, Any]) -> None:
    """Each chunk goes out as one compact data event, as upstream sent it, usage included, then [DONE]."""
    start, responses = start_app
    events = text_chunks(words(CLEAN), usage=USAGE)
    upstream.chat = lambda body: Script(events, delay=0.001)
    url = start()
    with anyio.fail_after(10):
        r = await raw_post(url)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert r.headers["cache-control"] == "no-cache"
    payloads = data_events(r.text)
    assert payloads[-1] == "[DONE]"
    assert [json.loads(p) for p in payloads[:-1]] == events
    # compact JSON, the same fields as upstream's (in the openai model's field order)
    assert all(p == json.dumps(json.loads(p), separators=(",", ":"), ensure_ascii=False) for p in payloads[:-1])
    assert responses[0].report is not None and responses[0].report.usage_source == "upstream"
    assert not responses[0].disconnected


async def test_openai_client_reads_a_cut_stream(upstream: LoopbackUpstream, start_app: tuple[App, Any]) -> None:
    """The real openai client reads the adapter's stream: a flag ends it with content_filter."""
    start, _ = start_app
    story = "Once upon a time the model said that it would attack the castle at dawn. " + CLEAN * 50
    upstream.chat = lambda body: Script(text_chunks(words(story)), delay=0.001)
    url = start()
    with anyio.fail_after(10):
        async with AsyncOpenAI(api_key="k", base_url=url, max_retries=0, timeout=10) as c:
            stream = await c.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            chunks = [x async for x in stream]
        assert await upstream.await_ended(1)
    text = "".join(ch.delta.content or "" for x in chunks for ch in x.choices)
    assert "attack" not in text and story.startswith(text)
    assert [ch.finish_reason for x in chunks for ch in x.choices if ch.finish_reason] == ["content_filter"]
    assert chunks[-1].usage is not None  # the guard's final usage chunk
    assert upstream.aborted == 1


async def test_pings_on_gaps(upstream: LoopbackUpstream, start_app: tuple[App, Any]) -> None:
    """Gaps longer than ``ping`` get ``: ping`` comments, which the openai client ignores."""
    start, _ = start_app
    upstream.chat = lambda body: Script(text_chunks(["Hello", " there."]), delay=0.3)
    url = start(ping=0.05)
    with anyio.fail_after(10):
        r = await raw_post(url)
        async with AsyncOpenAI(api_key="k", base_url=url, max_retries=0, timeout=10) as c:
            stream = await c.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            text = "".join([x.choices[0].delta.content or "" async for x in stream if x.choices])
    assert ": ping\n\n" in r.text
    assert data_events(r.text)[-1] == "[DONE]"
    assert text == "Hello there."


async def test_upstream_drop_sends_error_event(upstream: LoopbackUpstream, start_app: tuple[App, Any]) -> None:
    """An upstream that breaks mid-stream ends the body with one OpenAI-shaped error event, no [DONE]."""
    start, _ = start_app
    upstream.chat = lambda body: Script(text_chunks(words(CLEAN)), delay=0.001, drop_after=6)
    url = start()
    with anyio.fail_after(10):
        r = await raw_post(url)
        async with AsyncOpenAI(api_key="k", base_url=url, max_retries=0, timeout=10) as c:
            stream = await c.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            with pytest.raises(openai.APIError, match="Could not reach the upstream server"):
                async for _ in stream:
                    pass
    assert r.status_code == 200
    last = json.loads(data_events(r.text)[-1])
    assert last == {
        "error": {
            "message": "Could not reach the upstream server.",
            "type": "server_error",
            "param": None,
            "code": "upstream_unavailable",
        }
    }


async def test_moderation_failure_sends_error_event(upstream: LoopbackUpstream, start_app: tuple[App, Any]) -> None:
    """A failing moderator (fail closed) ends the stream with a moderation error event."""
    start, _ = start_app
    upstream.chat = lambda body: Script(text_chunks(words(CLEAN)), delay=0.001)
    url = start(moderator=FakeModerator(fail=RuntimeError("backend down")))
    with anyio.fail_after(10):
        r = await raw_post(url)
    payloads = data_events(r.text)
    assert json.loads(payloads[-1])["error"]["code"] == "moderation_failed"
    assert "backend down" not in r.text
    assert all("content" not in p or '"content":""' in p for p in payloads[:-1])  # nothing unmoderated shown


async def test_open_failure_is_a_status_response(upstream: LoopbackUpstream, start_app: tuple[App, Any]) -> None:
    """If upstream refuses the request, the response carries its status and error, not a stream."""
    start, _ = start_app
    error = {"error": {"message": "Bad model.", "type": "invalid_request_error", "param": "model", "code": None}}
    upstream.chat = lambda body: Reply(error, status=400)
    url = start()
    with anyio.fail_after(10):
        r = await raw_post(url)
    assert r.status_code == 400
    assert r.json() == error


async def test_http_disconnect_closes_upstream(upstream: LoopbackUpstream, start_app: tuple[App, Any]) -> None:
    """A client that leaves mid-stream makes the response close the upstream at once."""
    start, responses = start_app
    upstream.chat = lambda body: Script(text_chunks(words(CLEAN * 200)), delay=0.005)
    url = start()
    with anyio.fail_after(10):
        async with AsyncOpenAI(api_key="k", base_url=url, max_retries=0, timeout=10) as c:
            stream = await c.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            async for _ in stream:
                break
            await stream.close()
        assert await upstream.await_ended(1)
    assert upstream.aborted == 1 and upstream.completed == 0
    for _ in range(100):  # the server notices the disconnect on its own thread
        if responses[0].disconnected:
            break
        await anyio.sleep(0.01)
    assert responses[0].disconnected


async def test_asgi_disconnect_closes_upstream_and_leaves_no_task(
    upstream: LoopbackUpstream, client: AsyncOpenAI
) -> None:
    """With hand-written receive/send: http.disconnect after the first body part stops everything."""
    upstream.chat = lambda body: Script(text_chunks(words(CLEAN * 200)), delay=0.005)
    moderator = FakeModerator(latency=0.05)
    streams: list[Any] = []

    async def open_stream() -> Any:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        streams.append(stream)
        return stream

    response = GuardedSSEResponse(open_stream, moderator=moderator, policy=Policy(window_chars=32))
    sent: list[Message] = []
    body_started = anyio.Event()
    requested = False

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await body_started.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message["body"].startswith(b"data: "):
            body_started.set()

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "asgi": {"spec_version": "2.3"}}
    with anyio.fail_after(10):
        await response(scope, receive, send)
        assert await upstream.await_ended(1)
    assert response.disconnected
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert not any(m.get("body") == b"data: [DONE]\n\n" for m in sent)
    assert upstream.aborted == 1
    assert streams[0].response.is_closed
    assert moderator.in_flight == 0
    assert other_tasks() == set()


async def test_asgi_send_oserror_counts_as_disconnect(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """An ASGI 2.4 server's OSError from send ends the response quietly and closes upstream."""
    upstream.chat = lambda body: Script(text_chunks(words(CLEAN * 200)), delay=0.005)
    response = GuardedSSEResponse(
        lambda: client.chat.completions.create(model="m", messages=MESSAGES, stream=True), moderator=FakeModerator()
    )
    bodies = 0

    async def receive() -> Message:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        nonlocal bodies
        if message["type"] == "http.response.body":
            bodies += 1
            if bodies == 3:
                raise OSError("client went away")

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "asgi": {"spec_version": "2.4"}}
    with anyio.fail_after(10):
        await response(scope, receive, send)
        assert await upstream.await_ended(1)
    assert response.disconnected and bodies == 3
    assert upstream.aborted == 1
    assert other_tasks() == set()
