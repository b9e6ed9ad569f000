"""A scriptable OpenAI-compatible upstream on loopback, for the tests, benchmarks and the demo.

It speaks real HTTP and real SSE (uvicorn + Starlette, extra ``[server]``) on 127.0.0.1 with a
free port, in a thread of its own, so the real ``openai`` client can be pointed at it. It keeps
counts that tests assert on: streams started, completed and aborted by the client (the way to
see that a cut-off really closed upstream).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import re
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

__all__ = [
    "LoopbackUpstream",
    "RateLimitedModeration",
    "Reply",
    "Script",
    "hashed_embeddings",
    "hashed_vector",
    "keyword_moderation",
    "sse_body",
    "story_chat",
    "text_chunks",
]


@dataclass
class Script:
    """One streamed chat-completions reply.

    Attributes:
        events: SSE ``data:`` payloads (dicts are JSON-encoded; strings are sent as they are).
        delay: Seconds before each event after the first.
        first_delay: Seconds before the first event.
        done: Send ``data: [DONE]`` at the end.
        stall_after: After this many events, stop sending and keep the connection open.
        drop_after: After this many events, break the connection (no clean end of body).
        raw: Bytes sent as the whole body instead of events (for recorded or malformed SSE).
    """

    events: Sequence[Mapping[str, Any] | str] = ()
    delay: float = 0.0
    first_delay: float = 0.0
    done: bool = True
    stall_after: int | None = None
    drop_after: int | None = None
    raw: bytes | None = None


@dataclass
class Reply:
    """A plain (non-streamed) JSON reply with a status code and headers."""

    body: Any
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0


ChatHandler = Callable[[dict[str, Any]], "Script | Reply"]
ModerationHandler = Callable[[dict[str, Any]], Reply]
EmbeddingsHandler = Callable[[dict[str, Any]], Reply]


@dataclass
class _Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    headers: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    started: int = 0
    completed: int = 0
    aborted: int = 0
    events_sent: int = 0
    ended: threading.Condition = field(default_factory=threading.Condition)


class LoopbackUpstream:
    """An OpenAI-compatible server on 127.0.0.1 with a free port, run in a thread.

    Args:
        chat: Maps a ``/v1/chat/completions`` request body to a :class:`Script` (streamed) or a
            :class:`Reply`.
        moderation: Maps a ``/v1/moderations`` request body to a :class:`Reply`; by default
            :func:`keyword_moderation` with no words (nothing flagged).
        embeddings: Maps a ``/v1/embeddings`` request body to a :class:`Reply`; by default a
            404 error (no embeddings model).
        port: The port to listen on; 0 (the default) picks a free one.

    Use as a context manager; ``base_url`` is what ``AsyncOpenAI(base_url=...)`` takes.
    """

    def __init__(
        self,
        *,
        chat: ChatHandler | None = None,
        moderation: ModerationHandler | None = None,
        embeddings: EmbeddingsHandler | None = None,
        port: int = 0,
    ) -> None:
        self.chat = chat or (lambda body: Script(text_chunks(["Hello", " world", "."])))
        self.moderation = moderation or keyword_moderation(())
        self.embeddings = embeddings or _no_embeddings
        self._stats = _Stats()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port = port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> list[tuple[str, dict[str, Any]]]:
        """(path, JSON body) of every request so far."""
        with self._stats.lock:
            return list(self._stats.requests)

    @property
    def request_headers(self) -> list[tuple[str, dict[str, str]]]:
        """(path, headers with lower-case names) of every request so far."""
        with self._stats.lock:
            return list(self._stats.headers)

    def count(self, path: str) -> int:
        """Requests received for one path, e.g. ``"/v1/moderations"``."""
        return sum(1 for p, _ in self.requests if p == path)

    @property
    def started(self) -> int:
        return self._stats.started

    @property
    def completed(self) -> int:
        return self._stats.completed

    @property
    def aborted(self) -> int:
        """Streams the client closed before the server had sent everything."""
        return self._stats.aborted

    @property
    def events_sent(self) -> int:
        return self._stats.events_sent

    def wait_ended(self, streams: int, timeout: float) -> bool:
        """Block until ``streams`` streams have ended (completed or aborted)."""
        stats = self._stats
        with stats.ended:
            return stats.ended.wait_for(lambda: stats.completed + stats.aborted >= streams, timeout)

    async def await_ended(self, streams: int, seconds: float = 5.0) -> bool:
        """Async form of :meth:`wait_ended` (runs the wait in a worker thread)."""
        return await anyio.to_thread.run_sync(self.wait_ended, streams, seconds)

    def __enter__(self) -> LoopbackUpstream:
        import uvicorn

        config = uvicorn.Config(
            self._app(), host="127.0.0.1", port=self.port, log_level="critical", lifespan="off", access_log=False
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, name="loopback-upstream", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("loopback upstream did not start")
            time.sleep(0.005)
        self.port = server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response, StreamingResponse
        from starlette.routing import Route

        stats = self._stats

        async def body_of(request: Request) -> dict[str, Any]:
            raw = await request.body()
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                body = {"_raw": raw.decode("utf-8", "replace")}
            with stats.lock:
                stats.requests.append((request.url.path, body))
                stats.headers.append((request.url.path, dict(request.headers)))
            return dict(body) if isinstance(body, dict) else {"_body": body}

        async def reply(r: Reply) -> Response:
            if r.delay:
                await anyio.sleep(r.delay)
            return JSONResponse(r.body, status_code=r.status, headers=dict(r.headers))

        async def chat(request: Request) -> Response:
            answer = self.chat(await body_of(request))
            if isinstance(answer, Reply):
                return await reply(answer)
            with stats.lock:
                stats.started += 1
            return StreamingResponse(self._stream(answer), media_type="text/event-stream")

        async def moderations(request: Request) -> Response:
            return await reply(self.moderation(await body_of(request)))

        async def embeddings(request: Request) -> Response:
            return await reply(self.embeddings(await body_of(request)))

        async def models(request: Request) -> Response:
            return JSONResponse({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})

        return Starlette(
            routes=[
                Route("/v1/chat/completions", chat, methods=["POST"]),
                # The Responses API is answered by the same handler (scripts send its SSE, e.g. raw).
                Route("/v1/responses", chat, methods=["POST"]),
                Route("/v1/moderations", moderations, methods=["POST"]),
                Route("/v1/embeddings", embeddings, methods=["POST"]),
                Route("/v1/models", models, methods=["GET"]),
            ]
        )

    async def _stream(self, script: Script) -> AsyncIterator[bytes]:
        stats = self._stats
        finished = False
        try:
            if script.first_delay:
                await anyio.sleep(script.first_delay)
            if script.raw is not None:
                yield script.raw
            else:
                for i, event in enumerate(script.events):
                    if i == script.drop_after:
                        raise ConnectionAbortedError("scripted drop")
                    if i == script.stall_after:
                        await anyio.sleep_forever()
                    if i and script.delay:
                        await anyio.sleep(script.delay)
                    yield _sse(event)
                    with stats.lock:
                        stats.events_sent += 1
                if script.stall_after is not None and script.stall_after >= len(script.events):
                    await anyio.sleep_forever()
                if script.done:
                    yield b"data: [DONE]\n\n"
            finished = True
        finally:
            with stats.ended:
                if finished:
                    stats.completed += 1
                else:
                    stats.aborted += 1
                stats.ended.notify_all()


def _sse(event: Mapping[str, Any] | str) -> bytes:
    data = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def sse_body(events: Sequence[Mapping[str, Any] | str], *, done: bool = True) -> bytes:
    """Encode events as an SSE body, as OpenAI sends it."""
    return b"".join(_sse(e) for e in events) + (b"data: [DONE]\n\n" if done else b"")


def text_chunks(
    deltas: Sequence[str],
    *,
    index: int = 0,
    finish_reason: str | None = "stop",
    model: str = "gpt-4o-mini",
    id: str = "chatcmpl-loopback",
    usage: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Chat-completion chunk dicts for one choice: a role chunk, one chunk per delta, a finish."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": id,
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": model,
            "system_fingerprint": "fp_loopback",
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": d}) for d in deltas]
    if finish_reason is not None:
        out.append(chunk({}, finish_reason))
    if usage is not None:
        out.append(
            {
                "id": id,
                "object": "chat.completion.chunk",
                "created": 1_700_000_000,
                "model": model,
                "choices": [],
                "usage": dict(usage),
            }
        )
    return out


def keyword_moderation(words: Sequence[str], *, category: str = "violence") -> ModerationHandler:
    """A Moderation-endpoint handler that flags inputs containing any of ``words``."""
    rule = re.compile("|".join(rf"\b{re.escape(w)}\b" for w in words), re.I) if words else None

    def handler(body: dict[str, Any]) -> Reply:
        inputs = body.get("input", [])
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        results = []
        for text in texts:
            hit = bool(rule and rule.search(str(text)))
            results.append(
                {
                    "flagged": hit,
                    "categories": {category: hit, "hate": False},
                    "category_scores": {category: 0.97 if hit else 0.01, "hate": 0.001},
                    "category_applied_input_types": {category: ["text"], "hate": ["text"]},
                }
            )
        model = body.get("model", "omni-moderation-latest")
        return Reply({"id": "modr-loopback", "model": model, "results": results})

    return handler


class RateLimitedModeration:
    """A Moderation-endpoint handler that allows ``requests`` per ``window`` seconds, as OpenAI does.

    Windows are fixed (aligned on the server's clock). Every reply carries OpenAI's rate-limit
    headers (``x-ratelimit-limit-requests`` as a per-minute figure, ``-remaining-requests``,
    ``-reset-requests``); past the limit the reply is a 429 ``rate_limit_exceeded`` error.
    ``accepted`` and ``rejected`` count the requests answered each way.

    Args:
        requests: Requests allowed per window.
        window: Seconds per window.
        inner: Answers the accepted requests (default: :func:`keyword_moderation` with no words).
    """

    def __init__(self, requests: int, window: float, inner: ModerationHandler | None = None) -> None:
        self.requests = requests
        self.window = window
        self.inner = inner or keyword_moderation(())
        self.accepted = 0
        self.rejected = 0
        self._lock = threading.Lock()
        self._current = -1
        self._used = 0

    def __call__(self, body: dict[str, Any]) -> Reply:
        now = time.monotonic()
        with self._lock:
            index = math.floor(now / self.window)
            if index != self._current:
                self._current, self._used = index, 0
            allowed = self._used < self.requests
            self._used += allowed
            remaining = self.requests - self._used
            if allowed:
                self.accepted += 1
            else:
                self.rejected += 1
        reset_ms = max(1, math.ceil(((index + 1) * self.window - now) * 1000))
        headers = {
            "x-ratelimit-limit-requests": str(round(self.requests * 60 / self.window)),
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": f"{reset_ms}ms",
        }
        if not allowed:
            error = {
                "message": f"Rate limit reached for requests: limit {self.requests} per {self.window}s",
                "type": "requests",
                "code": "rate_limit_exceeded",
            }
            return Reply({"error": error}, 429, headers)
        reply = self.inner(body)
        return Reply(reply.body, reply.status, {**reply.headers, **headers}, reply.delay)


_STORY_VOCAB = (
    "the a of and to in is that it for on with as was at by from this an not which one all river light "
    "stone window garden morning letter quiet harbour ledger wind north paper bridge market careful bright "
    "slowly under before after across small old green long early late open walked wrote carried opened "
    "watched kept turned answered painted gathered counted folded"
).split()


def story_chat(
    *, words: int = 60, delay: float = 0.01, first_delay: float = 0.0, flag_words: Sequence[str] = ()
) -> ChatHandler:
    """A chat handler that streams a made-up answer, deterministic per prompt, with usage.

    The answer is ``words`` words (``max_tokens`` / ``max_completion_tokens`` cut it to that many words, with
    ``finish_reason="length"``), one chunk per word after ``first_delay`` and then every ``delay``
    seconds. A word of ``flag_words`` that appears in the last user message is repeated halfway
    through the answer, so a moderator that flags it flags the answer mid-stream. The usage chunk
    (tokens counted with tiktoken; the prompt's as its text only) is sent when the request asks for
    it (``stream_options.include_usage``).
    """

    def handler(body: dict[str, Any]) -> Script:
        prompt = _last_user_text(body.get("messages"))
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
        rng = random.Random(seed)
        answer = [rng.choice(_STORY_VOCAB) for _ in range(words)]
        for i in range(11, words, 12):
            answer[i] += "."
        hits = [w for w in flag_words if re.search(rf"\b{re.escape(w)}\b", prompt, re.I)]
        if hits and words:
            answer[words // 2] = hits[0]
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = "stop"
        if isinstance(limit, int) and 0 < limit < len(answer):
            answer, finish = answer[:limit], "length"
        deltas = [w if i == 0 else " " + w for i, w in enumerate(answer)]
        model = str(body.get("model") or "gpt-4o-mini")
        options = body.get("stream_options")
        usage = None
        if isinstance(options, dict) and options.get("include_usage"):
            from ..usage import count_tokens

            prompt_tokens = count_tokens(prompt, model)
            completion_tokens = count_tokens("".join(deltas), model)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
        events = text_chunks(deltas, model=model, finish_reason=finish, usage=usage)
        return Script(events, delay=delay, first_delay=first_delay)

    return handler


def _last_user_text(messages: object) -> str:
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


_HASHED_DIMS = 64
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "a an and are as at be but by do for from has have i in is it its of on or our so that the their them "
    "they this to was we were what when which will with you your".split()
)


def hashed_embeddings(body: dict[str, Any]) -> Reply:
    """A deterministic Embeddings-endpoint handler: the :func:`hashed_vector` of each input.

    Like the real endpoint, it answers ``encoding_format="base64"`` (what the ``openai`` client
    asks for by default) with little-endian float32 bytes, and ``"float"`` with JSON numbers; an
    empty input is a 400 error.
    """
    value = body.get("input", [])
    texts = [value] if isinstance(value, str) else [str(v) for v in value]
    if not texts or any(not t for t in texts):
        return Reply({"error": {"message": "'input' cannot be empty", "type": "invalid_request_error"}}, status=400)
    dims = body.get("dimensions")
    size = dims if isinstance(dims, int) and dims > 0 else _HASHED_DIMS
    encoding_format = body.get("encoding_format", "float")
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(hashed_vector(t, size), encoding_format)}
        for i, t in enumerate(texts)
    ]
    tokens = sum(len(t.split()) for t in texts)
    return Reply(
        {
            "object": "list",
            "data": data,
            "model": body.get("model", "text-embedding-3-small"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def hashed_vector(text: str, dims: int = _HASHED_DIMS) -> list[float]:
    """The L2-normalised hashed bag of words of ``text`` (all zeros if it has no words).

    Each word (lower-cased, a trailing plural "s" dropped, common stop words skipped) adds 1 to
    one of ``dims`` buckets chosen by a stable hash (BLAKE2b, not the salted ``hash()``). So texts
    sharing words are similar, texts sharing none are nearly orthogonal (only bucket collisions),
    and all similarities are in [0, 1].
    """
    counts = [0.0] * dims
    for word in _words(text):
        bucket = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") % dims
        counts[bucket] += 1.0
    norm = math.sqrt(sum(c * c for c in counts))
    return [c / norm for c in counts] if norm else counts


def _words(text: str) -> list[str]:
    out = []
    for word in _WORD.findall(text.lower()):
        if word in _STOP:
            continue
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        out.append(word)
    return out


def _encode(vector: Sequence[float], encoding_format: object) -> str | list[float]:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return list(vector)


def _no_embeddings(body: dict[str, Any]) -> Reply:
    """The default embeddings handler: no model, as a 404 error."""
    message = f"The model {body.get('model')!r} does not exist (no embeddings handler set)"
    return Reply({"error": {"message": message, "type": "invalid_request_error", "code": "model_not_found"}}, 404)


@contextmanager
def serve(**kwargs: Any) -> Iterator[LoopbackUpstream]:
    """``with serve(chat=...) as upstream:`` — shorthand for the context manager."""
    with LoopbackUpstream(**kwargs) as upstream:
        yield upstream
