"""The guard for sync code (WSGI apps, scripts): the async engine on one shared background loop.

How it works:

- One *bridge*: a daemon thread running an asyncio event loop with an
  ``anyio.from_thread.BlockingPortal``, started lazily on first use and kept open for the life of
  the process (stopped, with a time limit, by an ``atexit`` hook). Every sync guarded stream of
  the process runs on it, and so do the moderators (they stay async; an ``OpenAIModerator``
  used here must have been made for this loop, e.g. by ``wrap(sync_client)``).
- A :class:`SyncGuardedStream` holds a :class:`~streamguard.GuardedStream` in its bare form
  (its pump is one tracked task on the bridge loop) and pulls each chunk with
  ``portal.call(guarded.__anext__)`` from the caller's thread.
- The sync upstream is read inside the loop with ``run_in_daemon_thread(next, iterator,
  sentinel)`` (the shape of ``anyio.to_thread.run_sync``), so a blocking read never blocks the
  loop (and the other streams on it). The read is abandoned on cancellation (a cut-off while
  upstream stalls); closing upstream, in a worker thread too, then ends it. The workers are
  *daemon* threads of a small pool of our own, not anyio's: anyio's worker threads are not
  daemons and stop only when their loop ends, which the bridge loop never does, so the
  interpreter would hang at exit waiting for them.
- Closing early (``close()``, leaving the ``with``, garbage collection) cancels moderation and
  closes upstream, exactly as ``aclose()`` does for the async form.

Deadlock guard: calling into the bridge from its own thread (e.g. a sync iterator consumed
inside a moderator) would wait for itself forever; it raises ``RuntimeError`` instead.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import queue
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

import anyio
import anyio.from_thread
from openai.types.chat import ChatCompletionChunk

from .guard import GuardedStream, Hook
from .moderation._base import Moderator
from .policy import Policy
from .report import GuardReport

__all__ = ["SyncGuardedStream", "guard_sync", "run_on_bridge"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

_END = object()
_lock = threading.Lock()
_portal: anyio.from_thread.BlockingPortal | None = None
_bridge_thread: threading.Thread | None = None
_bridge_loop: asyncio.AbstractEventLoop | None = None
_cleanups: set[asyncio.Task[None]] = set()  # strong references to close-on-GC tasks

BRIDGE_THREAD_NAME = "streamguard-bridge"
_EXIT_SECONDS = 3.0


def _bridge() -> anyio.from_thread.BlockingPortal:
    """The shared portal, started on first use (a daemon thread: it never delays interpreter exit)."""
    global _portal, _bridge_thread, _bridge_loop
    if _bridge_thread is not None and threading.current_thread() is _bridge_thread:
        raise RuntimeError(
            "a sync guarded stream was used from streamguard's own bridge thread (e.g. inside a "
            "moderator or hook); that would deadlock. In async code use streamguard.guard()."
        )
    portal = _portal
    if portal is not None:
        return portal
    with _lock:
        if _portal is None:
            # Not anyio.from_thread.start_blocking_portal(): kept open for the life of the process,
            # its context manager is finalized at interpreter shutdown, where its blocking
            # ``portal.call(portal.stop)`` never returns. The same loop-in-a-daemon-thread, minus that.
            ready: Future[tuple[anyio.from_thread.BlockingPortal, asyncio.AbstractEventLoop]] = Future()
            thread = threading.Thread(target=_run_bridge, args=(ready,), name=BRIDGE_THREAD_NAME, daemon=True)
            thread.start()
            portal, _bridge_loop = ready.result()
            _bridge_thread = thread
            _portal = portal
            atexit.register(_stop_bridge)
        return _portal


def _run_bridge(ready: Future[tuple[anyio.from_thread.BlockingPortal, asyncio.AbstractEventLoop]]) -> None:
    async def main() -> None:
        async with anyio.from_thread.BlockingPortal() as portal:
            ready.set_result((portal, asyncio.get_running_loop()))
            await portal.sleep_until_stopped()

    try:
        anyio.run(main, backend="asyncio")
    except BaseException as exc:  # pragma: no cover - the loop failed to start
        if not ready.done():
            ready.set_exception(exc)


def _stop_bridge() -> None:
    """At exit: cancel what still runs on the bridge (closing upstreams), waiting a bounded time."""
    portal, thread = _portal, _bridge_thread
    if portal is None or thread is None or not thread.is_alive():
        return
    try:
        portal.start_task_soon(portal.stop, True)
    except RuntimeError:  # already stopped
        return
    # Bounded: a stuck close must not hang interpreter exit (the thread is a daemon anyway).
    thread.join(timeout=_EXIT_SECONDS)


def _reset_after_fork() -> None:
    """In a forked child the bridge thread does not exist: start a new one on first use."""
    global _lock, _portal, _bridge_thread, _bridge_loop, _cleanups, _work, _idle, _threads, _pool_lock
    _lock = threading.Lock()
    _work = queue.SimpleQueue()
    _idle = 0
    _threads = set()
    _pool_lock = threading.Lock()
    _portal = None
    _bridge_thread = None
    _bridge_loop = None
    _cleanups = set()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def bridge_thread() -> threading.Thread | None:
    """The bridge's thread, if it has been started."""
    return _bridge_thread


def run_on_bridge(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``await fn(*args)`` on the bridge loop and return its result (blocking the caller)."""
    return _bridge().call(fn, *args)


_IDLE_SECONDS = 10.0  # an idle pool thread exits after this long
_work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
_idle = 0
_threads: set[threading.Thread] = set()
_pool_lock = threading.Lock()


async def run_in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """``await fn(*args)`` run in a daemon worker thread; on cancellation the call is abandoned."""
    global _idle
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return  # abandoned (cancelled)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def job() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:
            error: BaseException | None = exc
            result = None
        else:
            error = None
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed
            pass
        del error

    with _pool_lock:
        if _idle:
            _idle -= 1  # an idle worker is reserved for this job
            _work.put(job)
        else:
            thread = threading.Thread(target=_worker, args=(job,), name="streamguard-bridge-worker", daemon=True)
            _threads.add(thread)
            thread.start()
    return await future


def _worker(job: Callable[[], None]) -> None:
    """Run ``job``, then queued jobs; exit after ``_IDLE_SECONDS`` without one.

    Invariant (under ``_pool_lock``): ``_idle`` == workers waiting for a job - jobs queued, so a
    queued job always has a worker to take it.
    """
    global _idle
    while True:
        job()
        del job
        with _pool_lock:
            _idle += 1
        while True:
            try:
                job = _work.get(timeout=_IDLE_SECONDS)
                break
            except queue.Empty:
                with _pool_lock:
                    if _work.empty():
                        _idle -= 1
                        _threads.discard(threading.current_thread())
                        return


class _Closable(Protocol[T_co]):
    """What the bridge drives: the bare form of a guarded stream."""

    @property
    def report(self) -> GuardReport: ...

    def __anext__(self) -> Awaitable[T_co]: ...

    async def aclose(self) -> None: ...


class ThreadedSource:
    """A sync iterable read from an async loop: each ``next()`` runs in a worker thread."""

    def __init__(self, stream: Iterable[Any]) -> None:
        self._stream = stream
        self._iterator: Iterator[Any] = iter(stream)
        self._closed = False

    def __aiter__(self) -> ThreadedSource:
        return self

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        # abandon_on_cancel: a cut-off must not wait for a stalled upstream; aclose() ends the read.
        item = await run_in_daemon_thread(next, self._iterator, _END)
        if item is _END:
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for target in (self._stream, self._iterator):
            close = getattr(target, "close", None)
            if callable(close):
                try:
                    await run_in_daemon_thread(close)
                except Exception:  # e.g. "generator already executing" for a plain generator
                    logger.debug("closing the sync upstream failed", exc_info=True)
                return


class SyncGuardedStream(Generic[T]):
    """A sync iterator over a guarded stream; also a context manager.

    Upstream errors surface unchanged (the ``openai`` client's own exceptions); moderation
    failures as :class:`~streamguard.ModerationError` under ``on_error="fail_closed"``. Stop early
    with ``close()`` or a ``with`` block (dropping it closes it too, a little later).
    """

    def __init__(self, inner: _Closable[T], *, source: ThreadedSource | None = None) -> None:
        self._portal = _bridge()
        self._inner = inner
        self._source = source
        self._closed = False
        self._ended = False

    @property
    def report(self) -> GuardReport:
        """The stream's report so far (final once the stream has ended)."""
        inner = self._inner
        return self._portal.call(lambda: inner.report)

    def __iter__(self) -> SyncGuardedStream[T]:
        return self

    def __next__(self) -> T:
        if self._closed or self._ended:
            raise StopIteration
        item = _bridge().call(_next, self._inner)
        if item is _END:
            self._ended = True
            raise StopIteration
        return item  # type: ignore[return-value]

    def close(self) -> None:
        """Stop: cancel moderation, close upstream. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        _bridge().call(_close, self._inner, self._source)

    def __enter__(self) -> SyncGuardedStream[T]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Dropped without close(): close on the bridge loop, from whatever thread the GC runs in.
        if getattr(self, "_closed", True):
            return
        self._closed = True
        loop = _bridge_loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(_close_soon, self._inner, self._source)
        except RuntimeError:  # the loop is gone (interpreter shutdown)
            pass


async def _next(inner: _Closable[T]) -> T | object:
    try:
        return await inner.__anext__()
    except StopAsyncIteration:
        return _END


async def _close(inner: _Closable[Any], source: ThreadedSource | None) -> None:
    await inner.aclose()
    if source is not None:
        # The engine closes upstream itself once started; this covers a stream never iterated.
        with anyio.CancelScope(shield=True):
            await source.aclose()


def _close_soon(inner: _Closable[Any], source: ThreadedSource | None) -> None:
    task = asyncio.get_running_loop().create_task(_close(inner, source), name="streamguard-sync-close")
    _cleanups.add(task)
    task.add_done_callback(_cleanups.discard)


def guard_sync(
    stream: Iterable[Any],
    *,
    moderator: Moderator,
    policy: Policy | None = None,
    model: str | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    n: int | None = None,
    on_verdict: Hook | None = None,
    on_flag: Hook | None = None,
) -> SyncGuardedStream[ChatCompletionChunk]:
    """Guard a streamed chat completion in sync code (WSGI frameworks, scripts).

    The async engine runs on one shared background event loop (a daemon thread); the upstream is
    read in worker threads, so nothing blocks that loop.

    Args:
        stream: A sync ``openai.Stream[ChatCompletionChunk]``, or any iterable of chunks or chunk
            dicts.
        moderator: An async moderator; it runs on the background loop.
        policy: As for :func:`streamguard.guard`.
        model: The model asked for (token counting).
        messages: The request's messages (prompt-token usage, ``Policy(moderate_input=True)``).
        tools: The request's tool definitions (prompt-token usage).
        n: How many choices were asked for.
        on_verdict: As for :func:`streamguard.guard` (called on the background loop's thread).
        on_flag: Likewise.

    Returns:
        A :class:`SyncGuardedStream` of ``ChatCompletionChunk``: iterate it, and call ``close()``
        (or use ``with``) when you stop early.

    Raises:
        RuntimeError: Called from the background loop's own thread (it would deadlock).
    """

    source = ThreadedSource(stream)
    return SyncGuardedStream(
        GuardedStream(
            source,
            moderator=moderator,
            policy=policy or Policy(),
            model=model,
            messages=messages,
            tools=tools,
            n=n,
            on_verdict=on_verdict,
            on_flag=on_flag,
        ),
        source=source,
    )
