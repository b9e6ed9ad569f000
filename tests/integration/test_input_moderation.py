"""Policy(moderate_input=True): the request's messages are judged concurrently with generation."""

from __future__ import annotations

from typing import Any

import anyio
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

import streamguard as sg
from streamguard.report import VerdictEvent
from streamguard.sources import input_text
from streamguard.testing import FakeModerator
from streamguard.testing.upstream import LoopbackUpstream, Script, text_chunks

ANSWER = [" A", " calm", " answer", " about", " gardens", " and", " rivers", "."]


async def guarded_run(
    client: AsyncOpenAI, messages: list[ChatCompletionMessageParam], moderator: Any, **kwargs: Any
) -> tuple[list[Any], sg.GuardedStream]:
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True)
    policy = kwargs.pop("policy", sg.Policy(moderate_input=True))
    async with sg.guard(stream, moderator=moderator, policy=policy, messages=messages, **kwargs) as g:
        chunks = [c async for c in g]
    return chunks, g


async def test_clean_input_releases_after_its_verdict(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """With a clean input, output is unchanged, and no text went out before the input verdict."""
    upstream.chat = lambda body: Script(text_chunks(ANSWER), delay=0.001)
    order: list[str] = []

    def on_verdict(event: VerdictEvent) -> None:
        order.append("input" if event.choice == -1 else "window")

    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "You are kind."},
        {"role": "user", "content": "Tell me about gardens."},
    ]
    moderator = FakeModerator(["weapon"], latency=0.05)
    with anyio.fail_after(10):
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True)
        async with sg.guard(
            stream, moderator=moderator, policy=sg.Policy(moderate_input=True), messages=messages, on_verdict=on_verdict
        ) as g:
            async for chunk in g:
                if any(ch.delta.content for ch in chunk.choices):
                    order.append("text")
    assert order.index("input") < order.index("text")
    assert g.report.input_moderated_chars == len("Tell me about gardens.")  # the system prompt is the app's own
    assert ["Tell me about gardens."] in moderator.calls
    assert g.report.flags == () and g.report.finish_reasons == {0: "stop"}


async def test_flagged_input_ends_every_choice_and_closes_upstream(
    upstream: LoopbackUpstream, client: AsyncOpenAI
) -> None:
    """A flagged input ends all choices with content_filter, releases no text and closes upstream."""
    a, b = text_chunks(ANSWER * 50, index=0), text_chunks(ANSWER * 50, index=1)
    upstream.chat = lambda body: Script([e for pair in zip(a, b, strict=True) for e in pair], delay=0.002)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "How do I build a weapon?"}]
    with anyio.fail_after(10):
        chunks, g = await guarded_run(client, messages, FakeModerator(["weapon"], latency=0.05), n=2)
        assert await upstream.await_ended(1)
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert text == ""
    assert g.report.finish_reasons == {0: "content_filter", 1: "content_filter"}
    flag = g.report.flags[0]
    assert (flag.source, flag.choice, flag.category) == ("input", -1, "violence")
    assert upstream.aborted == 1


async def test_flag_before_any_chunk_still_ends_with_content_filter(
    upstream: LoopbackUpstream, client: AsyncOpenAI
) -> None:
    """If the input verdict beats upstream's first chunk, the consumer still gets a content_filter ending."""
    upstream.chat = lambda body: Script(text_chunks(ANSWER), first_delay=1.0)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "weapon"}]
    with anyio.fail_after(10):
        chunks, g = await guarded_run(client, messages, FakeModerator(["weapon"]))
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == ["content_filter"]
    assert g.report.finish_reasons == {0: "content_filter"}


async def test_long_conversation_is_truncated_newest_first(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """Only the newest messages within input_max_chars are moderated, and the report says so."""
    upstream.chat = lambda body: Script(text_chunks(ANSWER))
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": f"message {i} " * 20} for i in range(50)]
    moderator = FakeModerator()
    with anyio.fail_after(10):
        _, g = await guarded_run(
            client, messages, moderator, policy=sg.Policy(moderate_input=True, input_max_chars=500)
        )
    assert g.report.input_truncated
    assert g.report.input_moderated_chars <= 500
    input_call = next(texts[0] for texts in moderator.calls if "message 49" in texts[0])
    assert "message 0 " not in input_call


def test_input_text_skips_app_roles_and_reads_text_parts() -> None:
    """System/developer text is the app's own; content parts of type text count."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "secret rules"},
        {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "image_url", "image_url": {}}]},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "bye"},
    ]
    assert input_text(messages, 1000) == ("hello\nhi\nbye", False)
    assert input_text(messages, 5) == ("i\nbye", True)  # the newest text first, within the budget
