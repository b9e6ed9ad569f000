"""The body of one streamed SSE response, shared by the Starlette adapter and the proxy.

Writes go out in order, debug events queued in ``pending`` first (a verdict precedes the text it
released), and a ``: ping`` comment goes out after ``ping`` seconds of silence. The body writer
and the pinger share ``send``; uncontended (nearly always) the lock is taken without a checkpoint,
since a task switch per write is a real share of the CPU under load.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ._sse import PING

__all__ = ["BodyWriter"]


class BodyWriter:
    """Writes one response's body through ``send(data, more_body)``.

    Args:
        send: Sends one ``http.response.body`` message (and deals with a caller that left).
        pending: Debug events to put before the next write; emptied as they are written.
        ping: Seconds of silence after which :meth:`pinger` writes a ``: ping`` (None: never).
    """

    def __init__(
        self, send: Callable[[bytes, bool], Awaitable[None]], pending: list[bytes], ping: float | None
    ) -> None:
        self._send = send
        self._pending = pending
        self.ping = ping
        self._lock: Any = anyio.Lock(fast_acquire=True) if ping is not None else contextlib.nullcontext()
        self._last_sent = time.monotonic()

    async def write(self, data: bytes, *, more: bool = True) -> None:
        async with self._lock:
            if self._pending:
                data = b"".join(self._pending) + data
                self._pending.clear()
            await self._send(data, more)
            self._last_sent = time.monotonic()

    async def pinger(self) -> None:
        """Write ``: ping`` whenever nothing went out for ``ping`` seconds (run it in a task; never returns)."""
        every = self.ping
        if every is None:
            return
        while True:
            wait = self._last_sent + every - time.monotonic()
            if wait > 0:
                await anyio.sleep(wait)
            else:
                await self.write(PING)
