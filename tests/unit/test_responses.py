"""Responses API streams through the same engine: recorded events, in-process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import streamguard as sg
from streamguard.responses import guard_responses
from streamguard.testing import FakeModerator

FIXTURES = Path(__file__).parent.parent / "fixtures" / "streams"
RECORDINGS = sorted(FIXTURES.glob("resp_*.sse"))
STORY = "resp_gpt41nano_text.sse"


def events_of(name: str) -> list[dict[str, Any]]:
    body = (FIXTURES / name).read_text()
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]


async def source(events: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for event in events:
        yield event


async def run(name: str, moderator: Any, policy: sg.Policy | None = None) -> tuple[list[dict[str, Any]], Any]:
    with anyio.fail_after(10):
        async with guard_responses(source(events_of(name)), moderator=moderator, policy=policy) as guarded:
            out = [json.loads(e.to_json(indent=None)) for e in [e async for e in guarded]]
    return out, guarded


def deltas(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


@pytest.mark.parametrize("name", [p.name for p in RECORDINGS])
async def test_unflagged_recording_comes_out_identical(name: str) -> None:
    """Every event, of every type, comes out as recorded and in order when nothing is flagged."""
    recorded = events_of(name)
    out, guarded = await run(name, FakeModerator(["never-flagged-word"]))
    assert out == recorded
    assert guarded.report.flags == ()
    assert guarded.report.usage_source == "upstream"


async def test_cutoff_ends_incomplete_and_never_repeats_the_withheld_text() -> None:
    """A cut ends with response.incomplete (content_filter); no event carries the withheld text."""
    out, guarded = await run(STORY, FakeModerator(["unicorn"]))
    text = deltas(out)
    assert text and "Once upon a time".startswith(text[:16])
    assert "unicorn" not in json.dumps(out)  # not in a delta, a done event, or the final response
    assert out[-1]["type"] == "response.incomplete"
    final = out[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "content_filter"}
    assert final["output"][0]["content"][0]["text"] == text
    assert final["usage"]["output_tokens"] > 0  # synthesized: upstream never sent its completed event
    done = [e for e in out if e["type"] == "response.output_text.done"]
    assert [d["text"] for d in done] == [text]
    assert [e["sequence_number"] for e in out] == sorted(e["sequence_number"] for e in out)


async def test_redact_rewrites_every_event_that_repeats_the_text() -> None:
    """Redaction reaches the done events and the completed response, not only the deltas."""
    out, guarded = await run(STORY, FakeModerator(["unicorn"]), sg.Policy(action="redact"))
    text = deltas(out)
    assert "[redacted]" in text and "unicorn" not in json.dumps(out)
    assert out[-1]["type"] == "response.completed"
    assert out[-1]["response"]["output"][0]["content"][0]["text"] == text
    assert [e["text"] for e in out if e["type"] == "response.output_text.done"] == [text]
    assert out[-1]["response"]["usage"] == events_of(STORY)[-1]["response"]["usage"]  # upstream's, unchanged
