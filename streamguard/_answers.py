"""Non-streamed answers judged like streamed ones.

A chat completion is replayed through :func:`streamguard.guard` as the chunks a stream would carry
(every channel: content, refusal, ``reasoning_content`` / ``reasoning``, tool-call and function-call
arguments, the audio transcript), and the answer is rebuilt from what the guard released: a cut-off keeps the clean
prefix and ends ``content_filter``; a redaction replaces only the flagged windows and keeps
upstream's ``finish_reason``. Windows, verdicts and policy are exactly those of a stream.

A Responses API answer is replayed the same way, each text part (output text, refusal, reasoning
summary and text, function-call arguments, custom tool input) as a choice of its own.

The upstream object is never mutated: a choice or item that changed is a copy.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import anyio
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response
from openai.types.responses.response import IncompleteDetails

from .exceptions import ModerationError, ModerationTimeout
from .guard import guard
from .moderation._base import Moderator, check_verdicts
from .policy import Decision, Policy

__all__ = ["decide", "guard_completion", "guard_response", "replay_texts"]

logger = logging.getLogger(__name__)

_REASONING = ("reasoning_content", "reasoning")
# Characters per replayed chunk: about four tokens, as a stream would carry them. Windows are
# counted in characters, so this only decides where a cut-off can fall inside a chunk.
_PIECE = 16


async def guard_completion(completion: ChatCompletion, *, moderator: Moderator, policy: Policy) -> ChatCompletion:
    """Judge a non-streamed chat completion with the windows and semantics of a stream.

    Args:
        completion: The upstream answer (not mutated).
        moderator: Judges the windows.
        policy: As for :func:`streamguard.guard` (input moderation is the caller's business).

    Returns:
        ``completion`` itself when the guard released every choice unchanged, else a copy whose
        changed choices carry the released text (log-probs and annotations dropped).

    Raises:
        ModerationError: The moderator failed under ``on_error="fail_closed"``.
    """
    chunks = [chunk for choice in completion.choices for chunk in _as_chunks(completion, choice)]
    if not chunks:
        return completion
    policy = dataclasses.replace(policy, moderate_input=False, include_usage=False)
    released: list[ChatCompletionChunk] = []
    async with guard(_replay(chunks), moderator=moderator, policy=policy, model=completion.model) as guarded:
        async for chunk in guarded:
            released.append(chunk)
    got = _collect(released)
    choices = [_rebuilt(choice, got.get(choice.index)) for choice in completion.choices]
    if all(new is old for new, old in zip(choices, completion.choices, strict=True)):
        return completion
    return completion.model_copy(update={"choices": choices})


async def _replay(chunks: Sequence[ChatCompletionChunk]) -> AsyncIterator[ChatCompletionChunk]:
    for chunk in chunks:
        yield chunk


def _text(content: object) -> str | None:
    """A message's ``content``: a string, or the text of a list of parts (as some servers send)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            part = part.model_dump() if hasattr(part, "model_dump") else part
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return "".join(texts)
    return str(content)


def _as_chunks(completion: ChatCompletion, choice: Any) -> list[ChatCompletionChunk]:
    """A choice's message as the chunks a stream would have carried, ``_PIECE`` characters each."""
    message = choice.message
    deltas: list[dict[str, Any]] = [{"role": "assistant"}]
    extra = message.model_extra or {}
    for name in _REASONING:
        if isinstance(extra.get(name), str):
            deltas += [{name: piece} for piece in _pieces(extra[name])]
    deltas += [{"content": piece} for piece in _pieces(_text(message.content) or "")]
    deltas += [{"refusal": piece} for piece in _pieces(message.refusal or "")]
    for k, call in enumerate(message.tool_calls or ()):
        if call.type != "function":
            continue
        head = {"index": k, "id": call.id, "type": "function", "function": {"name": call.function.name}}
        deltas.append({"tool_calls": [head]})
        deltas += [
            {"tool_calls": [{"index": k, "function": {"arguments": piece}}]}
            for piece in _pieces(call.function.arguments)
        ]
    audio = message.audio
    if audio is not None and audio.transcript:
        deltas += [{"audio": {"id": audio.id, "transcript": piece}} for piece in _pieces(audio.transcript)]
    if message.function_call is not None:
        deltas.append({"function_call": {"name": message.function_call.name, "arguments": ""}})
        deltas += [{"function_call": {"arguments": piece}} for piece in _pieces(message.function_call.arguments)]
    last = len(deltas) - 1
    return [
        ChatCompletionChunk.model_validate(
            {
                "id": completion.id,
                "object": "chat.completion.chunk",
                "created": completion.created,
                "model": completion.model,
                "choices": [
                    {
                        "index": choice.index,
                        "delta": delta,
                        "finish_reason": choice.finish_reason if i == last else None,
                    }
                ],
            }
        )
        for i, delta in enumerate(deltas)
    ]


def _pieces(text: str) -> list[str]:
    return [text[i : i + _PIECE] for i in range(0, len(text), _PIECE)]


@dataclasses.dataclass
class _Released:
    """What the guard released for one choice."""

    content: str = ""
    refusal: str = ""
    reasoning: dict[str, str] = dataclasses.field(default_factory=dict)
    tool_args: dict[int, str] = dataclasses.field(default_factory=dict)
    function_args: str | None = None
    transcript: str | None = None
    finish_reason: str | None = None


def _collect(chunks: Sequence[ChatCompletionChunk]) -> dict[int, _Released]:
    got: dict[int, _Released] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            out = got.setdefault(choice.index, _Released())
            delta = choice.delta
            out.content += delta.content or ""
            out.refusal += delta.refusal or ""
            extra = delta.model_extra or {}
            for name in _REASONING:
                if isinstance(extra.get(name), str):
                    out.reasoning[name] = out.reasoning.get(name, "") + extra[name]
            for call in delta.tool_calls or ():
                args = call.function.arguments if call.function is not None else None
                out.tool_args[call.index] = out.tool_args.get(call.index, "") + (args or "")
            if delta.function_call is not None:
                out.function_args = (out.function_args or "") + (delta.function_call.arguments or "")
            if delta.audio is not None:
                out.transcript = (out.transcript or "") + (delta.audio.transcript or "")
            if choice.finish_reason is not None:
                out.finish_reason = choice.finish_reason
    return got


def _rebuilt(choice: Any, got: _Released | None) -> Any:
    """``choice`` as released: itself if nothing changed, else a copy with the released text."""
    got = got or _Released(finish_reason="content_filter")
    message = choice.message
    update: dict[str, Any] = {}
    content = _text(message.content)
    if (content or "") != got.content:
        update["content"] = got.content
        if message.annotations:
            update["annotations"] = []  # they point into text that is gone
    if (message.refusal or "") != got.refusal:
        update["refusal"] = got.refusal
    extra = message.model_extra or {}
    for name in _REASONING:
        if isinstance(extra.get(name), str) and extra[name] != got.reasoning.get(name, ""):
            update[name] = got.reasoning.get(name, "")
    if message.tool_calls:
        calls = []
        for k, call in enumerate(message.tool_calls):
            if call.type != "function":
                calls.append(call)
            elif k in got.tool_args:
                args = got.tool_args[k]
                same = args == call.function.arguments
                calls.append(call if same else call.model_copy(update={"function": _args(call.function, args)}))
        if len(calls) != len(message.tool_calls) or any(
            a is not b for a, b in zip(calls, message.tool_calls, strict=True)
        ):
            update["tool_calls"] = calls or None
    if message.function_call is not None and got.function_args != message.function_call.arguments:
        update["function_call"] = None if got.function_args is None else _args(message.function_call, got.function_args)
    audio = message.audio
    if audio is not None and audio.transcript and got.transcript != audio.transcript:
        # The audio speaks the transcript: once the transcript is cut or redacted, the audio goes too.
        update["audio"] = (
            None if got.transcript is None else audio.model_copy(update={"transcript": got.transcript, "data": ""})
        )
    if not update and got.finish_reason == choice.finish_reason:
        return choice
    changes: dict[str, Any] = {"finish_reason": got.finish_reason or choice.finish_reason}
    if update:
        changes["message"] = message.model_copy(update=update)
        changes["logprobs"] = None
    return choice.model_copy(update=changes)


def _args(function: Any, arguments: str) -> Any:
    return function.model_copy(update={"arguments": arguments})


# -- the Responses API ---------------------------------------------------------------------------


async def guard_response(response: Response, *, moderator: Moderator, policy: Policy) -> Response:
    """Judge a non-streamed Responses API answer with the windows and semantics of a stream.

    Each text part (output text and refusal of messages, summary and text of reasoning items,
    function-call arguments, custom tool-call input) is replayed through :func:`streamguard.guard`
    as a choice of its own. A cut-off keeps a part's clean prefix (a flagged function or tool call
    is dropped whole, as a stream never emits it) and makes the response ``incomplete`` with reason
    ``content_filter``; a redaction replaces only the flagged windows and keeps the status.

    Args:
        response: The upstream answer (not mutated).
        moderator: Judges the windows.
        policy: As for :func:`streamguard.guard` (input moderation is the caller's business).

    Returns:
        ``response`` itself when every part was released unchanged, else a rewritten copy.

    Raises:
        ModerationError: The moderator failed under ``on_error="fail_closed"``.
    """
    where: list[tuple[int, str, int]] = []  # (output index, field, part index)
    texts: list[str] = []
    for i, item in enumerate(response.output):
        for field, j, text in _item_texts(item):
            if text:
                where.append((i, field, j))
                texts.append(text)
    released = await replay_texts(texts, moderator, policy, response.model)
    changed = {at: got for at, text, got in zip(where, texts, released, strict=True) if got != (text, False)}
    if not changed:
        return response
    output: list[Any] = []
    for i, item in enumerate(response.output):
        hits = {(field, j): got for (fi, field, j), got in changed.items() if fi == i}
        if not hits:
            output.append(item)
        elif item.type in ("function_call", "custom_tool_call") and any(cut for _, cut in hits.values()):
            continue  # a flagged call is never handed out, not even its name
        else:
            output.append(_rewrite_item(item, hits))
    update: dict[str, Any] = {"output": output}
    if any(cut for _, cut in changed.values()):
        update["status"] = "incomplete"
        update["incomplete_details"] = IncompleteDetails(reason="content_filter")
    return response.model_copy(update=update)


async def replay_texts(
    texts: Sequence[str], moderator: Moderator, policy: Policy, model: str
) -> list[tuple[str, bool]]:
    """(released text, whether it was cut) of each text, replayed through the guard as one choice each."""
    if not texts:
        return []
    chunks = [
        ChatCompletionChunk.model_validate(
            {
                "id": "replay",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [{"index": k, "delta": {"content": piece}, "finish_reason": None}],
            }
        )
        for k, text in enumerate(texts)
        for piece in _pieces(text)
    ]
    chunks += [
        ChatCompletionChunk.model_validate(
            {
                "id": "replay",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [{"index": k, "delta": {}, "finish_reason": "stop"}],
            }
        )
        for k in range(len(texts))
    ]
    policy = dataclasses.replace(policy, moderate_input=False, include_usage=False)
    got = [_Released() for _ in texts]
    async with guard(_replay(chunks), moderator=moderator, policy=policy, model=model, n=len(texts)) as guarded:
        async for chunk in guarded:
            for choice in chunk.choices:
                got[choice.index].content += choice.delta.content or ""
                if choice.finish_reason is not None:
                    got[choice.index].finish_reason = choice.finish_reason
    return [(g.content, g.finish_reason != "stop") for g in got]


def _item_texts(item: Any) -> list[tuple[str, int, str]]:
    """(field, part index, text) of every text an output item carries."""
    kind = getattr(item, "type", None)
    if kind == "message":
        return [
            ("content", j, (part.text if part.type == "output_text" else getattr(part, "refusal", "")) or "")
            for j, part in enumerate(item.content)
        ]
    if kind == "reasoning":
        out = [("summary", j, part.text) for j, part in enumerate(item.summary or ())]
        out += [("reasoning_text", j, part.text) for j, part in enumerate(getattr(item, "content", None) or ())]
        return out
    if kind == "function_call":
        return [("arguments", 0, item.arguments or "")]
    if kind == "custom_tool_call":
        return [("input", 0, item.input or "")]
    return []


def _rewrite_item(item: Any, hits: Mapping[tuple[str, int], tuple[str, bool]]) -> Any:
    """``item`` with the released text of each changed part."""
    update: dict[str, Any] = {}
    if item.type == "message":
        parts = list(item.content)
        for (_, j), (text, _) in hits.items():
            part = parts[j]
            if part.type == "output_text":
                parts[j] = part.model_copy(update={"text": text, "annotations": [], "logprobs": None})
            else:
                parts[j] = part.model_copy(update={"refusal": text})
        update["content"] = parts
    elif item.type == "reasoning":
        summary, content = list(item.summary or ()), list(getattr(item, "content", None) or ())
        for (field, j), (text, _) in hits.items():
            target = summary if field == "summary" else content
            target[j] = target[j].model_copy(update={"text": text})
        update["summary"] = summary
        if content:
            update["content"] = content
        update["encrypted_content"] = None  # it would carry the original reasoning
    elif item.type == "function_call":
        update["arguments"] = next(iter(hits.values()))[0]
    elif item.type == "custom_tool_call":
        update["input"] = next(iter(hits.values()))[0]
    if any(cut for _, cut in hits.values()) and "status" in type(item).model_fields:
        update["status"] = "incomplete"
    return item.model_copy(update=update)


async def decide(texts: Sequence[str], moderator: Moderator, policy: Policy) -> list[Decision | None]:
    """One ``moderate()`` call for ``texts`` under the policy; all ``None`` after a fail-open error."""
    if not texts:
        return []
    error: ModerationError
    try:
        with anyio.fail_after(policy.moderation_timeout):
            verdicts = check_verdicts(await moderator.moderate(list(texts)), len(texts))
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
