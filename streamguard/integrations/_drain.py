"""Graceful drain of the proxy on SIGTERM (and SIGINT): unready at once, streams finish, then a defined ending.

On the signal, in each worker process:

1. :attr:`Drain.draining` turns true: ``/readyz`` answers 503 at once while ``/healthz`` stays 200,
   and new API requests are refused with 503 ``server_shutting_down`` (``Connection: close``; the
   ``openai`` client retries it, elsewhere once the load balancer has taken this replica out).
2. Requests in flight go on for up to ``timeout`` seconds. Each stream is registered with the
   drain for its whole life (:meth:`Drain.stream`: one :class:`Stop` a stream, nothing a chunk).
3. At the deadline every stream still running is stopped *between* chunks: one waiting for its
   next item is cancelled there, one writing stops once the write is done. It ends with
   :data:`SHUTDOWN_ERROR` as an OpenAI-shaped error event (never a cut mid-chunk).
4. Once nothing is in flight (or :data:`GRACE` seconds past the deadline), the handler that was
   installed before ours (uvicorn's) gets the signal: uvicorn stops listening and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from types import FrameType
from typing import Any

import anyio

__all__ = ["GRACE", "SHUTDOWN_ERROR", "Drain", "DrainMiddleware"]

logger = logging.getLogger(__name__)

# Seconds past the drain deadline allowed for the endings to be written before the server exits.
GRACE = 5.0

SHUTDOWN_ERROR: dict[str, Any] = {
    "error": {
        "message": (
            "The server is shutting down: this answer was ended at a chunk boundary after the drain timeout. "
            "Retry the request."
        ),
        "type": "server_error",
        "param": None,
        "code": "server_shutting_down",
    }
}
_REFUSED = {
    "error": {
        "message": "The server is shutting down and takes no new requests; retry the request.",
        "type": "server_error",
        "param": None,
        "code": "server_shutting_down",
    }
}
# Paths that keep answering while draining (probes and metrics); everything else is refused.
_ALWAYS = frozenset({"/healthz", "/readyz", "/metrics"})

_Handler = Callable[[int, FrameType | None], Any] | int | None
_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class Drain:
    """The drain state of one worker process.

    Args:
        timeout: Seconds requests in flight may still run after the signal.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.draining = False
        self.active = 0  # API requests in flight
        self.deadline = math.inf  # asyncio loop time; inf until draining
        self._streams: set[Stop] = set()
        self._expired = False  # the deadline has passed: streams registered now stop at once
        self._restore: list[tuple[int, _Handler]] = []
        self._signal: tuple[int, FrameType | None, _Handler] | None = None
        self._finisher: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()  # set when draining and nothing is in flight

    def start(self) -> None:
        """Begin draining (in the event loop): every waiting stream gets the drain deadline."""
        if self.draining:
            return
        self.draining = True
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.timeout
        logger.warning(
            "draining: %d request(s) in flight get up to %.1fs to finish; /readyz is unready", self.active, self.timeout
        )
        loop.call_at(self.deadline, self._expire)
        if not self.active:
            self._idle.set()
        if self._signal is not None:
            self._finisher = loop.create_task(self._finish())

    @contextlib.contextmanager
    def stream(self) -> Iterator[Stop]:
        """Register one stream for its whole life; its :class:`Stop` is stopped at the drain deadline."""
        stop = Stop()
        if self._expired:
            stop.stop()
        self._streams.add(stop)
        try:
            yield stop
        finally:
            self._streams.discard(stop)

    def _expire(self) -> None:
        self._expired = True
        for stop in list(self._streams):
            stop.stop()

    def install(self) -> None:
        """Drain on SIGTERM and SIGINT, then pass the signal to the handler installed before (uvicorn's).

        Only in the main thread (signals are delivered there); elsewhere (a server in a test
        thread) nothing is installed and whoever stops the server calls :meth:`start`.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous: _Handler = signal.getsignal(sig)

            def handler(signum: int, frame: FrameType | None, previous: _Handler = previous) -> None:
                if self._signal is not None:  # a second signal: no more waiting
                    _deliver(signum, frame, previous)
                    return
                self._signal = (signum, frame, previous)
                loop.call_soon_threadsafe(self.start)

            signal.signal(sig, handler)
            self._restore.append((sig, previous))

    def uninstall(self) -> None:
        """Put the previous handlers back (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return
        while self._restore:
            sig, previous = self._restore.pop()
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)

    def enter(self) -> None:
        """An API request starts."""
        self.active += 1

    def leave(self) -> None:
        """An API request is over."""
        self.active -= 1
        if self.draining and not self.active:
            self._idle.set()

    async def _finish(self) -> None:
        """Wait until nothing is in flight (bounded), then let the server stop."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(0.0, self.deadline + GRACE - loop.time()))
        if self.active:
            logger.warning("drain: %d request(s) still in flight %.1fs after the deadline", self.active, GRACE)
        assert self._signal is not None
        _deliver(*self._signal)


def _deliver(signum: int, frame: FrameType | None, previous: _Handler) -> None:
    """Hand the signal to what would have handled it without us."""
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


class Stop:
    """One stream's link to the drain: stopped between chunks, never mid-write.

    The stream runs its loop inside :attr:`scope`, sets :attr:`writing` around each write, and
    ends after a write when :attr:`requested` is set. :meth:`stop` cancels the scope only while
    the stream is not writing (waiting for its next item).
    """

    __slots__ = ("requested", "scope", "writing")

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.writing = False
        self.requested = False

    def stop(self) -> None:
        self.requested = True
        if not self.writing:
            self.scope.cancel("drain deadline")


class DrainMiddleware:
    """ASGI middleware: counts API requests in flight, refuses new ones while draining, answers ``/readyz``.

    Args:
        app: The app to wrap.
        drain: The worker's drain state.
    """

    def __init__(self, app: Callable[[_Scope, _Receive, _Send], Awaitable[None]], drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path == "/readyz":
            if self.drain.draining:
                await _json(send, 503, {"status": "draining"})
            else:
                await _json(send, 200, {"status": "ready"})
            return
        if path in _ALWAYS:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await _json(send, 503, _REFUSED, close=True)
            return
        self.drain.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()


async def _json(send: _Send, status: int, body: Any, *, close: bool = False) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
