"""The guarded stream through the real ``openai`` client, over real HTTP, from a loopback server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anyio
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

import streamguard as sg
from streamguard.testing import FakeModerator
from streamguard.testing.upstream import LoopbackUpstream, Script, text_chunks
from tests.conftest import other_tasks
from tests.helpers import words

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story."}]
STORY = (
    "Once upon a time a careful engineer wrote a library that watched every word. "
    "Then one day the model said that it would attack the castle at dawn, "
    "and the library stopped it before anyone could read the plan. The end came quietly."
)


async def open_stream(client: AsyncOpenAI, **extra: Any) -> Any:
    return await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True, **extra)


async def collect(guarded: sg.GuardedStream) -> tuple[str, list[ChatCompletionChunk]]:
    chunks = [c async for c in guarded]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


async def test_clean_stream_passes_through_identically(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """With nothing flagged, every upstream chunk comes out unchanged and in order."""
    events = text_chunks(words(STORY), usage={"prompt_tokens": 12, "completion_tokens": 40, "total_tokens": 52})
    upstream.chat = lambda body: Script(events, delay=0.001)
    with anyio.fail_after(10):
        async with sg.guard(await open_stream(client), moderator=FakeModerator(["zzz"])) as guarded:
            _, chunks = await collect(guarded)
    assert [json.loads(c.to_json(indent=None)) for c in chunks] == events
    report = guarded.report
    assert report.flags == ()
    assert report.usage_source == "upstream"
    assert report.usage is not None and report.usage.completion_tokens == 40
    assert report.watermarks == {0: len(STORY)}
    assert report.finish_reasons == {0: "stop"}


async def test_cutoff_ends_with_content_filter_and_closes_upstream(
    upstream: LoopbackUpstream, client: AsyncOpenAI
) -> None:
    """A flag ends the choice with content_filter, withholds the flagged text and closes upstream early."""
    long_tail = STORY + " More words follow." * 200
    upstream.chat = lambda body: Script(text_chunks(words(long_tail)), delay=0.002)
    with anyio.fail_after(10):
        async with sg.guard(
            await open_stream(client), moderator=FakeModerator(["attack"]), model="gpt-4o-mini", messages=MESSAGES
        ) as guarded:
            text, chunks = await collect(guarded)
        assert await upstream.await_ended(1)
    assert "attack" not in text
    assert STORY.startswith(text)
    assert text.startswith("Once upon a time")
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == ["content_filter"]
    assert upstream.aborted == 1  # the server saw the client go away before the end
    assert upstream.events_sent < len(words(long_tail))
    flag = guarded.report.flags[0]
    assert flag.category == "violence" and flag.choice == 0
    assert flag.start <= STORY.index("attack") < flag.end
    assert guarded.report.leaked_chars == 0
    # the final usage chunk is estimated, and counts withheld text as billed
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert guarded.report.usage_source == "estimated"
    assert guarded.report.shown_completion_tokens < chunks[-1].usage.completion_tokens


async def test_redact_keeps_text_before_and_after(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """Redaction replaces only the flagged window; text before and after it is released."""
    upstream.chat = lambda body: Script(text_chunks(words(STORY)), delay=0.001)
    policy = sg.Policy(action="redact", redaction="[…]", window_chars=48, first_window_chars=16)
    with anyio.fail_after(10):
        async with sg.guard(await open_stream(client), moderator=FakeModerator(["attack"]), policy=policy) as g:
            text, chunks = await collect(g)
    flag = g.report.flags[0]
    assert text == STORY[: flag.start] + "[…]" + STORY[flag.end :]
    assert "attack" not in text and text.endswith("The end came quietly.")
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["stop"]


async def test_n2_choices_are_guarded_independently(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """With n=2 each choice has its own windows and verdicts: one is cut, the other goes on."""
    clean = "A calm answer about gardens and rivers and the long light of summer evenings."
    a = text_chunks(words(STORY), index=0)
    b = text_chunks(words(clean), index=1)
    interleaved = [e for pair in zip(a, b, strict=False) for e in pair] + a[len(b) :] + b[len(a) :]
    upstream.chat = lambda body: Script(interleaved, delay=0.001)
    with anyio.fail_after(10):
        async with sg.guard(await open_stream(client, n=2), moderator=FakeModerator(["attack"]), n=2) as g:
            chunks = [c async for c in g]
    texts = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts[1] == clean
    assert "attack" not in texts[0] and STORY.startswith(texts[0])
    assert g.report.finish_reasons == {0: "content_filter", 1: "stop"}
    assert {f.choice for f in g.report.flags} == {0}


async def test_tool_calls_pass_through(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """Tool-call deltas keep their shape and order, after the text before them."""
    head = text_chunks(words("Let me look that up for you."), finish_reason=None)
    base = {k: v for k, v in head[0].items() if k != "choices"}
    calls = [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"city": '}},
        {"index": 0, "function": {"arguments": '"Paris"}'}},
    ]
    tool_events = [
        {**base, "choices": [{"index": 0, "delta": {"tool_calls": [c]}, "logprobs": None, "finish_reason": None}]}
        for c in calls
    ]
    finish = {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}]}
    events = head + tool_events + [finish]
    upstream.chat = lambda body: Script(events, delay=0.001)
    with anyio.fail_after(10):
        async with sg.guard(await open_stream(client), moderator=FakeModerator(["attack"])) as g:
            chunks = [c async for c in g]
    assert [json.loads(c.to_json(indent=None)) for c in chunks[:-1]] == events
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert g.report.finish_reasons == {0: "tool_calls"}


async def test_stream_first_cut_counts_leak(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """Stream-first releases text at once; on a flag it cuts and reports what was shown."""
    upstream.chat = lambda body: Script(text_chunks(words(STORY)), delay=0.003)
    policy = sg.Policy(mode="stream_first")
    with anyio.fail_after(10):
        async with sg.guard(
            await open_stream(client), moderator=FakeModerator(["attack"], latency=0.01), policy=policy
        ) as g:
            text, chunks = await collect(g)
    flag = g.report.flags[0]
    assert text.startswith(STORY[: flag.start])
    assert len(text) > flag.start  # stream-first showed flagged text ...
    assert g.report.leaked_chars == len(text) - flag.start  # ... and says how much
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["content_filter"]


async def test_holdback_never_releases_before_verdict(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """Every released character lies below the watermark of settled verdicts at release time."""
    upstream.chat = lambda body: Script(text_chunks(words(STORY)), delay=0.002)
    moderator = FakeModerator(latency=0.02)
    with anyio.fail_after(10):
        async with sg.guard(await open_stream(client), moderator=moderator) as g:
            released = 0
            async for chunk in g:
                for ch in chunk.choices:
                    released += len(ch.delta.content or "")
                    assert released <= g.report.watermarks[0]
    assert released == len(STORY)


@pytest.mark.parametrize("form", ["context", "bare"])
async def test_early_exit_closes_upstream_and_leaves_no_tasks(
    upstream: LoopbackUpstream, client: AsyncOpenAI, form: str
) -> None:
    """Leaving early (either form) closes upstream and cancels in-flight moderation."""
    upstream.chat = lambda body: Script(text_chunks(words(STORY * 20)), delay=0.002)
    moderator = FakeModerator(latency=0.05)
    with anyio.fail_after(10):
        stream = await open_stream(client)
        if form == "context":
            async with sg.guard(stream, moderator=moderator) as g:
                async for _ in g:
                    break
        else:
            g = sg.guard(stream, moderator=moderator)
            async for _ in g:
                break
            await g.aclose()
        assert await upstream.await_ended(1)
    assert upstream.aborted == 1
    assert moderator.in_flight == 0
    assert stream.response.is_closed
    assert other_tasks() == set()


async def test_bare_break_without_aclose_still_closes(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """Dropping a bare guarded stream after `break` cancels its pump, which closes upstream."""
    upstream.chat = lambda body: Script(text_chunks(words(STORY * 20)), delay=0.002)
    with anyio.fail_after(10):
        stream = await open_stream(client)
        g = sg.guard(stream, moderator=FakeModerator(latency=0.01))
        async for _ in g:
            break
        del g
        assert await upstream.await_ended(1)
        for _ in range(200):  # the cancelled pump finishes on its own, shortly
            if not other_tasks():
                break
            await asyncio.sleep(0.01)
    assert upstream.aborted == 1 and stream.response.is_closed


async def test_consumer_cancelled_mid_moderation(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """Cancelling the consumer while a verdict is pending closes upstream and cancels the call."""
    upstream.chat = lambda body: Script(text_chunks(words(STORY * 20)), delay=0.002)
    moderator = FakeModerator(latency=float("inf"))
    with anyio.fail_after(10):
        stream = await open_stream(client)
        with anyio.move_on_after(0.2):
            async with sg.guard(stream, moderator=moderator) as g:
                async for _ in g:  # the role chunk, then nothing: verdicts never come
                    pass
        assert await upstream.await_ended(1)
    assert moderator.cancelled >= 1 and moderator.in_flight == 0
    assert stream.response.is_closed and upstream.aborted == 1
    assert other_tasks() == set()


async def test_upstream_drop_surfaces_openai_error(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """An upstream that drops mid-stream ends the guarded stream with the client's own error."""
    upstream.chat = lambda body: Script(text_chunks(words(STORY)), delay=0.001, drop_after=10)
    released = ""
    with anyio.fail_after(10), pytest.raises(openai.APIConnectionError):
        async with sg.guard(await open_stream(client), moderator=FakeModerator()) as g:
            async for c in g:
                released += "".join(ch.delta.content or "" for ch in c.choices)
    assert STORY.startswith(released)
    assert isinstance(g.report.error, openai.APIConnectionError)
    assert other_tasks() == set()


async def test_openai_moderator_end_to_end(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """The Moderation endpoint (loopback) judges windows; its category decides the flag."""
    from streamguard.testing.upstream import keyword_moderation

    upstream.moderation = keyword_moderation(["attack"], category="violence")
    upstream.chat = lambda body: Script(text_chunks(words(STORY)), delay=0.001)
    with anyio.fail_after(10):
        async with sg.guard(await open_stream(client), moderator=sg.OpenAIModerator(client)) as g:
            text, _ = await collect(g)
    assert "attack" not in text and g.report.flags[0].category == "violence"
    assert upstream.count("/v1/moderations") >= 1


@pytest.mark.parametrize("on_error", ["fail_closed", "fail_open"])
async def test_moderation_endpoint_500_under_both_error_modes(
    upstream: LoopbackUpstream, client: AsyncOpenAI, on_error: str
) -> None:
    """The Moderation endpoint answering 500 (after retries): fail-closed raises, fail-open releases and records."""
    from streamguard.testing.upstream import Reply

    upstream.moderation = lambda body: Reply({"error": {"message": "boom", "type": "server_error"}}, status=500)
    upstream.chat = lambda body: Script(text_chunks(words(STORY)))
    policy = sg.Policy(on_error=on_error)  # type: ignore[arg-type]
    moderator = sg.OpenAIModerator(client, max_retries=1, backoff=0.01)
    released = ""
    with anyio.fail_after(10):
        stream = await open_stream(client)
        if on_error == "fail_closed":
            with pytest.raises(sg.ModerationError):
                async with sg.guard(stream, moderator=moderator, policy=policy) as g:
                    async for chunk in g:
                        released += "".join(ch.delta.content or "" for ch in chunk.choices)
            assert released == ""  # nothing had a clean verdict
            assert stream.response.is_closed
        else:
            async with sg.guard(stream, moderator=moderator, policy=policy) as g:
                text, _ = await collect(g)
            assert text == STORY
            spans = g.report.unmoderated
            assert spans[0].start == 0 and spans[-1].end == len(STORY)
    assert upstream.count("/v1/moderations") >= 2  # retried
