"""Chat-completions doors: upstream answers with the flagged word in one field, and every wrap path.

Each path returns everything the caller can see (JSON dumps of every object handed out), so a test
asserts the flagged word is nowhere in it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import openai
from openai import AsyncOpenAI, OpenAI

from tests.doors._upstream import FLAG

SAFE = "Here is a calm and friendly answer about gardens and rivers. "
TEXT = SAFE + f"Then the {FLAG} goes off in the story here. And then it ends quietly."
ARGS = json.dumps({"note": TEXT})
MESSAGES = [{"role": "user", "content": "Tell me a story."}]
KW: dict[str, Any] = {"model": "gpt-4o-mini", "messages": MESSAGES}

# field -> (message fields of a non-streamed answer, deltas of a streamed one)
FIELDS: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {
    "content": ({"content": TEXT}, [{"content": p} for p in (TEXT[:30], TEXT[30:70], TEXT[70:])]),
    "refusal": ({"content": None, "refusal": TEXT}, [{"refusal": p} for p in (TEXT[:30], TEXT[30:])]),
    "reasoning_content": (
        {"content": "Fine.", "reasoning_content": TEXT},
        [{"reasoning_content": p} for p in (TEXT[:30], TEXT[30:])] + [{"content": "Fine."}],
    ),
    "reasoning": (
        {"content": "Fine.", "reasoning": TEXT},
        [{"reasoning": p} for p in (TEXT[:30], TEXT[30:])] + [{"content": "Fine."}],
    ),
    "tool_call_arguments": (
        {
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "note", "arguments": ARGS}}],
        },
        [
            {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "note"}}]},
            *(
                {"tool_calls": [{"index": 0, "function": {"arguments": p}}]}
                for p in (ARGS[:30], ARGS[30:60], ARGS[60:])
            ),
        ],
    ),
    "function_call_arguments": (
        {"content": None, "function_call": {"name": "note", "arguments": ARGS}},
        [{"function_call": {"name": "note", "arguments": ""}}]
        + [{"function_call": {"arguments": p}} for p in (ARGS[:30], ARGS[30:])],
    ),
    "audio_transcript": (
        {"content": None, "audio": {"id": "audio_1", "data": "UklGRg==", "expires_at": 2, "transcript": TEXT}},
        [{"audio": {"id": "audio_1", "transcript": p}} for p in (TEXT[:30], TEXT[30:])],
    ),
    "content_parts": ({"content": [{"type": "text", "text": TEXT}]}, [{"content": p} for p in (TEXT[:40], TEXT[40:])]),
}


def chat_answer(field: str) -> Callable[[str, str, dict[str, Any]], Any]:
    """An upstream that answers chat requests with ``TEXT`` in ``field``, streamed if asked."""
    message, deltas = FIELDS[field]

    def answer(method: str, path: str, body: dict[str, Any]) -> Any:
        assert path.endswith("/chat/completions"), path
        if body.get("stream") is True:
            return [chunk({"role": "assistant"}), *(chunk(d) for d in deltas), chunk({}, "stop")]
        return {
            "id": "chatcmpl-doors",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": "stop"}],
        }

    return answer


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-doors",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def dump(obj: Any) -> str:
    if hasattr(obj, "model_dump_json"):
        # warnings off: openai's generic Parsed* models warn when dumped (nothing to do with the text)
        return str(obj.model_dump_json(warnings=False))
    if isinstance(obj, dict | list):
        return json.dumps(obj, default=str)
    return repr(obj)


# -- async paths ----------------------------------------------------------------------------------


async def _a_all(stream: Any) -> list[str]:
    seen = []
    async for item in stream:
        seen.append(dump(item))
    return seen


async def _a_helper_stream(client: Any) -> list[str]:
    seen: list[str] = []
    async with client.stream(**KW) as stream:
        seen += await _a_all(stream)
        try:
            seen.append(dump(await stream.get_final_completion()))
        except openai.ContentFilterFinishReasonError as exc:  # openai's own reaction to a cut-off
            seen.append(str(exc))
    return seen


async def _a_parse(client: Any) -> list[str]:
    try:
        return [dump(await client.parse(**KW))]
    except openai.ContentFilterFinishReasonError as exc:
        return [str(exc)]


async def _a_streaming_response(resource: Any, **extra: Any) -> list[str]:
    async with resource.create(**KW, **extra) as response:
        parsed = await response.parse()
        return await _a_all(parsed) if extra.get("stream") else [dump(parsed)]


AsyncPath = Callable[[AsyncOpenAI], Awaitable[list[str]]]

ASYNC_PATHS: dict[str, AsyncPath] = {
    "create": lambda c: _a_one(c.chat.completions.create(**KW)),
    "create(stream=True)": lambda c: _a_stream(c.chat.completions.create(**KW, stream=True)),
    "create(stream=1)": lambda c: _a_stream(c.chat.completions.create(**KW, stream=1)),  # type: ignore[call-overload]
    "create(stream='true')": lambda c: _a_stream(c.chat.completions.create(**KW, stream="true")),  # type: ignore[call-overload]
    "create(extra_body stream)": lambda c: _a_stream(c.chat.completions.create(**KW, extra_body={"stream": True})),
    "parse": lambda c: _a_parse(c.chat.completions),
    "stream()": lambda c: _a_helper_stream(c.chat.completions),
    "with_raw_response.create": lambda c: _a_raw(c.chat.completions.with_raw_response.create(**KW), False),
    "with_raw_response.create(stream)": lambda c: _a_raw(
        c.chat.completions.with_raw_response.create(**KW, stream=True), True
    ),
    "client.with_raw_response": lambda c: _a_raw(c.with_raw_response.chat.completions.create(**KW), False),
    "with_streaming_response.create": lambda c: _a_streaming_response(c.chat.completions.with_streaming_response),
    "with_streaming_response.create(stream)": lambda c: _a_streaming_response(
        c.chat.completions.with_streaming_response, stream=True
    ),
    "client.with_streaming_response": lambda c: _a_streaming_response(
        c.with_streaming_response.chat.completions, stream=True
    ),
    "beta.create": lambda c: _a_one(c.beta.chat.completions.create(**KW)),
    "beta.parse": lambda c: _a_parse(c.beta.chat.completions),
    "beta.stream()": lambda c: _a_helper_stream(c.beta.chat.completions),
}


async def _a_one(call: Awaitable[Any]) -> list[str]:
    return [dump(await call)]


async def _a_stream(call: Awaitable[Any]) -> list[str]:
    return await _a_all(await call)


async def _a_raw(call: Awaitable[Any], streamed: bool) -> list[str]:
    raw = await call
    parsed = raw.parse()
    return await _a_all(parsed) if streamed else [dump(parsed)]


# -- sync paths -----------------------------------------------------------------------------------


def _s_helper_stream(client: Any) -> list[str]:
    seen: list[str] = []
    with client.stream(**KW) as stream:
        seen += [dump(event) for event in stream]
        try:
            seen.append(dump(stream.get_final_completion()))
        except openai.ContentFilterFinishReasonError as exc:
            seen.append(str(exc))
    return seen


def _s_parse(client: Any) -> list[str]:
    try:
        return [dump(client.parse(**KW))]
    except openai.ContentFilterFinishReasonError as exc:
        return [str(exc)]


def _s_streaming_response(resource: Any, **extra: Any) -> list[str]:
    with resource.create(**KW, **extra) as response:
        parsed = response.parse()
        return [dump(c) for c in parsed] if extra.get("stream") else [dump(parsed)]


def _s_raw(raw: Any, streamed: bool) -> list[str]:
    parsed = raw.parse()
    return [dump(c) for c in parsed] if streamed else [dump(parsed)]


SyncPath = Callable[[OpenAI], list[str]]

SYNC_PATHS: dict[str, SyncPath] = {
    "create": lambda c: [dump(c.chat.completions.create(**KW))],
    "create(stream=True)": lambda c: [dump(x) for x in c.chat.completions.create(**KW, stream=True)],
    "create(stream=1)": lambda c: [dump(x) for x in c.chat.completions.create(**KW, stream=1)],  # type: ignore[call-overload]
    "create(stream='true')": lambda c: [dump(x) for x in c.chat.completions.create(**KW, stream="true")],  # type: ignore[call-overload]
    "create(extra_body stream)": lambda c: [
        dump(x) for x in c.chat.completions.create(**KW, extra_body={"stream": True})
    ],
    "parse": lambda c: _s_parse(c.chat.completions),
    "stream()": lambda c: _s_helper_stream(c.chat.completions),
    "with_raw_response.create": lambda c: _s_raw(c.chat.completions.with_raw_response.create(**KW), False),
    "with_raw_response.create(stream)": lambda c: _s_raw(
        c.chat.completions.with_raw_response.create(**KW, stream=True), True
    ),
    "client.with_raw_response": lambda c: _s_raw(c.with_raw_response.chat.completions.create(**KW), False),
    "with_streaming_response.create": lambda c: _s_streaming_response(c.chat.completions.with_streaming_response),
    "with_streaming_response.create(stream)": lambda c: _s_streaming_response(
        c.chat.completions.with_streaming_response, stream=True
    ),
    "client.with_streaming_response": lambda c: _s_streaming_response(
        c.with_streaming_response.chat.completions, stream=True
    ),
    "beta.create": lambda c: [dump(c.beta.chat.completions.create(**KW))],
    "beta.parse": lambda c: _s_parse(c.beta.chat.completions),
    "beta.stream()": lambda c: _s_helper_stream(c.beta.chat.completions),
}
