"""``Policy(moderate_input=True)`` holds on every view of a guarded door: a flagged request gets a
``content_filter`` answer, whatever path it took."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from streamguard import KeywordModerator, Policy, wrap
from tests.doors._chat import SAFE, chat_answer, dump
from tests.doors._upstream import FLAG, Doors

KW: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"How do I build a {FLAG}?"}]}
CLEAN = {"content": SAFE}


async def _a_streaming(c: AsyncOpenAI) -> Any:
    async with c.chat.completions.with_streaming_response.create(**KW) as response:
        return await response.parse()


async def _a_raw(c: AsyncOpenAI) -> Any:
    return (await c.chat.completions.with_raw_response.create(**KW)).parse()


ASYNC: dict[str, Callable[[AsyncOpenAI], Awaitable[Any]]] = {
    "create": lambda c: c.chat.completions.create(**KW),
    "with_raw_response.create": _a_raw,
    "with_streaming_response.create": _a_streaming,
}


def _s_streaming(c: OpenAI) -> Any:
    with c.chat.completions.with_streaming_response.create(**KW) as response:
        return response.parse()


SYNC: dict[str, Callable[[OpenAI], Any]] = {
    "create": lambda c: c.chat.completions.create(**KW),
    "with_raw_response.create": lambda c: c.chat.completions.with_raw_response.create(**KW).parse(),
    "with_streaming_response.create": _s_streaming,
}


def _clean_answer(method: str, path: str, body: dict[str, Any]) -> Any:
    return chat_answer("content")(method, path, body) if body.get("stream") else _clean_body()


def _clean_body() -> dict[str, Any]:
    return {
        "id": "chatcmpl-doors",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": SAFE}, "finish_reason": "stop"}],
    }


@pytest.mark.parametrize("path", ASYNC.values(), ids=ASYNC.keys())
async def test_async_flagged_input(doors: Doors, async_client: AsyncOpenAI, path: Any) -> None:
    """A flagged input ends the async answer content_filter, with none of upstream's text."""
    doors.answer = _clean_answer
    wrapped = wrap(async_client, moderator=KeywordModerator([FLAG]), policy=Policy(moderate_input=True))
    with anyio.fail_after(10):
        answer = await path(wrapped)
    assert [c.finish_reason for c in answer.choices] == ["content_filter"]
    assert SAFE not in dump(answer)


@pytest.mark.parametrize("path", SYNC.values(), ids=SYNC.keys())
def test_sync_flagged_input(doors: Doors, sync_client: OpenAI, path: Any) -> None:
    """A flagged input ends the sync answer content_filter, with none of upstream's text."""
    doors.answer = _clean_answer
    wrapped = wrap(sync_client, moderator=KeywordModerator([FLAG]), policy=Policy(moderate_input=True))
    answer = path(wrapped)
    assert [c.finish_reason for c in answer.choices] == ["content_filter"]
    assert SAFE not in dump(answer)


def test_parse_with_flagged_input_raises_openais_own_error(doors: Doors, sync_client: OpenAI) -> None:
    """``parse()`` of a flagged request reacts as openai does to a filtered answer."""
    doors.answer = _clean_answer
    wrapped = wrap(sync_client, moderator=KeywordModerator([FLAG]), policy=Policy(moderate_input=True))
    with pytest.raises(openai.ContentFilterFinishReasonError):
        wrapped.chat.completions.parse(**KW)
    assert (
        wrapped.chat.completions.parse(**{**KW, "messages": [{"role": "user", "content": "hi"}]})
        .choices[0]
        .message.content
        == SAFE
    )
