"""Shared fixtures: a loopback OpenAI-compatible upstream and a real ``AsyncOpenAI`` client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from openai import AsyncOpenAI

from streamguard.testing.upstream import LoopbackUpstream
from tests.integration._redis import RedisServer


@pytest.fixture
def anyio_backend() -> str:
    """asyncio by default. Engine tests with in-process fakes override this to run on trio too;
    the ``openai`` client's own stream leaves inner generators to the garbage collector, which
    trio reports as a ResourceWarning, so tests through the real client run on asyncio."""
    return "asyncio"


@pytest.fixture
def upstream() -> Iterator[LoopbackUpstream]:
    """A real uvicorn server on 127.0.0.1 (free port); tests set ``.chat`` / ``.moderation``."""
    with LoopbackUpstream() as server:
        yield server


@pytest.fixture
async def client(upstream: LoopbackUpstream) -> AsyncIterator[AsyncOpenAI]:
    """The real ``openai`` client over real HTTP to ``upstream``; no retries, short timeout."""
    async with AsyncOpenAI(api_key="test", base_url=upstream.base_url, max_retries=0, timeout=10) as c:
        yield c


def other_tasks() -> set[asyncio.Task[object]]:
    """asyncio tasks alive besides the current one and anyio's own test runner (a leak check)."""
    return {
        t
        for t in asyncio.all_tasks()
        if t is not asyncio.current_task() and not t.done() and "/anyio/" not in _code_file(t)
    }


def _code_file(task: asyncio.Task[object]) -> str:
    code = getattr(task.get_coro(), "cr_code", None)
    return code.co_filename if code is not None else ""


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real ``redis-server`` on a free 127.0.0.1 port (Debian's; scripts/test.sh installs it), stopped after."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
