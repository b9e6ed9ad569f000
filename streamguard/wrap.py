"""One-line wrapping: ``client = wrap(AsyncOpenAI())`` (or ``wrap(OpenAI())``) and every answer is guarded.

The wrapped client is a proxy: every attribute, resource and argument goes to the real client
untouched, except

- ``chat.completions.create(..., stream=True)``: a guarded stream (:func:`streamguard.guard`;
  for a sync client :func:`streamguard.guard_sync`), used like openai's own stream (``async
  for``, ``async with``, ``close()``);
- ``responses.create(..., stream=True)``: likewise, with :func:`streamguard.guard_responses`;
- the non-streamed forms of both: the answer is moderated once (one ``moderate()`` call with
  every choice's text); a flagged choice comes back cut (empty text) or redacted, with
  ``finish_reason="content_filter"``. The upstream object is never mutated: a copy is returned.
- ``with_options(...)`` / ``copy(...)`` return a wrapped client.

With ``Policy(moderate_input=True)`` the request's input is moderated concurrently with the call;
a flagged input gives a ``content_filter`` answer (the call is cancelled if it is still running).

The default moderator is :class:`~streamguard.OpenAIModerator` on the same client. For a sync
client it is an ``AsyncOpenAI`` with the same key, base URL, organization, project and headers,
living on the sync bridge's event loop (see ``_sync.py``).

Only ``create`` is guarded: ``with_raw_response``, ``with_streaming_response``, ``parse`` and the
``stream()`` helpers pass through unguarded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

import anyio
import openai
from openai.types.chat import ChatCompletion
from openai.types.chat.chat_completion import Choice
from openai.types.responses import Response
from openai.types.responses.response import IncompleteDetails

from ._sync import SyncGuardedStream, ThreadedSource, _bridge, guard_sync, run_on_bridge
from .exceptions import ModerationError, ModerationTimeout
from .guard import guard
from .moderation._base import Moderator, Verdict
from .moderation.openai import OpenAIModerator
from .policy import Decision, Policy
from .responses import _messages, guard_responses
from .sources import input_text

__all__ = ["wrap"]

logger = logging.getLogger(__name__)

ClientT = TypeVar("ClientT", openai.OpenAI, openai.AsyncOpenAI)
T = TypeVar("T")
A = TypeVar("A", ChatCompletion, Response)


def wrap(client: ClientT, *, moderator: Moderator | None = None, policy: Policy | None = None) -> ClientT:
    """Wrap an ``openai.AsyncOpenAI`` or ``openai.OpenAI`` client so that every answer is guarded.

    Args:
        client: The client to wrap; it is used as is (not copied).
        moderator: Judges text; defaults to :class:`~streamguard.OpenAIModerator` on the same
            client (for a sync client, on an async twin of it).
        policy: As for :func:`streamguard.guard`; defaults to ``Policy()``.

    Returns:
        A proxy that behaves like ``client`` (``isinstance`` included). Streamed
        ``chat.completions.create`` / ``responses.create`` return guarded streams (typed as the
        client's own stream classes, which they stand in for).

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


class _ClientBase(_Proxy):
    _sg_moderators: _Moderators
    _sg_policy: Policy

    def __init__(self, client: Any, moderators: _Moderators, policy: Policy) -> None:
        super().__init__(client)
        object.__setattr__(self, "_sg_moderators", moderators)
        object.__setattr__(self, "_sg_policy", policy)

    def with_options(self, **options: Any) -> Any:
        """The client's ``with_options(...)``, wrapped the same way (same moderator and policy)."""
        return type(self)(self._sg_target.with_options(**options), self._sg_moderators, self._sg_policy)

    def copy(self, **options: Any) -> Any:
        """The client's ``copy(...)``, wrapped the same way."""
        return type(self)(self._sg_target.copy(**options), self._sg_moderators, self._sg_policy)


class _AsyncClient(_ClientBase):
    @property
    def chat(self) -> Any:
        return _Chat(self._sg_target.chat, _AsyncCompletions(self._sg_target.chat.completions, self))

    @property
    def responses(self) -> Any:
        return _AsyncResponses(self._sg_target.responses, self)

    async def __aenter__(self) -> _AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._sg_target.close()


class _SyncClient(_ClientBase):
    @property
    def chat(self) -> Any:
        return _Chat(self._sg_target.chat, _SyncCompletions(self._sg_target.chat.completions, self))

    @property
    def responses(self) -> Any:
        return _SyncResponses(self._sg_target.responses, self)

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


class _Chat(_Proxy):
    _sg_completions: Any

    def __init__(self, chat: Any, completions: Any) -> None:
        super().__init__(chat)
        object.__setattr__(self, "_sg_completions", completions)

    @property
    def completions(self) -> Any:
        return self._sg_completions


class _Resource(_Proxy):
    _sg_client: _ClientBase

    def __init__(self, resource: Any, client: _ClientBase) -> None:
        super().__init__(resource)
        object.__setattr__(self, "_sg_client", client)

    @property
    def _moderator(self) -> Moderator:
        return self._sg_client._sg_moderators.get()

    @property
    def _policy(self) -> Policy:
        return self._sg_client._sg_policy


class _AsyncCompletions(_Resource):
    async def create(self, **kwargs: Any) -> Any:
        """``chat.completions.create``, guarded (see the module docstring)."""
        create = self._sg_target.create
        moderator, policy = self._moderator, self._policy
        if kwargs.get("stream") is True:
            stream = await create(**kwargs)
            return guard(
                stream,
                moderator=moderator,
                policy=policy,
                model=kwargs.get("model"),
                messages=kwargs.get("messages"),
                tools=kwargs.get("tools"),
                n=kwargs.get("n"),
            )
        return await _async_create(create, kwargs, _CHAT, moderator, policy)


class _SyncCompletions(_Resource):
    def create(self, **kwargs: Any) -> Any:
        """``chat.completions.create``, guarded (see the module docstring)."""
        create = self._sg_target.create
        moderator, policy = self._moderator, self._policy
        if kwargs.get("stream") is True:
            return guard_sync(
                create(**kwargs),
                moderator=moderator,
                policy=policy,
                model=kwargs.get("model"),
                messages=kwargs.get("messages"),
                tools=kwargs.get("tools"),
                n=kwargs.get("n"),
            )
        return _sync_create(create, kwargs, _CHAT, moderator, policy)


class _AsyncResponses(_Resource):
    async def create(self, **kwargs: Any) -> Any:
        """``responses.create``, guarded (see the module docstring)."""
        create = self._sg_target.create
        moderator, policy = self._moderator, self._policy
        if kwargs.get("stream") is True:
            stream = await create(**kwargs)
            return guard_responses(
                stream, moderator=moderator, policy=policy, model=kwargs.get("model"), input=kwargs.get("input")
            )
        return await _async_create(create, kwargs, _RESPONSES, moderator, policy)


class _SyncResponses(_Resource):
    def create(self, **kwargs: Any) -> Any:
        """``responses.create``, guarded (see the module docstring)."""
        create = self._sg_target.create
        moderator, policy = self._moderator, self._policy
        if kwargs.get("stream") is True:
            source = ThreadedSource(create(**kwargs))
            model, input = kwargs.get("model"), kwargs.get("input")
            inner = guard_responses(source, moderator=moderator, policy=policy, model=model, input=input)
            return SyncGuardedStream(inner, source=source)
        return _sync_create(create, kwargs, _RESPONSES, moderator, policy)


# -- non-streamed calls ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answers(Generic[A]):
    """How the non-streamed answers of one API are guarded."""

    type: type[A]
    messages: Callable[[Mapping[str, Any]], Sequence[Mapping[str, Any]] | None]  # the request's input
    input_flagged: Callable[[A | None, Mapping[str, Any]], A]  # the answer to a flagged input
    moderate: Callable[[A, Moderator, Policy], Awaitable[A]]


async def _async_create(
    create: Callable[..., Awaitable[Any]],
    kwargs: Mapping[str, Any],
    answers: _Answers[A],
    moderator: Moderator,
    policy: Policy,
) -> Any:
    """A non-streamed ``create(**kwargs)``: input moderation (if the policy asks), then the answer's."""
    messages = answers.messages(kwargs)
    if policy.moderate_input and messages:
        answer, flagged = await _with_input_check(lambda: create(**kwargs), messages, moderator, policy)
        if flagged:
            return answers.input_flagged(answer, kwargs)
    else:
        answer = await create(**kwargs)
    if not isinstance(answer, answers.type):
        return answer
    return await answers.moderate(answer, moderator, policy)


def _sync_create(
    create: Callable[..., Any], kwargs: Mapping[str, Any], answers: _Answers[A], moderator: Moderator, policy: Policy
) -> Any:
    """:func:`_async_create` for a sync client: the call in the caller's thread, moderation on the bridge."""
    messages = answers.messages(kwargs)
    if policy.moderate_input and messages:
        answer, flagged = _sync_with_input_check(lambda: create(**kwargs), messages, moderator, policy)
        if flagged:
            return answers.input_flagged(answer, kwargs)
    else:
        answer = create(**kwargs)
    if not isinstance(answer, answers.type):
        return answer
    return run_on_bridge(answers.moderate, answer, moderator, policy)


# -- non-streamed answers -------------------------------------------------------------------------


async def moderate_completion(completion: ChatCompletion, *, moderator: Moderator, policy: Policy) -> ChatCompletion:
    """Moderate a non-streamed chat completion: each choice's text, in one ``moderate()`` call.

    Args:
        completion: The upstream answer (not mutated).
        moderator: Judges the texts.
        policy: ``action``, ``redaction``, ``moderation_timeout`` and ``on_error`` apply.

    Returns:
        ``completion`` itself when nothing is flagged (or moderation failed under fail-open),
        else a copy whose flagged choices are cut or redacted, with
        ``finish_reason="content_filter"`` and no log-probs.

    Raises:
        ModerationError: The moderator failed under ``on_error="fail_closed"``.
    """
    texts: list[str] = []
    where: list[int] = []
    for i, choice in enumerate(completion.choices):
        text = (choice.message.content or "") + (choice.message.refusal or "")
        if text:
            texts.append(text)
            where.append(i)
    decisions = await _decide(texts, moderator, policy)
    flagged = {where[k] for k, decision in enumerate(decisions) if decision is not None}
    if not flagged:
        return completion
    choices = [_filtered_choice(c, policy) if i in flagged else c for i, c in enumerate(completion.choices)]
    return completion.model_copy(update={"choices": choices})


async def _moderate_completion(completion: ChatCompletion, moderator: Moderator, policy: Policy) -> ChatCompletion:
    return await moderate_completion(completion, moderator=moderator, policy=policy)


async def moderate_response(response: Response, *, moderator: Moderator, policy: Policy) -> Response:
    """Moderate a non-streamed Responses API answer: each output text or refusal part.

    A flagged part's text is emptied (cut-off: the response becomes ``status="incomplete"`` with
    ``incomplete_details.reason == "content_filter"``) or replaced by ``policy.redaction``.

    Args:
        response: The upstream answer (not mutated).
        moderator: Judges the texts.
        policy: As for :func:`moderate_completion`.

    Returns:
        ``response`` itself when nothing is flagged, else a rewritten copy.

    Raises:
        ModerationError: The moderator failed under ``on_error="fail_closed"``.
    """
    texts: list[str] = []
    where: list[tuple[int, int]] = []
    for i, item in enumerate(response.output):
        if item.type != "message":
            continue
        for j, part in enumerate(item.content):
            text = part.text if part.type == "output_text" else part.refusal
            if text:
                texts.append(text)
                where.append((i, j))
    decisions = await _decide(texts, moderator, policy)
    flagged = {where[k] for k, decision in enumerate(decisions) if decision is not None}
    if not flagged:
        return response
    replacement = "" if policy.action == "cutoff" else policy.redaction
    output = list(response.output)
    for i, item in enumerate(output):
        if item.type != "message" or not any(i == fi for fi, _ in flagged):
            continue
        parts = list(item.content)
        for j, part in enumerate(parts):
            if (i, j) not in flagged:
                continue
            if part.type == "output_text":
                parts[j] = part.model_copy(update={"text": replacement, "annotations": [], "logprobs": None})
            else:
                parts[j] = part.model_copy(update={"refusal": replacement})
        update: dict[str, Any] = {"content": parts}
        if policy.action == "cutoff":
            update["status"] = "incomplete"
        output[i] = item.model_copy(update=update)
    update = {"output": output}
    if policy.action == "cutoff":
        update["status"] = "incomplete"
        update["incomplete_details"] = IncompleteDetails(reason="content_filter")
    return response.model_copy(update=update)


async def _moderate_response(response: Response, moderator: Moderator, policy: Policy) -> Response:
    return await moderate_response(response, moderator=moderator, policy=policy)


async def _decide(texts: Sequence[str], moderator: Moderator, policy: Policy) -> list[Decision | None]:
    """One ``moderate()`` call for ``texts`` under the policy; all ``None`` after a fail-open error."""
    if not texts:
        return []
    error: ModerationError
    try:
        with anyio.fail_after(policy.moderation_timeout):
            verdicts: list[Verdict] = await moderator.moderate(list(texts))
        if len(verdicts) != len(texts):
            raise ModerationError(f"moderator returned {len(verdicts)} verdicts for {len(texts)} texts")
        return [policy.judge(v) for v in verdicts]
    except ModerationError as exc:
        error = exc
    except TimeoutError as exc:
        error = ModerationTimeout(f"moderation took longer than {policy.moderation_timeout}s")
        error.__cause__ = exc
    except Exception as exc:
        error = ModerationError(f"moderator failed: {exc!r}")
        error.__cause__ = exc
    if policy.on_error == "fail_closed":
        raise error
    logger.warning("moderation failed; the answer goes out unmoderated (fail_open): %s", error)
    return [None] * len(texts)


def _filtered_choice(choice: Choice, policy: Policy) -> Choice:
    """``choice`` cut (empty text) or redacted, ending as ``content_filter``."""
    message = choice.message
    fields = [name for name in ("content", "refusal") if getattr(message, name)]
    update: dict[str, Any] = dict.fromkeys(fields, "")
    if policy.action == "redact" and fields:
        update[fields[0]] = policy.redaction
    if message.annotations:
        update["annotations"] = []  # they point into the text that is gone
    return choice.model_copy(
        update={"message": message.model_copy(update=update), "finish_reason": "content_filter", "logprobs": None}
    )


# -- input moderation -----------------------------------------------------------------------------


async def _input_flagged(text: str, moderator: Moderator, policy: Policy) -> bool:
    """Whether the input flags (``False`` after a fail-open error; fail-closed raises)."""
    decisions = await _decide([text], moderator, policy)
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


def _chat_input_flagged(answer: ChatCompletion | None, kwargs: Mapping[str, Any]) -> ChatCompletion:
    """The content_filter answer for a flagged input: upstream's own, every choice cut, or a made-up one."""
    cut = Policy(action="cutoff")
    if isinstance(answer, ChatCompletion):
        return answer.model_copy(update={"choices": [_filtered_choice(c, cut) for c in answer.choices]})
    choices = [
        {"index": i, "message": {"role": "assistant", "content": ""}, "finish_reason": "content_filter"}
        for i in range(kwargs.get("n") or 1)
    ]
    return ChatCompletion.model_validate(
        {
            "id": "chatcmpl-streamguard",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": kwargs.get("model") or "",
            "choices": choices,
        }
    )


def _response_input_flagged(answer: Response | None, kwargs: Mapping[str, Any]) -> Response:
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


_CHAT = _Answers(ChatCompletion, lambda kwargs: kwargs.get("messages"), _chat_input_flagged, _moderate_completion)
_RESPONSES = _Answers(
    Response, lambda kwargs: _messages(kwargs.get("input")), _response_input_flagged, _moderate_response
)
