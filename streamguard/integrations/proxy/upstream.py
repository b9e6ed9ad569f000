"""Talking to upstream: one pooled HTTP client per worker, the headers that go each way, and errors.

The proxy speaks HTTP to upstream itself (``httpx2``, the ``openai`` client's own transport) rather
than through ``openai.AsyncOpenAI``: pass-through routes need the bytes as they come, and guarded
streams are parsed once, by the proxy (see :mod:`.stream`). Its failures are turned into the
``openai`` client's exception types (``APIConnectionError``, ``APITimeoutError``), so that error
descriptions and metrics treat them as they treat the client's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import httpx2
import openai

from .._sse import error_object, scrub
from .config import ProxyConfig

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

__all__ = ["Upstream", "passed_headers", "request_headers"]

logger = logging.getLogger(__name__)

# Never relayed either way: hop-by-hop (RFC 9110 §7.6.1), framing the server sets itself, and
# what belongs to the other side's host.
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "set-cookie",
        "server",
        "date",
        "alt-svc",
    }
)
# Caller headers that carry credentials: dropped when the proxy holds the upstream key.
_CREDENTIALS = frozenset({"authorization", "api-key", "openai-organization", "openai-project", "cookie"})
# Upstream answer headers kept on guarded answers (whose body the proxy rebuilds).
_KEPT = (
    "x-request-id",
    "openai-processing-ms",
    "openai-version",
    "openai-organization",
    "retry-after",
    "retry-after-ms",
)


class Upstream:
    """The pooled client, and the request building every route shares."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.http = httpx2.AsyncClient(
            timeout=httpx2.Timeout(config.timeout, connect=config.connect_timeout),
            limits=httpx2.Limits(
                max_connections=config.max_connections, max_keepalive_connections=config.max_keepalive_connections
            ),
            follow_redirects=False,  # a redirect must not take the proxy's key elsewhere
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    def build(
        self,
        request: Request,
        path: str,
        *,
        content: Any = None,
        identity: bool = False,
    ) -> httpx2.Request:
        """The upstream request for ``path`` (from the route table), with the caller's query string."""
        url = httpx2.URL(self.config.upstream + path)
        query = request.scope.get("query_string", b"")
        if query:
            url = url.copy_with(query=query)
        headers = request_headers(request.headers.items(), self.config.upstream_api_key)
        length = request.headers.get("content-length")
        if content is not None and not isinstance(content, bytes) and length and length.isdigit():
            headers.append(("content-length", length))  # a streamed upload keeps its length (no chunked upload)
        if identity or not any(name == "accept-encoding" for name, _ in headers):
            # Guarded answers are parsed: no compression. Passed ones keep what the caller accepts.
            headers = [(n, v) for n, v in headers if n != "accept-encoding"] + [("accept-encoding", "identity")]
        return self.http.build_request(request.method, url, headers=headers, content=content)

    async def send(self, req: httpx2.Request) -> httpx2.Response:
        """Send, streaming the answer; transport failures as the ``openai`` client's exceptions."""
        try:
            return await self.http.send(req, stream=True)
        except httpx2.TimeoutException as exc:
            raise openai.APITimeoutError(request=req) from exc
        except httpx2.TransportError as exc:
            raise openai.APIConnectionError(request=req) from exc

    def status_error(self, response: httpx2.Response, body: bytes, secrets: Sequence[str]) -> Response:
        """An upstream HTTP error, passed on scrubbed (unless it is about the proxy's own key)."""
        from starlette.responses import Response as StarletteResponse

        if self.config.upstream_api_key is not None and response.status_code in (401, 403):
            logger.error("upstream refused the proxy's credentials (%d)", response.status_code)
            message = "The upstream server refused the proxy's credentials."
            return json_response(502, error_object(message, "server_error", code="upstream_auth_failed"))
        if secrets and any(s.encode() in body for s in secrets):
            body = scrub(body.decode("utf-8", "replace"), secrets).encode()
        headers = passed_headers(response.headers.items(), all_headers=False)
        media_type = response.headers.get("content-type", "application/json")
        return StarletteResponse(body, status_code=response.status_code, media_type=media_type, headers=headers)


def request_headers(headers: Any, upstream_key: str | None) -> list[tuple[str, str]]:
    """The caller's headers as sent upstream: no hop-by-hop ones; its credentials unless the proxy holds a key."""
    out: list[tuple[str, str]] = []
    for name, value in headers:
        lower = name.lower()
        if lower in _HOP or lower.startswith("x-streamguard-"):
            continue
        if upstream_key is not None and lower in _CREDENTIALS:
            continue
        out.append((lower, value))
    if upstream_key is not None:
        out.append(("authorization", f"Bearer {upstream_key}"))
    return out


def passed_headers(headers: Any, *, all_headers: bool = True) -> dict[str, str]:
    """Upstream's answer headers as passed to the caller.

    Args:
        headers: ``(name, value)`` pairs.
        all_headers: Everything but hop-by-hop and framing (pass-through routes); else only
            ids, rate limits, processing time and retry hints (guarded answers, whose body and
            content type the proxy sets).
    """
    out: dict[str, str] = {}
    for name, value in headers:
        lower = name.lower()
        if all_headers:
            # content-length stays: the raw body is relayed unchanged, so it is still true.
            if lower not in _HOP or lower == "content-length":
                out[lower] = value
        elif lower in _KEPT or lower.startswith("x-ratelimit-"):
            out[lower] = value
    return out


def json_response(status: int, body: Any, *, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON response (orjson-encoded)."""
    from starlette.responses import Response as StarletteResponse

    from ._json import dumps

    return StarletteResponse(dumps(body), status_code=status, media_type="application/json", headers=headers)
