"""streamguard inside LiteLLM's proxy: a custom guardrail that runs streams through :func:`~streamguard.guard`.

LiteLLM hands a guardrail that overrides ``async_post_call_streaming_iterator_hook`` the whole
iterator of a streamed answer (``ModelResponseStream`` chunks) and adds nothing of its own there,
so :class:`StreamGuardrail` feeds that iterator to streamguard's engine and gives LiteLLM back
what the engine releases: sliding windows, hold-back or stream-first, a cut-off that ends the
choice with ``finish_reason="content_filter"`` (a normal ending, not an error frame) and closes
upstream, redaction. Usage stays LiteLLM's: its usage chunk passes through in its place and
nothing is synthesized. Non-streamed answers go through the same engine (the message is fed in
as a stream), so a cut-off keeps the clean prefix and redaction replaces only flagged windows.

The request's messages are moderated too when ``streamguard_moderate_input`` is on: for a
stream inside the engine, concurrently with generation (a flagged input ends every choice with
``content_filter``); for a non-streamed request in LiteLLM's ``during_call`` hook, which runs
beside the upstream call, when the guardrail's ``mode`` lists ``during_call`` (else after it).

Configuration comes from the guardrail's ``litellm_params`` in LiteLLM's ``config.yaml``; each
option is its environment variable's name in lower case (``streamguard_moderator`` for
``STREAMGUARD_MODERATOR``), and the environment is the fallback. The ``streamguard_`` prefix
keeps the options apart from LiteLLM's own ``mode`` and ``action``. One moderator is built per
configuration and shared by every request of the process, so windows of concurrent streams are
batched into the same moderation calls.

This module imports ``litellm`` (extra ``[litellm]``); ``import streamguard`` never does.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import anyio
from litellm.integrations.custom_guardrail import CustomGuardrail
from litellm.types.guardrails import GuardrailEventHooks
from litellm.types.utils import (
    ChatCompletionMessageCustomToolCall,
    ChatCompletionMessageToolCall,
    ModelResponse,
    ModelResponseStream,
)

from ..exceptions import ConfigError
from ..guard import guard
from ..moderation import KeywordModerator, LocalModerator, Moderator, OpenAIModerator
from ..policy import Policy

__all__ = ["GuardrailConfig", "GuardrailStartupError", "StreamGuardrail"]

logger = logging.getLogger(__name__)

ModeratorName = Literal["openai", "local", "keyword"]

_PREFIX = "streamguard_"
_MODERATORS = ("openai", "local", "keyword")
# Policy fields set from an option of the same name (after the prefix), and how each is parsed.
_INT_FIELDS = ("window_chars", "first_window_chars", "overlap_chars", "max_in_flight", "input_max_chars")
_FLOAT_FIELDS = ("window_growth", "flush_after", "moderation_timeout", "close_timeout")
_STR_FIELDS = ("mode", "action", "redaction", "on_error")
_BOOL_FIELDS = ("moderate_input",)
_OWN_FIELDS = ("moderator", "keywords", "moderation_base_url", "moderation_api_key", "moderation_model")
OPTIONS = tuple(_PREFIX + name for name in (*_OWN_FIELDS, *_STR_FIELDS, *_INT_FIELDS, *_FLOAT_FIELDS, *_BOOL_FIELDS))
"""Every option's name as a ``litellm_params`` key; the environment variable is its upper case."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
# Input verdicts of non-streamed requests, from the during_call hook to the post-call hook. Bounded,
# because a request that fails upstream never reaches the post-call hook to collect its entry.
_MAX_PENDING_INPUTS = 10_000
# A word with the whitespace before it, or trailing whitespace: how a non-streamed answer is split.
_WORDS = re.compile(r"\s*\S+|\s+")


@dataclass(frozen=True, kw_only=True)
class GuardrailConfig:
    """What a :class:`StreamGuardrail` does, read from ``litellm_params`` and the environment.

    Attributes:
        moderator: ``"openai"`` (the Moderation endpoint), ``"local"``
            (:class:`~streamguard.LocalModerator`) or ``"keyword"``
            (:class:`~streamguard.KeywordModerator` with ``keywords``).
        keywords: Patterns of the keyword moderator.
        moderation_base_url: Base URL of the Moderation endpoint (default: OpenAI's).
        moderation_api_key: Its API key (default: ``OPENAI_API_KEY``).
        moderation_model: The moderation model asked for.
        policy: The :class:`~streamguard.Policy` every request is guarded with (``include_usage``
            is off: usage is LiteLLM's).
    """

    moderator: ModeratorName = "openai"
    keywords: tuple[str, ...] = ()
    moderation_base_url: str | None = None
    moderation_api_key: str | None = None
    moderation_model: str = "omni-moderation-latest"
    policy: Policy = Policy(include_usage=False)

    @classmethod
    def from_params(cls, params: Mapping[str, object], environ: Mapping[str, str] | None = None) -> GuardrailConfig:
        """Read the ``streamguard_*`` options of ``params``, falling back to ``environ``.

        Args:
            params: The guardrail's ``litellm_params`` (other keys are LiteLLM's and ignored).
                A string value ``"os.environ/NAME"`` is read from the environment variable
                ``NAME``, as LiteLLM does for its own keys.
            environ: Environment variables; ``os.environ`` by default.

        Raises:
            ConfigError: An unknown ``streamguard_*`` option, or a value that cannot work,
                naming the option and what it accepts.
        """
        env = os.environ if environ is None else environ
        unknown = sorted(k for k in params if k.lower().startswith(_PREFIX) and k.lower() not in OPTIONS)
        if unknown:
            raise ConfigError(f"unknown streamguard option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
        values: dict[str, tuple[str, object]] = {}
        for option in OPTIONS:
            if params.get(option) is not None:
                values[option[len(_PREFIX) :]] = (option, _resolve(option, params[option], env))
            elif env.get(option.upper(), "") != "":
                values[option[len(_PREFIX) :]] = (option.upper(), env[option.upper()])

        moderator = _text(values.get("moderator"), "openai")
        if moderator not in _MODERATORS:
            where = values["moderator"][0]
            raise ConfigError(f"{where} must be one of 'openai', 'local', 'keyword', got {moderator!r}")
        keywords = _keywords(values.get("keywords"))
        if moderator == "keyword" and not keywords:
            raise ConfigError(
                "the keyword moderator needs STREAMGUARD_KEYWORDS (comma-separated) or streamguard_keywords"
            )

        fields: dict[str, Any] = {"include_usage": False}
        for name in _STR_FIELDS:
            if name in values:
                fields[name] = _text(values[name], "")
        for name in _INT_FIELDS:
            if name in values:
                fields[name] = _number(values[name], int)
        for name in _FLOAT_FIELDS:
            if name in values:
                fields[name] = _number(values[name], float)
        for name in _BOOL_FIELDS:
            if name in values:
                fields[name] = _flag(values[name])
        try:
            policy = Policy(**fields)
        except ConfigError as exc:
            raise ConfigError(f"streamguard guardrail: {exc}") from exc
        base_url = values.get("moderation_base_url")
        api_key = values.get("moderation_api_key")
        return cls(
            moderator=cast(ModeratorName, moderator),
            keywords=keywords,
            moderation_base_url=_text(base_url, "") or None,
            moderation_api_key=_text(api_key, "") or None,
            moderation_model=_text(values.get("moderation_model"), "omni-moderation-latest"),
            policy=policy,
        )

    def build_moderator(self) -> Moderator:
        """A new moderator for this configuration (use :func:`shared_moderator` to share one).

        Raises:
            ConfigError: The local moderator is not installed, or the OpenAI moderator has no key.
        """
        if self.moderator == "keyword":
            return KeywordModerator(list(self.keywords))
        if self.moderator == "local":
            return LocalModerator()
        import openai

        api_key = self.moderation_api_key or os.environ.get("OPENAI_API_KEY")
        if not api_key:
            raise ConfigError(
                "the openai moderator needs STREAMGUARD_MODERATION_API_KEY, streamguard_moderation_api_key "
                "or OPENAI_API_KEY"
            )
        client = openai.AsyncOpenAI(api_key=api_key, base_url=self.moderation_base_url)
        return OpenAIModerator(client, model=self.moderation_model)

    def _key(self) -> tuple[object, ...]:
        return (self.moderator, self.keywords, self.moderation_base_url, self.moderation_api_key, self.moderation_model)


_shared: dict[tuple[object, ...], Moderator] = {}


def shared_moderator(config: GuardrailConfig) -> Moderator:
    """The process's one moderator for ``config``'s moderator settings, built on first use."""
    key = config._key()
    moderator = _shared.get(key)
    if moderator is None:
        moderator = _shared[key] = config.build_moderator()
    return moderator


class GuardrailStartupError(RuntimeError):
    """A :class:`StreamGuardrail` was configured so that it cannot work; the proxy must not start.

    Not a ``ValueError`` (as :class:`~streamguard.ConfigError` is) on purpose: LiteLLM skips a
    guardrail whose constructor raises ``ValueError`` or ``TypeError`` and starts without it,
    which would serve every request unguarded. This error stops LiteLLM's startup instead.
    """


class StreamGuardrail(CustomGuardrail):
    """A LiteLLM guardrail that moderates answers with streamguard's sliding windows.

    In LiteLLM's ``config.yaml``::

        guardrails:
          - guardrail_name: streamguard
            litellm_params:
              guardrail: streamguard.integrations.litellm.StreamGuardrail
              mode: [post_call, during_call]
              default_on: true
              streamguard_moderator: keyword        # or STREAMGUARD_MODERATOR in the environment

    Args:
        **kwargs: What LiteLLM passes: ``guardrail_name``, ``event_hook``, ``default_on`` and
            every ``litellm_params`` key; the ``streamguard_*`` ones configure the guard (see
            :meth:`GuardrailConfig.from_params`), the rest go to ``CustomGuardrail``.

    Raises:
        GuardrailStartupError: The configuration cannot work (its ``__cause__`` is the
            :class:`~streamguard.ConfigError` that says why).
    """

    def __init__(self, **kwargs: Any) -> None:
        params = {k: kwargs.pop(k) for k in list(kwargs) if k.lower().startswith(_PREFIX)}
        try:
            self.config = GuardrailConfig.from_params(params)
            self.moderator = shared_moderator(self.config)
        except ConfigError as exc:
            raise GuardrailStartupError(f"streamguard guardrail {kwargs.get('guardrail_name')!r}: {exc}") from exc
        # id(request dict) -> (that dict, whether its input was flagged). Keyed by the dict itself,
        # not by litellm_call_id, which a client may set (x-litellm-call-id) to collide with another.
        self._input_flags: OrderedDict[int, tuple[dict[str, Any], bool]] = OrderedDict()
        kwargs.setdefault("supported_event_hooks", [GuardrailEventHooks.post_call, GuardrailEventHooks.during_call])
        super().__init__(**kwargs)

    async def async_post_call_streaming_iterator_hook(
        self,
        user_api_key_dict: Any,
        response: Any,
        request_data: dict[str, Any],
    ) -> AsyncGenerator[ModelResponseStream, None]:
        """Guard a streamed answer: LiteLLM's chunks in, the released chunks out."""
        policy = self.config.policy
        bridge = _Bridge(response)
        guarded = guard(
            bridge.chunks(),
            moderator=self.moderator,
            policy=policy,
            model=_str_or_none(request_data.get("model")),
            messages=_messages(request_data),
            tools=_list_or_none(request_data.get("tools")),
            n=_int_or_none(request_data.get("n")),
        )
        try:
            async for out in guarded:
                yield bridge.back(out)
        finally:
            # Shielded: LiteLLM closes this generator when its client leaves, maybe while cancelled.
            with anyio.move_on_after(policy.close_timeout * 2, shield=True):
                await guarded.aclose()

    async def async_moderation_hook(self, data: dict[str, Any], user_api_key_dict: Any, call_type: Any) -> None:
        """During the upstream call of a non-streamed request: moderate its messages, beside it.

        The verdict is applied by the post-call hook (a flagged input ends every choice with
        ``content_filter`` and no text). Streams moderate their input inside the engine instead.
        """
        if not self.config.policy.moderate_input or data.get("stream") or not _messages(data):
            return
        self._input_flags[id(data)] = (data, await self._input_flagged(data))
        while len(self._input_flags) > _MAX_PENDING_INPUTS:
            self._input_flags.popitem(last=False)

    async def async_post_call_success_hook(self, data: dict[str, Any], user_api_key_dict: Any, response: Any) -> Any:
        """Moderate a non-streamed answer with the same windows and semantics as a stream.

        Returns:
            A new ``ModelResponse`` when something was cut or redacted, else ``None`` (unchanged).
        """
        known = self._input_verdict(data)
        if not isinstance(response, ModelResponse):
            return None
        if self.should_run_guardrail(data=data, event_type=GuardrailEventHooks.post_call) is not True:
            return None
        if known:
            return _blocked(response)
        check_input = self.config.policy.moderate_input and known is None
        return await _moderate_answer(response, data, self.moderator, self.config.policy, check_input)

    async def async_post_call_failure_hook(
        self,
        request_data: dict[str, Any],
        original_exception: Exception,
        user_api_key_dict: Any,
        traceback_str: str | None = None,
    ) -> None:
        """The upstream call failed: forget the input verdict kept for its post-call hook."""
        self._input_verdict(request_data)

    def _input_verdict(self, data: dict[str, Any]) -> bool | None:
        """Take the during-call verdict on ``data``'s input (``None`` if there is none)."""
        kept = self._input_flags.pop(id(data), None)
        return kept[1] if kept is not None and kept[0] is data else None

    async def _input_flagged(self, data: Mapping[str, Any]) -> bool:
        policy = replace(self.config.policy, mode="holdback", moderate_input=True)
        end = {"id": "input", "object": "chat.completion.chunk", "created": 0, "model": "input"}
        end["choices"] = [{"index": 0, "delta": {}, "finish_reason": "stop"}]
        guarded = guard(_iterate([end]), moderator=self.moderator, policy=policy, messages=_messages(data))
        try:
            async for _ in guarded:
                pass
        finally:
            await guarded.aclose()
        return any(flag.source == "input" for flag in guarded.report.flags)


class _Bridge:
    """LiteLLM's chunks to chunk dicts for the engine, and what it releases back to LiteLLM's chunks.

    A chunk the engine releases unchanged (the same dict) goes back as LiteLLM's own object; an
    edited one becomes a new ``ModelResponseStream`` carrying the hidden params (cost, headers)
    of the upstream chunk seen last. A usage chunk (LiteLLM gives it an empty choice) enters as
    OpenAI's ``choices == []`` shape, which the engine keeps in its place and never edits, and
    leaves as LiteLLM's original.
    """

    def __init__(self, response: AsyncIterable[Any]) -> None:
        self._response = response
        self._same: dict[int, tuple[dict[str, Any], Any]] = {}
        self._choiceless: deque[Any] = deque()
        self._last: Any = None

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        iterator = aiter(self._response)
        try:
            async for chunk in iterator:
                data = _dump(chunk)
                if data.get("usage") is not None and _only_empty_choices(data):
                    data["choices"] = []
                if not data.get("choices"):
                    self._choiceless.append(chunk)
                else:
                    self._same[id(data)] = (data, chunk)
                self._last = chunk
                yield data
        finally:
            close = getattr(iterator, "aclose", None)
            if close is not None:
                await close()

    def back(self, out: Any) -> Any:
        if isinstance(out, dict):
            kept = self._same.pop(id(out), None)
            if kept is not None and kept[0] is out:
                return kept[1]
            data = out
        else:
            data = out.model_dump(exclude_none=True)
        if not data.get("choices") and self._choiceless:
            return self._choiceless.popleft()
        chunk = ModelResponseStream(**data)
        if self._last is not None:
            chunk.hidden_params = dict(self._last.hidden_params)
        return chunk


async def _moderate_answer(
    response: ModelResponse, data: Mapping[str, Any], moderator: Moderator, policy: Policy, check_input: bool
) -> ModelResponse | None:
    """Feed a non-streamed answer through the engine as a stream; a new answer if it was changed."""
    # A non-streamed answer is shown only when whole, so nothing may pass before its verdict.
    policy = replace(policy, mode="holdback", moderate_input=check_input)
    chunks = _as_chunks(response)
    guarded = guard(
        _iterate(chunks),
        moderator=moderator,
        policy=policy,
        model=_str_or_none(data.get("model")),
        messages=_messages(data),
        n=len(response.choices) or None,
    )
    released: list[dict[str, Any]] = []
    try:
        async for out in guarded:
            released.append(out if isinstance(out, dict) else out.model_dump(exclude_none=True))
    finally:
        await guarded.aclose()
    before = _assemble(chunks)
    after = _assemble(released)
    if after == before:
        return None
    result = response.model_copy(deep=True)
    for choice in result.choices:
        old, new = before.get(choice.index, _Message()), after.get(choice.index, _Message())
        if new == old:
            continue
        message = choice.message
        choice.finish_reason = cast(Any, new.finish_reason or "content_filter")
        if new.content != old.content:
            message.content = new.content if new.content or message.content is not None else None
        if new.refusal != old.refusal:
            message.refusal = new.refusal or None
        if new.reasoning != old.reasoning:
            message.reasoning_content = new.reasoning or None
            message.thinking_blocks = None  # the provider's copy of the reasoning, unmoderated
        if new.tool_calls != old.tool_calls:
            calls: list[ChatCompletionMessageToolCall | ChatCompletionMessageCustomToolCall] = [
                ChatCompletionMessageToolCall(
                    function={"name": c["name"], "arguments": c["arguments"]}, id=c["id"], type="function"
                )
                for c in new.tool_calls or ()
            ]
            message.tool_calls = calls or None
    return result


@dataclass
class _Message:
    content: str = ""
    reasoning: str = ""
    refusal: str = ""
    tool_calls: list[dict[str, str]] | None = None
    finish_reason: str | None = None


def _as_chunks(response: ModelResponse) -> list[dict[str, Any]]:
    """A non-streamed answer as the stream it could have been: per choice, word by word, then its finish.

    Word-sized deltas, as a model streams them, so a cut-off keeps the clean text before the
    flagged window and redaction replaces only the flagged window.
    """
    head = {"id": response.id, "object": "chat.completion.chunk", "created": response.created, "model": response.model}
    chunks = []
    for choice in response.choices:
        message = choice.message
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        deltas += [{"reasoning_content": w} for w in _WORDS.findall(getattr(message, "reasoning_content", None) or "")]
        deltas += [{"content": w} for w in _WORDS.findall(message.content or "")]
        deltas += [{"refusal": w} for w in _WORDS.findall(getattr(message, "refusal", None) or "")]
        for i, call in enumerate(message.tool_calls or ()):
            first = _tool_call_delta(i, call)
            arguments = first["function"]["arguments"]
            first["function"]["arguments"] = ""
            deltas.append({"tool_calls": [first]})
            deltas += [{"tool_calls": [{"index": i, "function": {"arguments": w}}]} for w in _WORDS.findall(arguments)]
        for delta in deltas:
            chunks.append({**head, "choices": [{"index": choice.index, "delta": delta, "finish_reason": None}]})
        finish = choice.finish_reason or "stop"
        chunks.append({**head, "choices": [{"index": choice.index, "delta": {}, "finish_reason": finish}]})
    return chunks


def _tool_call_delta(index: int, call: Any) -> dict[str, Any]:
    """A tool call of a message as a stream delta; a custom tool's input counts as its arguments."""
    function = getattr(call, "function", None)
    if function is not None:
        name, arguments = function.name or "", function.arguments or ""
    else:
        custom = getattr(call, "custom", None)
        name, arguments = getattr(custom, "name", "") or "", getattr(custom, "input", "") or ""
    return {"index": index, "id": call.id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _assemble(chunks: Sequence[Mapping[str, Any]]) -> dict[int, _Message]:
    """Per choice, the text, tool calls and finish that a list of chunks adds up to."""
    messages: dict[int, _Message] = {}
    for chunk in chunks:
        for choice in chunk.get("choices") or ():
            message = messages.setdefault(int(choice.get("index", 0)), _Message())
            delta = choice.get("delta") or {}
            message.content += delta.get("content") or ""
            message.reasoning += delta.get("reasoning_content") or delta.get("reasoning") or ""
            message.refusal += delta.get("refusal") or ""
            for call in delta.get("tool_calls") or ():
                calls = message.tool_calls = message.tool_calls or []
                while len(calls) <= int(call.get("index", 0)):
                    calls.append({"id": "", "name": "", "arguments": ""})
                slot = calls[int(call.get("index", 0))]
                function = call.get("function") or {}
                slot["id"] += call.get("id") or ""
                slot["name"] += function.get("name") or ""
                slot["arguments"] += function.get("arguments") or ""
            if choice.get("finish_reason"):
                message.finish_reason = choice["finish_reason"]
    return messages


def _blocked(response: ModelResponse) -> ModelResponse:
    """The answer to a flagged input: every choice ended with ``content_filter``, no text."""
    result = response.model_copy(deep=True)
    for choice in result.choices:
        choice.finish_reason = "content_filter"
        choice.message.content = ""
        choice.message.tool_calls = None
        choice.message.refusal = None
        choice.message.reasoning_content = None
        choice.message.thinking_blocks = None
    return result


def _dump(chunk: Any) -> dict[str, Any]:
    if isinstance(chunk, dict):
        return dict(chunk)
    return cast(dict[str, Any], chunk.model_dump(exclude_none=True))


def _only_empty_choices(data: Mapping[str, Any]) -> bool:
    for choice in data.get("choices") or ():
        delta = choice.get("delta") or {}
        if choice.get("finish_reason") or any(v not in (None, "", [], {}) for v in delta.values()):
            return False
    return True


async def _iterate(items: Sequence[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for item in items:
        yield item


def _messages(data: Mapping[str, Any]) -> list[Mapping[str, Any]] | None:
    messages = data.get("messages")
    return [m for m in messages if isinstance(m, Mapping)] if isinstance(messages, list) else None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _list_or_none(value: object) -> list[Mapping[str, Any]] | None:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else None


def _resolve(option: str, value: object, env: Mapping[str, str]) -> object:
    """LiteLLM's ``os.environ/NAME`` indirection for a config value."""
    if isinstance(value, str) and value.startswith("os.environ/"):
        name = value[len("os.environ/") :]
        if name not in env:
            raise ConfigError(f"{option} refers to the environment variable {name}, which is not set")
        return env[name]
    return value


def _text(item: tuple[str, object] | None, default: str) -> str:
    if item is None:
        return default
    where, value = item
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value.strip()


def _keywords(item: tuple[str, object] | None) -> tuple[str, ...]:
    if item is None:
        return ()
    where, value = item
    if isinstance(value, str):
        parts = value.split(",")
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        parts = value
    else:
        raise ConfigError(f"{where} must be a comma-separated string or a list of strings, got {value!r}")
    return tuple(p.strip() for p in parts if p.strip())


def _number(item: tuple[str, object], kind: Callable[[str], int] | Callable[[str], float]) -> int | float:
    where, value = item
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if kind is int and isinstance(value, int):
        return value
    if kind is float and isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            pass
    noun = "an integer" if kind is int else "a number"
    raise ConfigError(f"{where} must be {noun}, got {value!r}")


def _flag(item: tuple[str, object]) -> bool:
    where, value = item
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{where} must be true or false, got {value!r}")
