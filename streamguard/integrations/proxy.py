"""An OpenAI-compatible moderating proxy: ``POST /v1/chat/completions``, ``GET /v1/models``, ``/healthz``.

Also ``GET /metrics`` (Prometheus text format, see :mod:`._metrics`; like ``/healthz`` it needs
no client key) and ``GET /``, the playground: one self-contained page (no external resources,
locked down by its Content-Security-Policy) that sends a prompt to this proxy and shows the
guarded stream arrive, redactions and cut-offs marked, with a timeline of the moderated windows.

Needs the ``[server]`` extra. Starlette and uvicorn are imported inside :func:`create_app` and
:func:`serve` only, so the CLI can register ``streamguard serve`` without the extra installed.

How a request is forwarded: the JSON body goes upstream *as received*, through the ``openai``
client's low-level ``post()`` (``client.post("/chat/completions", body=body, ...)``), not through
``chat.completions.create(**body)``, which would reject or drop fields it does not know. So
provider-specific fields survive, while the client still does what it is good at: the SSE
parsing (an ``AsyncStream`` of the decoded JSON events; an ``{"error": ...}`` event raises
``openai.APIError``), and typed errors (an upstream 4xx/5xx before the stream starts is returned
with the upstream's own status and body). Its retries are off: the caller's client retries.
Each event becomes a ``ChatCompletionChunk`` here (:class:`_Chunks`): validated strictly by
pydantic-core when it fits the schema, else built without validation exactly as the ``openai``
client builds it (``construct``). Either way unknown fields are kept, ``to_json`` gives the same
bytes, and a chunk costs a few microseconds instead of the ~40 of the client's pure-Python
``construct_type`` (the largest share of the proxy's CPU per chunk under load).

Streaming requests are guarded (:class:`~streamguard.integrations.starlette.GuardedSSEResponse`);
a usage chunk is sent only if the request asked for one (``stream_options.include_usage``),
as OpenAI does. Non-streaming answers are moderated as one text per choice, under the same
policy: a flagged choice comes back with empty content (``cutoff``) or the redaction text
(``redact``) and ``finish_reason: "content_filter"``.

Credentials: by default the caller's ``Authorization`` header passes through to upstream. With
``ProxyConfig.upstream_api_key`` the proxy holds the upstream key itself and callers present
one of ``ProxyConfig.client_keys`` (compared in constant time). The upstream key is never
logged and never sent to a caller: an upstream 401/403 becomes a 502 that does not echo the
upstream's message, and every error text is scrubbed of the key. The caller's own credentials
(the ``Authorization`` bearer token, an ``api-key`` header) are scrubbed the same way from that
request's error responses, error events and log lines, in case upstream echoes them
(``Incorrect API key provided: sk-...``). The upstream URL comes from configuration only, never
from a request.

Debugging: a streaming request with the header ``x-streamguard-debug: 1`` also gets the policy
and each window's verdict (offsets, latency, category; never text) as SSE comments, which SSE
clients skip (see :mod:`streamguard.integrations.starlette`). The playground sends it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hmac
import importlib.resources
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import anyio
import httpx2
import openai
from openai import AsyncOpenAI, AsyncStream
from openai.types.chat import ChatCompletionChunk
from pydantic import ValidationError

from ..exceptions import ConfigError, ModerationError, ModerationTimeout
from ..moderation import KeywordModerator, LocalModerator, OpenAIModerator
from ..moderation._base import Moderator, Verdict
from ..policy import Policy
from ._sse import describe_error, error_object, scrub

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from ._metrics import ProxyMetrics
    from .starlette import GuardedSSEResponse

__all__ = ["ProxyConfig", "add_serve_subcommand", "create_app", "run_serve", "serve"]

logger = logging.getLogger(__name__)

ModeratorName = Literal["openai", "local", "keyword"]
# Upstream response headers worth passing on to the caller (ids for support, rate-limit hints).
_PASS_HEADERS = ("x-request-id", "retry-after", "retry-after-ms", "openai-processing-ms")
DEBUG_HEADER = "x-streamguard-debug"
# The playground loads nothing from elsewhere and talks only to this origin; inline code is its own.
_PLAYGROUND_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True, kw_only=True)
class ProxyConfig:
    """How the proxy runs. Secrets are left out of ``repr``.

    Attributes:
        upstream: Base URL of the upstream API, e.g. ``"https://api.openai.com/v1"``.
        moderator: ``"openai"`` (the Moderation endpoint at ``moderation_base_url``, else at
            ``upstream``), ``"local"`` (:class:`~streamguard.LocalModerator`) or ``"keyword"``
            (:class:`~streamguard.KeywordModerator` with ``keywords``).
        keywords: Patterns for the keyword moderator.
        policy: The guard's policy, for streamed and non-streamed answers alike.
        upstream_api_key: The upstream key the proxy holds; ``None`` passes the caller's
            ``Authorization`` header through.
        client_keys: Keys callers must present as ``Authorization: Bearer <key>``; empty for
            no check.
        cors_origins: Origins allowed by CORS (``"*"`` for any); empty for no CORS headers.
        moderation_base_url: Base URL of the Moderation endpoint, if not ``upstream``.
        moderation_api_key: Key for the Moderation endpoint; else ``upstream_api_key``, else the
            caller's ``Authorization``.
        max_body_bytes: Larger request bodies are refused with 413.
        max_messages: Requests with more ``messages`` are refused with 400 (OpenAI's own limit is 2048).
        timeout: Seconds an upstream request may take.
        ping: Seconds of silence in a stream after which a ``: ping`` comment is sent.
        playground: Serve the playground page at ``GET /``.
    """

    upstream: str
    moderator: ModeratorName = "openai"
    keywords: Sequence[str] = ()
    policy: Policy = field(default_factory=Policy)
    upstream_api_key: str | None = field(default=None, repr=False)
    client_keys: frozenset[str] = field(default=frozenset(), repr=False)
    cors_origins: Sequence[str] = ()
    moderation_base_url: str | None = None
    moderation_api_key: str | None = field(default=None, repr=False)
    max_body_bytes: int = 8 * 1024 * 1024
    max_messages: int = 2048
    timeout: float = 600.0
    ping: float | None = 15.0
    playground: bool = True

    def __post_init__(self) -> None:
        for name in ("upstream", "moderation_base_url"):
            url = getattr(self, name)
            if url is not None and not url.startswith(("http://", "https://")):
                raise ConfigError(f"{name} must be an http:// or https:// URL, got {url!r}")
        if self.moderator not in ("openai", "local", "keyword"):
            raise ConfigError(f"moderator must be 'openai', 'local' or 'keyword', got {self.moderator!r}")
        if self.moderator == "keyword" and not self.keywords:
            raise ConfigError("the keyword moderator needs keywords")
        if self.max_body_bytes < 1:
            raise ConfigError("max_body_bytes must be >= 1")
        if self.max_messages < 1:
            raise ConfigError("max_messages must be >= 1")
        if not self.timeout > 0:
            raise ConfigError("timeout must be a positive number of seconds")
        if any(not key for key in self.client_keys):
            raise ConfigError("client keys must not be empty")
        object.__setattr__(self, "upstream", self.upstream.rstrip("/"))
        object.__setattr__(self, "keywords", tuple(self.keywords))
        object.__setattr__(self, "client_keys", frozenset(self.client_keys))
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))


def create_app(config: ProxyConfig) -> Starlette:
    """The proxy as a Starlette app.

    Args:
        config: How to run.

    Returns:
        An ASGI app; its lifespan closes the upstream HTTP clients on shutdown.

    Raises:
        ConfigError: The configuration cannot work (e.g. the local moderator is not installed).
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.routing import Route

    from ._metrics import ProxyMetrics

    proxy = _Proxy(config, ProxyMetrics())

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "The server had an error."
        kind = "invalid_request_error" if status < 500 else "server_error"
        return _json(status, error_object(str(detail), kind))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await proxy.aclose()

    middleware = []
    if config.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.cors_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],  # Authorization and the openai client's own headers
                expose_headers=["x-request-id"],
            )
        )
    routes = [
        Route("/v1/chat/completions", proxy.chat, methods=["POST"]),
        Route("/v1/models", proxy.models, methods=["GET"]),
        Route("/v1/models/{model:path}", proxy.models, methods=["GET"]),
        Route("/healthz", proxy.healthz, methods=["GET"]),
        Route("/metrics", proxy.metrics_page, methods=["GET"]),
    ]
    if config.playground:
        routes.append(Route("/", proxy.playground, methods=["GET"]))
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: http_error, 500: http_error},
        lifespan=lifespan,
    )


def serve(config: ProxyConfig, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info") -> None:
    """Run the proxy with uvicorn until interrupted.

    Args:
        config: How to run.
        host: Interface to listen on.
        port: Port to listen on.
        log_level: uvicorn's log level.
    """
    import uvicorn

    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level)


class _Proxy:
    """The handlers, and the clients they share."""

    def __init__(self, config: ProxyConfig, metrics: ProxyMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self._playground: bytes | None = None
        self.secrets = tuple(k for k in (config.upstream_api_key, config.moderation_api_key) if k)
        self._client_keys = [key.encode() for key in sorted(config.client_keys)]
        # Without a key of our own the caller's Authorization replaces this placeholder per request.
        self.upstream = AsyncOpenAI(
            api_key=config.upstream_api_key or "unused",
            base_url=config.upstream,
            max_retries=0,
            timeout=config.timeout,
        )
        self._clients = [self.upstream]
        self._moderator: Moderator | None = None
        self._moderation_client: AsyncOpenAI | None = None
        if config.moderator == "keyword":
            self._moderator = KeywordModerator(config.keywords)
        elif config.moderator == "local":
            self._moderator = LocalModerator()
        else:
            key = config.moderation_api_key or config.upstream_api_key
            client = AsyncOpenAI(
                api_key=key or "unused", base_url=config.moderation_base_url or config.upstream, max_retries=0
            )
            self._clients.append(client)
            if key is not None:
                self._moderator = OpenAIModerator(client)  # shared, so windows of all streams are batched
            else:
                self._moderation_client = client
        if config.upstream_api_key and not config.client_keys:
            logger.warning("the proxy holds the upstream key but requires no client key: anyone can use it")

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            for client in self._clients:
                await client.close()

    def moderator_for(self, request: Request) -> Moderator:
        if self._moderator is not None:
            return self._moderator
        assert self._moderation_client is not None
        # The caller's credentials pay for the moderation of their own answer.
        auth = request.headers.get("authorization")
        client = self._moderation_client
        if auth:
            client = client.with_options(default_headers={"Authorization": auth})
        return OpenAIModerator(client)

    # -- handlers ----------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return _json(200, {"status": "ok"})

    async def metrics_page(self, request: Request) -> Response:
        from starlette.responses import Response

        from ._metrics import CONTENT_TYPE

        return Response(self.metrics.render(), headers={"content-type": CONTENT_TYPE})

    async def playground(self, request: Request) -> Response:
        from starlette.responses import HTMLResponse

        if self._playground is None:
            page = importlib.resources.files(__package__).joinpath("_playground.html")
            self._playground = page.read_bytes()
        headers = {"content-security-policy": _PLAYGROUND_CSP, "x-content-type-options": "nosniff"}
        return HTMLResponse(self._playground, headers=headers)

    async def models(self, request: Request) -> Response:
        if (denied := self.authorize(request)) is not None:
            return denied
        path = "/models" + request.url.path.removeprefix("/v1/models")
        secrets = self.secrets_for(request)
        try:
            headers = self.forward(request)
            response = await self.upstream.get(path, cast_to=httpx2.Response, options={"headers": headers})
        except openai.APIError as exc:
            self.metrics.error(exc)
            return self.open_error(exc, secrets)
        return _raw(response, secrets)

    async def chat(self, request: Request) -> Response:
        if (denied := self.authorize(request)) is not None:
            return denied
        body = await self.read_json(request)
        if not isinstance(body, dict):
            return body
        if (refused := self.check_messages(body)) is not None:
            return refused
        moderator = self.moderator_for(request)
        if body.get("stream") is True:
            return self.stream(body, request, moderator)
        return await self.complete(body, request, moderator)

    # -- pieces ------------------------------------------------------------------------------

    def authorize(self, request: Request) -> Response | None:
        """None if the caller may go on, else the 401 to send."""
        if not self._client_keys:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        presented = token.strip().encode()
        ok = False
        for key in self._client_keys:  # no early exit: the time taken says nothing about which key
            ok |= hmac.compare_digest(presented, key)
        if ok and scheme.lower() == "bearer":
            return None
        return _json(401, error_object("Incorrect API key provided.", code="invalid_api_key"))

    def secrets_for(self, request: Request) -> tuple[str, ...]:
        """The strings to scrub from this request's errors and logs: the proxy's keys and the caller's."""
        caller = []
        if auth := request.headers.get("authorization", "").strip():
            _, _, token = auth.partition(" ")
            caller.append(token.strip() or auth)
        if api_key := request.headers.get("api-key", "").strip():
            caller.append(api_key)
        if not caller:
            return self.secrets
        return (*self.secrets, *(key for key in caller if key not in self.secrets))

    def forward(self, request: Request) -> dict[str, str | openai.Omit]:
        """Headers to send upstream: the caller's credentials, unless the proxy holds the key."""
        if self.config.upstream_api_key is not None:
            return {}
        headers: dict[str, str | openai.Omit] = {"Authorization": request.headers.get("authorization") or openai.omit}
        for name in ("openai-organization", "openai-project"):
            if value := request.headers.get(name):
                headers[name] = value
        return headers

    async def read_json(self, request: Request) -> dict[str, Any] | Response:
        """The body as a JSON object, or the 400/413 to send."""
        from starlette.requests import ClientDisconnect

        limit = self.config.max_body_bytes
        too_large = _json(
            413, error_object(f"Request body too large: the limit is {limit} bytes.", code="request_too_large")
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return too_large
        data = bytearray()
        try:
            async for part in request.stream():
                data += part
                if len(data) > limit:
                    return too_large
        except ClientDisconnect:
            return _json(400, error_object("The client disconnected while sending the body."))
        try:
            body = json.loads(data)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            message = "We could not parse the JSON body of your request: the API expects a JSON object."
            return _json(400, error_object(message))
        return body

    def check_messages(self, body: dict[str, Any]) -> Response | None:
        """None if ``messages`` is within ``max_messages``, else the 400 to send (OpenAI's wording)."""
        messages = body.get("messages")
        limit = self.config.max_messages
        if not isinstance(messages, list) or len(messages) <= limit:
            return None
        message = (
            f"Invalid 'messages': array too long. Expected an array with maximum length {limit}, "
            f"but got an array with length {len(messages)} instead."
        )
        return _json(400, error_object(message, param="messages", code="array_above_max_length"))

    def stream(self, body: dict[str, Any], request: Request, moderator: Moderator) -> Response:
        from .starlette import GuardedSSEResponse

        headers = self.forward(request)
        secrets = self.secrets_for(request)

        async def open_stream() -> _Chunks:
            events = await self.upstream.post(
                "/chat/completions",
                body=body,
                cast_to=object,  # the decoded JSON as is: _Chunks builds the chunks, faster
                stream=True,
                stream_cls=AsyncStream[object],
                options={"headers": headers},
            )
            return _Chunks(events)

        options = body.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        debug = request.headers.get(DEBUG_HEADER, "").strip().lower() in ("1", "true", "yes")
        return GuardedSSEResponse(
            open_stream,
            moderator=moderator,
            policy=dataclasses.replace(self.config.policy, include_usage=wants_usage),
            model=_str(body.get("model")),
            messages=_dicts(body.get("messages")),
            tools=_dicts(body.get("tools")),
            n=body["n"] if isinstance(body.get("n"), int) else None,
            ping=self.config.ping,
            secrets=secrets,
            open_error=lambda exc: self.open_error(exc, secrets),
            on_verdict=self.metrics.verdict,
            on_flag=self.metrics.flag,
            on_end=self._stream_ended,
            debug_events=debug,
        )

    def _stream_ended(self, response: GuardedSSEResponse) -> None:
        self.metrics.stream_ended(response)

    async def complete(self, body: dict[str, Any], request: Request, moderator: Moderator) -> Response:
        secrets = self.secrets_for(request)
        try:
            response = await self.upstream.post(
                "/chat/completions", body=body, cast_to=httpx2.Response, options={"headers": self.forward(request)}
            )
        except openai.APIError as exc:
            self.metrics.error(exc)
            return self.open_error(exc, secrets)
        try:
            answer = response.json()
        except ValueError:
            return _raw(response, secrets)
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list):
            return _raw(response, secrets)
        try:
            flagged = await self.judge(choices, moderator)
        except ModerationError as exc:
            logger.warning("moderation of a non-streamed answer failed: %s", type(exc).__name__)
            self.metrics.error(exc)
            return _json(*describe_error(exc))
        if not flagged:
            return _raw(response, secrets)
        policy = self.config.policy
        for choice in flagged:
            message = choice.get("message")
            if isinstance(message, dict):
                message["content"] = policy.redaction if policy.action == "redact" else ""
                if message.get("refusal") is not None:
                    message["refusal"] = None
            choice["finish_reason"] = "content_filter"
            if "logprobs" in choice:
                choice["logprobs"] = None  # they name the withheld tokens
        return _json(response.status_code, answer, headers=_passed_headers(response))

    async def judge(self, choices: list[Any], moderator: Moderator) -> list[dict[str, Any]]:
        """The choices whose text the policy flags (fail-open errors flag nothing)."""
        texts: list[tuple[dict[str, Any], str]] = []
        for choice in choices:
            message = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(message, dict):
                text = "".join(t for t in (message.get("content"), message.get("refusal")) if isinstance(t, str))
                if text:
                    texts.append((choice, text))
        if not texts:
            return []
        policy = self.config.policy
        try:
            started = time.perf_counter()
            with anyio.fail_after(policy.moderation_timeout):
                verdicts: list[Verdict] = await moderator.moderate([t for _, t in texts])
            self.metrics.latency.observe(time.perf_counter() - started)
            if len(verdicts) != len(texts):
                raise ModerationError(f"moderator returned {len(verdicts)} verdicts for {len(texts)} texts")
        except Exception as exc:
            if policy.on_error == "fail_open":
                logger.warning("moderation failed, answer passed unmoderated (fail_open): %s", type(exc).__name__)
                return []
            if isinstance(exc, ModerationError):
                raise
            if isinstance(exc, TimeoutError):
                raise ModerationTimeout(f"moderation took longer than {policy.moderation_timeout}s") from exc
            raise ModerationError(f"moderator failed: {type(exc).__name__}") from exc
        flagged = []
        for (choice, _), verdict in zip(texts, verdicts, strict=True):
            if (decision := policy.judge(verdict)) is not None:
                flagged.append(choice)
                self.metrics.count_flag(decision.category, policy.action, "output")
        return flagged

    def open_error(self, exc: Exception, secrets: Sequence[str]) -> Response:
        """The response for a request that failed before any answer came (scrubbed of ``secrets``)."""
        if isinstance(exc, openai.APIStatusError):
            return self.upstream_error(exc, secrets)
        return _json(*describe_error(exc, secrets))

    def upstream_error(self, exc: openai.APIStatusError, secrets: Sequence[str]) -> Response:
        """An upstream HTTP error, passed on (unless it is about the proxy's own key)."""
        if self.config.upstream_api_key is not None and exc.status_code in (401, 403):
            logger.error("upstream refused the proxy's credentials (%d)", exc.status_code)
            message = "The upstream server refused the proxy's credentials."
            return _json(502, error_object(message, "server_error", code="upstream_auth_failed"))
        return _raw(exc.response, secrets)


class _Chunks:
    """Upstream's SSE events (decoded JSON) as ``ChatCompletionChunk``s; closing it closes the response."""

    def __init__(self, events: AsyncStream[object]) -> None:
        self._events = events

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> Any:
        return _chunk(await self._events.__anext__())

    async def aclose(self) -> None:
        await self._events.close()


def _chunk(data: object) -> Any:
    """``data`` as the ``openai`` client would build it (``construct_type``), but validated in Rust when it can be.

    Strict validation coerces nothing (a string stays out of an int field), so when it succeeds the
    chunk is what ``construct`` would give; when it fails, ``construct`` it is. Anything but an
    object is left as it is, as the client leaves it (the guard rejects it).
    """
    if not isinstance(data, dict):
        return data
    try:
        return ChatCompletionChunk.model_validate(data, strict=True)
    except ValidationError:
        return ChatCompletionChunk.construct(**data)


def _json(status: int, body: Any, *, headers: Mapping[str, str] | None = None) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _raw(response: httpx2.Response, secrets: Sequence[str]) -> Response:
    """An upstream response, passed on as it came (scrubbed of secrets, if any)."""
    from starlette.responses import Response

    content = response.content
    if secrets and any(s.encode() in content for s in secrets):
        content = scrub(content.decode("utf-8", "replace"), secrets).encode()
    media_type = response.headers.get("content-type", "application/json")
    return Response(content, status_code=response.status_code, media_type=media_type, headers=_passed_headers(response))


def _passed_headers(response: httpx2.Response) -> dict[str, str]:
    headers = {name: response.headers[name] for name in _PASS_HEADERS if name in response.headers}
    headers.update({k: v for k, v in response.headers.items() if k.lower().startswith("x-ratelimit-")})
    return headers


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _dicts(value: object) -> list[Mapping[str, Any]] | None:
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return cast(list[Mapping[str, Any]], value)
    return None


# -- the `streamguard serve` subcommand -------------------------------------------------------


def add_serve_subcommand(subparsers: argparse._SubParsersAction[Any]) -> argparse.ArgumentParser:
    """Add ``serve`` to the CLI's subparsers; :func:`run_serve` runs it.

    Args:
        subparsers: What ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The ``serve`` parser (its defaults include ``run=run_serve``, as the CLI dispatches).
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run an OpenAI-compatible moderating proxy",
        description="Run an OpenAI-compatible proxy that moderates chat completions on their way through.",
    )
    parser.add_argument("--upstream", required=True, metavar="URL", help="upstream API base URL, e.g. .../v1")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--moderator", choices=["openai", "local", "keyword"], default="openai")
    parser.add_argument("--keywords", default="", metavar="A,B", help="comma-separated patterns (keyword moderator)")
    parser.add_argument("--mode", choices=["holdback", "stream_first"], default="holdback")
    parser.add_argument("--action", choices=["cutoff", "redact"], default="cutoff")
    parser.add_argument(
        "--client-key", action="append", default=[], dest="client_keys", metavar="K", help="a key callers must present"
    )
    parser.add_argument(
        "--client-keys-env", metavar="NAME", help="environment variable with comma-separated client keys"
    )
    parser.add_argument(
        "--upstream-key-env", metavar="NAME", help="environment variable holding the upstream key the proxy uses"
    )
    parser.add_argument("--moderation-base-url", metavar="URL", help="Moderation endpoint base URL (openai moderator)")
    parser.add_argument("--cors-origin", action="append", default=[], dest="cors_origins", metavar="O")
    parser.add_argument("--max-body-bytes", type=int, default=ProxyConfig.max_body_bytes)
    parser.add_argument(
        "--no-playground", action="store_false", dest="playground", help="do not serve the playground page at /"
    )
    parser.set_defaults(run=run_serve)
    return parser


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    """A :class:`ProxyConfig` from parsed ``serve`` arguments.

    Raises:
        ConfigError: An option is invalid or a named environment variable is unset.
    """

    def env(name: str) -> str:
        value = os.environ.get(name)
        if not value:
            raise ConfigError(f"environment variable {name} is not set")
        return value

    client_keys = set(args.client_keys)
    if args.client_keys_env:
        client_keys |= {k.strip() for k in env(args.client_keys_env).split(",") if k.strip()}
    return ProxyConfig(
        upstream=args.upstream,
        moderator=args.moderator,
        keywords=tuple(k.strip() for k in args.keywords.split(",") if k.strip()),
        policy=Policy(mode=args.mode, action=args.action),
        upstream_api_key=env(args.upstream_key_env) if args.upstream_key_env else None,
        client_keys=frozenset(client_keys),
        cors_origins=tuple(args.cors_origins),
        moderation_base_url=args.moderation_base_url,
        max_body_bytes=args.max_body_bytes,
        playground=args.playground,
    )


def run_serve(args: argparse.Namespace) -> int:
    """Run ``streamguard serve``; returns the exit status (2 for a usage or setup error)."""
    missing = [m for m in ("starlette", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        sys.stderr.write(f"streamguard serve needs {', '.join(missing)}: pip install 'streamguard[server]'\n")
        return 2
    try:
        config = config_from_args(args)
        create_app(config)  # fail on bad configuration before binding the port
    except ConfigError as exc:
        sys.stderr.write(f"streamguard serve: {exc}\n")
        return 2
    serve(config, host=args.host, port=args.port)
    return 0
