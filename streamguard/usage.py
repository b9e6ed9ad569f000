"""Token accounting for guarded streams, with tiktoken and no network.

A streamed completion carries ``usage`` only when the request asked for it
(``stream_options={"include_usage": True}``), and many providers never send it. A
:class:`UsageTracker` sees every upstream chunk and every chunk shown to the consumer, and at the
end gives a ``CompletionUsage``: upstream's own object, unchanged, when there was one
(``source == "upstream"``), otherwise an estimate (``source == "estimated"``).

What is counted:

- **Prompt tokens**: the chat-format recipe of OpenAI's cookbook ("How to count tokens with
  tiktoken", ``num_tokens_from_messages`` / ``num_tokens_for_tools``), see
  :func:`count_prompt_tokens`.
- **Completion tokens**: everything upstream generated, for every choice: content, refusal, tool
  call names and arguments, including text withheld after a cut-off, because that is what is
  billed. Tokens actually shown are reported separately (:attr:`UsageTracker.shown_completion_tokens`).
  Hidden reasoning tokens of reasoning models never appear in the stream, so for those models the
  estimate is a lower bound.

Counting is incremental. tiktoken first splits text into pieces with a regex, then encodes each
piece on its own, so a piece that can no longer change as text is appended can be counted at once.
Appending text only ever changes the last two pieces of a split (a word growing, a whitespace run
giving its last space to the next word, ``'`` + ``r`` becoming ``'re``); each counter therefore keeps
those two as a pending tail and re-splits only the tail plus the new delta (text from two pieces
before a code point unassigned in Python's Unicode database stays pending, because the `regex`
module's newer Unicode tables may split around it unlike tiktoken's). The sum equals
``len(encoding.encode_ordinary(whole_text))``; ``tests/unit/test_usage.py`` checks this as a property.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import regex  # type: ignore[import-untyped]  # tiktoken's own dependency; \p{L} needs it
import tiktoken
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionChunk

from ._encodings import encoding_spec, get_encoding, peek_encoding

__all__ = [
    "DEFAULT_ENCODING",
    "UsageSource",
    "UsageTracker",
    "count_prompt_tokens",
    "count_tokens",
    "encoding_for_model",
    "encoding_name_for_model",
]

UsageSource = Literal["upstream", "estimated"]

#: Encoding for models streamguard does not recognise (newer OpenAI models, other providers, None).
DEFAULT_ENCODING = "o200k_base"

# Checked in order, against the lower-cased name without an ``ft:`` or ``provider/`` prefix.
_ENCODING_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # gpt-3.5-turbo (gpt-35-turbo on Azure) and OpenAI's embeddings, before "gpt-NN" below
    (re.compile(r"(gpt-3\.5|gpt-35|text-embedding-ada-002|text-embedding-3)"), "cl100k_base"),
    # gpt-4o, chatgpt-4o, gpt-4.1, gpt-4.5, o1/o3/o4..., gpt-5 and later, gpt-oss
    (re.compile(r"(chatgpt-4o|gpt-4o|gpt-4\.[1-9]|o[1-9](\b|-)|gpt-oss|gpt-([5-9]|[1-9]\d))"), "o200k_base"),
    # gpt-4, gpt-4-turbo, gpt-4-32k
    (re.compile(r"gpt-4"), "cl100k_base"),
)

# Cookbook constants for function definitions (num_tokens_for_tools), by encoding family:
# gpt-4o/gpt-4o-mini values for o200k_base models, gpt-4/gpt-3.5-turbo values for cl100k_base.
_FUNC_INIT = {"o200k_base": 7, "cl100k_base": 10}
_PROP_INIT = 3
_PROP_KEY = 3
_ENUM_INIT = -3
_ENUM_ITEM = 3
_FUNC_END = 12

# Pieces of a split that appended text can still change (see the module docstring).
_HOLD_BACK = 2


def encoding_name_for_model(model: str | None) -> str:
    """The tiktoken encoding name streamguard uses for ``model``.

    ``o200k_base`` for gpt-4o, gpt-4.1, gpt-4.5, gpt-5 and later, and the o-series;
    ``cl100k_base`` for gpt-4 (incl. turbo) and gpt-3.5-turbo. Unknown models (including
    non-OpenAI ones and ``None``) fall back to :data:`DEFAULT_ENCODING`, ``o200k_base``: the
    encoding of every current OpenAI chat model, so an estimate for a look-alike is close.

    Args:
        model: A model name as sent or as reported by the stream, e.g. ``"gpt-4o-2024-08-06"``,
            ``"ft:gpt-4o-mini:org::id"`` or ``"openai/gpt-4.1"``.

    Returns:
        ``"o200k_base"`` or ``"cl100k_base"``.
    """
    if not model:
        return DEFAULT_ENCODING
    name = model.lower().rsplit("/", 1)[-1].removeprefix("ft:")
    for pattern, encoding in _ENCODING_RULES:
        if pattern.match(name):
            return encoding
    return DEFAULT_ENCODING


def _is_known_model(model: str | None) -> bool:
    """True when a rule (not the fallback) decides the encoding of ``model``."""
    name = (model or "").lower().rsplit("/", 1)[-1].removeprefix("ft:")
    return any(pattern.match(name) for pattern, _ in _ENCODING_RULES)


def encoding_for_model(model: str | None) -> tiktoken.Encoding:
    """The tiktoken encoding for ``model``, loaded offline and built once per process.

    Args:
        model: A model name, or None for the fallback (see :func:`encoding_name_for_model`).

    Returns:
        The encoding.

    Raises:
        ConfigError: The rank file is missing or corrupt; the message names the fix.
    """
    return get_encoding(encoding_name_for_model(model))


def count_tokens(text: str, model: str | None) -> int:
    """Number of tokens ``text`` encodes to for ``model``.

    Special-token strings such as ``<|endoftext|>`` count as ordinary text, as they do in a request.

    Args:
        text: Any text.
        model: A model name, or None for the fallback encoding.

    Returns:
        The token count.
    """
    return len(encoding_for_model(model).encode_ordinary(text))


def count_prompt_tokens(
    messages: Sequence[Mapping[str, Any]],
    model: str | None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> int:
    """Estimate the prompt tokens of a chat completions request.

    Follows the OpenAI cookbook "How to count tokens with tiktoken"
    (openai/openai-cookbook ``examples/How_to_count_tokens_with_tiktoken.ipynb``):

    - ``num_tokens_from_messages``: 3 tokens per message plus the tokens of each string value
      (role, content, name), 1 more per ``name`` (gpt-3.5-turbo-0301: 4 per message, -1 per
      name), and 3 for the reply priming ``<|start|>assistant<|message|>``. This is exact for
      plain-text messages on gpt-4, gpt-3.5-turbo and gpt-4o-family models.
    - ``num_tokens_for_tools``: per function 7 tokens (10 for cl100k_base models) plus
      ``name:description``, 3 more if it has properties, per property 3 plus
      ``name:type:description`` (-3 for an enum, then 3 plus the item per enum item), and 12 once
      at the end. OpenAI does not publish its tool formatting; this is the cookbook's fitted
      approximation, and nested schemas are counted only at the top level.

    Approximations beyond the cookbook: content-part lists count their ``text``/``refusal`` parts
    (images, audio and files are not counted); an assistant message's ``tool_calls`` count each
    function's name and arguments; ``tool_call_id`` is not counted (it is not part of the text the
    model reads).

    Args:
        messages: The request's ``messages``, as dicts.
        model: The request's model; picks the encoding and the constants.
        tools: The request's ``tools``, as dicts.

    Returns:
        The estimated prompt tokens.
    """
    name = encoding_name_for_model(model)
    encoding = get_encoding(name)

    def tokens(text: str) -> int:
        return len(encoding.encode_ordinary(text))

    legacy = bool(model) and "gpt-3.5-turbo-0301" in str(model)
    per_message, per_name = (4, -1) if legacy else (3, 1)
    total = 3  # every reply is primed with <|start|>assistant<|message|>
    for message in messages:
        total += per_message
        for key, value in message.items():
            if key == "tool_call_id":
                continue
            total += _value_tokens(value, tokens)
            if key == "name":
                total += per_name
    if tools:
        total += _tools_tokens(tools, tokens, _FUNC_INIT[name])
    return total


def _value_tokens(value: object, tokens: Callable[[str], int]) -> int:
    """Tokens of one message value: a string, content parts, tool calls or a function call."""
    if isinstance(value, str):
        return tokens(value)
    if isinstance(value, Mapping):
        if "function" in value:  # one tool call
            return _value_tokens(value["function"], tokens)
        return sum(_value_tokens(value.get(key), tokens) for key in ("text", "refusal", "name", "arguments"))
    if isinstance(value, Sequence):
        return sum(_value_tokens(item, tokens) for item in value)
    return 0


def _tools_tokens(tools: Sequence[Mapping[str, Any]], tokens: Callable[[str], int], func_init: int) -> int:
    """The cookbook's ``num_tokens_for_tools`` estimate for the function definitions."""
    total = 0
    for tool in tools:
        function: Mapping[str, Any] = tool.get("function") or tool
        total += func_init
        description = str(function.get("description") or "").removesuffix(".")
        total += tokens(f"{function.get('name', '')}:{description}")
        properties: Mapping[str, Any] = (function.get("parameters") or {}).get("properties") or {}
        if properties:
            total += _PROP_INIT
            for key, prop in properties.items():
                total += _PROP_KEY
                if "enum" in prop:
                    total += _ENUM_INIT
                    for item in prop["enum"]:
                        total += _ENUM_ITEM + tokens(str(item))
                p_desc = str(prop.get("description") or "").removesuffix(".")
                total += tokens(f"{key}:{prop.get('type', '')}:{p_desc}")
    return total + _FUNC_END if tools else total


@functools.cache
def _splitter(encoding_name: str) -> Callable[[str], list[str]]:
    """tiktoken's pre-tokenizer for ``encoding_name``: text -> pieces."""
    findall: Callable[[str], list[str]] = regex.compile(encoding_spec(encoding_name).pat_str).findall
    return findall


# Deltas kept uncounted while the encoding loads; past this, counting waits for it.
_EARLY_DELTAS = 4096

# Text is pre-tokenized and encoded in batches of at least this many characters.
_BATCH_CHARS = 256


class _IncrementalCounter:
    """Token count of a growing text, encoding each settled regex piece once."""

    __slots__ = ("_committed", "_encode", "_pending", "_split", "_stuck_at")

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self._encode = encoding.encode_ordinary
        self._split = _splitter(encoding.name)
        self._committed = 0
        self._pending = ""
        self._stuck_at: int | None = None  # offset in _pending of the first unassigned code point

    def feed(self, text: str) -> None:
        """Append ``text``."""
        if not text:
            return
        pending = self._pending + text
        if self._stuck_at is None and not text.isascii():
            # `regex` may know code points that tiktoken's Rust tables do not (newer Unicode) and
            # split around them differently; from two pieces before one, everything stays pending
            # and is encoded by tiktoken itself. Exact, but that tail is re-split on every delta.
            for offset, char in enumerate(text):
                if unicodedata.category(char) == "Cn":
                    self._stuck_at = len(self._pending) + offset
                    break
        if len(pending) < _BATCH_CHARS:
            # Split and encode once per batch of text, not per delta: a delta costs an append.
            self._pending = pending
            return
        pieces = self._split(pending)
        keep = _HOLD_BACK
        if self._stuck_at is not None:
            end = 0
            for index, piece in enumerate(pieces):
                end += len(piece)
                if end > self._stuck_at:
                    keep = max(keep, len(pieces) - index + _HOLD_BACK)
                    break
        if len(pieces) <= keep:
            self._pending = pending
            return
        settled = pieces[:-keep]
        encode = self._encode
        self._committed += sum(len(encode(piece)) for piece in settled)
        consumed = sum(map(len, settled))
        self._pending = pending[consumed:]
        if self._stuck_at is not None:
            self._stuck_at -= consumed

    @property
    def tokens(self) -> int:
        """Tokens of everything fed so far."""
        return self._committed + (len(self._encode(self._pending)) if self._pending else 0)


# A counter per (choice index, field, tool-call index): separate texts never merge into one token.
_Key = tuple[int, str, int]


class _LazyCounter:
    """Token count of a growing text, encoded only when asked (and then cached)."""

    __slots__ = ("_cached", "_encode", "_parts")

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self._encode = encoding.encode_ordinary
        self._parts: list[str] = []
        self._cached: tuple[int, int] = (0, 0)  # (parts counted, tokens)

    def feed(self, text: str) -> None:
        self._parts.append(text)

    @property
    def tokens(self) -> int:
        if self._cached[0] != len(self._parts):
            self._cached = (len(self._parts), len(self._encode("".join(self._parts))))
        return self._cached[1]


class _ChoiceCounters:
    """Counters for every generated text of every choice.

    ``lazy``: keep the text and encode it when the count is read, instead of per batch. Used for
    the shown text, which is read once at the end: a delta then costs one list append.
    """

    __slots__ = ("_counters", "_early", "_encoding", "_lazy", "_model")

    def __init__(self, *, lazy: bool = False) -> None:
        self._counters: dict[_Key, _IncrementalCounter | _LazyCounter] = {}
        self._encoding: tiktoken.Encoding | None = None
        self._lazy = lazy
        # Text seen before the encoding was built (it loads in a worker thread, see
        # UsageTracker.warm_up): kept, not waited for, so the first deltas never block the loop.
        self._early: list[tuple[_Key, str]] = []
        self._model: str | None = None

    def feed(self, chunk: ChatCompletionChunk, model: str | None) -> None:
        for choice in chunk.choices:
            delta = getattr(choice, "delta", None)
            if delta is None:  # e.g. Azure's asynchronous content-filter annotations
                continue
            index = choice.index
            if delta.content:
                self._feed((index, "content", 0), delta.content, model)
            if delta.refusal:
                self._feed((index, "refusal", 0), delta.refusal, model)
            for call in delta.tool_calls or ():
                if call.function is not None:
                    self._feed((index, "tool_name", call.index), call.function.name, model)
                    self._feed((index, "tool_arguments", call.index), call.function.arguments, model)
            if delta.function_call is not None:
                self._feed((index, "function_name", 0), delta.function_call.name, model)
                self._feed((index, "function_arguments", 0), delta.function_call.arguments, model)

    def _feed(self, key: _Key, text: str | None, model: str | None) -> None:
        if not text:
            return
        encoding = self._encoding
        if encoding is None:
            encoding = peek_encoding(encoding_name_for_model(model))
            if encoding is None and len(self._early) < _EARLY_DELTAS:
                self._early.append((key, text))
                self._model = model
                return
            self._resolve(model)
        counter = self._counters.get(key)
        if counter is None:
            assert self._encoding is not None
            kind = _LazyCounter if self._lazy else _IncrementalCounter
            counter = self._counters[key] = kind(self._encoding)
        counter.feed(text)

    def _resolve(self, model: str | None) -> None:
        """Build (or wait for) the encoding, then count the text kept while it loaded."""
        self._encoding = encoding_for_model(model)
        early, self._early = self._early, []
        for key, text in early:
            self._feed(key, text, model)

    @property
    def tokens(self) -> int:
        if self._early:
            self._resolve(self._model)
        return sum(counter.tokens for counter in self._counters.values())


class UsageTracker:
    """Accounts the tokens of one streamed chat completion.

    The engine calls :meth:`observe` with every upstream chunk, in order, before moderation, and
    :meth:`observe_shown` with every chunk it yields to the consumer. :meth:`usage` then returns
    upstream's ``CompletionUsage`` unchanged if the stream carried one, else an estimate.

    Example:
        ```python
        tracker = UsageTracker(model="gpt-4o", messages=messages)
        for chunk in upstream:
            tracker.observe(chunk)
        tracker.usage().completion_tokens
        ```
    """

    def __init__(
        self,
        *,
        model: str | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Create a tracker for one request.

        Args:
            model: The request's model. The model the stream's chunks name replaces it when it is a
                snapshot of it (``gpt-4o`` -> ``gpt-4o-2024-08-06``) or when streamguard does not
                recognise it (Azure deployment names); with neither, ``o200k_base`` is used.
            messages: The request's messages. None means the prompt is unknown: the estimated
                ``prompt_tokens`` is then 0.
            tools: The request's tool definitions, counted into the prompt.
        """
        self._model = model
        self._messages = None if messages is None else list(messages)
        self._tools = None if tools is None else list(tools)
        self._upstream: CompletionUsage | None = None
        self._generated = _ChoiceCounters()
        self._shown = _ChoiceCounters(lazy=True)
        self._prompt_tokens: int | None = None

    @property
    def model(self) -> str | None:
        """The model whose encoding is used: see ``model`` in :meth:`__init__`."""
        return self._model

    @property
    def ready(self) -> bool:
        """Whether the encoding for the request's model is built already."""
        return peek_encoding(encoding_name_for_model(self._model)) is not None

    def warm_up(self) -> None:
        """Build the encoding now (blocking; meant for a worker thread) so counting never waits."""
        encoding_for_model(self._model)

    def observe(self, chunk: ChatCompletionChunk) -> None:
        """Account one upstream chunk: generated text of every choice, and its ``usage``.

        Args:
            chunk: The next chunk from upstream, before any moderation.
        """
        if chunk.model and chunk.model != self._model:
            # The served snapshot ("gpt-4o" -> "gpt-4o-2024-08-06") or, for an unrecognised request
            # model (an Azure deployment name), whatever the stream names.
            if not _is_known_model(self._model) or chunk.model.startswith(self._model or ""):
                self._model = chunk.model
        if chunk.usage is not None:
            # Providers that send cumulative usage on every chunk: the last one is the total.
            self._upstream = chunk.usage
        self._generated.feed(chunk, self._model)

    def observe_shown(self, chunk: ChatCompletionChunk) -> None:
        """Account one chunk yielded to the consumer (its text counts as shown).

        Args:
            chunk: A chunk exactly as yielded; its ``usage``, if any, is ignored.
        """
        self._shown.feed(chunk, self._model)

    @property
    def upstream_usage(self) -> CompletionUsage | None:
        """The usage upstream sent, unchanged, or None."""
        return self._upstream

    @property
    def source(self) -> UsageSource:
        """``"upstream"`` if upstream sent usage, else ``"estimated"``."""
        return "upstream" if self._upstream is not None else "estimated"

    @property
    def generated_completion_tokens(self) -> int:
        """Estimated tokens upstream generated so far, across choices (shown or not)."""
        return self._generated.tokens

    @property
    def shown_completion_tokens(self) -> int:
        """Estimated tokens of the text shown to the consumer, across choices."""
        return self._shown.tokens

    @property
    def estimated_prompt_tokens(self) -> int:
        """:func:`count_prompt_tokens` of the request; 0 when ``messages`` was not given."""
        if self._prompt_tokens is None:
            self._prompt_tokens = (
                0 if self._messages is None else count_prompt_tokens(self._messages, self._model, self._tools)
            )
        return self._prompt_tokens

    def usage(self) -> CompletionUsage:
        """The usage to report: upstream's object itself if it sent one, else an estimate.

        The estimate has ``prompt_tokens`` from the request's messages and tools (0 when the
        tracker was given no ``messages``) and ``completion_tokens`` for everything generated
        in every choice, including text withheld after a cut-off. Hidden reasoning tokens are
        not in the stream and so not in the estimate.

        Returns:
            A ``CompletionUsage``.
        """
        if self._upstream is not None:
            return self._upstream
        prompt = self.estimated_prompt_tokens
        completion = self.generated_completion_tokens
        return CompletionUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
