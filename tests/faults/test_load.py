"""Concurrent guarded streams through the proxy over real HTTP: nothing lost, mixed up or left open.

Each stream's text names its stream, so a chunk delivered to the wrong caller, lost or reordered
shows as a mismatch. The upstream records how each of its streams ended, so a cut-off stream can
be matched to an upstream stream that the proxy closed early.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any, cast

import anyio
import httpx2
import pytest
from openai import AsyncOpenAI

from streamguard.integrations.proxy import ProxyConfig, create_app
from streamguard.testing.upstream import LoopbackUpstream, Script, text_chunks
from tests.conftest import other_tasks
from tests.integration._servers import serve_in_thread

_ID = re.compile(r"stream (\d+)")


class TrackingUpstream(LoopbackUpstream):
    """A loopback upstream that also records, per stream id, whether it completed or was aborted."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[int, int] = {}  # id(script) -> stream id
        self.outcomes: dict[int, str] = {}  # stream id -> "completed" | "aborted"

    async def _stream(self, script: Script) -> AsyncIterator[bytes]:
        name = self.ids[id(script)]
        completed = False
        inner = cast(AsyncGenerator[bytes, None], super()._stream(script))
        try:
            async for part in inner:
                yield part
            completed = True
        finally:
            await inner.aclose()  # closed here, not by the garbage collector: its own counts must be current
            self.outcomes[name] = "completed" if completed else "aborted"


def expected_words(i: int, *, flagged: bool) -> list[str]:
    """About 40 words naming stream ``i``; a flagged one says "attack" early, then goes on for long."""
    head = [f"Stream {i} begins"] + [f" w{i}.{k}" for k in range(38)] + [f" end of stream {i}."]
    if not flagged:
        return head
    return head[:10] + [" attack"] + head[10:] * 10


def stream_id(body: dict[str, Any]) -> int:
    match = _ID.search(str(body["messages"][0]["content"]))
    assert match is not None
    return int(match.group(1))


@pytest.fixture
def tracking() -> Iterator[TrackingUpstream]:
    server = TrackingUpstream()
    with server:
        yield server


@pytest.fixture
def proxy_url(tracking: TrackingUpstream) -> Iterator[str]:
    config = ProxyConfig(upstream=tracking.base_url, moderator="keyword", keywords=["attack"], ping=None)
    with serve_in_thread(create_app(config)) as url:
        yield url + "/v1"


def script_for(upstream: TrackingUpstream, every: int | None) -> Any:
    def chat(body: dict[str, Any]) -> Script:
        i = stream_id(body)
        flagged = every is not None and i % every == 0
        script = Script(text_chunks(expected_words(i, flagged=flagged)), delay=0.005)
        upstream.ids[id(script)] = i
        return script

    return chat


async def run_streams(url: str, count: int) -> dict[int, tuple[str, list[str | None]]]:
    """``count`` concurrent streams through two clients; each stream's text and finish reasons."""
    results: dict[int, tuple[str, list[str | None]]] = {}
    limits = httpx2.Limits(max_connections=count, max_keepalive_connections=count)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                AsyncOpenAI(
                    api_key="k",
                    base_url=url,
                    max_retries=0,
                    timeout=30,
                    http_client=httpx2.AsyncClient(limits=limits, timeout=30),
                )
            )
            for _ in range(2)
        ]

        async def one(i: int) -> None:
            client = clients[i % len(clients)]
            stream = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"stream {i}"}], stream=True
            )
            text: list[str] = []
            finishes: list[str | None] = []
            async with stream:
                async for chunk in stream:
                    for choice in chunk.choices:
                        text.append(choice.delta.content or "")
                        if choice.finish_reason:
                            finishes.append(choice.finish_reason)
            results[i] = ("".join(text), finishes)

        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(one, i)
    return results


async def test_hundred_concurrent_streams_are_whole_and_unmixed(tracking: TrackingUpstream, proxy_url: str) -> None:
    """100 concurrent clean streams each arrive whole, in order, to their own caller; all upstreams end."""
    tracking.chat = script_for(tracking, None)
    with anyio.fail_after(60):
        results = await run_streams(proxy_url, 100)
        assert await tracking.await_ended(100, 30)
    assert sorted(results) == list(range(100))
    for i, (text, finishes) in results.items():
        assert text == "".join(expected_words(i, flagged=False)), i
        assert finishes == ["stop"], i
    assert tracking.completed == 100 and tracking.aborted == 0
    assert set(tracking.outcomes.values()) == {"completed"}
    assert other_tasks() == set()


async def test_every_fifth_stream_cut_off_the_rest_complete(tracking: TrackingUpstream, proxy_url: str) -> None:
    """Of 50 concurrent streams, exactly the flagged ones end with content_filter and are closed upstream."""
    tracking.chat = script_for(tracking, 5)
    flagged = {i for i in range(50) if i % 5 == 0}
    with anyio.fail_after(60):
        results = await run_streams(proxy_url, 50)
        assert await tracking.await_ended(50, 30)
    assert sorted(results) == list(range(50))
    for i, (text, finishes) in results.items():
        if i in flagged:
            full = "".join(expected_words(i, flagged=True))
            assert finishes == ["content_filter"], i
            assert "attack" not in text and full.startswith(text), i
        else:
            assert finishes == ["stop"], i
            assert text == "".join(expected_words(i, flagged=False)), i
    assert {i for i, outcome in tracking.outcomes.items() if outcome == "aborted"} == flagged
    assert {i for i, outcome in tracking.outcomes.items() if outcome == "completed"} == set(range(50)) - flagged
    assert tracking.aborted == len(flagged) and tracking.completed == 50 - len(flagged)
    assert other_tasks() == set()
