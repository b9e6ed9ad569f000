"""guard_responses: every Responses event type that carries model text is a judged channel, and every
event that repeats the text (done events, parts, items, the final response) is rebuilt from what was
released. In-process events (as dicts, as the openai client decodes them)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
import pytest

import streamguard as sg
from streamguard.testing import FakeModerator
from tests.helpers import words

FLAG = "attack"
CLEAN = "we walk by the calm river and plan a picnic for the long summer evening"
DIRTY = "we walk by the calm river and then we attack the castle at dawn with everyone"


def _response(output: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "model": "gpt-4.1-nano",
        "status": status,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
    }


def message_events(text: str) -> list[dict[str, Any]]:
    item = {"type": "message", "id": "msg_1", "role": "assistant", "status": "in_progress", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    done_part = {**part, "text": text}
    done_item = {**item, "status": "completed", "content": [done_part]}
    ids = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    return [
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        {"type": "response.content_part.added", **ids, "part": part},
        *({"type": "response.output_text.delta", **ids, "delta": w, "logprobs": []} for w in words(text)),
        {"type": "response.output_text.done", **ids, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **ids, "part": done_part},
        {"type": "response.output_item.done", "output_index": 0, "item": done_item},
        {"type": "response.completed", "response": _response([done_item], "completed")},
    ]


def reasoning_events(text: str) -> list[dict[str, Any]]:
    item = {"type": "reasoning", "id": "rs_1", "summary": []}
    part = {"type": "summary_text", "text": ""}
    done_item = {**item, "summary": [{**part, "text": text}]}
    ids = {"item_id": "rs_1", "output_index": 0, "summary_index": 0}
    answer = message_events("Here is my answer.")
    for e in answer:
        if "output_index" in e:
            e["output_index"] = 1
    final = answer[-1]
    final["response"]["output"] = [done_item, *final["response"]["output"]]
    return [
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        {"type": "response.reasoning_summary_part.added", **ids, "part": part},
        *({"type": "response.reasoning_summary_text.delta", **ids, "delta": w} for w in words(text)),
        {"type": "response.reasoning_summary_text.done", **ids, "text": text},
        {"type": "response.reasoning_summary_part.done", **ids, "part": {**part, "text": text}},
        {"type": "response.output_item.done", "output_index": 0, "item": done_item},
        *answer,
    ]


def function_events(text: str) -> list[dict[str, Any]]:
    args = json.dumps({"plan": text})
    item = {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "call_1",
        "name": "lookup",
        "arguments": "",
        "status": "in_progress",
    }
    done_item = {**item, "arguments": args, "status": "completed"}
    pieces = [args[i : i + 7] for i in range(0, len(args), 7)]
    return [
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        *(
            {"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 0, "delta": p}
            for p in pieces
        ),
        {"type": "response.function_call_arguments.done", "item_id": "fc_1", "output_index": 0, "arguments": args},
        {"type": "response.output_item.done", "output_index": 0, "item": done_item},
        {"type": "response.completed", "response": _response([done_item], "completed")},
    ]


SHAPES = {"message": message_events, "reasoning": reasoning_events, "function_call": function_events}


async def run(events: list[dict[str, Any]], policy: sg.Policy) -> tuple[list[Any], sg.GuardReport]:
    seq = iter(range(1, 10_000))

    async def source() -> AsyncIterator[dict[str, Any]]:
        for event in events:
            yield {**event, "sequence_number": next(seq)}

    with anyio.fail_after(10):
        async with sg.guard_responses(source(), moderator=FakeModerator([FLAG]), policy=policy) as guarded:
            out = [e async for e in guarded]
    return out, guarded.report


def dumped(events: list[Any]) -> str:
    return "\n".join(json.dumps(e.model_dump(), default=str) for e in events)


@pytest.mark.parametrize("action", ["cutoff", "redact"])
@pytest.mark.parametrize("shape", SHAPES)
async def test_a_flagged_word_in_any_channel_never_leaves(shape: str, action: Literal["cutoff", "redact"]) -> None:
    """Hold-back: the flagged word is in no event that comes out, done events and the final response included."""
    out, report = await run(SHAPES[shape](DIRTY), sg.Policy(action=action, window_chars=24))
    assert FLAG not in dumped(out)
    assert report.flagged
    assert out[-1].type in ("response.completed", "response.incomplete")
    if action == "cutoff":
        assert out[-1].type == "response.incomplete"
        assert out[-1].response.incomplete_details.reason == "content_filter"


async def test_a_cut_function_call_is_never_shown_not_even_its_name() -> None:
    """A flagged call's output_item.added (its name) and its item in the final response are withheld."""
    out, _ = await run(function_events(DIRTY), sg.Policy())
    assert "lookup" not in dumped(out)
    assert all(e.type != "response.output_item.added" for e in out)


async def test_a_redacted_function_call_keeps_valid_json() -> None:
    """Redact: the call's arguments become one JSON string everywhere they are repeated."""
    out, _ = await run(function_events(DIRTY), sg.Policy(action="redact"))
    done = [e for e in out if e.type == "response.function_call_arguments.done"]
    assert json.loads(done[0].arguments) == "[redacted]"
    final = out[-1].response.output[0]
    assert json.loads(final.arguments) == "[redacted]"


@pytest.mark.parametrize("shape", SHAPES)
async def test_clean_streams_pass_unchanged(shape: str) -> None:
    """Nothing flagged: every event comes out with the text it came in with."""
    events = SHAPES[shape](CLEAN)
    out, report = await run(events, sg.Policy())
    assert not report.flagged
    assert [e.type for e in out] == [e["type"] for e in events]
    assert CLEAN.replace(" ", "") in dumped(out).replace(" ", "").replace("\\\\", "")


async def test_content_part_done_after_a_flagged_first_window_carries_no_text() -> None:
    """The first window flagged (nothing released): the repeats carry the empty released text."""
    out, _ = await run(message_events(f"{FLAG} everyone now"), sg.Policy())
    assert FLAG not in dumped(out)


async def test_unknown_event_types_with_text_are_dropped_and_reported() -> None:
    """An event type the adapter does not know is never passed on if it carries text."""
    events = message_events(CLEAN)
    events.insert(3, {"type": "response.code_interpreter_call_code.delta", "output_index": 0, "delta": FLAG})
    out, report = await run(events, sg.Policy())
    assert FLAG not in dumped(out)
    assert "event.response.code_interpreter_call_code.delta" in report.dropped


@pytest.mark.parametrize("action", ["cutoff", "redact"])
async def test_guard_reads_a_responses_stream_off_its_first_event(action: Literal["cutoff", "redact"]) -> None:
    """guard() given Responses events (not chat chunks) guards them as guard_responses does."""
    seq = iter(range(1, 10_000))

    async def source() -> AsyncIterator[dict[str, Any]]:
        for event in reasoning_events(DIRTY):
            yield {**event, "sequence_number": next(seq)}

    with anyio.fail_after(10):
        async with sg.guard(source(), moderator=FakeModerator([FLAG]), policy=sg.Policy(action=action)) as guarded:
            out = [e async for e in guarded]
    assert out and all(e.type.startswith("response.") for e in out)
    assert FLAG not in dumped(out)
    assert guarded.report.flagged


async def test_guard_bare_form_reads_a_responses_stream_too() -> None:
    """The bare `async for` form detects the shape as well, and closes the upstream at the end."""
    closed: list[bool] = []

    class Source:
        def __init__(self) -> None:
            self._events = iter(message_events(CLEAN))
            self._seq = 0

        def __aiter__(self) -> Source:
            return self

        async def __anext__(self) -> dict[str, Any]:
            self._seq += 1
            try:
                return {**next(self._events), "sequence_number": self._seq}
            except StopIteration:
                raise StopAsyncIteration from None

        async def aclose(self) -> None:
            closed.append(True)

    with anyio.fail_after(10):
        out = [e async for e in sg.guard(Source(), moderator=FakeModerator([FLAG]))]
    assert out[-1].type == "response.completed"
    assert closed
