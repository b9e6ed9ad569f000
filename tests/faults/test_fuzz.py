"""Fuzzing the chunk/SSE parsing path with mutated bodies: a defined error or a normal end, never a hang.

Bodies start as a valid chat-completions SSE stream and are mutated (truncated, lines duplicated,
random bytes inserted, invalid UTF-8, huge lines). Served raw by the loopback upstream to the
real ``openai`` client and guarded, they may only end normally or with the client's own
exceptions, a JSON/validation/decoding ``ValueError`` or a ``StreamGuardError``; through
``guard_sse`` only with ``StreamFormatError``. Every example is time-limited, and leaves no task.
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import AsyncIterator, Sequence

import anyio
import anyio.lowlevel
import openai
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import AsyncOpenAI

import streamguard as sg
from streamguard.testing.upstream import LoopbackUpstream, Script, sse_body, text_chunks
from tests.conftest import other_tasks

USAGE = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
VALID = sse_body(text_chunks(["Hello", " there", ",", " calm", " friend", " attack", " and", " bye", "."], usage=USAGE))
LINES = VALID.split(b"\n")
FLAGGED = re.compile(r"\battack\b")  # as KeywordModerator matches it: "attackzzz" is another word
INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3(", b"\xed\xa0\x80", b"\xf0\x28\x8c\x28", b"\xe2\x82"]
ALLOWED_CLIENT: tuple[type[BaseException], ...] = (
    openai.APIError,
    json.JSONDecodeError,
    ValueError,
    pydantic.ValidationError,
    UnicodeDecodeError,
    sg.StreamGuardError,
)
FUZZ = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def huge_line(size: int, valid: bool) -> bytes:
    """A line of ``size`` bytes or more: a valid chunk with a huge delta, or one unbroken run of junk."""
    if not valid:
        return b"data: " + b"y" * size
    event = text_chunks(["z" * size], finish_reason=None)[1]
    return b"data: " + json.dumps(event).encode()


class Body(bytes):
    """The body; its repr is short (a failing example with a huge line would otherwise print megabytes)."""

    def __repr__(self) -> str:
        if len(self) <= 2000:
            return f"Body({bytes(self)!r})"
        return f"Body({bytes(self[:1000])!r} + ... + {bytes(self[-1000:])!r}, {len(self)} bytes)"


@st.composite
def bodies(draw: st.DrawFn) -> Body:
    """A valid SSE body after up to four mutations."""
    lines = list(LINES)
    for op in draw(st.lists(st.sampled_from(["dup", "insert", "utf8", "huge", "drop"]), max_size=4)):
        i = draw(st.integers(0, len(lines) - 1))
        if op == "dup":
            lines.insert(i, lines[i])
        elif op == "drop":
            del lines[i]
        elif op == "huge":
            lines.insert(i, huge_line(draw(st.sampled_from([70_000, 300_000])), draw(st.booleans())))
            lines.insert(i + 1, b"")
        else:
            junk = draw(st.binary(min_size=1, max_size=8)) if op == "insert" else draw(st.sampled_from(INVALID_UTF8))
            at = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + junk + lines[i][at:]
        if not lines:
            break
    body = b"\n".join(lines)
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]
    return Body(body)


async def assert_no_task_left() -> None:
    """No task is left once the garbage collector has had its turn.

    The ``openai`` client's ``AsyncStream.close()`` closes the HTTP response but leaves its inner
    async generators (``_iter_events``, ``SSEDecoder.aiter_bytes``, httpx's ``aiter_bytes``) to
    the garbage collector; asyncio then closes each in a short-lived task. A task of ours would
    still be pending after that. Closing one generator can drop the last reference to the next
    (each in a task of its own), so the loop waits as many turns as the chain is deep, up to 50: a
    task that waits on anything (a leak of ours) is still pending after that.
    """
    gc.collect()
    for _ in range(50):
        await anyio.lowlevel.checkpoint()
        if not other_tasks():
            break
    assert other_tasks() == set()


@pytest.fixture
async def short_client(upstream: LoopbackUpstream) -> AsyncIterator[AsyncOpenAI]:
    """The real client with a short timeout (a hang in the client would show as APITimeoutError, not a stall)."""
    async with AsyncOpenAI(api_key="test", base_url=upstream.base_url, max_retries=0, timeout=5) as c:
        yield c


@FUZZ
@given(body=bodies())
async def test_mutated_bodies_through_openai_client_and_guard(
    upstream: LoopbackUpstream, short_client: AsyncOpenAI, body: Body
) -> None:
    """A mutated body ends normally or with an allowed exception, within the time limit, leaving no task."""
    upstream.chat = lambda request: Script(raw=bytes(body))
    released = ""
    with anyio.fail_after(10):
        try:
            stream = await short_client.chat.completions.create(model="gpt-4o-mini", messages=[], stream=True)
            async with sg.guard(stream, moderator=sg.KeywordModerator(["attack"])) as guarded:
                async for chunk in guarded:
                    released += "".join(
                        ch.delta.content or "" for ch in chunk.choices if isinstance(ch.delta.content, str)
                    )
        except ALLOWED_CLIENT:
            pass
    assert FLAGGED.search(released) is None
    await assert_no_task_left()


async def pieces(body: bytes, cuts: Sequence[int]) -> AsyncIterator[bytes]:
    """``body`` split at ``cuts``, as a network read would split it."""
    start = 0
    for cut in sorted({c % (len(body) + 1) for c in cuts}):
        yield body[start:cut]
        start = cut
    yield body[start:]


@FUZZ
@given(body=bodies(), cuts=st.lists(st.integers(0, 1_000_000), max_size=8))
async def test_mutated_bodies_through_guard_sse(body: Body, cuts: list[int]) -> None:
    """Through guard_sse a mutated body ends normally (with [DONE]) or with StreamFormatError, nothing else."""
    out: list[bytes] = []
    with anyio.fail_after(10):
        try:
            async with sg.guard_sse(pieces(body, cuts), moderator=sg.KeywordModerator(["attack"])) as guarded:
                async for data in guarded:
                    out.append(data)
        except sg.StreamFormatError:
            pass
        else:
            assert out[-1] == b"data: [DONE]\n\n"
    for text in delta_texts(out):
        assert FLAGGED.search(text) is None, text[:200]
    await assert_no_task_left()


def delta_texts(events: Sequence[bytes]) -> list[str]:
    """Every text the output's deltas carry, joined per choice and field, as a reader would see it.

    Searched as text, not as the output's bytes: `" attack"` then `"zzz"` is the word
    "attackzzz", which the keyword moderator rightly lets through, while in the bytes the chunk
    boundary (`attack"}`) would look like a word end.
    """
    texts: dict[tuple[object, ...], list[str]] = {}

    def walk(value: object, path: tuple[object, ...]) -> None:
        if isinstance(value, str):
            texts.setdefault(path, []).append(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*path, key))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, (*path, item.get("index", i) if isinstance(item, dict) else i))

    for event in events:
        for line in event.split(b"\n"):
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or []:
                    walk(choice.get("delta") or {}, ("choice", choice.get("index")))
    return ["".join(parts) for parts in texts.values()]
