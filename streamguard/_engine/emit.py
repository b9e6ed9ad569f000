"""The chat-chunk shape: take text out of chunks for the core, and build the chunks it releases.

Chunks come as ``ChatCompletionChunk`` objects or as plain dicts (a JSON-decoded SSE event);
what comes out has the shape that went in, and a chunk the core releases unchanged is the very
object that came in (so a proxy can forward its original bytes).

Text channels of a choice's delta: ``content``, ``refusal``, ``reasoning_content`` or
``reasoning`` (channel ``reasoning``), each ``tool_calls[i].function.arguments`` (``tool:<i>``),
``function_call.arguments`` (``function``), ``audio.transcript`` (``audio``). A delta field the
adapter does not know that carries text is dropped (and reported), never passed on unmoderated.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from openai.types.chat import ChatCompletionChunk

from ..exceptions import StreamFormatError
from ..sources import as_chunk
from .core import Edit, TextPart

__all__ = ["ChatShape", "Unit"]

#: One single-choice (or choice-less) unit for the core: original, choice, texts, finish, opens, names.
Unit = tuple[Any, int | None, list[TextPart], str | None, tuple[str, ...], tuple[str, ...]]

# Delta fields whose meaning is known (text channels, or text-free).
_KNOWN_DELTA = frozenset(
    {"role", "content", "refusal", "tool_calls", "function_call", "audio", "reasoning_content", "reasoning"}
)
_REASONING = ("reasoning_content", "reasoning")

#: A text longer than this is fed to the core in slices (each its own output chunk), so no
#: single step holds the event loop for long.
SLICE_CHARS = 8192
# Delta keys of nearly every chunk: a delta with no others takes the fast path in `_dict_choice`.
_PLAIN_DELTA = frozenset({"content", "role", "refusal"})

_KINDS = {"content": "content", "refusal": "refusal", "reasoning": "reasoning", "function": "tool_arguments"}


def channel_kind(key: str) -> str:
    """The ``Policy.channels`` kind of a channel key."""
    if key.startswith("tool:"):
        return "tool_arguments"
    return _KINDS.get(key, key)


class ChatShape:
    """Reads chat chunks (objects or dicts) into units, and builds released chunks back."""

    def __init__(self, model: str | None = None) -> None:
        self.model = model
        self.dicts: bool | None = None  # the shape of what came in (None: nothing yet)
        self.usage: Any = None  # the last usage upstream sent
        self.moderation: Any = None  # the provider's own moderation, when a chunk carried it
        self.dropped: list[str] = []
        self.template: Any = None
        self.new_model: str | None = None  # set when a chunk names a model not seen before
        self.notice = False  # set when usage, moderation, a dropped field or a new model came
        self._last_model: Any = None

    # -- in ----------------------------------------------------------------------------------

    def units(self, raw: Any) -> list[Unit]:
        """The units of one upstream chunk, in order (several for an ``n > 1`` chunk or a long text)."""
        # The first chunk decides the output's shape; a later chunk of the other shape is converted.
        if type(raw) is dict and self.dicts:
            return self._dict_units(raw)
        if isinstance(raw, ChatCompletionChunk):
            if self.dicts:
                return self._dict_units(raw.model_dump(exclude_unset=True))
            self.dicts = False
            return self._object_units(raw)
        if isinstance(raw, Mapping):
            if self.dicts is False:
                return self._object_units(as_chunk(raw))
            self.dicts = True
            return self._dict_units(raw if isinstance(raw, dict) else dict(raw))
        raise StreamFormatError(f"expected a chat completion chunk (object or dict), got {type(raw).__name__}")

    def _object_units(self, chunk: ChatCompletionChunk) -> list[Unit]:
        if self.template is None:
            self.template = chunk
        if chunk.usage is not None:
            self.usage = chunk.usage
            self.notice = True
        if chunk.moderation is not None:
            self.moderation = chunk.moderation
            self.notice = True
        if chunk.model != self._last_model:
            self._last_model = chunk.model
            if isinstance(chunk.model, str) and chunk.model:
                self.new_model = chunk.model
                self.notice = True
        choices = chunk.choices
        if choices is None or not isinstance(choices, list):
            raise StreamFormatError("a chunk's `choices` is not a list")
        if not choices:
            return [(chunk, None, [], None, (), ())]
        if len(choices) == 1:
            return self._object_choice(chunk, choices[0])
        out: list[Unit] = []
        for choice in choices:
            out.extend(self._object_choice(chunk.model_copy(update={"choices": [choice]}), choice))
        return out

    def _object_choice(self, chunk: ChatCompletionChunk, choice: Any) -> list[Unit]:
        index = getattr(choice, "index", None)
        if not isinstance(index, int):
            raise StreamFormatError("a choice has no integer `index`")
        delta = getattr(choice, "delta", None)
        finish = getattr(choice, "finish_reason", None)
        if delta is None:  # e.g. Azure's content-filter annotations
            return [(chunk, index, [], finish, (), ())]
        opens: tuple[str, ...] = ()
        names: tuple[str, ...] = ()
        content = delta.content
        refusal = delta.refusal
        extra = delta.__pydantic_extra__
        if (
            content
            and refusal is None
            and not extra
            and delta.tool_calls is None
            and delta.function_call is None
            and delta.audio is None
            and isinstance(content, str)
            and len(content) <= SLICE_CHARS
        ):
            return [(chunk, index, [("content", "content", content)], finish, (), ())]  # the hot path
        texts: list[TextPart] = []
        if content:
            texts.append(("content", "content", _text(content, "content")))
        if refusal:
            texts.append(("refusal", "refusal", _text(refusal, "refusal")))
        if extra:
            unknown = False
            for name in _REASONING:
                value = extra.get(name)
                if value:
                    texts.append(("reasoning", name, _text(value, name)))
            for name, value in extra.items():
                if name not in _KNOWN_DELTA and _has_text(value):
                    unknown = True
                    self.notice = True
                    self._drop(f"delta.{name}")
            if unknown:
                kept = {k: v for k, v in extra.items() if k in _KNOWN_DELTA or not _has_text(v)}
                delta = delta.model_copy()
                delta.__pydantic_extra__ = kept
                chunk = chunk.model_copy(update={"choices": [choice.model_copy(update={"delta": delta})]})
        calls = delta.tool_calls
        if calls:
            for call in calls:
                key = f"tool:{call.index}"
                fn = call.function
                args = fn.arguments if fn is not None else None
                if args:
                    texts.append((key, "arguments", _text(args, "arguments")))
                if call.id or (fn is not None and fn.name):
                    opens += (key,)
                    if fn is not None and fn.name:
                        names += (fn.name,)
        fc = delta.function_call
        if fc is not None:
            if fc.arguments:
                texts.append(("function", "arguments", _text(fc.arguments, "arguments")))
            if fc.name:
                opens += ("function",)
                names += (fc.name,)
        audio = delta.audio
        if audio is not None and audio.transcript:
            texts.append(("audio", "transcript", _text(audio.transcript, "transcript")))
        unit: Unit = (chunk, index, texts, finish, opens, names)
        return self._sliced(unit) if _long(texts) else [unit]

    def _dict_units(self, chunk: dict[str, Any]) -> list[Unit]:
        if self.template is None:
            self.template = chunk
        if chunk.get("usage") is not None:
            self.usage = chunk["usage"]
            self.notice = True
        if chunk.get("moderation") is not None:
            self.moderation = chunk["moderation"]
            self.notice = True
        model = chunk.get("model")
        if model != self._last_model:
            self._last_model = model
            if isinstance(model, str) and model:
                self.new_model = model
                self.notice = True
        if "error" in chunk and "choices" not in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, Mapping) else error
            raise StreamFormatError(f"upstream sent an error event: {message}")
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise StreamFormatError("a chunk's `choices` is missing or not a list")
        if not choices:
            return [(chunk, None, [], None, (), ())]
        if len(choices) == 1:
            return self._dict_choice(chunk, choices[0])
        out: list[Unit] = []
        for choice in choices:
            out.extend(self._dict_choice({**chunk, "choices": [choice]}, choice))
        return out

    def _dict_choice(self, chunk: dict[str, Any], choice: Any) -> list[Unit]:
        if type(choice) is dict:
            # The fast path: a delta of content/refusal text (and the role) only, of normal length.
            delta = choice.get("delta")
            index = choice.get("index")
            if type(delta) is dict and type(index) is int and delta.keys() <= _PLAIN_DELTA:
                texts: list[TextPart] = []
                content = delta.get("content")
                if content:
                    texts.append(("content", "content", _text(content, "content")))
                refusal = delta.get("refusal")
                if refusal:
                    texts.append(("refusal", "refusal", _text(refusal, "refusal")))
                unit: Unit = (chunk, index, texts, choice.get("finish_reason"), (), ())
                return self._sliced(unit) if texts and _long(texts) else [unit]
        return self._dict_choice_general(chunk, choice)

    def _dict_choice_general(self, chunk: dict[str, Any], choice: Any) -> list[Unit]:
        if not isinstance(choice, Mapping):
            raise StreamFormatError("a choice is not an object")
        index = choice.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            raise StreamFormatError("a choice has no integer `index`")
        finish = choice.get("finish_reason")
        delta = choice.get("delta")
        if delta is None:
            return [(chunk, index, [], finish, (), ())]
        if not isinstance(delta, Mapping):
            raise StreamFormatError("a choice's `delta` is not an object")
        texts: list[TextPart] = []
        opens: tuple[str, ...] = ()
        names: tuple[str, ...] = ()
        unknown = [k for k in delta if k not in _KNOWN_DELTA and _has_text(delta[k])]
        if unknown:
            for name in unknown:
                self._drop(f"delta.{name}")
            self.notice = True
            delta = {k: v for k, v in delta.items() if k not in unknown}
            chunk = {**chunk, "choices": [{**choice, "delta": delta}]}
        for name, key in (("content", "content"), ("refusal", "refusal"), *((n, "reasoning") for n in _REASONING)):
            value = delta.get(name)
            if value:
                texts.append((key, name, _text(value, name)))
        for call in delta.get("tool_calls") or ():
            if not isinstance(call, Mapping):
                raise StreamFormatError("a tool call is not an object")
            key = f"tool:{call.get('index', 0)}"
            fn = call.get("function") or {}
            if not isinstance(fn, Mapping):
                raise StreamFormatError("a tool call's `function` is not an object")
            if fn.get("arguments"):
                texts.append((key, "arguments", _text(fn["arguments"], "arguments")))
            if call.get("id") or fn.get("name"):
                opens += (key,)
                if fn.get("name"):
                    names += (str(fn["name"]),)
        fc = delta.get("function_call")
        if isinstance(fc, Mapping):
            if fc.get("arguments"):
                texts.append(("function", "arguments", _text(fc["arguments"], "arguments")))
            if fc.get("name"):
                opens += ("function",)
                names += (str(fc["name"]),)
        audio = delta.get("audio")
        if isinstance(audio, Mapping) and audio.get("transcript"):
            texts.append(("audio", "transcript", _text(audio["transcript"], "transcript")))
        unit: Unit = (chunk, index, texts, finish, opens, names)
        return self._sliced(unit) if _long(texts) else [unit]

    def _sliced(self, unit: Unit) -> list[Unit]:
        """A unit whose text is very long, as several units of at most SLICE_CHARS each."""
        original, index, texts, finish, opens, names = unit
        assert index is not None
        out: list[Unit] = []
        pending: list[TextPart] = []
        for key, field, text in texts:
            for i in range(0, len(text), SLICE_CHARS):
                pending.append((key, field, text[i : i + SLICE_CHARS]))
        for n, part in enumerate(pending):
            first, last = n == 0, n == len(pending) - 1
            keep = {(part[0], part[1])}
            edit = Edit(
                index,
                {(k, f): (part[2] if (k, f) in keep else "") for k, f, _ in texts},
                frozenset(),
                finish if last else None,
                drop_logprobs=True,
            )
            piece = self.build(original, edit)
            out.append((piece, index, [part], finish if last else None, opens if first else (), names if first else ()))
        return out

    def _drop(self, name: str) -> None:
        if name not in self.dropped:
            self.dropped.append(name)

    # -- out ---------------------------------------------------------------------------------

    def build(self, original: Any, edit: Edit) -> Any:
        """``original`` (a single-choice chunk) changed as ``edit`` says."""
        if isinstance(original, ChatCompletionChunk):
            return _edit_object(original, edit)
        return _edit_dict(original, edit)

    def cut_finish(self, choice: int, template: Any) -> Any:
        """A chunk that ends ``choice`` with ``finish_reason="content_filter"``."""
        fields = {"choices": [{"index": choice, "delta": {}, "finish_reason": "content_filter", "logprobs": None}]}
        return self._fresh(template, fields)

    def usage_chunk(self, template: Any, usage: Mapping[str, Any]) -> Any:
        """The closing usage chunk (``choices == []``)."""
        return self._fresh(template, {"choices": [], "usage": dict(usage)})

    def _fresh(self, template: Any, fields: dict[str, Any]) -> Any:
        template = template if template is not None else self.template
        if isinstance(template, ChatCompletionChunk):
            base: dict[str, Any] = {
                "id": template.id,
                "created": template.created,
                "model": template.model,
                "system_fingerprint": template.system_fingerprint,
            }
        elif isinstance(template, Mapping):
            base = {k: template.get(k) for k in ("id", "created", "model", "system_fingerprint")}
        else:
            base = {"id": "chatcmpl-streamguard", "created": int(time.time()), "model": self.model or ""}
        data = {"id": base.get("id") or "chatcmpl-streamguard", "object": "chat.completion.chunk"}
        data["created"] = base.get("created") or int(time.time())
        data["model"] = base.get("model") or self.model or ""
        if base.get("system_fingerprint") is not None:
            data["system_fingerprint"] = base["system_fingerprint"]
        data.update(fields)
        if self.dicts:
            return data
        return ChatCompletionChunk.model_validate(data)


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise StreamFormatError(f"a delta's `{name}` is not a string")
    return value


def _long(texts: list[TextPart]) -> bool:
    if len(texts) == 1:
        return len(texts[0][2]) > SLICE_CHARS
    return sum(len(t) for _, _, t in texts) > SLICE_CHARS


def _has_text(value: Any) -> bool:
    """Whether ``value`` holds a non-empty string anywhere (bounded depth)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if item:
                return True
        elif depth < 8 and isinstance(item, Mapping):
            stack.extend((v, depth + 1) for v in item.values())
        elif depth < 8 and isinstance(item, list | tuple):
            stack.extend((v, depth + 1) for v in item)
        elif depth >= 8:
            return True  # too deep to look through: treat as text
    return False


def _edit_object(chunk: ChatCompletionChunk, edit: Edit) -> ChatCompletionChunk:
    choice = chunk.choices[0]
    delta = choice.delta
    update: dict[str, Any] = {}
    tool_texts: dict[int, str] = {}
    for (key, field), text in edit.texts.items():
        if key.startswith("tool:"):
            tool_texts[int(key[5:])] = text
        elif key == "function":
            if delta.function_call is not None:
                update["function_call"] = delta.function_call.model_copy(update={"arguments": text})
        elif key == "audio":
            if delta.audio is not None:
                # The audio speaks the transcript: once the transcript is cut or redacted, it goes too.
                update["audio"] = delta.audio.model_copy(update={"transcript": text, "data": ""})
        else:
            update[field] = text
    drop_tools = {int(k[5:]) for k in edit.drop if k.startswith("tool:")}
    if (tool_texts or drop_tools) and delta.tool_calls:
        calls = []
        for call in delta.tool_calls:
            if call.index in drop_tools:
                continue
            if call.index in tool_texts and call.function is not None:
                call = call.model_copy(
                    update={"function": call.function.model_copy(update={"arguments": tool_texts[call.index]})}
                )
            calls.append(call)
        update["tool_calls"] = calls or None
    if "function" in edit.drop:
        update["function_call"] = None
    if "audio" in edit.drop:
        update["audio"] = None
    new_delta = delta.model_copy(update=update) if update else delta
    choice_update: dict[str, Any] = {"delta": new_delta, "finish_reason": edit.finish}
    if edit.drop_logprobs:
        choice_update["logprobs"] = None
    return chunk.model_copy(update={"choices": [choice.model_copy(update=choice_update)]})


def _edit_dict(chunk: Mapping[str, Any], edit: Edit) -> dict[str, Any]:
    choice = dict(chunk["choices"][0])
    delta = dict(choice.get("delta") or {})
    tool_texts: dict[int, str] = {}
    for (key, field), text in edit.texts.items():
        if key.startswith("tool:"):
            tool_texts[int(key[5:])] = text
        elif key == "function":
            delta["function_call"] = {**(delta.get("function_call") or {}), "arguments": text}
        elif key == "audio":
            delta["audio"] = {**(delta.get("audio") or {}), "transcript": text, "data": ""}
        else:
            delta[field] = text
    drop_tools = {int(k[5:]) for k in edit.drop if k.startswith("tool:")}
    if (tool_texts or drop_tools) and delta.get("tool_calls"):
        calls = []
        for call in delta["tool_calls"]:
            index = call.get("index", 0)
            if index in drop_tools:
                continue
            if index in tool_texts:
                call = {**call, "function": {**(call.get("function") or {}), "arguments": tool_texts[index]}}
            calls.append(call)
        if calls:
            delta["tool_calls"] = calls
        else:
            delta.pop("tool_calls", None)
    if "function" in edit.drop:
        delta.pop("function_call", None)
    if "audio" in edit.drop:
        delta.pop("audio", None)
    choice["delta"] = delta
    choice["finish_reason"] = edit.finish
    if edit.drop_logprobs and "logprobs" in choice:
        choice["logprobs"] = None
    return {**chunk, "choices": [choice]}
