"""Real recorded OpenAI streams, replayed from a loopback server through the real client and the guard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from openai import AsyncOpenAI

import streamguard as sg
from streamguard.testing import FakeModerator
from streamguard.testing.upstream import LoopbackUpstream, Script

FIXTURES = Path(__file__).parent.parent / "fixtures" / "streams"
RECORDINGS = sorted(FIXTURES.glob("cc_*.sse"))


def events_of(body: bytes) -> list[dict[str, Any]]:
    return [
        json.loads(line[len("data: ") :])
        for line in body.decode().splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


def by_choice(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events stably sorted by choice index (choice-less events last, in order)."""
    return sorted(events, key=lambda e: e["choices"][0]["index"] if e["choices"] else 1_000)


def test_fixtures_are_present() -> None:
    """The recordings were copied into the repo (tests never read ../shared)."""
    assert len(RECORDINGS) >= 15


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.stem)
async def test_unflagged_recording_comes_out_identical(
    path: Path, upstream: LoopbackUpstream, client: AsyncOpenAI
) -> None:
    """Nothing flagged: every recorded chunk comes out as recorded, in order; usage is added only if missing."""
    body = await anyio.Path(path).read_bytes()
    upstream.chat = lambda request: Script(raw=body)
    recorded = events_of(body)
    with anyio.fail_after(10):
        stream = await client.chat.completions.create(model="gpt-4o", messages=[], stream=True)
        async with sg.guard(stream, moderator=FakeModerator(["svirblocked-never"])) as guarded:
            out = [json.loads(c.to_json(indent=None)) for c in [c async for c in guarded]]
    had_usage = any(e.get("usage") for e in recorded)
    if len({ch["index"] for e in recorded for ch in e["choices"]}) > 1:
        # n>1: each choice keeps its order; one choice may get ahead of another.
        out, recorded = by_choice(out), by_choice(recorded)
    if had_usage:
        assert out == recorded
        assert guarded.report.usage_source == "upstream"
    else:
        assert out[:-1] == recorded
        assert out[-1]["choices"] == [] and out[-1]["usage"]["completion_tokens"] > 0
        assert guarded.report.usage_source == "estimated"
    assert guarded.report.flags == ()


async def test_azure_blocklisted_word_is_caught_in_a_real_recording(
    upstream: LoopbackUpstream, client: AsyncOpenAI
) -> None:
    """The Azure async-filter recording repeats a blocklisted word: hold-back never shows it."""
    body = await anyio.Path(FIXTURES / "cc_azure_async_filter_flagged.sse").read_bytes()
    upstream.chat = lambda request: Script(raw=body)
    with anyio.fail_after(10):
        stream = await client.chat.completions.create(model="gpt-4o", messages=[], stream=True)
        async with sg.guard(stream, moderator=sg.KeywordModerator({"blocklist": ["svirblocked"]})) as guarded:
            chunks = [c async for c in guarded]
    text = "".join(getattr(ch.delta, "content", None) or "" for c in chunks for ch in c.choices if ch.delta)
    assert "svirblocked" not in text
    assert guarded.report.flags[0].category == "blocklist"
    assert guarded.report.finish_reasons[0] == "content_filter"


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("resp_*.sse")), ids=lambda p: p.stem)
async def test_unflagged_responses_recording_comes_out_identical(
    path: Path, upstream: LoopbackUpstream, client: AsyncOpenAI
) -> None:
    """Responses recordings via client.responses.create(stream=True) and guard_responses: events as recorded."""
    body = await anyio.Path(path).read_bytes()
    upstream.chat = lambda request: Script(raw=body)
    recorded = events_of(body)
    with anyio.fail_after(10):
        stream = await client.responses.create(model="gpt-4o", input="Tell me a story.", stream=True)
        async with sg.guard_responses(
            stream, moderator=FakeModerator(["never-flagged"]), input="Tell me a story."
        ) as g:
            out = [json.loads(e.to_json(indent=None)) async for e in g]
    assert out == recorded
    assert upstream.requests[-1][0] == "/v1/responses"
    assert g.report.flags == () and g.report.usage_source == "upstream"


async def test_flagged_responses_recording_never_shows_the_word(
    upstream: LoopbackUpstream, client: AsyncOpenAI
) -> None:
    """A cut Responses stream ends as response.incomplete and no event anywhere carries the flagged word."""
    body = await anyio.Path(FIXTURES / "resp_gpt41nano_text.sse").read_bytes()
    upstream.chat = lambda request: Script(raw=body)
    with anyio.fail_after(10):
        stream = await client.responses.create(model="gpt-4o", input="Tell me a story.", stream=True)
        async with sg.guard_responses(stream, moderator=FakeModerator(["unicorn"])) as g:
            out = [json.loads(e.to_json(indent=None)) async for e in g]
    assert "unicorn" not in json.dumps(out)
    assert out[-1]["type"] == "response.incomplete"
    assert out[-1]["response"]["incomplete_details"] == {"reason": "content_filter"}
