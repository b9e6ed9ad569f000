"""Non-streamed answers, judged with the same windows and semantics as streamed ones.

The answer is fed through :func:`streamguard.guard` as the stream it would have been: per choice,
one chunk carrying every channel (``content``, ``refusal``, ``reasoning_content`` / ``reasoning``,
each tool call's ``function.arguments``, legacy ``function_call``), split into word-sized deltas,
then a chunk with upstream's ``finish_reason``. The body is rebuilt from what the guard released:

- cut-off keeps the clean prefix and ends the choice with ``content_filter``;
- redact replaces only the flagged windows and keeps upstream's ``finish_reason``;
- a tool call the guard did not release is removed (never its name without its arguments);
- a choice whose text changed loses its ``logprobs`` (they name the withheld tokens).

An answer the guard left unchanged is passed on as upstream's original bytes. Legacy completions
(``choices[].text``) and Responses (each output text, refusal, reasoning summary and function
call's arguments of ``output[]``) are fed the same way, one choice per piece of text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ...guard import guard
from ...moderation._base import Moderator
from ...policy import Policy

__all__ = ["judge_answer"]

_PIECE = re.compile(r"\S*\s*|\s+")  # a word and the spaces after it: the size of a streamed delta
_TEXT_CHANNELS = ("content", "refusal", "reasoning_content", "reasoning")


@dataclass
class _Out:
    """What the guard released for one choice."""

    text: dict[str, list[str]] = field(default_factory=dict)
    tools: dict[int, list[str]] = field(default_factory=dict)
    function_call: list[str] | None = None
    finish: str | None = None


async def judge_answer(
    answer: dict[str, Any],
    shape: str,
    *,
    moderator: Moderator,
    policy: Policy,
    guard_args: Mapping[str, Any],
    on_verdict: Callable[[Any], object] | None = None,
    on_flag: Callable[[Any], object] | None = None,
) -> bool:
    """Judge ``answer`` in place. Returns whether it changed.

    Raises:
        ModerationError: Moderation failed (under ``on_error="fail_closed"``).
        StreamFormatError: The answer has no choices (or output) to judge.
    """
    if shape == "chat":
        choices = _chat_choices(answer)
    else:
        choices = _pieces(answer, shape)
    chunks: list[dict[str, Any]] = []
    for index, delta, finish in choices:
        chunks.extend(_chunks(answer, index, delta, finish))
    out: dict[int, _Out] = {}
    args = dict(guard_args)
    if "input" in args:
        args["messages"] = input_messages(args.pop("input"))
    args["n"] = len(choices)
    async with guard(
        _aiter(chunks),
        moderator=moderator,
        policy=_no_usage(policy),
        on_verdict=on_verdict,
        on_flag=on_flag,
        **args,
    ) as guarded:
        async for item in guarded:
            got: Any = item
            _collect(got if type(got) is dict else got.model_dump(mode="json", exclude_unset=True), out)
    if shape == "chat":
        return _rebuild_chat(answer, out)
    return _rebuild_pieces(answer, shape, out)


def input_messages(value: Any) -> list[dict[str, Any]] | None:
    """A Responses ``input`` as chat messages (for input moderation and prompt tokens)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        return None
    messages = []
    for item in value:
        if not isinstance(item, dict):
            continue
        content = item.get("content")
        if isinstance(content, list):
            content = [
                {"type": "text", "text": part.get("text")}
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            ]
        messages.append({"role": item.get("role", "user"), "content": content})
    return messages


def _no_usage(policy: Policy) -> Policy:
    from dataclasses import replace

    return replace(policy, include_usage=False)


async def _aiter(items: list[dict[str, Any]]) -> Any:
    for item in items:
        yield item


def _split(text: str) -> list[str]:
    return [p for p in _PIECE.findall(text) if p] or [text]


def _chunks(answer: Mapping[str, Any], index: int, delta: dict[str, Any], finish: Any) -> list[dict[str, Any]]:
    base = {
        "id": answer.get("id") if isinstance(answer.get("id"), str) else "answer",
        "object": "chat.completion.chunk",
        "created": answer.get("created") if isinstance(answer.get("created"), int) else 0,
        "model": answer.get("model") if isinstance(answer.get("model"), str) else "unknown",
    }

    def chunk(d: dict[str, Any], reason: Any = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": index, "delta": d, "finish_reason": reason, "logprobs": None}]}

    out = [chunk({"role": "assistant"})]
    for name in _TEXT_CHANNELS:
        if isinstance(text := delta.get(name), str) and text:
            out.extend(chunk({name: piece}) for piece in _split(text))
    for j, call in enumerate(delta.get("tool_calls") or []):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        head = {"index": j, "id": call.get("id"), "type": call.get("type", "function")}
        out.append(chunk({"tool_calls": [{**head, "function": {"name": function.get("name"), "arguments": ""}}]}))
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            out.extend(chunk({"tool_calls": [{"index": j, "function": {"arguments": p}}]}) for p in _split(arguments))
    if isinstance(fc := delta.get("function_call"), dict):
        out.append(chunk({"function_call": {"name": fc.get("name"), "arguments": ""}}))
        if isinstance(arguments := fc.get("arguments"), str) and arguments:
            out.extend(chunk({"function_call": {"arguments": p}}) for p in _split(arguments))
    out.append(chunk({}, finish if isinstance(finish, str) else "stop"))
    return out


def _collect(chunk: Mapping[str, Any], out: dict[int, _Out]) -> None:
    for choice in chunk.get("choices") or []:
        got = out.setdefault(choice.get("index", 0), _Out())
        if choice.get("finish_reason"):
            got.finish = choice["finish_reason"]
        delta = choice.get("delta") or {}
        for name in _TEXT_CHANNELS:
            if isinstance(text := delta.get(name), str):
                got.text.setdefault(name, []).append(text)
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            parts = got.tools.setdefault(call.get("index", 0), [])
            if isinstance(arguments := function.get("arguments"), str):
                parts.append(arguments)
        if isinstance(fc := delta.get("function_call"), dict):
            got.function_call = (got.function_call or []) + [fc.get("arguments") or ""]


# -- chat ---------------------------------------------------------------------------------------


def _chat_choices(answer: dict[str, Any]) -> list[tuple[int, dict[str, Any], Any]]:
    from ...exceptions import StreamFormatError

    choices = answer.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise StreamFormatError("the answer has no list of choices")
    out = []
    for position, choice in enumerate(choices):
        message = choice.get("message")
        index = choice.get("index", position)
        out.append(
            (
                index if isinstance(index, int) else position,
                message if isinstance(message, dict) else {},
                choice.get("finish_reason"),
            )
        )
    return out


def _rebuild_chat(answer: dict[str, Any], out: dict[int, _Out]) -> bool:
    changed = False
    for position, choice in enumerate(answer["choices"]):
        index = choice.get("index", position)
        got = out.get(index if isinstance(index, int) else position, _Out())
        message = choice.get("message")
        if not isinstance(message, dict):
            continue
        edited = False
        for name in _TEXT_CHANNELS:
            if isinstance(message.get(name), str) and message[name]:
                text = "".join(got.text.get(name, []))
                if text != message[name]:
                    message[name] = text if text or name == "content" else None
                    edited = True
        calls = message.get("tool_calls")
        if isinstance(calls, list) and calls:
            kept = []
            for j, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if j not in got.tools:
                    edited = True  # not released (cut before it, or flagged): never its name alone
                    continue
                arguments = "".join(got.tools[j])
                if isinstance(function, dict) and arguments != (function.get("arguments") or ""):
                    function["arguments"] = arguments
                    edited = True
                kept.append(call)
            message["tool_calls"] = kept or None
        fc = message.get("function_call")
        if isinstance(fc, dict):
            if got.function_call is None:
                message["function_call"] = None
                edited = True
            elif (arguments := "".join(got.function_call)) != (fc.get("arguments") or ""):
                fc["arguments"] = arguments
                edited = True
        finish = got.finish or choice.get("finish_reason")
        if finish != choice.get("finish_reason"):
            choice["finish_reason"] = finish
            edited = True
        if edited:
            changed = True
            if choice.get("logprobs") is not None:
                choice["logprobs"] = None  # they name the withheld tokens
    return changed


# -- legacy completions and Responses: one choice per piece of text -----------------------------


def _pieces(answer: dict[str, Any], shape: str) -> list[tuple[int, dict[str, Any], Any]]:
    from ...exceptions import StreamFormatError

    out: list[tuple[int, dict[str, Any], Any]] = []
    for k, (_, text) in enumerate(_texts(answer, shape)):
        out.append((k, {"content": text}, "stop"))
    if not out and not isinstance(answer.get("choices" if shape == "completions" else "output"), list):
        raise StreamFormatError(f"the answer has no {'choices' if shape == 'completions' else 'output'} list")
    return out


def _texts(answer: dict[str, Any], shape: str) -> list[tuple[tuple[Any, ...], str]]:
    """(where, text) of each piece of model text in a completions or Responses answer."""
    found: list[tuple[tuple[Any, ...], str]] = []
    if shape == "completions":
        for i, choice in enumerate(answer.get("choices") or []):
            if isinstance(choice, dict) and isinstance(choice.get("text"), str):
                found.append((("choice", i), choice["text"]))
        return found
    for i, item in enumerate(answer.get("output") or []):
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("arguments"), str):
            found.append((("arguments", i), item["arguments"]))
        for key in ("content", "summary"):
            for j, part in enumerate(item.get(key) or []):
                if not isinstance(part, dict):
                    continue
                for field_name in ("text", "refusal", "transcript"):
                    if isinstance(part.get(field_name), str):
                        found.append(((key, i, j, field_name), part[field_name]))
    return found


def _rebuild_pieces(answer: dict[str, Any], shape: str, out: dict[int, _Out]) -> bool:
    changed = False
    cut_items: set[int] = set()
    dropped: set[int] = set()
    for k, (where, text) in enumerate(_texts(answer, shape)):
        got = out.get(k, _Out())
        released = "".join(got.text.get("content", []))
        filtered = got.finish == "content_filter"
        if released == text and not filtered:
            continue
        changed = True
        if where[0] == "choice":
            choice = answer["choices"][where[1]]
            choice["text"] = released
            if filtered:
                choice["finish_reason"] = "content_filter"
            if choice.get("logprobs") is not None:
                choice["logprobs"] = None
        elif where[0] == "arguments":
            dropped.add(where[1])  # a flagged function call is never sent
        else:
            key, i, j, field_name = where
            answer["output"][i][key][j][field_name] = released
            if filtered:
                cut_items.add(i)
    if shape == "responses" and (cut_items or dropped):
        for i in cut_items:
            answer["output"][i]["status"] = "incomplete"
        answer["output"] = [item for i, item in enumerate(answer["output"]) if i not in dropped]
        answer["status"] = "incomplete"
        answer["incomplete_details"] = {"reason": "content_filter"}
    return changed
