"""Responses API doors: upstream answers (JSON and SSE events) with the flagged word in one field."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from openai import AsyncOpenAI, OpenAI

from tests.doors._chat import ARGS, TEXT, dump

INPUT = "Tell me a story."


def _message(part: dict[str, Any]) -> dict[str, Any]:
    return {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed", "content": [part]}


# field -> output items of the answer
ITEMS: dict[str, list[dict[str, Any]]] = {
    "output_text": [_message({"type": "output_text", "text": TEXT, "annotations": []})],
    "refusal": [_message({"type": "refusal", "refusal": TEXT})],
    "reasoning_summary": [
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": TEXT}], "status": "completed"},
        _message({"type": "output_text", "text": "Fine.", "annotations": []}),
    ],
    "reasoning_text": [
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": TEXT}],
            "status": "completed",
        },
        _message({"type": "output_text", "text": "Fine.", "annotations": []}),
    ],
    "function_call_arguments": [
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_1",
            "name": "note",
            "arguments": ARGS,
            "status": "completed",
        }
    ],
}


def response(field: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": "resp_doors",
        "object": "response",
        "created_at": 1,
        "status": status,
        "model": "gpt-4o-mini",
        "output": ITEMS[field],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
    }


def events(field: str) -> list[dict[str, Any]]:
    """The SSE events of a streamed answer carrying ``TEXT`` in ``field``, as OpenAI sends them."""
    out: list[dict[str, Any]] = []
    started = {**response(field, "in_progress"), "output": []}
    out.append({"type": "response.created", "response": started})
    out.append({"type": "response.in_progress", "response": started})
    for i, item in enumerate(ITEMS[field]):
        out += _item_events(i, item)
    out.append({"type": "response.completed", "response": response(field)})
    return [{**e, "sequence_number": n} for n, e in enumerate(out)]


def _pieces(text: str) -> list[str]:
    return [text[i : i + 25] for i in range(0, len(text), 25)]


def _item_events(i: int, item: dict[str, Any]) -> list[dict[str, Any]]:
    kind, item_id = item["type"], item["id"]
    empty: dict[str, Any]
    if kind == "message":
        part = item["content"][0]
        empty = {**item, "status": "in_progress", "content": []}
        blank = {**part, part["type"] == "output_text" and "text" or "refusal": ""}
        base = {"item_id": item_id, "output_index": i, "content_index": 0}
        text = part.get("text") or part.get("refusal") or ""
        if part["type"] == "output_text":
            deltas = [{"type": "response.output_text.delta", **base, "delta": p, "logprobs": []} for p in _pieces(text)]
            done = {"type": "response.output_text.done", **base, "text": text, "logprobs": []}
        else:
            deltas = [{"type": "response.refusal.delta", **base, "delta": p} for p in _pieces(text)]
            done = {"type": "response.refusal.done", **base, "refusal": text}
        return [
            {"type": "response.output_item.added", "output_index": i, "item": empty},
            {"type": "response.content_part.added", **base, "part": blank},
            *deltas,
            done,
            {"type": "response.content_part.done", **base, "part": part},
            {"type": "response.output_item.done", "output_index": i, "item": item},
        ]
    if kind == "reasoning":
        empty = {**item, "summary": [], "content": [], "status": "in_progress"}
        out: list[dict[str, Any]] = [{"type": "response.output_item.added", "output_index": i, "item": empty}]
        for j, part in enumerate(item["summary"]):
            base = {"item_id": item_id, "output_index": i, "summary_index": j}
            out.append({"type": "response.reasoning_summary_part.added", **base, "part": {**part, "text": ""}})
            out += [
                {"type": "response.reasoning_summary_text.delta", **base, "delta": p} for p in _pieces(part["text"])
            ]
            out.append({"type": "response.reasoning_summary_text.done", **base, "text": part["text"]})
            out.append({"type": "response.reasoning_summary_part.done", **base, "part": part})
        for j, part in enumerate(item.get("content") or []):
            base = {"item_id": item_id, "output_index": i, "content_index": j}
            out += [{"type": "response.reasoning_text.delta", **base, "delta": p} for p in _pieces(part["text"])]
            out.append({"type": "response.reasoning_text.done", **base, "text": part["text"]})
        out.append({"type": "response.output_item.done", "output_index": i, "item": item})
        return out
    # function_call
    empty = {**item, "arguments": "", "status": "in_progress"}
    base = {"item_id": item_id, "output_index": i}
    return [
        {"type": "response.output_item.added", "output_index": i, "item": empty},
        *({"type": "response.function_call_arguments.delta", **base, "delta": p} for p in _pieces(item["arguments"])),
        {"type": "response.function_call_arguments.done", **base, "arguments": item["arguments"], "name": "note"},
        {"type": "response.output_item.done", "output_index": i, "item": item},
    ]


def responses_answer(field: str) -> Callable[[str, str, dict[str, Any]], Any]:
    """An upstream for ``/responses`` (create, retrieve, cancel) answering with ``TEXT`` in ``field``."""

    def answer(method: str, path: str, body: dict[str, Any]) -> Any:
        assert "/responses" in path, path
        streamed = body.get("stream") is True or "stream=true" in path
        return events(field) if streamed else response(field)

    return answer


# -- paths ----------------------------------------------------------------------------------------

KW: dict[str, Any] = {"model": "gpt-4o-mini", "input": INPUT}


async def _a_all(stream: Any) -> list[str]:
    return [dump(item) async for item in stream]


async def _a_one(call: Awaitable[Any]) -> list[str]:
    return [dump(await call)]


async def _a_stream(call: Awaitable[Any]) -> list[str]:
    return await _a_all(await call)


async def _a_raw(call: Awaitable[Any]) -> list[str]:
    raw = await call
    return [dump(raw.parse())]


async def _a_streaming(resource: Any) -> list[str]:
    async with resource.create(**KW) as response:
        return [dump(await response.parse())]


async def _a_helper(client: AsyncOpenAI, **kw: Any) -> list[str]:
    async with client.responses.stream(**kw) as stream:
        seen = await _a_all(stream)
        try:
            seen.append(dump(await stream.get_final_response()))
        except RuntimeError as exc:  # openai's own reaction to a stream that ends response.incomplete
            seen.append(str(exc))
    return seen


AsyncPath = Callable[[AsyncOpenAI], Awaitable[list[str]]]
SyncPath = Callable[[OpenAI], list[str]]

ASYNC_ANSWERS: dict[str, AsyncPath] = {
    "create": lambda c: _a_one(c.responses.create(**KW)),
    "parse": lambda c: _a_one(c.responses.parse(**KW)),
    "retrieve": lambda c: _a_one(c.responses.retrieve("resp_doors")),
    "cancel": lambda c: _a_one(c.responses.cancel("resp_doors")),
    "with_raw_response.create": lambda c: _a_raw(c.responses.with_raw_response.create(**KW)),
    "client.with_raw_response": lambda c: _a_raw(c.with_raw_response.responses.create(**KW)),
    "with_streaming_response.create": lambda c: _a_streaming(c.responses.with_streaming_response),
}
ASYNC_STREAMS: dict[str, AsyncPath] = {
    "create(stream=True)": lambda c: _a_stream(c.responses.create(**KW, stream=True)),
    "create(stream=1)": lambda c: _a_stream(c.responses.create(**KW, stream=1)),  # type: ignore[call-overload]
    "retrieve(stream=True)": lambda c: _a_stream(c.responses.retrieve("resp_doors", stream=True)),
    "stream()": lambda c: _a_helper(c, **KW),
    "stream(response_id)": lambda c: _a_helper(c, response_id="resp_doors"),
}


def _s_streaming(resource: Any) -> list[str]:
    with resource.create(**KW) as response:
        return [dump(response.parse())]


def _s_helper(client: OpenAI, **kw: Any) -> list[str]:
    with client.responses.stream(**kw) as stream:
        seen = [dump(event) for event in stream]
        try:
            seen.append(dump(stream.get_final_response()))
        except RuntimeError as exc:  # openai's own reaction to a stream that ends response.incomplete
            seen.append(str(exc))
    return seen


SYNC_ANSWERS: dict[str, SyncPath] = {
    "create": lambda c: [dump(c.responses.create(**KW))],
    "parse": lambda c: [dump(c.responses.parse(**KW))],
    "retrieve": lambda c: [dump(c.responses.retrieve("resp_doors"))],
    "cancel": lambda c: [dump(c.responses.cancel("resp_doors"))],
    "with_raw_response.create": lambda c: [dump(c.responses.with_raw_response.create(**KW).parse())],
    "client.with_raw_response": lambda c: [dump(c.with_raw_response.responses.create(**KW).parse())],
    "with_streaming_response.create": lambda c: _s_streaming(c.responses.with_streaming_response),
}
SYNC_STREAMS: dict[str, SyncPath] = {
    "create(stream=True)": lambda c: [dump(e) for e in c.responses.create(**KW, stream=True)],
    "create(stream=1)": lambda c: [dump(e) for e in c.responses.create(**KW, stream=1)],  # type: ignore[call-overload]
    "retrieve(stream=True)": lambda c: [dump(e) for e in c.responses.retrieve("resp_doors", stream=True)],
    "stream()": lambda c: _s_helper(c, **KW),
    "stream(response_id)": lambda c: _s_helper(c, response_id="resp_doors"),
}
