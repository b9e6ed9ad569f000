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

Counting is incremental and linear in the text: each counter keeps the text not yet encoded and,
once it holds a batch, encodes it with tiktoken itself up to the last *firm boundary* (a space
between an ASCII letter or digit and an ASCII letter, where every piece pattern of tiktoken's
pre-tokenizer ends one piece and starts the next), so the sum equals
``len(encoding.encode_ordinary(whole_text))`` whatever the Unicode version of the text;
``tests/unit/test_usage.py`` checks this as a property. Only a run of 64 KiB without such a
boundary is cut elsewhere (then the count may be off by a token).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import tiktoken
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionChunk

from ._encodings import get_encoding, peek_encoding

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


# Text is encoded in batches of at least this many characters, cut at a firm piece boundary.
_BATCH_CHARS = 2048
# A run this long with no firm boundary is encoded anyway, keeping a short tail (see _Counter).
_FORCE_CHARS = 65536
_FORCE_TAIL = 64


def _firm_boundary(text: str) -> int | None:
    """The last offset at which tiktoken's pre-tokenizer surely starts a new piece, or None.

    A space with an ASCII letter or digit before it and an ASCII letter after it: every piece
    pattern of cl100k_base and o200k_base ends a word or number before the space, and the space
    starts the next word's piece. What is before such an offset encodes the same alone as in the
    whole text, whatever Unicode version either side's tables know.
    """
    end = len(text) - 1
    for _ in range(64):
        i = text.rfind(" ", 1, end)
        if i < 1:
            return None
        before, after = text[i - 1], text[i + 1]
        if before.isascii() and before.isalnum() and after.isascii() and after.isalpha():
            return i
        end = i
    return None


class _Counter:
    """Token count of a growing text, in linear time: settled text is encoded once, in batches."""

    __slots__ = ("_committed", "_encoding_name", "_next", "_parts", "_size")

    def __init__(self, encoding_name: str) -> None:
        self._encoding_name = encoding_name
        self._parts: list[str] = []
        self._size = 0
        self._next = _BATCH_CHARS
        self._committed = 0

    def feed(self, text: str) -> None:
        self._parts.append(text)
        self._size += len(text)
        if self._size >= self._next:
            self._settle()

    def _settle(self) -> None:
        encoding = peek_encoding(self._encoding_name)
        if encoding is None:
            # It is loading in a worker thread (never on the event loop): count once it is there.
            self._next = self._size + _BATCH_CHARS
            return
        text = "".join(self._parts)
        cut = _firm_boundary(text)
        if cut is None:
            if len(text) < _FORCE_CHARS:
                # No boundary yet: look again only when the text has doubled (amortised linear).
                self._parts = [text]
                self._next = 2 * len(text)
                return
            cut = len(text) - _FORCE_TAIL  # a very long run without spaces: off by a token at most
        self._committed += len(encoding.encode_ordinary(text[:cut]))
        rest = text[cut:]
        self._parts = [rest] if rest else []
        self._size = len(rest)
        self._next = _BATCH_CHARS

    @property
    def tokens(self) -> int:
        """Tokens of everything fed so far."""
        if not self._parts:
            return self._committed
        encoding = get_encoding(self._encoding_name)
        return self._committed + len(encoding.encode_ordinary("".join(self._parts)))


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
        self._generated: dict[tuple[int, str], _Counter] = {}
        self._shown: dict[tuple[int, str], _Counter] = {}
        self._prompt_tokens: int | None = None
        self._encoding_name = encoding_name_for_model(model)

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
        if chunk.model:
            self.see_model(chunk.model)
        if chunk.usage is not None:
            self.upstream(chunk.usage)
        for index, key, text in _chunk_texts(chunk):
            self.count(index, key, text, False)

    def observe_shown(self, chunk: ChatCompletionChunk) -> None:
        """Account one chunk yielded to the consumer (its text counts as shown).

        Args:
            chunk: A chunk exactly as yielded; its ``usage``, if any, is ignored.
        """
        for index, key, text in _chunk_texts(chunk):
            self.count(index, key, text, True)

    def see_model(self, model: str) -> None:
        """The model a chunk names: it replaces the request's when it is a snapshot of it
        (``gpt-4o`` -> ``gpt-4o-2024-08-06``) or when the request's is not recognised."""
        if model != self._model and (not _is_known_model(self._model) or model.startswith(self._model or "")):
            self._model = model
            if not self._generated and not self._shown:
                self._encoding_name = encoding_name_for_model(model)

    def upstream(self, usage: Any) -> None:
        """Usage upstream sent (providers that send it on every chunk: the last is the total)."""
        if isinstance(usage, Mapping):
            usage = CompletionUsage.model_validate(usage) if _valid_usage(usage) else CompletionUsage.construct(**usage)
        self._upstream = usage

    def count(self, choice: int, key: str, text: str, shown: bool) -> None:
        """Account ``text`` of ``choice``'s channel ``key``: generated, or (``shown``) released."""
        counters = self._shown if shown else self._generated
        counter = counters.get((choice, key))
        if counter is None:
            counter = counters[(choice, key)] = _Counter(self._encoding_name)
        counter.feed(text)

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
        return sum(c.tokens for c in self._generated.values())

    @property
    def shown_completion_tokens(self) -> int:
        """Estimated tokens of the text shown to the consumer, across choices."""
        return sum(c.tokens for c in self._shown.values())

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


def _valid_usage(usage: Mapping[str, Any]) -> bool:
    return all(isinstance(usage.get(k), int) for k in ("prompt_tokens", "completion_tokens", "total_tokens"))


def _chunk_texts(chunk: ChatCompletionChunk) -> list[tuple[int, str, str]]:
    """(choice, counter key, text) of every generated text in ``chunk``."""
    out: list[tuple[int, str, str]] = []
    for choice in chunk.choices or ():
        delta = getattr(choice, "delta", None)
        if delta is None:  # e.g. Azure's asynchronous content-filter annotations
            continue
        index = choice.index
        if delta.content:
            out.append((index, "content", delta.content))
        if delta.refusal:
            out.append((index, "refusal", delta.refusal))
        extra = delta.__pydantic_extra__ or {}
        for name in ("reasoning_content", "reasoning"):
            if isinstance(extra.get(name), str) and extra[name]:
                out.append((index, "reasoning", extra[name]))
        for call in delta.tool_calls or ():
            if call.function is not None:
                if call.function.name:
                    out.append((index, f"tool_name:{call.index}", call.function.name))
                if call.function.arguments:
                    out.append((index, f"tool:{call.index}", call.function.arguments))
        if delta.function_call is not None:
            if delta.function_call.name:
                out.append((index, "tool_name", delta.function_call.name))
            if delta.function_call.arguments:
                out.append((index, "function", delta.function_call.arguments))
    return out
