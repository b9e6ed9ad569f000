"""Refused doors raise UnguardedError, name the path and what to use instead, and send nothing;
raw bytes of a guarded answer are refused too."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest
from openai import AsyncOpenAI, OpenAI

from streamguard import KeywordModerator, UnguardedError, wrap
from tests.doors._chat import KW, chat_answer
from tests.doors._upstream import FLAG, Doors

REFUSED: dict[str, tuple[Callable[[Any], Any], str]] = {
    "client.post": (lambda c: c.post("/chat/completions", body=KW, cast_to=object), "call the resource method"),
    "client.get": (lambda c: c.get("/responses/resp_1", cast_to=object), "call the resource method"),
    "client.request": (lambda c: c.request(object, None), "call the resource method"),
    "client.audio.transcriptions.create": (
        lambda c: c.audio.transcriptions.create(model="whisper-1", file=b"x"),
        "transcripts",
    ),
    "client.beta.responses.create": (lambda c: c.beta.responses.create(model="m", input="hi"), "client.responses"),
    "client.chat.completions.retrieve": (lambda c: c.chat.completions.retrieve("c1"), "moderate them yourself"),
    "client.chat.completions.messages.list": (lambda c: c.chat.completions.messages.list("c1"), "stored answers"),
    "client.responses.input_items.list": (lambda c: c.responses.input_items.list("r1"), "stored answers"),
    "client.responses.compact": (lambda c: c.responses.compact(model="m"), "responses.create"),
    "client.beta.threads.runs.create": (lambda c: c.beta.threads.runs.create("t1", assistant_id="a"), "Assistants"),
    "client.files.content": (lambda c: c.files.content("f1"), "file bytes"),
    "client.with_raw_response.chat.completions.list": (
        lambda c: c.with_raw_response.chat.completions.list(),
        "stored answers",
    ),
    "client.chat.completions.with_streaming_response.list": (
        lambda c: c.chat.completions.with_streaming_response.list(),
        "stored answers",
    ),
}


@pytest.mark.parametrize(("call", "advice"), REFUSED.values(), ids=REFUSED.keys())
def test_sync_refused(doors: Doors, sync_client: OpenAI, call: Callable[[Any], Any], advice: str) -> None:
    """The call raises UnguardedError naming the path and the alternative; nothing reaches upstream."""
    before = len(doors.requests)
    wrapped = wrap(sync_client, moderator=KeywordModerator([FLAG]))
    with pytest.raises(UnguardedError, match=advice) as caught:
        call(wrapped)
    assert "client." in str(caught.value)
    assert len(doors.requests) == before


@pytest.mark.parametrize(("call", "advice"), REFUSED.values(), ids=REFUSED.keys())
async def test_async_refused(doors: Doors, async_client: AsyncOpenAI, call: Callable[[Any], Any], advice: str) -> None:
    """The call raises UnguardedError (before any await) naming the path; nothing reaches upstream."""
    before = len(doors.requests)
    wrapped = wrap(async_client, moderator=KeywordModerator([FLAG]))
    with pytest.raises(UnguardedError, match=advice):
        call(wrapped)
    assert len(doors.requests) == before


RAW_BODY = ["content", "text", "json", "iter_bytes", "iter_lines", "http_response"]


@pytest.mark.parametrize("name", RAW_BODY)
def test_sync_raw_bytes_refused(doors: Doors, sync_client: OpenAI, name: str) -> None:
    """``with_raw_response``: headers and the parsed (guarded) answer, never the raw body."""
    doors.answer = chat_answer("content")
    wrapped = wrap(sync_client, moderator=KeywordModerator([FLAG]))
    raw = wrapped.chat.completions.with_raw_response.create(**KW)
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/json"
    assert FLAG not in raw.parse().model_dump_json()
    with pytest.raises(UnguardedError, match=rf"with_raw_response\.create\(\.\.\.\)\.{name} is the raw body"):
        getattr(raw, name)
    with pytest.raises(UnguardedError):
        raw.parse(to=dict)


@pytest.mark.parametrize("name", ["read", "text", "json", "iter_bytes", "iter_text", "iter_lines"])
async def test_async_streaming_response_bytes_refused(doors: Doors, async_client: AsyncOpenAI, name: str) -> None:
    """``with_streaming_response``: the parsed (guarded) answer, never the raw bytes."""
    doors.answer = chat_answer("content")
    wrapped = wrap(async_client, moderator=KeywordModerator([FLAG]))
    with anyio.fail_after(10):
        async with wrapped.with_streaming_response.chat.completions.create(**KW) as response:
            assert response.status_code == 200
            with pytest.raises(UnguardedError, match="raw body"):
                getattr(response, name)
            assert FLAG not in (await response.parse()).model_dump_json()


def test_stream_flag_is_sent_as_a_boolean(doors: Doors, sync_client: OpenAI) -> None:
    """A truthy ``stream`` (``1``, ``"true"``, via ``extra_body``) goes upstream as true, ``"false"`` as false."""
    doors.answer = chat_answer("content")
    wrapped = wrap(sync_client, moderator=KeywordModerator([FLAG]))
    for value in (1, "true", "yes"):
        list(wrapped.chat.completions.create(**KW, stream=value))  # type: ignore[call-overload]
        assert doors.requests[-1][2]["stream"] is True
    list(wrapped.chat.completions.create(**KW, extra_body={"stream": 1, "other": 2}))
    assert doors.requests[-1][2]["stream"] is True and doors.requests[-1][2]["other"] == 2
    answer = wrapped.chat.completions.create(**KW, stream="false")  # type: ignore[call-overload]
    assert doors.requests[-1][2]["stream"] is False and FLAG not in answer.model_dump_json()
