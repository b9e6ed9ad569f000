"""Text-free routes: relayed byte for byte, status and headers included, streamed as upstream streams.

The request body is streamed upstream as it arrives (uploads can be large), the answer streamed
back as raw bytes (still compressed if upstream compressed it for a caller that accepts it). The
caller leaving, during the upload or the download, cancels the upstream request. An upstream
error answer is read whole and scrubbed of secrets before it is passed on.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence

import anyio
import httpx2
import openai
from starlette.requests import ClientDisconnect, Request

from .._sse import describe_error
from ._asgi import Caller, CallerBound
from .upstream import Upstream, json_response, passed_headers

__all__ = ["relay"]

logger = logging.getLogger(__name__)

_MAX_ERROR_BODY = 1024 * 1024  # an error answer is read whole (to scrub it): at most this much


def relay(
    upstream: Upstream,
    request: Request,
    path: str,
    secrets: Sequence[str],
    on_error: Callable[[BaseException], object],
    *,
    label: str = "passed",
) -> CallerBound:
    """The response relaying ``request`` to ``path`` upstream."""

    async def work(caller: Caller) -> None:
        content: AsyncIterator[bytes] | None = None
        if _has_body(request):
            content = _body(request, caller)
        else:
            caller.watch()
        req = upstream.build(request, path, content=content)
        try:
            response = await upstream.send(req)
        except openai.APIError as exc:
            if isinstance(exc.__cause__, httpx2.TransportError) and isinstance(
                exc.__cause__.__context__, ClientDisconnect
            ):
                return  # the caller left during the upload
            on_error(exc)
            await caller.respond(json_response(*describe_error(exc, secrets)))
            return
        try:
            if response.status_code >= 400:
                body = await _read_capped(response)
                on_error(openai.APIStatusError("upstream error", response=response, body=None))
                await caller.respond(upstream.status_error(response, body, secrets))
                return
            headers = passed_headers(response.headers.items())
            headers["x-streamguard-route"] = label
            raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
            await caller.send({"type": "http.response.start", "status": response.status_code, "headers": raw_headers})
            try:
                async for part in response.aiter_raw():
                    await caller.send({"type": "http.response.body", "body": part, "more_body": True})
            except httpx2.TransportError as exc:
                logger.warning("upstream broke off a relayed answer: %s", type(exc).__name__)
                return  # the caller sees the connection end without a complete body
            caller.finished = True
            await caller.send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            with anyio.CancelScope(shield=True):  # we may be cancelled (the caller left): close anyway
                await response.aclose()

    return CallerBound(work)


def _has_body(request: Request) -> bool:
    headers = request.headers
    return "transfer-encoding" in headers or headers.get("content-length", "0") not in ("", "0")


async def _body(request: Request, caller: Caller) -> AsyncIterator[bytes]:
    async for part in request.stream():
        if part:
            yield part
    caller.watch()  # the body is read: from now on receive() only reports the caller leaving


async def _read_capped(response: httpx2.Response) -> bytes:
    data = bytearray()
    async for part in response.aiter_bytes():
        data += part
        if len(data) > _MAX_ERROR_BODY:
            break
    return bytes(data[:_MAX_ERROR_BODY])
