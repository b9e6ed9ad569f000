"""The engine with in-process fakes, on asyncio and trio."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from openai.types.chat import ChatCompletionChunk

import streamguard as sg
from streamguard.report import Flag, VerdictEvent
from streamguard.testing import FakeModerator, ScriptedStream, chat_chunk, scripted_chunks
from tests.helpers import words

TEXT = "The quick brown fox jumps over the lazy dog and then we attack the castle with care and joy forever"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def released_text(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(ch.delta.content or "" for c in chunks for ch in c.choices)


async def run(source: Any, moderator: Any, **kwargs: Any) -> tuple[list[ChatCompletionChunk], sg.GuardedStream]:
    with anyio.fail_after(5):
        async with sg.guard(source, moderator=moderator, **kwargs) as guarded:
            chunks = [c async for c in guarded]
    return chunks, guarded


async def test_leaving_early_closes_upstream() -> None:
    """Leaving the block cancels pending moderation and closes the upstream."""
    source = scripted_chunks(["Hi", " there"] * 50)
    moderator = FakeModerator(latency=0.2)
    with anyio.fail_after(5):
        async with sg.guard(source, moderator=moderator) as guarded:
            await guarded.receive()  # the role chunk needs no verdict
    assert source.closed
    assert moderator.in_flight == 0


async def test_fail_closed_releases_only_clean_text_then_raises() -> None:
    """A failing moderator ends the stream with ModerationError; only settled text was released."""
    moderator = FakeModerator(fail=lambda call: RuntimeError("boom") if call >= 2 else None, latency=0.01)
    source = scripted_chunks(words(TEXT), delay=0.002)
    released: list[ChatCompletionChunk] = []
    with anyio.fail_after(5), pytest.raises(sg.ModerationError) as caught:
        async with sg.guard(source, moderator=moderator) as guarded:
            async for chunk in guarded:
                released.append(chunk)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert len(released_text(released)) <= guarded.report.watermarks[0]
    assert TEXT.startswith(released_text(released))
    assert source.closed


async def test_fail_open_releases_and_records_unmoderated_spans() -> None:
    """fail_open lets text through and says which spans went unmoderated."""
    moderator = FakeModerator(fail=RuntimeError("down"))
    chunks, guarded = await run(scripted_chunks(words(TEXT)), moderator, policy=sg.Policy(on_error="fail_open"))
    assert released_text(chunks) == TEXT
    spans = guarded.report.unmoderated
    assert spans and spans[0].start == 0 and spans[-1].end == len(TEXT)


async def test_hanging_moderator_times_out() -> None:
    """A moderator that never answers is bounded by moderation_timeout."""
    policy = sg.Policy(moderation_timeout=0.1)
    with anyio.fail_after(5), pytest.raises(sg.ModerationTimeout):
        await run(scripted_chunks(words(TEXT)), FakeModerator(latency=float("inf")), policy=policy)


async def test_wrong_verdict_count_is_a_moderation_error() -> None:
    """A moderator returning the wrong number of verdicts fails closed."""

    class Broken:
        async def moderate(self, texts: Any) -> list[sg.Verdict]:
            return []

    with anyio.fail_after(5), pytest.raises(sg.ModerationError, match="0 verdicts"):
        await run(scripted_chunks(words(TEXT)), Broken())


async def test_quiet_gap_flushes_a_partial_window() -> None:
    """When upstream pauses mid-answer, buffered text is moderated and released without waiting."""
    gate = anyio.Event()

    async def stalling() -> AsyncIterator[ChatCompletionChunk]:
        yield chat_chunk("", role="assistant")
        yield chat_chunk("Short")
        await gate.wait()
        yield chat_chunk(" end", finish_reason="stop")

    policy = sg.Policy(flush_after=0.05, first_window_chars=16)
    with anyio.fail_after(5):
        async with sg.guard(stalling(), moderator=FakeModerator(), policy=policy) as guarded:
            await guarded.receive()  # role
            first = await guarded.receive()  # released while upstream is still stalled
            assert first.choices[0].delta.content == "Short"
            gate.set()
            rest = [c async for c in guarded]
    assert released_text(rest) == " end"


async def test_hooks_see_every_verdict_and_flag() -> None:
    """on_verdict fires once per settled window; on_flag once per flag, async hooks too."""
    verdicts: list[VerdictEvent] = []
    flags: list[Flag] = []

    async def on_flag(flag: Flag) -> None:
        flags.append(flag)

    policy = sg.Policy(action="redact")
    chunks, guarded = await run(
        scripted_chunks(words(TEXT)),
        FakeModerator(["attack"]),
        policy=policy,
        on_verdict=verdicts.append,
        on_flag=on_flag,
    )
    assert len(flags) == 1 and flags[0].category == "violence"
    assert [v.seq for v in verdicts if v.flag is None and v.error is None] != []
    assert sum(v.flag is not None for v in verdicts) == 1
    assert "[redacted]" in released_text(chunks) and "attack" not in released_text(chunks)


async def test_dict_chunks_are_accepted() -> None:
    """Plain dict chunks go through the same engine and come out as dicts; unchanged ones are the same objects."""
    sent: list[dict[str, Any]] = [chunk.model_dump() for chunk in scripted_chunks(words(TEXT))._chunks]

    async def dicts() -> AsyncIterator[dict[str, Any]]:
        for chunk in sent:
            yield chunk

    chunks, _ = await run(dicts(), FakeModerator())
    out: list[Any] = chunks
    assert all(isinstance(c, dict) for c in out)
    assert "".join(ch["delta"].get("content") or "" for c in out for ch in c["choices"]) == TEXT
    assert [c for c in out if c["choices"]] == sent
    assert all(any(c is s for s in sent) for c in out if c["choices"])


async def test_usage_chunk_can_be_switched_off() -> None:
    """include_usage=False yields no choice-less chunk at the end."""
    on, _ = await run(scripted_chunks(words(TEXT)), FakeModerator())
    off, guarded = await run(scripted_chunks(words(TEXT)), FakeModerator(), policy=sg.Policy(include_usage=False))
    assert on[-1].choices == [] and on[-1].usage is not None
    assert all(c.choices for c in off)
    assert guarded.report.usage is not None and guarded.report.usage_source == "estimated"


async def test_refusal_text_is_moderated_and_released_in_its_field() -> None:
    """Refusal deltas are text too: judged, and released as refusal."""
    source = ScriptedStream(
        [chat_chunk(refusal="I cannot help"), chat_chunk(refusal=" with that", finish_reason="stop")]
    )
    chunks, _ = await run(source, FakeModerator())
    assert "".join(ch.delta.refusal or "" for c in chunks for ch in c.choices) == "I cannot help with that"


async def test_cut_with_every_choice_done_stops_reading() -> None:
    """After a cut-off of the only choice, upstream is closed before it is exhausted."""
    source = scripted_chunks(words(TEXT + " more" * 500), delay=0.001)
    chunks, guarded = await run(source, FakeModerator(["attack"]))
    assert source.closed and source.sent < len(words(TEXT + " more" * 500))
    assert guarded.report.finish_reasons == {0: "content_filter"}


async def test_bare_iteration_on_trio_says_to_use_async_with(anyio_backend: str) -> None:
    """Bare iteration needs asyncio; on trio it fails with a clear message, before reading anything."""
    source = scripted_chunks(words(TEXT))
    guarded = sg.guard(source, moderator=FakeModerator())
    if anyio_backend == "trio":
        with pytest.raises(RuntimeError, match="async with"):
            await guarded.__anext__()
        assert source.sent == 0
    else:
        with anyio.fail_after(5):
            chunks = [c async for c in guarded]
        assert released_text(chunks) == TEXT and source.closed


async def test_aclose_before_iterating_closes_upstream() -> None:
    """A guarded stream closed before anyone read it still closes its upstream."""
    source = scripted_chunks(words(TEXT))
    guarded = sg.guard(source, moderator=FakeModerator())
    with anyio.fail_after(5):
        await guarded.aclose()
    assert source.closed


async def test_upstream_error_releases_judged_text_first() -> None:
    """When upstream fails, what it sent is still judged and the clean part released before the error."""

    async def failing() -> AsyncIterator[ChatCompletionChunk]:
        for chunk in scripted_chunks(words(TEXT), finish_reason=None)._chunks:
            yield chunk
        raise ConnectionError("upstream went away")

    released: list[ChatCompletionChunk] = []
    with anyio.fail_after(5), pytest.raises(ConnectionError):
        async with sg.guard(failing(), moderator=FakeModerator(["attack"], latency=0.01)) as guarded:
            async for chunk in guarded:
                released.append(chunk)
    text = released_text(released)
    flag = guarded.report.flags[0]
    assert text == TEXT[: flag.start]  # everything before the flagged window, nothing after


def moderation_chunk(flagged: bool) -> dict[str, Any]:
    """The chunk OpenAI sends when the request asked it to moderate (``moderation={...}``)."""
    result = {
        "type": "moderation_result",
        "model": "omni-moderation-latest",
        "flagged": flagged,
        "categories": {"violence": flagged, "hate": False},
        "category_scores": {"violence": 0.93 if flagged else 0.01, "hate": 0.001},
        "category_applied_input_types": {"violence": ["text"], "hate": ["text"]},
    }
    clean = {**result, "flagged": False, "categories": {"violence": False, "hate": False}}
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "gpt-5",
        "choices": [],
        "moderation": {
            "input": {"type": "moderation_results", "model": "omni-moderation-latest", "results": [clean]},
            "output": {"type": "moderation_results", "model": "omni-moderation-latest", "results": [result]},
        },
    }


@pytest.mark.parametrize("flagged", [True, False])
async def test_upstream_moderation_results_are_honoured(flagged: bool) -> None:
    """A provider's own output moderation in the stream is reported, and a flag ends held text as content_filter."""

    async def with_moderation() -> AsyncIterator[Any]:
        for chunk in scripted_chunks(words(TEXT), finish_reason=None)._chunks:
            yield chunk
        yield moderation_chunk(flagged)  # arrives while the last windows still wait for verdicts
        yield chat_chunk(finish_reason="stop")

    chunks, guarded = await run(with_moderation(), FakeModerator(latency=0.05))
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    if flagged:
        flag = guarded.report.flags[0]
        assert (flag.source, flag.category, flag.score) == ("upstream", "violence", 0.93)
        assert finishes == ["content_filter"]
        assert guarded.report.leaked_chars == len(released_text(chunks))  # shown before the provider's verdict
        assert TEXT.startswith(released_text(chunks)) and len(released_text(chunks)) < len(TEXT)
    else:
        assert guarded.report.flags == () and finishes == ["stop"]
        assert released_text(chunks) == TEXT
    assert any(getattr(c, "moderation", None) is not None for c in chunks)  # passed through to the consumer


async def test_receive_nowait_takes_what_is_ready_and_never_waits() -> None:
    """``receive_nowait`` hands out released chunks in order; ``WouldBlock`` before the start, when
    nothing is ready and at the end; what it and ``__anext__`` hand out together is the stream."""
    source = scripted_chunks(words(TEXT), delay=0.001)
    guarded = sg.guard(source, moderator=FakeModerator(["zzz"], latency=0.01))
    with pytest.raises(anyio.WouldBlock):
        guarded.receive_nowait()  # not started
    got: list[ChatCompletionChunk] = []
    bursts: list[int] = []
    with anyio.fail_after(5):
        async with guarded:
            async for chunk in guarded:
                burst = [chunk]
                while True:
                    try:
                        burst.append(guarded.receive_nowait())
                    except anyio.WouldBlock:
                        break
                got += burst
                bursts.append(len(burst))
            with pytest.raises(anyio.WouldBlock):
                guarded.receive_nowait()  # ended
    assert released_text(got) == TEXT
    assert [c.finish_reason for chunk in got for c in chunk.choices if c.finish_reason] == ["stop"]
    assert max(bursts) > 1  # a verdict released several chunks at once


async def test_max_duration_ends_a_stream_whose_text_keeps_coming() -> None:
    """``max_duration`` ends a stream that never stops (its timer fires while text keeps arriving,
    the consumer waiting on held text), with ``StreamTimeout``; what was released was clean."""
    source = scripted_chunks(["word "] * 10_000, delay=0.01)
    policy = sg.Policy(max_duration=0.4)
    released: list[ChatCompletionChunk] = []
    with anyio.fail_after(5), pytest.raises(sg.StreamTimeout):
        async with sg.guard(source, moderator=FakeModerator(latency=0.05), policy=policy) as guarded:
            async for chunk in guarded:
                released.append(chunk)
    assert 0 < source.sent < 200
    assert source.closed
    assert set(released_text(released).split()) <= {"word"}


async def test_a_partial_window_is_flushed_while_the_consumer_waits() -> None:
    """With upstream silent after a short text, the flush timer (armed while the consumer waits)
    sends the partial window; its verdict releases the text before upstream goes on."""
    gate = anyio.Event()

    async def slow() -> AsyncIterator[ChatCompletionChunk]:
        yield chat_chunk("", role="assistant")
        for word in ("one", " two", " three"):
            yield chat_chunk(word)
            await anyio.sleep(0.01)  # a flush deadline that keeps moving while words come
        await gate.wait()
        yield chat_chunk(index=0, finish_reason="stop")

    policy = sg.Policy(flush_after=0.1, first_window_chars=200, window_chars=200)
    with anyio.fail_after(5):
        async with sg.guard(slow(), moderator=FakeModerator(), policy=policy) as guarded:
            await guarded.receive()  # role
            got = [await guarded.receive() for _ in range(3)]
            assert released_text(got) == "one two three"
            gate.set()
            rest = [c async for c in guarded]
    assert [c.finish_reason for chunk in rest for c in chunk.choices if c.finish_reason] == ["stop"]


def test_flushes_while_moderation_is_busy_start_new_workers() -> None:
    """Pauses longer than ``flush_after`` while earlier windows are still being judged: each flush
    comes from the timer and needs a new moderation worker. The stream still ends whole (a worker
    must be started from a task, never from a loop callback).

    Run by plain ``asyncio.run``, as a server runs it: under the test runner's anyio context the
    backend is found even in a loop callback, which hid the bug this guards against.
    """
    deltas = [f" w{i}" for i in range(12)]

    async def paced() -> AsyncIterator[ChatCompletionChunk]:
        yield chat_chunk("", role="assistant")
        for delta in deltas:
            yield chat_chunk(delta)
            await anyio.sleep(0.04)
        yield chat_chunk(index=0, finish_reason="stop")

    async def main() -> tuple[list[ChatCompletionChunk], sg.GuardedStream]:
        policy = sg.Policy(flush_after=0.01, first_window_chars=200, window_chars=200, max_in_flight=8)
        return await run(paced(), FakeModerator(latency=0.15), policy=policy)

    chunks, guarded = asyncio.run(main())
    assert released_text(chunks) == "".join(deltas)
    assert guarded.report.error is None
    assert guarded.report.moderation_calls >= 3


async def test_receive_nowait_never_hands_out_a_flagged_word() -> None:
    """Hold-back through ``receive_nowait`` as through iteration: the flagged word never arrives, the
    choice ends ``content_filter``, and what did arrive is the clean prefix."""
    source = scripted_chunks(words(TEXT), delay=0.001)
    got: list[ChatCompletionChunk] = []
    with anyio.fail_after(5):
        async with sg.guard(source, moderator=FakeModerator(["attack"], latency=0.01)) as guarded:
            async for chunk in guarded:
                got.append(chunk)
                while True:
                    try:
                        got.append(guarded.receive_nowait())
                    except anyio.WouldBlock:
                        break
    text = released_text(got)
    assert "attack" not in text and TEXT.startswith(text)
    assert [c.finish_reason for chunk in got for c in chunk.choices if c.finish_reason] == ["content_filter"]
