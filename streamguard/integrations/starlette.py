"""A Starlette/FastAPI response that streams a guarded chat completion as OpenAI's SSE.

Needs the ``[server]`` extra; ``streamguard`` itself never imports this module.

```python
@app.post("/chat")
async def chat(request: Request) -> GuardedSSEResponse:
    body = await request.json()
    return GuardedSSEResponse(
        lambda: client.chat.completions.create(**body, stream=True), moderator=moderator, messages=body["messages"]
    )
```

Invariant: the upstream request is made, and ``guard()`` entered, inside the response's ASGI
``__call__``, in a task group that also watches ``receive()`` for ``http.disconnect``. When the
client leaves, that task group is cancelled: the guarded stream closes upstream and cancels
pending moderation at once, and its cleanup is shielded and time-limited (``Policy.close_timeout``),
so it finishes even though we were cancelled. A generator handed to ``StreamingResponse`` would
be closed without a chance to await its cleanup; this body loop is ours for that reason.

Wire format, as OpenAI sends it: one ``data: {chunk}`` event per chunk (``to_json``, unset fields
left out, provider-specific fields kept), the final usage chunk, ``data: [DONE]``; ``: ping``
comments on gaps longer than ``ping`` seconds. If opening the upstream fails, the response is a
JSON error with a status (the upstream's own for an HTTP error); if the stream fails once
started, one ``data: {"error": {...}}`` event in OpenAI's error shape, and the body ends.

Debug events (opt-in, ``debug_events=True``): SSE *comments*, which every SSE client skips (the
``openai`` client included; a named ``event:`` would not do, as that client hands any event with
a name other than ``thread.*`` to the chunk parser). First ``: streamguard.policy {json}``, then
one ``: streamguard.verdict {json}`` per settled window, written just before the next chunk, so
a window's verdict precedes the text it released. They carry offsets, latency and category, never
the window's text, so a flagged word does not reach the client this way either.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio
import anyio.lowlevel
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from ..guard import GuardedStream, guard
from ..moderation._base import Moderator
from ..policy import Policy
from ..report import GuardReport, VerdictEvent
from ._body import BodyWriter
from ._sse import DONE, chunk_event, describe_error, error_event

__all__ = ["GuardedSSEResponse"]

logger = logging.getLogger(__name__)

OpenStream = Callable[[], Awaitable[AsyncIterable[Any]]]


class GuardedSSEResponse(Response):
    """Stream a guarded chat completion to the client in OpenAI's SSE format.

    Args:
        open_stream: Async callable that makes the upstream request and returns the stream
            (e.g. ``lambda: client.chat.completions.create(..., stream=True)``). It is called
            inside ``__call__``, so nothing is requested for a response that is never sent.
        moderator: Judges windows of text.
        policy: The guard's policy (default ``Policy()``).
        model: The model asked for (for token counting).
        messages: The request's messages (for prompt-token usage when upstream sends none).
        tools: The request's tool definitions (likewise).
        n: Number of choices asked for.
        ping: Seconds of silence after which a ``: ping`` comment is sent; ``None`` for never.
        headers: Extra response headers.
        secrets: Strings that must never reach the client: replaced by ``***`` in error messages.
        on_verdict: Passed to :func:`streamguard.guard`.
        on_flag: Passed to :func:`streamguard.guard`.
        open_error: Builds the response sent when ``open_stream`` raises; by default a JSON
            error in OpenAI's shape, with the upstream's status for an HTTP error.
        background: Run after the body has been sent (not when the client left).
        debug_events: Also send the policy and each window's verdict as SSE comments (see the
            module docstring); for debugging UIs such as the proxy's playground.
        on_end: Called with this response once it is over, however it ended (sent, failed, or
            the client left); synchronous, for bookkeeping such as metrics. Its errors are logged.

    After the response, :attr:`report` holds the stream's :class:`~streamguard.GuardReport`,
    :attr:`error` the exception it ended with (opening upstream, upstream or moderation failing
    mid-stream), and :attr:`disconnected` says whether the client left early.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        open_stream: OpenStream,
        *,
        moderator: Moderator,
        policy: Policy | None = None,
        model: str | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        n: int | None = None,
        ping: float | None = 15.0,
        headers: Mapping[str, str] | None = None,
        secrets: Sequence[str] = (),
        on_verdict: Callable[[Any], object] | None = None,
        on_flag: Callable[[Any], object] | None = None,
        open_error: Callable[[Exception], Response] | None = None,
        background: BackgroundTask | None = None,
        debug_events: bool = False,
        on_end: Callable[[GuardedSSEResponse], object] | None = None,
    ) -> None:
        if ping is not None and not ping > 0:
            raise ValueError(f"ping must be a positive number of seconds or None, got {ping!r}")
        self._open_stream = open_stream
        self._moderator = moderator
        self._policy = policy
        self._model = model
        self._messages = messages
        self._tools = tools
        self._n = n
        self._ping = ping
        self._secrets = tuple(secrets)
        self._on_verdict = on_verdict
        self._on_flag = on_flag
        self._open_error = open_error
        self._guarded: GuardedStream | None = None
        self._debug = debug_events
        self._started = time.monotonic()  # reset when the response begins; debug events' clock
        self._pending: list[bytes] = []  # debug events waiting for the next write
        self._on_end = on_end
        self.error: Exception | None = None
        self.disconnected = False
        self._scope: anyio.CancelScope | None = None
        self._sent = False  # the body's end is being sent: a disconnect now is the normal end
        self.status_code = 200
        self.background = background
        # No-cache and no proxy buffering (nginx honours X-Accel-Buffering), as for any SSE.
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})

    @property
    def report(self) -> GuardReport | None:
        """The guarded stream's report, once the upstream was opened."""
        return self._guarded.report if self._guarded is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        completed = False
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_disconnect, receive)
                self._scope = tg.cancel_scope
                await self._respond(scope, receive, send)
                completed = not self.disconnected
                tg.cancel_scope.cancel("response ended")
        except BaseExceptionGroup as group:  # collapse a lone error (starlette/_utils.py does the same)
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from group.exceptions[0].__cause__
            raise
        finally:
            if self._on_end is not None:
                try:
                    self._on_end(self)
                except Exception:  # bookkeeping must not change how the response ended
                    logger.exception("on_end hook failed")
        if completed and self.background is not None:
            await self.background()

    def _debug_verdict(self, event: VerdictEvent) -> object:
        at = time.monotonic() - self._started
        self._pending.append(_comment("streamguard.verdict", _verdict_fields(event, at)))
        return self._on_verdict(event) if self._on_verdict is not None else None

    def _client_gone(self) -> None:
        # ASGI spec 2.4 servers raise OSError from `send` instead: the same as a disconnect.
        if self._sent:
            return
        self.disconnected = True
        if self._scope is not None:
            self._scope.cancel("client disconnected")

    async def _watch_disconnect(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._client_gone()
                return

    async def _respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._started = time.monotonic()
        try:
            source = await self._open_stream()
        except Exception as exc:
            self.error = exc
            if self._open_error is not None:
                response = self._open_error(exc)
            else:
                status, body = describe_error(exc, self._secrets)
                response = JSONResponse(body, status_code=status)
            logger.warning("opening the upstream stream failed: %s (%d)", type(exc).__name__, response.status_code)
            self._sent = True  # a complete response: the disconnect after it is its normal end
            try:
                await response(scope, receive, send)
            except OSError:
                pass  # the client has gone; nothing is left to stop
            return
        # Entered right after the upstream is open (no checkpoint between): from here on the
        # guarded stream owns the upstream and closes it, whatever happens.
        async with guard(
            source,
            moderator=self._moderator,
            policy=self._policy,
            model=self._model,
            messages=self._messages,
            tools=self._tools,
            n=self._n,
            on_verdict=self._debug_verdict if self._debug else self._on_verdict,
            on_flag=self._on_flag,
        ) as guarded:
            self._guarded = guarded
            await self._stream(guarded, send)

    async def _stream(self, guarded: GuardedStream, send: Send) -> None:
        async def send_body(data: bytes, more: bool) -> None:
            try:
                await send({"type": "http.response.body", "body": data, "more_body": more})
            except OSError:
                self._client_gone()
                await anyio.lowlevel.checkpoint()  # raises the cancellation just requested

        writer = BodyWriter(send_body, self._pending, self._ping)
        write = writer.write

        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        except OSError:
            self._client_gone()
            await anyio.lowlevel.checkpoint()
        if self._debug:
            await write(_comment("streamguard.policy", _policy_fields(guarded.policy)))
        async with anyio.create_task_group() as tg:
            if self._ping is not None:
                tg.start_soon(writer.pinger)
            try:
                async for chunk in guarded:
                    await write(chunk_event(chunk))
                await write(DONE)
            except Exception as exc:
                # Not a disconnect (that cancels us): upstream or moderation failed mid-stream.
                self.error = exc
                _, body = describe_error(exc, self._secrets)
                logger.warning("guarded stream failed: %s: %s", type(exc).__name__, body["error"]["message"])
                await write(error_event(body))
            tg.cancel_scope.cancel("body sent")
        # Set first: the server may report the disconnect that ends every response while
        # this last send is still in progress.
        self._sent = True
        await write(b"", more=False)


def _comment(name: str, fields: Mapping[str, Any]) -> bytes:
    """One debug event: an SSE comment ``: name {json}`` (compact JSON has no newline)."""
    return b": " + name.encode() + b" " + json.dumps(fields, separators=(",", ":")).encode() + b"\n\n"


def _verdict_fields(event: VerdictEvent, at: float) -> dict[str, Any]:
    """What a debug client may see of a verdict: offsets, timing, category; not the text.

    ``at_ms`` is when the verdict was applied, counted from the start of the response (before
    the upstream request); the moderation call took the ``latency_ms`` before it.
    """
    flag = event.flag
    return {
        "choice": event.choice,
        "seq": event.seq,
        "start": event.start,
        "end": event.end,
        "latency_ms": round(event.latency * 1000, 3),
        "at_ms": round(at * 1000, 3),
        "flagged": flag is not None,
        "category": flag.category if flag is not None else None,
        "action": flag.action if flag is not None else None,
        "error": type(event.error).__name__ if event.error is not None else None,
    }


def _policy_fields(policy: Policy) -> dict[str, Any]:
    return {
        "mode": policy.mode,
        "action": policy.action,
        "redaction": policy.redaction,
        "window_chars": policy.window_chars,
        "first_window_chars": policy.first_window_chars,
        "overlap_chars": policy.overlap_chars,
        "on_error": policy.on_error,
    }
