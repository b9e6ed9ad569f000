"""``guard_sse``: a raw httpx streaming response from the loopback upstream, guarded as bytes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx2
import pytest
from openai._streaming import SSEDecoder

from streamguard.exceptions import StreamFormatError
from streamguard.integrations._sse import DONE
from streamguard.policy import Policy
from streamguard.sse import guard_sse
from streamguard.testing import FakeModerator
from streamguard.testing.upstream import LoopbackUpstream, Script, sse_body, text_chunks
from tests.conftest import other_tasks
from tests.helpers import words

MESSAGES = [{"role": "user", "content": "Tell me a story."}]
STORY = (
    "Once upon a time a careful engineer wrote a library that watched every word. "
    "Then one day the model said that it would attack the castle at dawn, "
    "and the library stopped it before anyone could read the plan. The end came quietly."
)
CLEAN = "Un café très calme 😀 au bord de la rivière, sous la longue lumière des soirs d'été."


async def decode(chunks: list[bytes]) -> list[str]:
    """The data of each event, as openai's own SSE decoder reads them."""

    async def gen() -> AsyncIterator[bytes]:
        for c in chunks:
            yield c

    return [sse.data async for sse in SSEDecoder().aiter_bytes(gen())]


def text_of(payloads: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in payloads if c["choices"])


async def test_clean_body_round_trips(upstream: LoopbackUpstream) -> None:
    """A clean body comes out as the same chunks in OpenAI's wire format, ending with [DONE]."""
    events = text_chunks(words(CLEAN), usage={"prompt_tokens": 5, "completion_tokens": 30, "total_tokens": 35})
    upstream.chat = lambda body: Script(events, delay=0.001)
    with anyio.fail_after(10):
        async with (
            httpx2.AsyncClient() as http,
            http.stream("POST", upstream.base_url + "/chat/completions", json={"stream": True}) as response,
        ):
            async with guard_sse(response.aiter_bytes(), moderator=FakeModerator(["attack"])) as guarded:
                out = [b async for b in guarded]
    assert out[-1] == DONE
    data = await decode(out)
    assert data[-1] == "[DONE]"
    assert [json.loads(d) for d in data[:-1]] == events
    assert guarded.report.usage_source == "upstream"


async def test_cutoff_closes_the_response_early(upstream: LoopbackUpstream) -> None:
    """A flag ends the body with content_filter and [DONE], and closes the response before its end."""
    long_tail = STORY + " More words follow." * 200
    upstream.chat = lambda body: Script(text_chunks(words(long_tail)), delay=0.002)
    with anyio.fail_after(10):
        async with httpx2.AsyncClient() as http:
            request = http.build_request("POST", upstream.base_url + "/chat/completions", json={"stream": True})
            response = await http.send(request, stream=True)
            guarded = guard_sse(response.aiter_bytes(), moderator=FakeModerator(["attack"]), messages=MESSAGES)
            out = [b async for b in guarded]  # the bare form
            assert response.is_closed  # closed by the guard, not by us
            assert await upstream.await_ended(1)
    payloads = [json.loads(d) for d in (await decode(out))[:-1]]
    text = text_of(payloads)
    assert "attack" not in text and STORY.startswith(text) and text
    finishes = [ch["finish_reason"] for c in payloads for ch in c["choices"] if ch.get("finish_reason")]
    assert finishes == ["content_filter"]
    assert out[-1] == DONE
    assert upstream.aborted == 1
    assert not other_tasks()


async def test_aclose_early_closes_the_body() -> None:
    """``aclose()`` after a few events closes the body and leaves no task."""
    closed = anyio.Event()

    async def body() -> AsyncIterator[bytes]:
        try:
            for event in text_chunks(words(CLEAN) * 50):
                yield sse_body([event], done=False)
                await anyio.sleep(0.001)
        finally:
            closed.set()

    with anyio.fail_after(10):
        guarded = guard_sse(body(), moderator=FakeModerator())
        first = await guarded.__anext__()
        assert first.startswith(b"data: {")
        await guarded.aclose()
        await closed.wait()
        with pytest.raises(StopAsyncIteration):
            await guarded.__anext__()
    assert not other_tasks()


async def _odd_body(raw: bytes, step: int) -> AsyncIterator[bytes]:
    for i in range(0, len(raw), step):
        yield raw[i : i + step]


@pytest.mark.parametrize("step", [1, 3, 7, 64])
async def test_odd_chunking_crlf_comments_and_events(step: int) -> None:
    """``\\r\\n`` endings, comments, ``event:`` lines and boundaries inside characters change nothing."""
    events = text_chunks(words(CLEAN))
    raw = b": hello\r\n\r\n" + sse_body(events).replace(b"\n", b"\r\n").replace(b"data: {", b"event: x\r\ndata: {")
    with anyio.fail_after(10):
        policy = Policy(include_usage=False)
        async with guard_sse(_odd_body(raw, step), moderator=FakeModerator(), policy=policy) as guarded:
            out = [b async for b in guarded]
    assert [json.loads(d) for d in (await decode(out))[:-1]] == events


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"data: {oops\n\n", "not valid JSON"),
        (b"data: [1]\n\n", "not a JSON object"),
        (b'data: {"error": {"message": "The server is overloaded", "type": "server_error"}}\n\n', "overloaded"),
    ],
)
async def test_malformed_body_raises_after_what_came_before(payload: bytes, match: str) -> None:
    """A malformed event raises StreamFormatError; the clean text before it was released first."""
    raw = sse_body(text_chunks(["Hello", " there."], finish_reason=None), done=False)

    async def body() -> AsyncIterator[bytes]:
        async for part in _odd_body(raw, 5):
            yield part
        await anyio.sleep(0.3)  # the text before is judged (quiet-gap flush) and released
        yield payload

    seen: list[bytes] = []
    with anyio.fail_after(10):
        with pytest.raises(StreamFormatError, match=match):
            async with guard_sse(body(), moderator=FakeModerator()) as guarded:
                async for b in guarded:
                    seen.append(b)
    assert text_of([json.loads(d) for d in await decode(seen)]) == "Hello there."
