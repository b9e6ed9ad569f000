"""One-line wrapping: ``client = wrap(AsyncOpenAI())`` (or ``wrap(OpenAI())``): every door guarded.

The wrapped client is a proxy that refuses by default. Each method reached through it is, by the
table in ``_doors.py``:

- **guarded**: ``chat.completions.create`` / ``parse`` / ``stream`` (also under ``beta.``) and
  ``responses.create`` / ``parse`` / ``stream`` / ``retrieve`` / ``cancel``. Streams come back
  guarded (:func:`streamguard.guard`, :func:`streamguard.guard_responses`; for a sync client on the
  sync bridge), used like openai's own. A non-streamed chat answer is replayed through the guard,
  so its windows and semantics are a stream's (``_answers.py``). The ``stream()`` and ``parse()``
  helpers return openai's own types built from guarded text. Any truthy ``stream`` (``1``,
  ``"true"``, ``extra_body={"stream": True}``) is sent as ``true`` and guarded as a stream.
  ``with_raw_response`` / ``with_streaming_response`` (on a resource or the client) guard the
  parsed body; raw bytes (``.content``, ``.text``, ``.json()``, ``.iter_bytes()``...) raise.
- **passed**: text-free methods (files, models, embeddings, moderations, batches, images, ...),
  returned as they are.
- **refused**: everything else, including any method the table does not know: calling it raises
  :class:`~streamguard.UnguardedError` naming the path and what to use instead.

``with_options(...)`` / ``copy(...)`` return a wrapped client. With ``Policy(moderate_input=True)``
the request's input is moderated concurrently with the call; a flagged input gives a
``content_filter`` answer (the call is cancelled if it is still running).

The default moderator is :class:`~streamguard.OpenAIModerator` on the same client. For a sync
client it is an ``AsyncOpenAI`` with the same key, base URL, organization, project and headers,
living on the sync bridge's event loop (see ``_sync.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, cast

import anyio
import openai
from openai._resource import AsyncAPIResource, SyncAPIResource
from openai.lib._parsing._completions import parse_chat_completion
from openai.lib._parsing._responses import parse_response
from openai.types import Completion
from openai.types.chat import ChatCompletion
from openai.types.responses import Response
from openai.types.responses.response import IncompleteDetails

from ._answers import decide, guard_completion, guard_response
from ._doors import door, wholly_passed
from ._legacy import AsyncChatChunks, AsyncLegacyStream, SyncChatChunks, SyncLegacyStream, guard_legacy
from ._sync import SyncGuardedStream, ThreadedSource, _bridge, guard_sync, run_on_bridge
from .exceptions import UnguardedError
from .guard import guard
from .moderation._base import Moderator
from .moderation.openai import OpenAIModerator
from .policy import Policy
from .responses import _messages, guard_responses
from .sources import input_text

__all__ = ["wrap"]

logger = logging.getLogger(__name__)

ClientT = TypeVar("ClientT", openai.OpenAI, openai.AsyncOpenAI)
T = TypeVar("T")

_MODES = ("with_raw_response", "with_streaming_response")
# What a raw or streaming response offers that is not the parsed (guarded) body.
_RAW_BODY = frozenset(
    {
        "content",
        "text",
        "json",
        "read",
        "iter_bytes",
        "iter_text",
        "iter_lines",
        "iter_raw",
        "http_response",
        "write_to_file",
        "stream_to_file",
    }
)
_FALSE = frozenset({"", "0", "false", "f", "no", "n", "off"})


def wrap(client: ClientT, *, moderator: Moderator | None = None, policy: Policy | None = None) -> ClientT:
    """Wrap an ``openai.AsyncOpenAI`` or ``openai.OpenAI`` client so that every answer is guarded.

    Args:
        client: The client to wrap; it is used as is (not copied).
        moderator: Judges text; defaults to :class:`~streamguard.OpenAIModerator` on the same
            client (for a sync client, on an async twin of it).
        policy: As for :func:`streamguard.guard`; defaults to ``Policy()``.

    Returns:
        A proxy that behaves like ``client`` (``isinstance`` included) for every door it guards or
        passes (see the module docstring).

    Raises:
        TypeError: ``client`` is neither ``openai.OpenAI`` nor ``openai.AsyncOpenAI``.
    """
    policy = policy or Policy()
    if isinstance(client, openai.AsyncOpenAI):
        return cast(ClientT, _AsyncClient(client, _Moderators(moderator or OpenAIModerator(client)), policy))
    if isinstance(client, openai.OpenAI):
        return cast(ClientT, _SyncClient(client, _Moderators(moderator, sync_client=client), policy))
    raise TypeError(f"wrap() takes an openai.OpenAI or openai.AsyncOpenAI client, got {type(client).__name__}")


class _Moderators:
    """The moderator of a wrapped client and its copies; for a sync client made lazily on the bridge."""

    def __init__(self, moderator: Moderator | None, *, sync_client: openai.OpenAI | None = None) -> None:
        self._moderator = moderator
        self._sync_client = sync_client
        self._lock = threading.Lock()
        self.async_client: openai.AsyncOpenAI | None = None

    def get(self) -> Moderator:
        if self._moderator is None:
            with self._lock:
                if self._moderator is None:
                    assert self._sync_client is not None
                    self.async_client = run_on_bridge(_async_twin, self._sync_client)
                    self._moderator = OpenAIModerator(self.async_client)
        return self._moderator


async def _async_twin(client: openai.OpenAI) -> openai.AsyncOpenAI:
    """An ``AsyncOpenAI`` like ``client`` (made on the bridge loop, which it is used on)."""
    return openai.AsyncOpenAI(
        api_key=client.api_key,
        organization=client.organization,
        project=client.project,
        base_url=client.base_url,
        timeout=client.timeout,
        max_retries=client.max_retries,
        default_headers=dict(getattr(client, "_custom_headers", {}) or {}) or None,
        default_query=dict(getattr(client, "_custom_query", {}) or {}) or None,
    )


class _Proxy:
    """Delegates every attribute it does not define to the wrapped object."""

    _sg_target: Any

    def __init__(self, target: Any) -> None:
        object.__setattr__(self, "_sg_target", target)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sg_target, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._sg_target, name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(dir(self._sg_target)) | set(super().__dir__()))

    def __repr__(self) -> str:
        return f"<streamguard-wrapped {self._sg_target!r}>"

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # isinstance(wrapped, AsyncOpenAI) stays true
        return type(self._sg_target)


def _door_attr(client: _ClientBase, target: Any, at: tuple[str, str], name: str, mode: str | None) -> Any:
    """Attribute ``name`` of ``target`` through the door table.

    ``at`` is (the path of ``target`` from the client, that path as written, views included).
    """
    value = getattr(target, name)
    if name.startswith("_"):
        return value
    path, written = at
    written = f"{written}.{name}" if written else name
    if name in _MODES:
        return _Node(value, (path, written), client, name)
    full = f"{path}.{name}" if path else name
    if _is_resource(value):
        return value if wholly_passed(full) else _Node(value, (full, written), client, mode)
    if not callable(value):
        return value
    rule = door(full)
    if rule.kind == "passed":
        return value
    shown = f"client.{written}"
    if rule.kind == "refused":
        return _refused(shown, rule.advice)
    return client._sg_guarded(full, shown, value, mode)


def _is_resource(value: object) -> bool:
    if isinstance(value, SyncAPIResource | AsyncAPIResource):
        return True
    return type(value).__name__.endswith(("WithRawResponse", "WithStreamingResponse"))


def _refused(shown: str, advice: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise UnguardedError(f"{shown}() is refused by streamguard.wrap(): {advice}")

    refuse.__name__ = shown.rsplit(".", 1)[-1]
    refuse.__qualname__ = shown
    return refuse


class _Node(_Proxy):
    """A resource of the wrapped client (or its raw/streaming-response view)."""

    _sg_at: tuple[str, str]
    _sg_client: _ClientBase
    _sg_mode: str | None

    def __init__(self, target: Any, at: tuple[str, str], client: _ClientBase, mode: str | None) -> None:
        super().__init__(target)
        object.__setattr__(self, "_sg_at", at)
        object.__setattr__(self, "_sg_client", client)
        object.__setattr__(self, "_sg_mode", mode)

    def __getattr__(self, name: str) -> Any:
        return _door_attr(self._sg_client, self._sg_target, self._sg_at, name, self._sg_mode)


class _ClientBase(_Proxy):
    _sg_moderators: _Moderators
    _sg_policy: Policy

    def __init__(self, client: Any, moderators: _Moderators, policy: Policy) -> None:
        super().__init__(client)
        object.__setattr__(self, "_sg_moderators", moderators)
        object.__setattr__(self, "_sg_policy", policy)

    def __getattr__(self, name: str) -> Any:
        return _door_attr(self, self._sg_target, ("", ""), name, None)

    @property
    def _moderator(self) -> Moderator:
        return self._sg_moderators.get()

    def with_options(self, **options: Any) -> Any:
        """The client's ``with_options(...)``, wrapped the same way (same moderator and policy)."""
        return type(self)(self._sg_target.with_options(**options), self._sg_moderators, self._sg_policy)

    def copy(self, **options: Any) -> Any:
        """The client's ``copy(...)``, wrapped the same way."""
        return type(self)(self._sg_target.copy(**options), self._sg_moderators, self._sg_policy)

    def _sg_guarded(self, path: str, shown: str, method: Callable[..., Any], mode: str | None) -> Callable[..., Any]:
        raise NotImplementedError


class _AsyncClient(_ClientBase):
    def _sg_guarded(self, path: str, shown: str, method: Callable[..., Any], mode: str | None) -> Callable[..., Any]:
        api, op = _api(path)

        def guard_raw(raw: Any, kwargs: Mapping[str, Any]) -> Any:
            return _guard_async_stream(api, raw, kwargs, self._moderator, self._sg_policy)

        async def guard_parsed(parsed: Any, kwargs: Mapping[str, Any]) -> Any:
            if isinstance(parsed, openai.AsyncStream):
                return guard_raw(parsed, kwargs)
            return await _guard_answer(api, op, kwargs, parsed, self._moderator, self._sg_policy)

        if op == "stream":

            def stream(*args: Any, **kwargs: Any) -> Any:
                return _AsyncStreamManager(method(*args, **kwargs), lambda raw: guard_raw(raw, kwargs))

            return stream
        if mode == "with_raw_response":

            async def raw_call(*args: Any, **kwargs: Any) -> Any:
                kwargs = _stream_kwargs(kwargs)
                raw = await method(*args, **kwargs)
                return _RawResponse(raw, await guard_parsed(raw.parse(), kwargs), shown)

            return raw_call
        if mode == "with_streaming_response":

            def streaming_call(*args: Any, **kwargs: Any) -> Any:
                kwargs = _stream_kwargs(kwargs)
                return _AsyncStreamingManager(method(*args, **kwargs), lambda p: guard_parsed(p, kwargs), shown)

            return streaming_call

        async def call(*args: Any, **kwargs: Any) -> Any:
            kwargs = _stream_kwargs(kwargs)
            if kwargs.get("stream") is True:
                return guard_raw(await method(*args, **kwargs), kwargs)
            moderator, policy = self._moderator, self._sg_policy
            messages = _request_messages(api, kwargs)
            flagged = False
            if policy.moderate_input and messages:
                answer, flagged = await _with_input_check(lambda: method(*args, **kwargs), messages, moderator, policy)
            else:
                answer = await method(*args, **kwargs)
            return await _guard_answer(api, op, kwargs, answer, moderator, policy, flagged)

        return call

    async def __aenter__(self) -> _AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._sg_target.close()


class _SyncClient(_ClientBase):
    def _sg_guarded(self, path: str, shown: str, method: Callable[..., Any], mode: str | None) -> Callable[..., Any]:
        api, op = _api(path)

        def guard_raw(raw: Any, kwargs: Mapping[str, Any]) -> Any:
            return _guard_sync_stream(api, raw, kwargs, self._moderator, self._sg_policy)

        def guard_parsed(parsed: Any, kwargs: Mapping[str, Any]) -> Any:
            if isinstance(parsed, openai.Stream):
                return guard_raw(parsed, kwargs)
            return run_on_bridge(_guard_answer, api, op, kwargs, parsed, self._moderator, self._sg_policy)

        if op == "stream":

            def stream(*args: Any, **kwargs: Any) -> Any:
                return _SyncStreamManager(method(*args, **kwargs), lambda raw: guard_raw(raw, kwargs))

            return stream
        if mode == "with_raw_response":

            def raw_call(*args: Any, **kwargs: Any) -> Any:
                kwargs = _stream_kwargs(kwargs)
                raw = method(*args, **kwargs)
                return _RawResponse(raw, guard_parsed(raw.parse(), kwargs), shown)

            return raw_call
        if mode == "with_streaming_response":

            def streaming_call(*args: Any, **kwargs: Any) -> Any:
                kwargs = _stream_kwargs(kwargs)
                return _SyncStreamingManager(method(*args, **kwargs), lambda p: guard_parsed(p, kwargs), shown)

            return streaming_call

        def call(*args: Any, **kwargs: Any) -> Any:
            kwargs = _stream_kwargs(kwargs)
            if kwargs.get("stream") is True:
                return guard_raw(method(*args, **kwargs), kwargs)
            moderator, policy = self._moderator, self._sg_policy
            messages = _request_messages(api, kwargs)
            flagged = False
            if policy.moderate_input and messages:
                answer, flagged = _sync_with_input_check(lambda: method(*args, **kwargs), messages, moderator, policy)
            else:
                answer = method(*args, **kwargs)
            return run_on_bridge(_guard_answer, api, op, kwargs, answer, moderator, policy, flagged)

        return call

    def close(self) -> None:
        """Close the client (and the async twin the default moderator uses, if it was made)."""
        self._sg_target.close()
        twin = self._sg_moderators.async_client
        if twin is not None:
            run_on_bridge(twin.close)

    def __enter__(self) -> _SyncClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _api(path: str) -> tuple[str, str]:
    """(``"chat"``, ``"responses"`` or ``"legacy"``, operation) of a guarded path."""
    parts = path.split(".")
    if parts[0] == "completions":
        return "legacy", parts[-1]
    return ("responses" if parts[-2] == "responses" else "chat"), parts[-1]


def _stream_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``stream`` (also one given in ``extra_body``) as a JSON boolean.

    Any truthy value streams; a string is read as pydantic reads it (``"false"``, ``"0"``, ``"no"``
    ... are false), so upstream and the client always agree on whether the answer is a stream.
    """
    out = dict(kwargs)
    extra = out.get("extra_body")
    if isinstance(extra, Mapping) and "stream" in extra:
        rest = {k: v for k, v in extra.items() if k != "stream"}
        out["extra_body"] = rest
        out["stream"] = extra["stream"]
    if "stream" in out:
        value = out["stream"]
        if isinstance(value, openai.NotGiven | openai.Omit) or value is None:
            del out["stream"]
        elif isinstance(value, str):
            out["stream"] = value.strip().lower() not in _FALSE
        else:
            out["stream"] = bool(value)
    return out


def _request_messages(api: str, kwargs: Mapping[str, Any]) -> Sequence[Mapping[str, Any]] | None:
    if api == "chat":
        messages = kwargs.get("messages")
        return messages if isinstance(messages, Sequence) else None
    if api == "legacy":
        prompt = kwargs.get("prompt")
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else None
    return _messages(kwargs.get("input"))


def _given(kwargs: Mapping[str, Any], name: str) -> Any:
    return kwargs.get(name, openai.omit)


def _guard_async_stream(api: str, raw: Any, kwargs: Mapping[str, Any], moderator: Moderator, policy: Policy) -> Any:
    if api == "legacy":
        messages = _request_messages(api, kwargs)
        inner = guard(
            AsyncChatChunks(raw), moderator=moderator, policy=policy, model=kwargs.get("model"), messages=messages
        )
        return AsyncLegacyStream(inner)
    if api == "chat":
        return guard(
            raw,
            moderator=moderator,
            policy=policy,
            model=kwargs.get("model"),
            messages=kwargs.get("messages"),
            tools=kwargs.get("tools"),
            n=kwargs.get("n"),
        )
    return guard_responses(
        raw, moderator=moderator, policy=policy, model=kwargs.get("model"), input=kwargs.get("input")
    )


def _guard_sync_stream(api: str, raw: Any, kwargs: Mapping[str, Any], moderator: Moderator, policy: Policy) -> Any:
    if api == "legacy":
        messages = _request_messages(api, kwargs)
        legacy = guard_sync(
            SyncChatChunks(raw), moderator=moderator, policy=policy, model=kwargs.get("model"), messages=messages
        )
        return SyncLegacyStream(legacy)
    if api == "chat":
        return guard_sync(
            raw,
            moderator=moderator,
            policy=policy,
            model=kwargs.get("model"),
            messages=kwargs.get("messages"),
            tools=kwargs.get("tools"),
            n=kwargs.get("n"),
        )
    source = ThreadedSource(raw)
    inner = guard_responses(
        source, moderator=moderator, policy=policy, model=kwargs.get("model"), input=kwargs.get("input")
    )
    return SyncGuardedStream(inner, source=source)


async def _guard_answer(
    api: str,
    op: str,
    kwargs: Mapping[str, Any],
    answer: object,
    moderator: Moderator,
    policy: Policy,
    input_flagged: bool | None = None,
) -> Any:
    """A non-streamed answer, judged; ``parse()`` answers re-parsed from the guarded text.

    ``input_flagged`` is the input verdict when the caller moderated the input alongside the call;
    ``None``: moderate it now if the policy asks (the raw and streaming-response views).
    """
    upstream = answer
    if input_flagged is None and policy.moderate_input:
        messages = _request_messages(api, kwargs)
        text = input_text(messages, policy.input_max_chars)[0] if messages else ""
        input_flagged = bool(text) and await _input_flagged(text, moderator, policy)
    if input_flagged:
        answer = _input_flagged_answer(api, answer, kwargs)
    if api == "chat" and isinstance(answer, ChatCompletion):
        completion = await guard_completion(answer, moderator=moderator, policy=policy)
        if op == "parse" and completion is not upstream:
            # openai's own parsing of the guarded text (a cut-off raises its ContentFilterFinishReasonError).
            return parse_chat_completion(
                response_format=_given(kwargs, "response_format"),
                input_tools=_given(kwargs, "tools"),
                chat_completion=completion,
            )
        return completion
    if api == "legacy" and isinstance(answer, Completion):
        return await guard_legacy(answer, moderator=moderator, policy=policy)
    if api == "responses" and isinstance(answer, Response):
        response = await guard_response(answer, moderator=moderator, policy=policy)
        if op == "parse" and response is not upstream:
            return parse_response(
                text_format=_given(kwargs, "text_format"), input_tools=_given(kwargs, "tools"), response=response
            )
        return response
    raise UnguardedError(
        f"{api} answered with a {type(answer).__name__}, which streamguard cannot judge; nothing was returned"
    )


class _Closer:
    """Stands in for the ``httpx`` response a helper stream closes: closes the guarded stream."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def close(self) -> None:
        self._stream.close()

    async def aclose(self) -> None:
        await self._stream.aclose()


class _SyncStreamManager:
    """``stream()``: openai's own manager and stream object, reading the guarded stream."""

    def __init__(self, manager: Any, guard_raw: Callable[[Any], Any]) -> None:
        self._manager = manager
        self._guard_raw = guard_raw

    def __enter__(self) -> Any:
        stream = self._manager.__enter__()
        guarded = self._guard_raw(stream._raw_stream)
        stream._raw_stream = guarded  # read lazily, on the first event: nothing was read yet
        stream._response = _Closer(guarded)
        return stream

    def __exit__(self, *exc: Any) -> None:
        self._manager.__exit__(*exc)


class _AsyncStreamManager:
    """``stream()`` of an async client: openai's own manager and stream object, reading the guarded stream."""

    def __init__(self, manager: Any, guard_raw: Callable[[Any], Any]) -> None:
        self._manager = manager
        self._guard_raw = guard_raw

    async def __aenter__(self) -> Any:
        stream = await self._manager.__aenter__()
        guarded = self._guard_raw(stream._raw_stream)
        stream._raw_stream = guarded  # read lazily, on the first event: nothing was read yet
        stream._response = _Closer(guarded)
        return stream

    async def __aexit__(self, *exc: Any) -> None:
        await self._manager.__aexit__(*exc)


def _raw_body(shown: str, name: str) -> UnguardedError:
    return UnguardedError(
        f"{shown}(...).{name} is the raw body, which streamguard has not judged; use .parse() (guarded)"
    )


class _RawResponse(_Proxy):
    """``with_raw_response``: headers and status as they are, ``parse()`` guarded, raw bytes refused."""

    _sg_parsed: Any
    _sg_shown: str

    def __init__(self, raw: Any, parsed: Any, shown: str) -> None:
        super().__init__(raw)
        object.__setattr__(self, "_sg_parsed", parsed)
        object.__setattr__(self, "_sg_shown", shown)

    def parse(self, *, to: Any = None) -> Any:
        """The guarded answer (``to=`` would re-read the raw body: refused)."""
        if to is not None:
            raise _raw_body(self._sg_shown, "parse(to=...)")
        return self._sg_parsed

    def __getattr__(self, name: str) -> Any:
        if name in _RAW_BODY:
            raise _raw_body(self._sg_shown, name)
        return getattr(self._sg_target, name)


class _StreamingResponse(_Proxy):
    """``with_streaming_response``'s response: ``parse()`` guarded, raw bytes refused."""

    _sg_guard: Callable[[Any], Any]
    _sg_shown: str

    def __init__(self, response: Any, guard_parsed: Callable[[Any], Any], shown: str) -> None:
        super().__init__(response)
        object.__setattr__(self, "_sg_guard", guard_parsed)
        object.__setattr__(self, "_sg_shown", shown)

    def __getattr__(self, name: str) -> Any:
        if name in _RAW_BODY:
            raise _raw_body(self._sg_shown, name)
        return getattr(self._sg_target, name)


class _SyncStreamingResponse(_StreamingResponse):
    def parse(self, *, to: Any = None) -> Any:
        """The guarded answer."""
        if to is not None:
            raise _raw_body(self._sg_shown, "parse(to=...)")
        return self._sg_guard(self._sg_target.parse())


class _AsyncStreamingResponse(_StreamingResponse):
    async def parse(self, *, to: Any = None) -> Any:
        """The guarded answer."""
        if to is not None:
            raise _raw_body(self._sg_shown, "parse(to=...)")
        return await self._sg_guard(await self._sg_target.parse())


class _SyncStreamingManager:
    def __init__(self, manager: Any, guard_parsed: Callable[[Any], Any], shown: str) -> None:
        self._manager, self._guard, self._shown = manager, guard_parsed, shown

    def __enter__(self) -> Any:
        return _SyncStreamingResponse(self._manager.__enter__(), self._guard, self._shown)

    def __exit__(self, *exc: Any) -> None:
        self._manager.__exit__(*exc)


class _AsyncStreamingManager:
    def __init__(self, manager: Any, guard_parsed: Callable[[Any], Awaitable[Any]], shown: str) -> None:
        self._manager, self._guard, self._shown = manager, guard_parsed, shown

    async def __aenter__(self) -> Any:
        return _AsyncStreamingResponse(await self._manager.__aenter__(), self._guard, self._shown)

    async def __aexit__(self, *exc: Any) -> None:
        await self._manager.__aexit__(*exc)


def _input_flagged_answer(api: str, answer: object, kwargs: Mapping[str, Any]) -> Any:
    if api == "legacy":
        return _legacy_input_flagged(answer, kwargs)
    return _chat_input_flagged(answer, kwargs) if api == "chat" else _response_input_flagged(answer, kwargs)


def _legacy_input_flagged(answer: object, kwargs: Mapping[str, Any]) -> Completion:
    """The content_filter answer to a flagged prompt: every choice empty."""
    if isinstance(answer, Completion):
        choices = [
            c.model_copy(update={"text": "", "finish_reason": "content_filter", "logprobs": None})
            for c in answer.choices
        ]
        return answer.model_copy(update={"choices": choices})
    return Completion.model_validate(
        {
            "id": "cmpl-streamguard",
            "object": "text_completion",
            "created": int(time.time()),
            "model": kwargs.get("model") or "",
            "choices": [{"index": 0, "text": "", "finish_reason": "content_filter"}],
        }
    )


# -- input moderation -----------------------------------------------------------------------------


async def _input_flagged(text: str, moderator: Moderator, policy: Policy) -> bool:
    """Whether the input flags (``False`` after a fail-open error; fail-closed raises)."""
    decisions = await decide([text], moderator, policy)
    return decisions[0] is not None


async def _with_input_check(
    call: Callable[[], Awaitable[T]], messages: Sequence[Mapping[str, Any]], moderator: Moderator, policy: Policy
) -> tuple[T | None, bool]:
    """Run ``call()`` and input moderation concurrently; a flagged input or an error cancels the call.

    Returns the answer (``None`` if the call was cancelled) and whether the input flagged.
    """
    text, _ = input_text(messages, policy.input_max_chars)
    if not text:
        return await call(), False
    outcome: dict[str, Any] = {}
    answer: T | None = None
    try:
        async with anyio.create_task_group() as tg:

            async def check() -> None:
                try:
                    outcome["flagged"] = await _input_flagged(text, moderator, policy)
                except Exception as exc:  # re-raised below, as itself (not in an ExceptionGroup)
                    outcome["error"] = exc
                if outcome.get("flagged") or "error" in outcome:
                    tg.cancel_scope.cancel("input moderation ended the call")

            tg.start_soon(check)
            answer = await call()
    except BaseExceptionGroup as group:
        # ``check`` never raises: this is the call's own error (openai's exception), surfaced as itself.
        if len(group.exceptions) != 1:
            raise
        error = group.exceptions[0]
        raise error from error.__cause__
    if "error" in outcome:
        raise outcome["error"]
    return answer, bool(outcome.get("flagged"))


def _sync_with_input_check(
    call: Callable[[], T], messages: Sequence[Mapping[str, Any]], moderator: Moderator, policy: Policy
) -> tuple[T | None, bool]:
    """Input moderation on the bridge loop while ``call()`` runs in the caller's thread."""
    text, _ = input_text(messages, policy.input_max_chars)
    if not text:
        return call(), False
    future = _bridge().start_task_soon(_input_flagged, text, moderator, policy)
    try:
        answer = call()
    except BaseException:
        future.cancel()
        raise
    return answer, future.result()


def _chat_input_flagged(answer: object, kwargs: Mapping[str, Any]) -> ChatCompletion:
    """The content_filter answer for a flagged input: upstream's own with every choice cut, or a made-up one."""
    if isinstance(answer, ChatCompletion):
        choices = [
            c.model_copy(
                update={
                    "message": c.message.model_copy(
                        update={"content": "", "refusal": None, "tool_calls": None, "function_call": None}
                    ),
                    "finish_reason": "content_filter",
                    "logprobs": None,
                }
            )
            for c in answer.choices
        ]
        return answer.model_copy(update={"choices": choices})
    choices_ = [
        {"index": i, "message": {"role": "assistant", "content": ""}, "finish_reason": "content_filter"}
        for i in range(kwargs.get("n") or 1)
    ]
    return ChatCompletion.model_validate(
        {
            "id": "chatcmpl-streamguard",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": kwargs.get("model") or "",
            "choices": choices_,
        }
    )


def _response_input_flagged(answer: object, kwargs: Mapping[str, Any]) -> Response:
    """The content_filter answer for a flagged input on the Responses API."""
    if isinstance(answer, Response):
        return answer.model_copy(
            update={
                "output": [],
                "status": "incomplete",
                "incomplete_details": IncompleteDetails(reason="content_filter"),
            }
        )
    return Response.model_construct(
        id="resp_streamguard",
        object="response",
        created_at=time.time(),
        status="incomplete",
        incomplete_details=IncompleteDetails(reason="content_filter"),
        output=[],
    )
