"""Regression tests for bugs found while reading the old engine (issue: the engine as a state machine)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

import streamguard as sg
from streamguard._sync import guard_sync
from streamguard.testing import FakeModerator, chat_chunk, scripted_chunks
from tests.helpers import words

TEXT = "The quick brown fox jumps over the lazy dog and then we rest by the river with care and joy forever"


def content(chunks: list[Any]) -> str:
    return "".join(ch.delta.content or "" for c in chunks for ch in c.choices)


async def test_an_async_hook_that_raises_ends_a_bare_stream_with_its_error() -> None:
    """The old engine silently truncated a bare-form stream when an async hook raised."""

    class HookFailed(Exception):
        pass

    async def on_verdict(event: Any) -> None:
        if event.seq == 2:
            raise HookFailed("the app's hook broke")

    released: list[Any] = []
    with anyio.fail_after(5), pytest.raises(HookFailed):
        async for chunk in sg.guard(scripted_chunks(words(TEXT)), moderator=FakeModerator(), on_verdict=on_verdict):
            released.append(chunk)
    assert TEXT.startswith(content(released))  # never a silent truncation: the error is raised


async def test_a_sync_hook_that_raises_ends_the_stream_with_its_error() -> None:
    """A sync hook's exception is the stream's ending, in the structured form too."""

    def on_flag(flag: Any) -> None:
        raise KeyError("hook")

    with anyio.fail_after(5), pytest.raises(KeyError):
        async with sg.guard(
            scripted_chunks(words("we attack now")), moderator=FakeModerator(["attack"]), on_flag=on_flag
        ) as guarded:
            async for _ in guarded:
                pass


@pytest.mark.parametrize("bad", [None, "nope", 3])
async def test_choices_that_are_not_a_list_raise_stream_format_error(bad: Any) -> None:
    """`choices: null` (or any non-list) is a StreamFormatError, not a TypeError."""

    async def source() -> AsyncIterator[dict[str, Any]]:
        yield {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": bad}

    with anyio.fail_after(5), pytest.raises(sg.StreamFormatError):
        async with sg.guard(source(), moderator=FakeModerator()) as guarded:
            async for _ in guarded:
                pass


async def test_something_that_is_not_a_chunk_raises_stream_format_error() -> None:
    """A stream of a shape the guard cannot read raises StreamFormatError."""

    async def source() -> AsyncIterator[Any]:
        yield b"data: {}\n\n"

    with anyio.fail_after(5), pytest.raises(sg.StreamFormatError):
        async for _ in sg.guard(source(), moderator=FakeModerator()):
            pass


def test_sync_close_from_another_thread_ends_iteration_cleanly() -> None:
    """close() from another thread while one is blocked in next(): StopIteration, no ClosedResourceError."""
    guarded = guard_sync(iter(list(scripted_chunks(words(TEXT))._chunks)), moderator=FakeModerator(latency=0.3))
    got: list[Any] = []
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            for chunk in guarded:
                got.append(chunk)
        except BaseException as exc:  # recorded: the assertion below names it
            errors.append(exc)

    reader = threading.Thread(target=consume)
    reader.start()
    time.sleep(0.1)  # the reader now waits for the first verdict
    guarded.close()
    reader.join(timeout=5)
    assert not reader.is_alive()
    assert errors == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_guard_sync_works_in_a_forked_child_after_the_parent_used_it() -> None:
    """The bridge is reset at fork: a child that guards a stream does not hang."""
    before = guard_sync(iter(list(scripted_chunks(words(TEXT))._chunks)), moderator=FakeModerator())
    with before:
        assert content(list(before)) == TEXT
    pid = os.fork()
    if pid == 0:  # the child: exit code says whether it worked
        code = 1
        try:
            child = guard_sync(iter(list(scripted_chunks(words(TEXT))._chunks)), moderator=FakeModerator())
            with child:
                code = 0 if content(list(child)) == TEXT else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("guard_sync hung in the forked child")


async def test_idle_upstream_ends_with_stream_timeout_and_closes_upstream() -> None:
    """An upstream that sends nothing (e.g. only SSE comments) ends at idle_timeout with StreamTimeout."""
    closed = anyio.Event()

    class Stalled:
        def __aiter__(self) -> Stalled:
            return self

        async def __anext__(self) -> Any:
            await anyio.sleep_forever()

        async def aclose(self) -> None:
            closed.set()

    with anyio.fail_after(5), pytest.raises(sg.StreamTimeout):
        async with sg.guard(Stalled(), moderator=FakeModerator(), policy=sg.Policy(idle_timeout=0.2)) as guarded:
            async for _ in guarded:
                pass
    assert closed.is_set()


def _sync_source(chunks: list[Any]) -> Iterator[Any]:
    yield from chunks


async def test_upstream_failure_while_a_window_is_in_moderation_ends_once() -> None:
    """A flagged window settled after upstream failed: the stream ends with the error only."""

    async def failing() -> AsyncIterator[Any]:
        yield chat_chunk("", role="assistant")
        for w in words("calm words then attack now"):
            yield chat_chunk(w)
        raise ConnectionError("upstream went away")

    out: list[Any] = []
    with anyio.fail_after(5), pytest.raises(ConnectionError):
        async with sg.guard(failing(), moderator=FakeModerator(["attack"], latency=0.05)) as guarded:
            async for chunk in guarded:
                out.append(chunk)
    assert [ch.finish_reason for c in out for ch in c.choices if ch.finish_reason] == []
    assert "attack" not in content(out)


@pytest.mark.parametrize("disguise", ["at\u200btack", "\uff41ttack", "att\u0430ck", "a\u00adttack"])
async def test_every_moderator_judges_the_normalised_view(disguise: str) -> None:
    """A custom moderator (not only the built-in ones) sees disguised text folded back; callers get the original."""
    out: list[Any] = []
    with anyio.fail_after(5):
        async with sg.guard(
            scripted_chunks(words(f"calm words then {disguise} now")),
            moderator=FakeModerator(["attack"]),
            policy=sg.Policy(action="redact"),
        ) as guarded:
            out = [c async for c in guarded]
    assert guarded.report.flagged
    assert disguise not in content(out) and "[redacted]" in content(out)
    assert content(out).startswith("calm words")  # the original text, not the normalised one
