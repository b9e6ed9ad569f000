"""Sync code: ``wrap(OpenAI(...))`` and ``guard_sync`` over real HTTP, the engine on the shared bridge loop."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio.lowlevel
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from streamguard import _sync
from streamguard._sync import SyncGuardedStream, guard_sync, run_on_bridge
from streamguard.exceptions import ModerationError
from streamguard.policy import Policy
from streamguard.testing import FakeModerator
from streamguard.testing.upstream import LoopbackUpstream, Reply, Script, keyword_moderation, text_chunks
from streamguard.wrap import wrap
from tests.helpers import words

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story."}]
STORY = (
    "Once upon a time a careful engineer wrote a library that watched every word. "
    "Then one day the model said that it would attack the castle at dawn, "
    "and the library stopped it before anyone could read the plan. The end came quietly."
)
CLEAN = "A calm answer about gardens and rivers and the long light of summer evenings."


def text_of(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def finishes(chunks: list[ChatCompletionChunk]) -> list[str]:
    return [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]


@pytest.fixture
def sync_client(upstream: LoopbackUpstream) -> Iterator[OpenAI]:
    """The real sync ``openai`` client over real HTTP to ``upstream``."""
    with OpenAI(base_url=upstream.base_url, api_key="test", max_retries=0, timeout=10) as c:
        yield c


def open_stream(client: OpenAI, **extra: Any) -> Any:
    return client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True, **extra)


async def _bridge_tasks() -> int:
    """Tasks on the bridge loop besides this one and the portal's own."""
    import asyncio

    me = asyncio.current_task()
    return sum(1 for t in asyncio.all_tasks() if t is not me and "/anyio/" not in _code_file(t))


def _code_file(task: Any) -> str:
    code = getattr(task.get_coro(), "cr_code", None)
    return code.co_filename if code is not None else ""


def settled(predicate: Any, seconds: float = 5.0) -> bool:
    """Poll ``predicate`` until true (bounded): cleanup on the bridge finishes just after a call returns."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def no_bridge_tasks() -> bool:
    return run_on_bridge(_bridge_tasks) == 0


def test_wrap_sync_clean_stream(upstream: LoopbackUpstream, sync_client: OpenAI) -> None:
    """A clean stream through ``wrap(OpenAI())`` comes out whole, in a plain ``for`` loop."""
    upstream.chat = lambda body: Script(text_chunks(words(CLEAN)), delay=0.001)
    wrapped = wrap(sync_client, moderator=FakeModerator(["attack"]))
    assert isinstance(wrapped, OpenAI)
    stream = open_stream(wrapped)
    assert isinstance(stream, SyncGuardedStream)
    chunks = list(stream)
    assert text_of(chunks) == CLEAN
    assert finishes(chunks) == ["stop"]
    assert stream.report.finish_reasons == {0: "stop"}
    assert upstream.wait_ended(1, 5) and upstream.completed == 1
    assert settled(no_bridge_tasks)


def test_cutoff_closes_upstream_early(upstream: LoopbackUpstream, sync_client: OpenAI) -> None:
    """A flag ends the stream with content_filter and closes upstream before its end."""
    long_tail = STORY + " More words follow." * 200
    upstream.chat = lambda body: Script(text_chunks(words(long_tail)), delay=0.002)
    guarded = guard_sync(open_stream(sync_client), moderator=FakeModerator(["attack"]))
    chunks = list(guarded)
    text = text_of(chunks)
    assert "attack" not in text and STORY.startswith(text) and text
    assert finishes(chunks) == ["content_filter"]
    assert upstream.wait_ended(1, 5)
    assert upstream.aborted == 1
    assert upstream.events_sent < len(words(long_tail))
    assert settled(no_bridge_tasks)


def test_break_and_close(upstream: LoopbackUpstream, sync_client: OpenAI) -> None:
    """``break`` + ``close()`` closes the upstream and cancels moderation."""
    upstream.chat = lambda body: Script(text_chunks(words(CLEAN) * 100), delay=0.002)
    guarded = guard_sync(open_stream(sync_client), moderator=FakeModerator(latency=0.01))
    for n, _ in enumerate(guarded):
        if n == 5:
            break
    guarded.close()
    guarded.close()  # idempotent
    assert list(guarded) == []
    assert upstream.wait_ended(1, 5) and upstream.aborted == 1
    assert settled(no_bridge_tasks)


def test_with_block_closes_upstream(upstream: LoopbackUpstream, sync_client: OpenAI) -> None:
    """Leaving a ``with`` block early closes the upstream."""
    upstream.chat = lambda body: Script(text_chunks(words(CLEAN) * 100), delay=0.002)
    wrapped = wrap(sync_client, moderator=FakeModerator())
    with open_stream(wrapped) as guarded:
        first = next(guarded)
    assert first.choices[0].delta.role == "assistant"
    assert upstream.wait_ended(1, 5) and upstream.aborted == 1
    assert settled(no_bridge_tasks)


def test_dropped_stream_is_closed(upstream: LoopbackUpstream, sync_client: OpenAI) -> None:
    """A stream dropped without close() is closed by the garbage collector's hook."""
    upstream.chat = lambda body: Script(text_chunks(words(CLEAN) * 100), delay=0.002)
    guarded = guard_sync(open_stream(sync_client), moderator=FakeModerator())
    next(guarded)
    del guarded
    gc.collect()
    assert upstream.wait_ended(1, 5) and upstream.aborted == 1
    assert settled(no_bridge_tasks)


def test_upstream_drop_raises_connection_error(upstream: LoopbackUpstream, sync_client: OpenAI) -> None:
    """A broken upstream connection surfaces as openai's own APIConnectionError."""
    upstream.chat = lambda body: Script(text_chunks(words(CLEAN)), drop_after=4)
    guarded = guard_sync(open_stream(sync_client), moderator=FakeModerator())
    with pytest.raises(openai.APIConnectionError):
        for _ in guarded:
            pass
    guarded.close()
    assert settled(no_bridge_tasks)


def test_fail_closed_raises_moderation_error(upstream: LoopbackUpstream, sync_client: OpenAI) -> None:
    """A failing moderator raises ModerationError (fail-closed), streamed and not."""
    upstream.chat = lambda body: Script(text_chunks(words(STORY)))
    wrapped = wrap(sync_client, moderator=FakeModerator(fail=RuntimeError("backend down")))
    with pytest.raises(ModerationError), open_stream(wrapped) as guarded:
        for _ in guarded:
            pass
    upstream.chat = lambda body: Reply(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": STORY}, "finish_reason": "stop"}],
        }
    )
    with pytest.raises(ModerationError):
        wrapped.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert settled(no_bridge_tasks)


def test_sync_non_stream_and_default_moderator(upstream: LoopbackUpstream, sync_client: OpenAI) -> None:
    """Non-streamed answers are moderated by the default OpenAIModerator (an async twin on the bridge)."""
    upstream.moderation = keyword_moderation(["attack"])
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": STORY}, "finish_reason": "stop"}],
    }
    upstream.chat = lambda b: Reply(body)
    with wrap(sync_client, policy=Policy(moderate_input=True)) as wrapped:
        answer = wrapped.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_body={"x": 1})
        content = answer.choices[0].message.content
        assert content and STORY.startswith(content) and "attack" not in content  # the clean prefix, as streamed
        assert answer.choices[0].finish_reason == "content_filter"
        assert upstream.count("/v1/moderations") >= 2  # the input, then the answer's windows
        assert [b for p, b in upstream.requests if p == "/v1/chat/completions"][-1]["x"] == 1
        assert [m.id for m in wrapped.models.list().data] == ["gpt-4o-mini"]


def test_no_threads_or_tasks_left(upstream: LoopbackUpstream, sync_client: OpenAI) -> None:
    """Repeated streams (cut, broken off, clean) leave no task and no extra thread behind."""
    upstream.chat = lambda body: Script(text_chunks(words(STORY)), delay=0.001)
    list(guard_sync(open_stream(sync_client), moderator=FakeModerator()))  # warm up: bridge + worker pool
    assert settled(no_bridge_tasks)
    before = {t.ident for t in threading.enumerate()}
    for i in range(6):
        guarded = guard_sync(open_stream(sync_client), moderator=FakeModerator(["attack"] if i % 2 else []))
        with guarded:
            for n, _ in enumerate(guarded):
                if i % 3 == 2 and n == 3:
                    break
    assert settled(no_bridge_tasks)
    assert upstream.wait_ended(7, 5)
    # The bridge thread is shared and idle pool threads are reused. A read abandoned by a cut-off keeps
    # its pool thread busy until upstream's close ends it, so a later stream may start another: an idle
    # one exits after the pool's idle time, so after that none is left.
    assert settled(lambda: {t.ident for t in threading.enumerate()} <= before, _sync._IDLE_SECONDS + 5)
    bridge = _sync.bridge_thread()
    assert bridge is not None and bridge.daemon and bridge.ident in before


def test_calling_from_the_bridge_thread_raises(upstream: LoopbackUpstream, sync_client: OpenAI) -> None:
    """Using a sync guarded stream from the bridge loop's own thread raises instead of deadlocking."""
    upstream.chat = lambda body: Script(text_chunks(["Hi."]))
    guarded = guard_sync(open_stream(sync_client), moderator=FakeModerator())

    async def consume() -> None:
        await anyio.lowlevel.checkpoint()
        next(guarded)  # raises at once: no wait for itself

    with pytest.raises(RuntimeError, match="deadlock"):
        run_on_bridge(consume)
    guarded.close()
    assert upstream.wait_ended(1, 5)


def test_guard_sync_accepts_plain_dicts() -> None:
    """Any iterable of chunk dicts works, not only openai's Stream."""
    guarded = guard_sync(iter(text_chunks(words(CLEAN))), moderator=FakeModerator())
    with guarded:
        out: list[Any] = list(guarded)
    assert all(isinstance(c, dict) for c in out)  # dicts in, dicts out
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in out if c["choices"]) == CLEAN
