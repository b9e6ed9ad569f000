"""Guard a streamed Responses API call (``client.responses.create(stream=True)``) with the same engine.

The adapter maps each event onto the chat-chunk shape the engine reads, and back. Every event type
that carries model text is a text channel of a "choice" keyed by its output item and part:

- ``response.output_text.delta`` / ``response.refusal.delta``: ``content`` / ``refusal`` of
  ``(output_index, content_index)``;
- ``response.reasoning_summary_text.delta`` / ``response.reasoning_text.delta``: ``reasoning`` of
  ``(output_index, summary part)`` / ``(output_index, content_index)``;
- ``response.function_call_arguments.delta`` / ``response.custom_tool_call_input.delta``: a tool
  call's arguments (held until the call is judged whole; the item's ``output_item.added`` waits with
  it, so a flagged call is never shown, not even its name);
- ``response.audio.transcript.delta``: ``audio``.

Their ``*.done`` events are that choice's finish (a part's last window is judged at once; the done
event waits for every verdict of its text). Events that repeat the text (``*.done``,
``content_part.done``, ``reasoning_summary_part.done``, ``output_item.done``, and the terminal
``response.completed``) are rebuilt from the text that was released, so a withheld or redacted span
never leaves through them. Text-free events pass through unchanged and in order; an event type the
adapter does not know that carries text is dropped and listed in ``GuardReport.dropped``.

On a cut-off the stream ends with the API's own shapes for an incomplete answer: the part's done event
with the released text, its ``output_item.done`` with status ``"incomplete"`` (a cut tool call's item
is dropped), then ``response.incomplete`` with ``incomplete_details.reason == "content_filter"``.
Usage is synthesized when the terminal event lacks it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterable, Mapping, Sequence
from typing import Any

from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionChunk
from openai.types.chat.chat_completion_chunk import (
    Choice,
    ChoiceDelta,
    ChoiceDeltaAudio,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
)
from openai.types.responses import ResponseStreamEvent

from ._adapted import AdaptedStream
from ._engine.emit import _has_text
from .exceptions import StreamFormatError
from .guard import GuardedStream, Hook
from .moderation._base import Moderator
from .policy import Policy
from .report import GuardReport
from .sources import chunk_iterator, close_quietly

__all__ = ["GuardedResponseStream", "guard_responses"]

# event type -> (delta field of the carrier, kind): the text channels of the Responses API.
_DELTAS = {
    "response.output_text.delta": "content",
    "response.refusal.delta": "refusal",
    "response.reasoning_summary_text.delta": "reasoning",
    "response.reasoning_text.delta": "reasoning",
    "response.function_call_arguments.delta": "tool",
    "response.custom_tool_call_input.delta": "tool",
    "response.audio.transcript.delta": "audio",
}
# done event -> the field that repeats the whole text
_DONES = {
    "response.output_text.done": "text",
    "response.refusal.done": "refusal",
    "response.reasoning_summary_text.done": "text",
    "response.reasoning_text.done": "text",
    "response.function_call_arguments.done": "arguments",
    "response.custom_tool_call_input.done": "input",
    "response.audio.transcript.done": None,
}
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_TOOL_ITEMS = frozenset({"function_call", "custom_tool_call"})
# Event types known to carry no model text of their own (or whose text is rebuilt below).
_TEXT_FREE = frozenset(
    {
        "response.created",
        "response.in_progress",
        "response.queued",
        "response.output_item.added",
        "response.output_item.done",
        "response.content_part.added",
        "response.content_part.done",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_part.done",
        "response.output_text.annotation.added",
        "response.error",
        "error",
        *(
            f"response.{tool}.{state}"
            for tool in ("web_search_call", "file_search_call")
            for state in ("in_progress", "searching", "completed")
        ),
        "response.image_generation_call.in_progress",
        "response.image_generation_call.generating",
        "response.image_generation_call.completed",
        "response.image_generation_call.partial_image",
        "response.code_interpreter_call.in_progress",
        "response.code_interpreter_call.interpreting",
        "response.code_interpreter_call.completed",
    }
)
_PARTS = 64  # content parts per output item that get their own "choice" index
_SUMMARY = 32  # reasoning summary parts are keyed from here within their item
_AUDIO = 1 << 30  # the audio transcript's "choice"
_EVENT = "streamguard_event"  # where a carrier chunk keeps the event it stands for


def guard_responses(
    stream: AsyncIterable[Any],
    *,
    moderator: Moderator,
    policy: Policy | None = None,
    model: str | None = None,
    input: str | Sequence[Mapping[str, Any]] | None = None,
    on_verdict: Hook | None = None,
    on_flag: Hook | None = None,
) -> GuardedResponseStream:
    """Guard a streamed Responses API call.

    Args:
        stream: ``client.responses.create(..., stream=True)``, or any async iterable of Responses
            stream events (objects or dicts).
        moderator: Judges windows of output text.
        policy: As for :func:`streamguard.guard`.
        model: The model asked for (token counting).
        input: The request's ``input`` (a string or input items), for prompt-token usage and
            ``Policy(moderate_input=True)``.
        on_verdict: As for :func:`streamguard.guard`.
        on_flag: As for :func:`streamguard.guard`.

    Returns:
        A :class:`GuardedResponseStream` of Responses stream events.
    """
    messages = _messages(input)
    return GuardedResponseStream(
        stream,
        moderator=moderator,
        policy=policy or Policy(),
        model=model,
        messages=messages,
        on_verdict=on_verdict,
        on_flag=on_flag,
    )


class GuardedResponseStream(AdaptedStream[Any]):
    """An async iterator of Responses stream events; also an async context manager."""

    def __init__(
        self,
        stream: AsyncIterable[Any],
        *,
        moderator: Moderator,
        policy: Policy,
        model: str | None,
        messages: Sequence[Mapping[str, Any]] | None,
        on_verdict: Hook | None,
        on_flag: Hook | None,
    ) -> None:
        self._to_chunks = _ToChunks(stream, model)
        guarded = GuardedStream(
            self._to_chunks,
            moderator=moderator,
            policy=policy,
            model=model,
            messages=messages,
            tools=None,
            n=None,
            on_verdict=on_verdict,
            on_flag=on_flag,
        )
        super().__init__(guarded)
        self._back = _ToEvents()

    @property
    def report(self) -> GuardReport:
        """The stream's report so far (final once the stream has ended); lists dropped event types too."""
        report = self._guarded.report
        if self._to_chunks.dropped:
            report = dataclasses.replace(report, dropped=report.dropped + tuple(self._to_chunks.dropped))
        return report

    def _convert(self, chunk: ChatCompletionChunk) -> list[Any]:
        return self._back.convert(chunk)

    def _finish(self) -> list[Any]:
        return self._back.finish()


class _ToChunks:
    """Responses events -> carrier chunks the engine reads; closing it closes the upstream."""

    def __init__(self, stream: AsyncIterable[Any], model: str | None) -> None:
        self._stream = stream
        self._iterator = chunk_iterator(stream)
        self._model = model or ""
        self.dropped: list[str] = []

    def __aiter__(self) -> _ToChunks:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        while True:
            event = _as_event(await self._iterator.__anext__())
            kind = getattr(event, "type", None)
            if not isinstance(kind, str):
                raise StreamFormatError("a Responses stream event has no `type`")
            if kind in _DELTAS or kind in _DONES or kind in _TEXT_FREE or kind in _TERMINAL or not _carries_text(event):
                return self._carrier(event)
            # An event type we do not know, carrying text: never passed on unjudged.
            name = f"event.{kind}"
            if name not in self.dropped:
                self.dropped.append(name)

    async def aclose(self) -> None:
        if self._iterator is not self._stream:
            await close_quietly(self._iterator)
        await close_quietly(self._stream)

    def _carrier(self, event: Any) -> ChatCompletionChunk:
        kind = event.type
        response = getattr(event, "response", None)
        if response is not None and getattr(response, "model", None):
            self._model = response.model
        choices: list[Choice] = []
        if kind in _DELTAS:
            delta = _delta(_DELTAS[kind], getattr(event, "delta", None))
            choices = [Choice.construct(index=_key(event), delta=delta, finish_reason=None, logprobs=None)]
        elif kind in _DONES:
            choices = [Choice.construct(index=_key(event), delta=ChoiceDelta.construct(), finish_reason="stop")]
        elif kind == "response.output_item.added" and getattr(event.item, "type", "") in _TOOL_ITEMS:
            # The call's name travels with this event: it waits with the call's arguments.
            item = event.item
            call = ChoiceDeltaToolCall.construct(
                index=0,
                id=getattr(item, "call_id", None) or getattr(item, "id", None) or "call",
                type="function",
                function=ChoiceDeltaToolCallFunction.construct(
                    name=getattr(item, "name", None) or "tool", arguments=""
                ),
            )
            delta = ChoiceDelta.construct(tool_calls=[call])
            choices = [Choice.construct(index=_key(event), delta=delta, finish_reason=None, logprobs=None)]
        usage = None
        if kind in _TERMINAL and response is not None and getattr(response, "usage", None) is not None:
            u = response.usage
            usage = CompletionUsage(
                prompt_tokens=u.input_tokens, completion_tokens=u.output_tokens, total_tokens=u.total_tokens
            )
        chunk = ChatCompletionChunk.construct(
            id=getattr(response, "id", None) or "resp",
            object="chat.completion.chunk",
            created=0,
            model=self._model,
            choices=choices,
            usage=usage,
        )
        setattr(chunk, _EVENT, event)
        return chunk


class _ToEvents:
    """Carrier chunks out of the engine -> Responses events, rewriting what repeats the text."""

    def __init__(self) -> None:
        self._released: dict[int, str] = {}  # choice key -> text released so far
        self._known: set[int] = set()  # keys that carried text (their repeats are rebuilt)
        self._cut: set[int] = set()
        self._last_delta: dict[int, Any] = {}
        self._items: dict[int, Any] = {}
        self._response: Any = None
        self._terminal: Any = None
        self._usage: CompletionUsage | None = None
        self._seq = 0

    def convert(self, chunk: ChatCompletionChunk) -> list[Any]:
        event = getattr(chunk, _EVENT, None)
        if event is None:  # made by the engine: a cut-off finish, or the usage chunk
            if chunk.choices and chunk.choices[0].finish_reason == "content_filter":
                return self._cut_part(chunk.choices[0].index)
            if chunk.usage is not None:
                self._usage = chunk.usage
            return []
        self._seq = max(self._seq, getattr(event, "sequence_number", 0) or 0)
        kind = event.type
        if kind in _DELTAS:
            choice = chunk.choices[0]
            text = _released_text(_DELTAS[kind], choice.delta)
            key = choice.index
            self._known.add(key)
            if not text:
                return []
            self._released[key] = self._released.get(key, "") + text
            self._last_delta[key] = event
            if text == event.delta:
                return [event]
            update: dict[str, Any] = {"delta": text}
            if hasattr(event, "logprobs"):
                update["logprobs"] = []
            return [event.model_copy(update=update)]
        if kind in _DONES:
            key = _key(event)
            field = _DONES[kind]
            if field is None or not hasattr(event, field):
                return [event]
            return [event.model_copy(update={field: self._released.get(key, "")})]
        if kind in ("response.created", "response.in_progress"):
            self._response = event.response
        elif kind == "response.output_item.added":
            self._items[event.output_index] = event.item
        elif kind == "response.content_part.done":
            key = _key(event)
            if key in self._known or key in self._cut:
                field = "refusal" if getattr(event.part, "type", "") == "refusal" else "text"
                part = event.part.model_copy(update={field: self._released.get(key, "")})
                return [event.model_copy(update={"part": part})]
        elif kind == "response.reasoning_summary_part.done":
            key = _key(event)
            if key in self._known or key in self._cut:
                part = event.part.model_copy(update={"text": self._released.get(key, "")})
                return [event.model_copy(update={"part": part})]
        elif kind == "response.output_item.done":
            item = self._rewrite_item(event.output_index, event.item)
            if item is None:
                return []  # a tool call that was cut: never shown
            return [event.model_copy(update={"item": item})]
        elif kind in _TERMINAL:
            self._terminal = event  # held: usage may need filling in, and a cut changes it
            return []
        return [event]

    def finish(self) -> list[Any]:
        terminal = self._terminal
        response = terminal.response if terminal is not None else self._response
        if response is None:
            return []
        source = list(response.output or ())
        if self._cut and not source:
            source = [item for _, item in sorted(self._items.items())]
        output = []
        changed = False
        for i, item in enumerate(source):
            new = self._rewrite_item(i, item)
            changed |= new is not item
            if new is not None:
                output.append(new)
        update: dict[str, Any] = {}
        if changed or len(output) != len(response.output or ()):
            update["output"] = output
        if response.usage is None and self._usage is not None:
            update["usage"] = _response_usage(self._usage)
        kind = terminal.type if terminal is not None else "response.completed"
        if self._cut:
            from openai.types.responses.response import IncompleteDetails

            update["status"] = "incomplete"
            update["incomplete_details"] = IncompleteDetails.construct(reason="content_filter")
            kind = "response.incomplete"
        if terminal is not None and not update:
            return [terminal]  # nothing to change: upstream's own event, as it was
        self._seq += 1
        return [
            _event_class(kind).construct(
                type=kind, sequence_number=self._seq, response=response.model_copy(update=update)
            )
        ]

    def _cut_part(self, key: int) -> list[Any]:
        self._cut.add(key)
        out: list[Any] = []
        last = self._last_delta.get(key)
        if last is not None and last.type == "response.output_text.delta":
            from openai.types.responses import ResponseTextDoneEvent

            self._seq += 1
            out.append(
                ResponseTextDoneEvent.construct(
                    type="response.output_text.done",
                    sequence_number=self._seq,
                    item_id=last.item_id,
                    output_index=last.output_index,
                    content_index=last.content_index,
                    text=self._released.get(key, ""),
                    logprobs=[],
                )
            )
        item = self._items.get(key // _PARTS)
        if item is not None:
            from openai.types.responses import ResponseOutputItemDoneEvent

            done = self._rewrite_item(key // _PARTS, item)
            if done is not None:
                self._seq += 1
                out.append(
                    ResponseOutputItemDoneEvent.construct(
                        type="response.output_item.done",
                        sequence_number=self._seq,
                        output_index=key // _PARTS,
                        item=done.model_copy(update={"status": "incomplete"}),
                    )
                )
        return out

    def _rewrite_item(self, output_index: int, item: Any) -> Any:
        """``item`` with every guarded text replaced by the released text; None for a cut tool call."""
        kind = getattr(item, "type", "")
        base = output_index * _PARTS
        if kind in _TOOL_ITEMS:
            if base in self._cut:
                return None
            if base not in self._known:
                return item
            field = "arguments" if kind == "function_call" else "input"
            if getattr(item, field, None) == self._released.get(base, ""):
                return item
            return item.model_copy(update={field: self._released.get(base, "")})
        if kind == "message":
            return self._rewrite_parts(
                item, "content", base, lambda part: "refusal" if getattr(part, "type", "") == "refusal" else "text"
            )
        if kind == "reasoning":
            item = self._rewrite_parts(item, "summary", base + _SUMMARY, lambda part: "text")
            return self._rewrite_parts(item, "content", base, lambda part: "text")
        return item

    def _rewrite_parts(self, item: Any, attr: str, base: int, field_of: Any) -> Any:
        parts = list(getattr(item, attr, None) or [])
        keys = [base + j for j in range(max(len(parts), 1))]
        if not any(k in self._known or k in self._cut for k in keys):
            return item
        new_parts = []
        changed = False
        for j, part in enumerate(parts):
            key = base + j
            field = field_of(part)
            if (key in self._known or key in self._cut) and getattr(part, field, None) != self._released.get(key, ""):
                part = part.model_copy(update={field: self._released.get(key, "")})
                changed = True
            new_parts.append(part)
        if parts and not changed:
            return item
        if not parts and base in self._released and attr == "content" and getattr(item, "type", "") == "message":
            from openai.types.responses import ResponseOutputText

            new_parts = [ResponseOutputText.construct(type="output_text", text=self._released[base], annotations=[])]
        return item.model_copy(update={attr: new_parts})


def _key(event: Any) -> int:
    """The "choice" an event's text belongs to."""
    kind = getattr(event, "type", "")
    if kind.startswith("response.audio.transcript"):
        return _AUDIO
    base = int(event.output_index) * _PARTS
    if "reasoning_summary" in kind:
        return base + _SUMMARY + int(getattr(event, "summary_index", 0) or 0)
    if "function_call_arguments" in kind or "custom_tool_call_input" in kind or kind == "response.output_item.added":
        return base
    return base + int(getattr(event, "content_index", 0) or 0)


def _delta(kind: str, text: Any) -> ChoiceDelta:
    if not isinstance(text, str):
        raise StreamFormatError("a Responses delta event's `delta` is not a string")
    if kind == "content":
        return ChoiceDelta.construct(content=text)
    if kind == "refusal":
        return ChoiceDelta.construct(refusal=text)
    if kind == "reasoning":
        delta = ChoiceDelta.construct()
        delta.__pydantic_extra__ = {"reasoning_content": text}
        return delta
    if kind == "audio":
        return ChoiceDelta.construct(
            audio=ChoiceDeltaAudio.construct(id="audio", transcript=text, data="", expires_at=0)
        )
    call = ChoiceDeltaToolCall.construct(index=0, function=ChoiceDeltaToolCallFunction.construct(arguments=text))
    return ChoiceDelta.construct(tool_calls=[call])


def _released_text(kind: str, delta: Any) -> str:
    """The text a carrier's delta holds after the engine (maybe edited)."""
    if kind == "content":
        return str(delta.content or "")
    if kind == "refusal":
        return str(delta.refusal or "")
    if kind == "reasoning":
        return str((delta.__pydantic_extra__ or {}).get("reasoning_content") or "")
    if kind == "audio":
        return str(getattr(delta.audio, "transcript", "") or "") if delta.audio is not None else ""
    calls = delta.tool_calls or []
    return "".join(str(getattr(c.function, "arguments", "") or "") for c in calls if c.function is not None)


_ID_FIELDS = frozenset({"type", "item_id", "id", "call_id", "status", "event_id", "response_id", "name"})


def _carries_text(event: Any) -> bool:
    """Whether an event of an unknown type holds a string beyond its ids (it may be model text)."""
    data = event.model_dump() if hasattr(event, "model_dump") else dict(event)
    return any(key not in _ID_FIELDS and _has_text(value) for key, value in data.items())


def _as_event(raw: Any) -> Any:
    if isinstance(raw, Mapping):
        from openai._models import construct_type  # the client's own lenient parser

        return construct_type(type_=ResponseStreamEvent, value=dict(raw))
    return raw


def _event_class(kind: str) -> Any:
    from openai.types.responses import ResponseCompletedEvent, ResponseFailedEvent, ResponseIncompleteEvent

    return {
        "response.completed": ResponseCompletedEvent,
        "response.incomplete": ResponseIncompleteEvent,
        "response.failed": ResponseFailedEvent,
    }[kind]


def _response_usage(usage: CompletionUsage) -> Any:
    from openai._models import construct_type  # lenient: usage-detail fields vary across releases
    from openai.types.responses import ResponseUsage

    return construct_type(
        type_=ResponseUsage,
        value={
            "input_tokens": usage.prompt_tokens,
            "output_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    )


def _messages(input: str | Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The Responses ``input`` as chat messages, for token counting and input moderation."""
    if input is None:
        return None
    if isinstance(input, str):
        return [{"role": "user", "content": input}]
    out = []
    for item in input:
        content = item.get("content")
        if isinstance(content, list):
            content = [
                {"type": "text", "text": p.get("text", "")}
                for p in content
                if isinstance(p, Mapping) and p.get("type") in ("input_text", "output_text", "text")
            ]
        if "role" in item:
            out.append({"role": item["role"], "content": content})
    return out
