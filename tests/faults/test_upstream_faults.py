"""Injected upstream and moderator faults, through the real openai client on loopback.

Each ends in a defined state: upstream failures as the openai client's own exception, moderation
failures as ModerationError (fail-closed), never a hang; no unmoderated text escapes in hold-back
mode; upstream is closed; and no task or file descriptor is left behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

import anyio
import openai
import pytest
from openai import AsyncOpenAI

import streamguard as sg
from streamguard.testing import FakeModerator
from streamguard.testing.upstream import LoopbackUpstream, Reply, Script, text_chunks
from tests.conftest import other_tasks

WORDS = [" word"] * 30 + [" attack"] + [" word"] * 30


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
async def fast_client(upstream: LoopbackUpstream) -> AsyncIterator[AsyncOpenAI]:
    """A client whose read timeout bounds an upstream that stalls."""
    async with AsyncOpenAI(api_key="test", base_url=upstream.base_url, max_retries=0, timeout=0.5) as c:
        yield c


async def consume(client: AsyncOpenAI, moderator: Any, policy: sg.Policy | None = None) -> tuple[str, sg.GuardedStream]:
    released = ""
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=[], stream=True)
    guarded = sg.guard(stream, moderator=moderator, policy=policy)
    try:
        async with guarded:
            async for chunk in guarded:
                released += "".join(ch.delta.content or "" for ch in chunk.choices)
    finally:
        assert stream.response.is_closed  # whatever happened, upstream is closed
    return released, guarded


async def assert_clean(client: AsyncOpenAI, before_fds: int) -> None:
    """No task is left, and once the client's pool is closed no socket is either (keep-alive
    connections of completed responses legitimately stay pooled until then)."""
    assert other_tasks() == set()
    await client.close()
    for _ in range(100):  # the loopback server's side of each socket closes when it sees EOF
        if open_fds() <= before_fds:
            break
        await anyio.sleep(0.01)
    assert open_fds() <= before_fds


@pytest.mark.parametrize(
    ("script", "error"),
    [
        (Script(text_chunks(WORDS), drop_after=12), openai.APIConnectionError),
        (Script(text_chunks(WORDS), stall_after=12), openai.APITimeoutError),
        (Script([*text_chunks(WORDS)[:12], "{not json"]), json.JSONDecodeError),
        (Script([*text_chunks(WORDS)[:12], {"error": {"message": "overloaded", "type": "server"}}]), openai.APIError),
    ],
    ids=["drop", "stall", "invalid-json", "error-event"],
)
async def test_upstream_failure_surfaces_unchanged(
    upstream: LoopbackUpstream, fast_client: AsyncOpenAI, script: Script, error: type[Exception]
) -> None:
    """The stream ends with the client's own exception; only judged text was released; nothing leaks."""
    upstream.chat = lambda body: script
    before = open_fds()
    with anyio.fail_after(10):
        with pytest.raises(error):
            await consume(fast_client, FakeModerator(["attack"], latency=0.01))
        assert await upstream.await_ended(1)
    await assert_clean(fast_client, before)


async def test_missing_done_still_ends_normally(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """A body that ends without [DONE] ends the stream with upstream's finish."""
    upstream.chat = lambda body: Script(text_chunks([" calm"] * 10), done=False)
    with anyio.fail_after(10):
        released, guarded = await consume(client, FakeModerator(["attack"]))
    assert released == " calm" * 10 and guarded.report.finish_reasons == {0: "stop"}


async def test_http_error_before_streaming(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """A 429 on the request itself is the client's RateLimitError; guard is never involved."""
    upstream.chat = lambda body: Reply({"error": {"message": "slow down", "type": "rate_limit"}}, status=429)
    with anyio.fail_after(10), pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=[], stream=True)


async def test_unknown_choice_indexes_are_guarded_too(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """Chunks for a choice index nobody asked for get their own windows and verdicts."""
    events = text_chunks([" hello"] * 5) + text_chunks([" one", " attack", " two"], index=7)
    upstream.chat = lambda body: Script(events)
    with anyio.fail_after(10):
        _, guarded = await consume(client, FakeModerator(["attack"]))
    assert guarded.report.finish_reasons == {0: "stop", 7: "content_filter"}


async def test_one_megabyte_delta(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """A single 1 MB delta is judged in windows; a flag deep inside it withholds the rest."""
    big = ("lorem ipsum " * 90_000)[:1_000_000] + " attack " + "tail " * 1000
    upstream.chat = lambda body: Script(text_chunks(["Start:", " " + big]))
    policy = sg.Policy(window_chars=4096, first_window_chars=64, max_in_flight=8)
    with anyio.fail_after(30):
        released, guarded = await consume(client, sg.KeywordModerator(["attack"]), policy)
    flag = guarded.report.flags[0]
    assert "attack" not in released and released == ("Start: " + big)[: flag.start]
    assert len(released) > 900_000  # the clean part before the flag came through


@pytest.mark.parametrize(
    "moderator",
    [
        FakeModerator(latency=float("inf")),
        FakeModerator(fail=RuntimeError("500 from the moderation service")),
        FakeModerator(fail=lambda call: RuntimeError("late failure") if call == 3 else None, latency=0.005),
    ],
    ids=["hang", "error", "late-error"],
)
async def test_moderator_failure_fails_closed(
    upstream: LoopbackUpstream, client: AsyncOpenAI, moderator: FakeModerator
) -> None:
    """A hanging or failing moderator ends with ModerationError; nothing unjudged was released."""
    upstream.chat = lambda body: Script(text_chunks(WORDS), delay=0.002)
    before = open_fds()
    released = ""
    with anyio.fail_after(10):
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=[], stream=True)
        with pytest.raises(sg.ModerationError):
            async with sg.guard(stream, moderator=moderator, policy=sg.Policy(moderation_timeout=0.3)) as guarded:
                async for chunk in guarded:
                    released += "".join(ch.delta.content or "" for ch in chunk.choices)
        assert await upstream.await_ended(1)
    assert len(released) <= guarded.report.watermarks[0]
    assert stream.response.is_closed and moderator.in_flight == 0
    await assert_clean(client, before)
