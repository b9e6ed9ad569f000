"""Legacy completions (``client.completions.create``) through a wrapped client, async and sync,
streamed and not, raw views included: the flagged word never reaches the caller; the clean prefix does."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from openai import AsyncOpenAI, OpenAI

from streamguard import KeywordModerator, Policy, wrap
from tests.doors._chat import SAFE, TEXT, dump
from tests.doors._upstream import FLAG, Doors

KW: dict[str, Any] = {"model": "gpt-3.5-turbo-instruct", "prompt": "Once upon a time"}


def completion(text: str, finish: str | None) -> dict[str, Any]:
    return {
        "id": "cmpl-doors",
        "object": "text_completion",
        "created": 1,
        "model": "gpt-3.5-turbo-instruct",
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
    }


def legacy_answer(method: str, path: str, body: dict[str, Any]) -> Any:
    assert path.endswith("/completions"), path
    if body.get("stream") is True:
        return [completion(p, None) for p in (TEXT[:20], TEXT[20:50], TEXT[50:])] + [completion("", "stop")]
    return completion(TEXT, "stop")


async def _a_stream(call: Awaitable[Any]) -> list[str]:
    stream = await call
    async with stream:
        return [dump(c) async for c in stream]


async def _a_raw(call: Awaitable[Any], streamed: bool) -> list[str]:
    parsed = (await call).parse()
    return [dump(c) async for c in parsed] if streamed else [dump(parsed)]


async def _a_streaming(client: AsyncOpenAI) -> list[str]:
    async with client.completions.with_streaming_response.create(**KW) as response:
        return [dump(await response.parse())]


ASYNC: dict[str, Callable[[AsyncOpenAI], Awaitable[list[str]]]] = {
    "create": lambda c: _a_raw(_parsed(c.completions.create(**KW)), False),
    "create(stream=True)": lambda c: _a_stream(c.completions.create(**KW, stream=True)),
    "create(stream=1)": lambda c: _a_stream(c.completions.create(**KW, stream=1)),  # type: ignore[call-overload]
    "with_raw_response.create(stream)": lambda c: _a_raw(
        c.completions.with_raw_response.create(**KW, stream=True), True
    ),
    "client.with_raw_response": lambda c: _a_raw(c.with_raw_response.completions.create(**KW), False),
    "with_streaming_response.create": _a_streaming,
}


async def _parsed(call: Awaitable[Any]) -> Any:
    """Present a plain answer like a raw response, so one helper reads both."""
    answer = await call

    class Raw:
        def parse(self) -> Any:
            return answer

    return Raw()


def _s_streaming(client: OpenAI) -> list[str]:
    with client.completions.with_streaming_response.create(**KW) as response:
        return [dump(response.parse())]


def _s_stream(stream: Any) -> list[str]:
    with stream:
        return [dump(c) for c in stream]


SYNC: dict[str, Callable[[OpenAI], list[str]]] = {
    "create": lambda c: [dump(c.completions.create(**KW))],
    "create(stream=True)": lambda c: _s_stream(c.completions.create(**KW, stream=True)),
    "create(stream=1)": lambda c: _s_stream(c.completions.create(**KW, stream=1)),  # type: ignore[call-overload]
    "with_raw_response.create(stream)": lambda c: [
        dump(x) for x in c.completions.with_raw_response.create(**KW, stream=True).parse()
    ],
    "client.with_raw_response": lambda c: [dump(c.with_raw_response.completions.create(**KW).parse())],
    "with_streaming_response.create": _s_streaming,
}


@pytest.mark.parametrize("action", ["cutoff", "redact"])
@pytest.mark.parametrize("path", ASYNC.values(), ids=ASYNC.keys())
async def test_async_legacy(doors: Doors, async_client: AsyncOpenAI, path: Any, action: str) -> None:
    """The flagged word is in nothing the async caller receives; the clean text before it is."""
    doors.answer = legacy_answer
    wrapped = wrap(async_client, moderator=KeywordModerator([FLAG]), policy=Policy(action=action))  # type: ignore[arg-type]
    with anyio.fail_after(10):
        seen = "\n".join(await path(wrapped))
    assert FLAG not in seen and SAFE.split()[0] in seen
    assert ("content_filter" in seen) == (action == "cutoff")


@pytest.mark.parametrize("action", ["cutoff", "redact"])
@pytest.mark.parametrize("path", SYNC.values(), ids=SYNC.keys())
def test_sync_legacy(doors: Doors, sync_client: OpenAI, path: Any, action: str) -> None:
    """The flagged word is in nothing the sync caller receives; the clean text before it is."""
    doors.answer = legacy_answer
    wrapped = wrap(sync_client, moderator=KeywordModerator([FLAG]), policy=Policy(action=action))  # type: ignore[arg-type]
    seen = "\n".join(path(wrapped))
    assert FLAG not in seen and SAFE.split()[0] in seen
    assert ("content_filter" in seen) == (action == "cutoff")
