"""The proxy's ASGI app: every ``/v1`` request is matched against the route table, then guarded, passed or refused."""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import importlib.resources
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote

import anyio
import openai
from openai import AsyncOpenAI

from ...exceptions import ModerationError, StreamFormatError
from ...moderation import KeywordModerator, LocalModerator, ModerationBudget, OpenAIModerator
from ...moderation._base import Moderator
from ...moderation._budget import budget_key
from .._drain import Drain, DrainMiddleware
from .._sse import describe_error, error_object
from ._asgi import Caller, CallerBound
from ._json import JSONDecodeError, loads
from .complete import judge_answer
from .config import ProxyConfig
from .routes import ROUTES, Match, Route, match
from .stream import GuardedAnswer, retry_after
from .upstream import Upstream, json_response, passed_headers

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from .._metrics import ProxyMetrics, RouteHooks

__all__ = ["DEBUG_HEADER", "create_app"]

logger = logging.getLogger(__name__)

DEBUG_HEADER = "x-streamguard-debug"
ROUTE_HEADER = "x-streamguard-route"
# The playground loads nothing from elsewhere and talks only to this origin; inline code is its own.
_PLAYGROUND_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


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
    from starlette.routing import Route as StarletteRoute

    from .._metrics import ProxyMetrics

    proxy = _Proxy(config, ProxyMetrics(moderator=config.moderator))

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        if status == 404:
            return _not_found(request)
        detail = exc.detail if isinstance(exc, HTTPException) else "The server had an error."
        kind = "invalid_request_error" if status < 500 else "server_error"
        return json_response(status, error_object(str(detail), kind))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        proxy.drain.install()  # SIGTERM drains (see _drain.py)
        try:
            yield
        finally:
            proxy.drain.uninstall()
            await proxy.aclose()

    middleware = [Middleware(DrainMiddleware, drain=proxy.drain)]
    if config.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.cors_origins),
                allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                allow_headers=["*"],  # Authorization and the openai client's own headers
                expose_headers=["x-request-id"],
            )
        )
    methods = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD"]
    routes = [
        StarletteRoute("/healthz", proxy.healthz, methods=["GET"]),
        StarletteRoute("/metrics", proxy.metrics_page, methods=["GET"]),
    ]
    if config.playground:
        routes.append(StarletteRoute("/", proxy.playground, methods=["GET"]))
    routes.append(StarletteRoute("/{path:path}", proxy.dispatch, methods=methods))
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: http_error, 500: http_error},
        lifespan=lifespan,
    )


def _not_found(request: Request) -> Response:
    served = ", ".join(f"{' '.join(sorted(r.methods))} /v1{r.pattern}" for r in ROUTES if r.kind != "refused")
    message = (
        f"Unknown request URL: {request.method} {request.url.path}. This streamguard proxy serves: {served} "
        "(and GET /healthz, GET /readyz, GET /metrics)."
    )
    return json_response(404, error_object(message, code="unknown_url"))


class _Proxy:
    """The handlers, and the clients they share."""

    def __init__(self, config: ProxyConfig, metrics: ProxyMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self._playground: bytes | None = None
        self.secrets = tuple(k for k in (config.upstream_api_key, config.moderation_api_key) if k)
        self._client_keys = [key.encode() for key in sorted(config.client_keys)]
        self.upstream = Upstream(config)
        self.drain = Drain(config.drain_timeout)
        self._budgets: dict[str, ModerationBudget] = {}  # per caller key, when callers pay for moderation
        self._clients: list[AsyncOpenAI] = []
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
                # Shared, so windows of all streams are batched; the budget is shared through Redis if given.
                self._moderator = OpenAIModerator(client, redis_url=config.redis_url)
            else:
                self._moderation_client = client
        if config.upstream_api_key and not config.client_keys:
            logger.warning("the proxy holds the upstream key but requires no client key: anyone can use it")
        if config.allow_unguarded:
            logger.warning("relaying routes unmoderated: %s", ", ".join(sorted(config.allow_unguarded)))

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.upstream.aclose()
            for client in self._clients:
                await client.close()
            budgets = [b for b in (self.budget(), *self._budgets.values()) if b is not None]
            for budget in budgets:
                await budget.aclose()

    def budget(self) -> ModerationBudget | None:
        """The shared moderator's rate-limit budget, if it has one."""
        return self._moderator.budget if isinstance(self._moderator, OpenAIModerator) else None

    def moderator_for(self, request: Request) -> Moderator:
        if self._moderator is not None:
            return self._moderator
        assert self._moderation_client is not None
        # The caller's credentials pay for the moderation of their own answer.
        auth = request.headers.get("authorization")
        client = self._moderation_client
        if auth:
            client = client.with_options(default_headers={"Authorization": auth})
        budget = None
        if self.config.redis_url is not None:
            # One budget per caller key (its organisation's limits), shared through Redis.
            key = budget_key(str(client.base_url), auth or "")
            budget = self._budgets.get(key)
            if budget is None:
                if len(self._budgets) >= 1024:
                    self._budgets.pop(next(iter(self._budgets)))
                budget = self._budgets[key] = ModerationBudget(self.config.redis_url, key=key)
        return OpenAIModerator(client, budget=budget)

    # -- handlers ----------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return json_response(200, {"status": "ok"})

    async def metrics_page(self, request: Request) -> Response:
        from starlette.responses import Response

        from .._metrics import CONTENT_TYPE

        self.metrics.sync_budget(self.budget())
        return Response(self.metrics.render(), headers={"content-type": CONTENT_TYPE})

    async def playground(self, request: Request) -> Response:
        from starlette.responses import HTMLResponse

        if self._playground is None:
            page = importlib.resources.files("streamguard.integrations").joinpath("_playground.html")
            self._playground = page.read_bytes()
        headers = {"content-security-policy": _PLAYGROUND_CSP, "x-content-type-options": "nosniff"}
        return HTMLResponse(self._playground, headers=headers)

    async def dispatch(self, request: Request) -> Response:
        raw = request.scope.get("raw_path")
        raw_path = raw.decode("latin-1") if isinstance(raw, bytes) else quote(request.url.path)
        found = match(raw_path, request.method)
        if found is None:
            return _not_found(request)
        if isinstance(found, Route):
            message = (
                f"Method {request.method} is not allowed here; this route takes {', '.join(sorted(found.methods))}."
            )
            return json_response(405, error_object(message, code="method_not_allowed"))
        if (denied := self.authorize(request)) is not None:
            return denied
        route = found.route
        if route.kind == "guarded":
            return await self.guarded(request, found)
        if route.kind == "refused" and route.name not in self.config.allow_unguarded:
            message = (
                f"streamguard refuses {request.method} /v1{route.pattern}: it returns {route.why}, model text "
                f"that this proxy cannot moderate. An operator can relay it unmoderated with "
                f"--allow-unguarded {route.name}."
            )
            return json_response(403, error_object(message, code="unguarded_route"))
        from .passthrough import relay

        label = "passed" if route.kind == "passed" else "unguarded"
        return relay(self.upstream, request, found.path, self.secrets_for(request), self.metrics.error, label=label)

    async def guarded(self, request: Request, found: Match) -> Response:
        read = await self.read_json(request)
        if not isinstance(read, tuple):
            return read
        raw, body = read
        if (refused := self.check_request(body)) is not None:
            return refused
        shape = cast(Any, found.route.shape)
        moderator = self.moderator_for(request)
        secrets = self.secrets_for(request)
        policy = self.config.policy
        args = _guard_args(shape, body)
        hooks = self.metrics.route(found.route.name)
        if body.get("stream") is True:
            if shape == "chat":
                options = body.get("stream_options")
                wants_usage = isinstance(options, dict) and options.get("include_usage") is True
                policy = dataclasses.replace(policy, include_usage=wants_usage)
            elif shape == "completions":
                policy = dataclasses.replace(policy, include_usage=False)
            answer = GuardedAnswer(
                upstream=self.upstream,
                request=request,
                path=found.path,
                body=raw,
                shape=shape,
                moderator=moderator,
                policy=policy,
                guard_args=args,
                secrets=secrets,
                ping=self.config.ping,
                debug=request.headers.get(DEBUG_HEADER, "").strip().lower() in ("1", "true", "yes"),
                on_verdict=hooks.verdict,
                on_flag=hooks.flag,
                route=found.route.name,
                drain=self.drain,
            )
            budget = moderator.budget if isinstance(moderator, OpenAIModerator) else None
            return answer.response(hooks.ended(budget))
        return self.complete(request, found.path, raw, shape, moderator, args, secrets, hooks)

    def complete(
        self,
        request: Request,
        path: str,
        raw: bytes,
        shape: str,
        moderator: Moderator,
        args: Mapping[str, Any],
        secrets: Sequence[str],
        hooks: RouteHooks,
    ) -> Response:
        upstream = self.upstream

        async def work(caller: Caller) -> None:
            from starlette.responses import Response

            caller.watch()
            req = upstream.build(request, path, content=raw, identity=True)
            try:
                response = await upstream.send(req)
            except openai.APIError as exc:
                self.metrics.error(exc)
                await caller.respond(json_response(*describe_error(exc, secrets)))
                return
            try:
                if response.status_code >= 400:
                    body = await response.aread()
                    self.metrics.error(openai.APIStatusError("upstream error", response=response, body=None))
                    await caller.respond(upstream.status_error(response, body, secrets))
                    return
                kind = response.headers.get("content-type", "")
                if kind.startswith("text/event-stream"):
                    message = (
                        "The upstream server answered a request that was not streamed with an event stream; "
                        "the answer was not forwarded."
                    )
                    await caller.respond(json_response(502, _server_error(message, "upstream_streamed")))
                    return
                data = await response.aread()
            finally:
                with anyio.CancelScope(shield=True):  # we may be cancelled (the caller left): close anyway
                    await response.aclose()
            headers = {**passed_headers(response.headers.items(), all_headers=False), ROUTE_HEADER: "guarded"}
            try:
                answer: Any = loads(data)
            except JSONDecodeError:
                answer = None
            if not isinstance(answer, dict):
                message = "The upstream server's answer is not a JSON object; it was not forwarded."
                await caller.respond(json_response(502, _server_error(message, "upstream_unreadable")))
                return
            try:
                changed = await judge_answer(
                    answer,
                    shape,
                    moderator=moderator,
                    policy=self.config.policy,
                    guard_args=args,
                    on_verdict=hooks.verdict,
                    on_flag=hooks.flag,
                )
            except ModerationError as exc:
                logger.warning("moderation of a non-streamed answer failed: %s", type(exc).__name__)
                self.metrics.error(exc)
                if (wait := retry_after(exc)) is not None:
                    headers["retry-after"] = wait
                status, error = describe_error(exc, secrets)
                await caller.respond(json_response(status, error, headers=headers))
                return
            except StreamFormatError as exc:
                message = f"The upstream server's answer could not be read ({exc}); it was not forwarded."
                await caller.respond(json_response(502, _server_error(message, "upstream_unreadable")))
                return
            if changed:
                await caller.respond(json_response(response.status_code, answer, headers=headers))
            else:
                media_type = response.headers.get("content-type", "application/json")
                await caller.respond(Response(data, response.status_code, headers=headers, media_type=media_type))

        return CallerBound(work)

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
        return json_response(401, error_object("Incorrect API key provided.", code="invalid_api_key"))

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

    async def read_json(self, request: Request) -> tuple[bytes, dict[str, Any]] | Response:
        """The body (as received, and as a JSON object), or the 400/413 to send."""
        from starlette.requests import ClientDisconnect

        limit = self.config.max_body_bytes
        too_large = json_response(
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
            return json_response(400, error_object("The client disconnected while sending the body."))
        try:
            body: Any = loads(bytes(data))
        except JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            message = "We could not parse the JSON body of your request: the API expects a JSON object."
            return json_response(400, error_object(message))
        return bytes(data), body

    def check_request(self, body: dict[str, Any]) -> Response | None:
        """None if the request's fields can be guarded as sent, else the 400 to send (OpenAI's wording)."""
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            message = f"Invalid type for 'stream': expected a boolean, but got {_json_type(stream)} instead."
            return json_response(400, error_object(message, param="stream", code="invalid_type"))
        messages = body.get("messages")
        limit = self.config.max_messages
        if not isinstance(messages, list) or len(messages) <= limit:
            return None
        message = (
            f"Invalid 'messages': array too long. Expected an array with maximum length {limit}, "
            f"but got an array with length {len(messages)} instead."
        )
        return json_response(400, error_object(message, param="messages", code="array_above_max_length"))


def _guard_args(shape: str, body: Mapping[str, Any]) -> dict[str, Any]:
    model = body.get("model") if isinstance(body.get("model"), str) else None
    if shape == "responses":
        value = body.get("input")
        return {"model": model, "input": value if isinstance(value, str | list) else None}
    if shape == "completions":
        prompt = body.get("prompt")
        texts = [prompt] if isinstance(prompt, str) else [p for p in prompt or [] if isinstance(p, str)]
        messages = [{"role": "user", "content": t} for t in texts] or None
        return {"model": model, "messages": messages, "tools": None, "n": _n(body)}
    return {"model": model, "messages": _dicts(body.get("messages")), "tools": _dicts(body.get("tools")), "n": _n(body)}


def _n(body: Mapping[str, Any]) -> int | None:
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _dicts(value: object) -> list[Mapping[str, Any]] | None:
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return cast(list[Mapping[str, Any]], value)
    return None


def _json_type(value: object) -> str:
    names = {str: "a string", int: "an integer", float: "a decimal", list: "an array", dict: "an object"}
    return names.get(type(value), "a value")


def _server_error(message: str, code: str) -> dict[str, Any]:
    return error_object(message, "server_error", code=code)
