"""A streamed guarded answer (chat, Responses, legacy completions): upstream SSE in, guarded SSE out.

Order of events inside the response's ASGI call (:class:`._asgi.CallerBound`, so the caller
leaving cancels everything and the guarded stream closes upstream):

1. The upstream request. A transport failure is a 502/504, an upstream error status is passed
   on (scrubbed), and an answer that is not ``text/event-stream`` is a 502: a JSON body in answer
   to a streamed request is never forwarded unmoderated.
2. The guard, over the answer's events as plain dicts (:mod:`.shapes`). Items before the first
   that carries an answer (the role chunk, ``response.created``) are held, so a failure before
   any answer (moderation unavailable, upstream breaking off) gets an HTTP status: 503 with
   ``Retry-After`` when the moderation backend gave one, 502 for upstream.
3. The response starts with upstream's ids, rate-limit and timing headers, then the events;
   ``: ping`` comments on silences longer than ``ping``. A failure after the first byte is one
   ``data: {"error": ...}`` event in OpenAI's shape, and the body ends without ``[DONE]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio
import openai

from ...guard import guard
from ...moderation._base import Moderator
from ...policy import Policy
from ...report import GuardReport, VerdictEvent
from ...responses import guard_responses
from .._body import BodyWriter
from .._drain import SHUTDOWN_ERROR, Drain
from .._sse import DONE, describe_error, error_event
from ..starlette import _comment, _policy_fields, _verdict_fields
from ._asgi import Caller, CallerBound
from .shapes import Source, encoder, starts_body
from .upstream import Upstream, json_response, passed_headers

__all__ = ["GuardedAnswer", "retry_after"]

_BURST = 256  # items joined into one write at most

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class GuardedAnswer:
    """One streamed guarded answer: what to ask, how to guard it; after it ran, how it ended.

    ``report``, ``error`` and ``disconnected`` are read by the metrics once it is over.
    """

    upstream: Upstream
    request: Any
    path: str
    body: bytes
    shape: str
    moderator: Moderator
    policy: Policy
    guard_args: Mapping[str, Any]
    secrets: Sequence[str]
    ping: float | None
    debug: bool = False
    on_verdict: Callable[[Any], object] | None = None
    on_flag: Callable[[Any], object] | None = None
    route: str = "unknown"
    drain: Drain | None = None
    report: GuardReport | None = None
    error: BaseException | None = None
    disconnected: bool = False
    shutdown: bool = False  # ended by the drain deadline (with the shutdown error event)
    _pending: list[bytes] = dataclasses.field(default_factory=list)
    _started: float = 0.0

    def response(self, on_end: Callable[[GuardedAnswer], object]) -> CallerBound:
        """The ASGI response that runs this answer."""

        def ended(caller: Caller) -> None:
            self.disconnected = caller.left
            try:
                on_end(self)
            except Exception:  # bookkeeping must not change how the response ended
                logger.exception("on_end hook failed")

        return CallerBound(self._run, ended)

    async def _run(self, caller: Caller) -> None:
        self._started = time.monotonic()
        caller.watch()  # the body was read by the handler
        req = self.upstream.build(self.request, self.path, content=self.body, identity=True)
        try:
            response = await self.upstream.send(req)
        except openai.APIError as exc:
            self.error = exc
            await caller.respond(json_response(*describe_error(exc, self.secrets)))
            return
        source: Source | None = None
        try:
            if response.status_code >= 400:
                body = await response.aread()
                self.error = openai.APIStatusError("upstream error", response=response, body=None)
                await caller.respond(self.upstream.status_error(response, body, self.secrets))
                return
            kind = response.headers.get("content-type", "")
            if not kind.startswith("text/event-stream"):
                self.error = openai.APIError("not an event stream", response.request, body=None)
                message = (
                    f"The upstream server answered a streamed request with {kind or 'no content type'}, "
                    "not an event stream; the answer was not forwarded."
                )
                await caller.respond(json_response(502, _error(message, "upstream_not_streamed")))
                return
            source = Source(response, self.shape)
            await self._guard(source, caller, passed_headers(response.headers.items(), all_headers=False))
        finally:
            with anyio.CancelScope(shield=True):  # we may be cancelled (the caller left): close anyway
                await response.aclose()

    async def _guard(self, source: Source, caller: Caller, headers: dict[str, str]) -> None:
        hooks: dict[str, Any] = {
            "on_verdict": self._debug_verdict if self.debug else self.on_verdict,
            "on_flag": self.on_flag,
        }
        if self.shape == "responses":
            guarded: Any = guard_responses(
                source, moderator=self.moderator, policy=self.policy, **self.guard_args, **hooks
            )
        else:
            guarded = guard(source, moderator=self.moderator, policy=self.policy, **self.guard_args, **hooks)
        encode = encoder(source, self.shape)
        async with guarded:
            try:
                items = guarded.__aiter__()
                first: list[bytes] = []
                async for item in items:
                    first.append(encode(item))
                    if starts_body(item, self.shape):
                        break
            except Exception as exc:
                # Nothing was sent yet: the caller gets a status it can act on (retry, back off).
                self.error = exc
                self.report = _report(guarded)
                status, body = describe_error(exc, self.secrets)
                extra = {}
                if (wait := retry_after(exc)) is not None:
                    extra["retry-after"] = wait
                logger.warning("guarded answer failed before its first byte: %s (%d)", type(exc).__name__, status)
                await caller.respond(json_response(status, body, headers=extra))
                return
            await self._write(caller, headers, first, guarded, encode)
            self.report = _report(guarded)

    async def _write(
        self, caller: Caller, headers: dict[str, str], first: list[bytes], items: Any, encode: Callable[[Any], bytes]
    ) -> None:
        # Items released at the same moment (one verdict releases a window's chunks) go out in one
        # write: one send and one syscall for the burst, not one per chunk.
        nowait: Callable[[], Any] | None = getattr(items, "receive_nowait", None)

        async def send_from(item: Any) -> None:
            data = encode(item)
            if nowait is not None:
                parts = [data]
                while len(parts) < _BURST:
                    try:
                        parts.append(encode(nowait()))
                    except anyio.WouldBlock:
                        break
                if len(parts) > 1:
                    data = b"".join(parts)
            await write(data)

        async def send_body(data: bytes, more: bool) -> None:
            await caller.send({"type": "http.response.body", "body": data, "more_body": more})

        writer = BodyWriter(send_body, self._pending, self.ping)
        write = writer.write

        head = {
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-cache",
            "x-accel-buffering": "no",  # no proxy buffering (nginx honours it)
            "x-streamguard-route": "guarded",
            **headers,
        }
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in head.items()]
        await caller.send({"type": "http.response.start", "status": 200, "headers": raw})
        if self.debug:
            self._pending.insert(0, _comment("streamguard.policy", _policy_fields(self.policy)))
        async with anyio.create_task_group() as tg:
            if self.ping is not None:
                tg.start_soon(writer.pinger)
            try:
                await write(b"".join(first))
                if self.drain is None:
                    async for item in items:
                        await send_from(item)
                elif not await self._relay(items, send_from, self.drain):
                    raise _ShutDown
                if self.shape != "responses":
                    await write(DONE)
            except _ShutDown:
                self.shutdown = True
                logger.warning("guarded stream ended by the drain deadline")
                await write(error_event(SHUTDOWN_ERROR))
            except Exception as exc:
                # Not a disconnect (that cancels us): upstream or moderation failed mid-stream.
                self.error = exc
                _, body = describe_error(exc, self.secrets)
                logger.warning("guarded stream failed: %s: %s", type(exc).__name__, body["error"]["message"])
                await write(error_event(body))
            tg.cancel_scope.cancel("body sent")
        caller.finished = True  # the server may report the disconnect that ends every response now
        await write(b"", more=False)

    @staticmethod
    async def _relay(items: Any, send_from: Callable[[Any], Awaitable[None]], drain: Drain) -> bool:
        """Write the items; False if the drain deadline stopped it (while waiting for one, or after a write)."""
        with drain.stream() as stop, stop.scope:
            async for item in items:
                stop.writing = True
                try:
                    await send_from(item)
                finally:
                    stop.writing = False
                if stop.requested:
                    return False
            return True
        return False  # the scope was cancelled: the deadline came while waiting for an item

    def _debug_verdict(self, event: VerdictEvent) -> object:
        at = time.monotonic() - self._started
        self._pending.append(_comment("streamguard.verdict", _verdict_fields(event, at)))
        return self.on_verdict(event) if self.on_verdict is not None else None


class _ShutDown(Exception):
    """The drain deadline passed while the stream waited for its next item."""


def _report(guarded: Any) -> GuardReport | None:
    report = getattr(guarded, "report", None)
    return report if isinstance(report, GuardReport) else None


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


def retry_after(exc: BaseException) -> str | None:
    """The ``Retry-After`` an upstream or moderation backend gave, found along ``exc``'s causes."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, openai.APIStatusError):
            value = current.response.headers.get("retry-after")
            if value:
                return value
            ms = current.response.headers.get("retry-after-ms")
            if ms:
                with contextlib.suppress(ValueError):
                    return str(max(1, round(float(ms) / 1000)))
        current = current.__cause__ or current.__context__
    return None
