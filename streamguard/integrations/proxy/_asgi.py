"""A response whose whole work (the upstream request included) runs inside its ASGI call, bound to the caller.

Starlette does not cancel an endpoint when its caller leaves; a handler that awaited upstream
itself would keep upstream generating (and billing) after the caller timed out. So the proxy's
handlers only check the request and return a :class:`CallerBound` response; its ``__call__``
runs the work in a task group that also watches ``receive()`` for ``http.disconnect`` (started
once the request body has been read, as the same ``receive`` delivers it) and cancels the work
when the caller leaves, streamed answer or not. A send that fails (ASGI 2.4 servers raise
``OSError``) counts as the caller leaving too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import anyio.lowlevel
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

__all__ = ["Caller", "CallerBound"]


class Caller:
    """The caller's side of one response: send to it, watch it leave."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, tg: anyio.abc.TaskGroup) -> None:
        self.scope = scope
        self.receive = receive
        self._send = send
        self._tg = tg
        self._watching = False
        self.left = False
        self.finished = False  # the last byte is being sent: a disconnect now is the normal end

    def watch(self) -> None:
        """Start watching for the caller leaving (call once the request body has been read)."""
        if not self._watching:
            self._watching = True
            self._tg.start_soon(self._watch)

    async def _watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.gone()
                return

    def gone(self) -> None:
        """The caller left: cancel the work."""
        if self.finished:
            return
        self.left = True
        self._tg.cancel_scope.cancel("caller left")

    async def send(self, message: Message) -> None:
        """Send to the caller; if it has gone, cancel the work and raise the cancellation."""
        try:
            await self._send(message)
        except OSError:
            self.gone()
            await anyio.lowlevel.checkpoint()

    async def respond(self, response: Response) -> None:
        """Send a whole (small) response."""
        self.finished = True
        try:
            await response(self.scope, self.receive, self._send)
        except OSError:
            pass  # the caller has gone; nothing is left to stop


Work = Callable[[Caller], Awaitable[None]]


class CallerBound(Response):
    """Run ``work(caller)`` as this response, cancelled if the caller leaves.

    Args:
        work: Does the upstream request and sends the answer through the :class:`Caller`.
        on_end: Called with the caller once the response is over, however it ended.
    """

    def __init__(self, work: Work, on_end: Callable[[Caller], object] | None = None) -> None:
        self._work = work
        self._on_end = on_end
        self.status_code = 200
        self.background = None
        self.caller: Caller | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self.caller = caller = Caller(scope, receive, send, tg)
                await self._work(caller)
                caller.finished = True
                tg.cancel_scope.cancel("response ended")
        except BaseExceptionGroup as group:  # collapse a lone error (as starlette/_utils.py does)
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from group.exceptions[0].__cause__
            raise
        finally:
            if self._on_end is not None and self.caller is not None:
                self._on_end(self.caller)
