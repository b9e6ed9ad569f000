"""Guard a streamed Responses API call (``client.responses.create(stream=True)``) with the same engine.

The adapter maps each event onto the chat-chunk shape the engine reads and back:

- ``response.output_text.delta`` / ``response.refusal.delta`` become text deltas of a "choice" keyed
  by ``(output_index, content_index)``; their ``*.done`` events become that choice's finish (so a
  part's last window is judged at once, and the done event waits for every verdict of its text).
- Every other event passes through unchanged and in order (a choice-less item to the engine).
- Events that repeat the whole text (``output_text.done``, ``content_part.done``,
  ``output_item.done``, and the terminal ``response.completed``) are rewritten to the text that was
  released, so a redacted or withheld span never reaches the consumer through them.
- On a cut-off the stream ends with the API's own shapes for an incomplete answer: the part's
  ``output_text.done`` with the released text, its ``output_item.done`` with status
  ``"incomplete"``, then ``response.incomplete`` with ``incomplete_details.reason ==
  "content_filter"``. Usage is synthesized when the terminal event lacks it.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Mapping, Sequence
from typing import Any

from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionChunk
from openai.types.chat.chat_completion_chunk import Choice, ChoiceDelta
from openai.types.responses import ResponseStreamEvent

from ._adapted import AdaptedStream
from .guard import GuardedStream, Hook
from .moderation._base import Moderator
from .policy import Policy
from .sources import chunk_iterator, close_quietly

__all__ = ["GuardedResponseStream", "guard_responses"]

_DELTAS = {"response.output_text.delta": "content", "response.refusal.delta": "refusal"}
_DONES = {"response.output_text.done": "text", "response.refusal.done": "refusal"}
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_PARTS = 64  # content parts per output item that get their own "choice" index
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

    def __aiter__(self) -> _ToChunks:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        return self._carrier(_as_event(await self._iterator.__anext__()))

    async def aclose(self) -> None:
        if self._iterator is not self._stream:
            await close_quietly(self._iterator)
        await close_quietly(self._stream)

    def _carrier(self, event: Any) -> ChatCompletionChunk:
        kind = getattr(event, "type", "")
        response = getattr(event, "response", None)
        if response is not None and getattr(response, "model", None):
            self._model = response.model
        choices: list[Choice] = []
        if kind in _DELTAS:
            delta = ChoiceDelta.construct(**{_DELTAS[kind]: event.delta})
            choices = [Choice.construct(index=_key(event), delta=delta, finish_reason=None, logprobs=None)]
        elif kind in _DONES:
            choices = [Choice.construct(index=_key(event), delta=ChoiceDelta.construct(), finish_reason="stop")]
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
        self._released: dict[int, str] = {}
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
            text = getattr(choice.delta, _DELTAS[kind]) or ""
            if not text:
                return []
            key = choice.index
            self._released[key] = self._released.get(key, "") + text
            self._last_delta[key] = event
            return [event if text == event.delta else event.model_copy(update={"delta": text, "logprobs": []})]
        if kind in _DONES:
            key = _key(event)
            return [event.model_copy(update={_DONES[kind]: self._released.get(key, "")})]
        if kind in ("response.created", "response.in_progress"):
            self._response = event.response
        elif kind == "response.output_item.added":
            self._items[event.output_index] = event.item
        elif kind == "response.content_part.done":
            key = _key(event)
            if key in self._released:
                field = "refusal" if getattr(event.part, "type", "") == "refusal" else "text"
                return [event.model_copy(update={"part": event.part.model_copy(update={field: self._released[key]})})]
        elif kind == "response.output_item.done":
            return [event.model_copy(update={"item": self._rewrite_item(event.output_index, event.item)})]
        elif kind in _TERMINAL:
            self._terminal = event  # held: usage may need filling in, and a cut changes it
            return []
        return [event]

    def finish(self) -> list[Any]:
        terminal = self._terminal
        response = terminal.response if terminal is not None else self._response
        if response is None:
            return []
        output = [self._rewrite_item(i, item) for i, item in enumerate(response.output)]
        if self._cut and not response.output:
            output = [self._rewrite_item(i, item) for i, item in sorted(self._items.items())]
        update: dict[str, Any] = {}
        if any(new is not old for new, old in zip(output, response.output, strict=False)) or len(output) != len(
            response.output
        ):
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
        if last is not None:
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

            self._seq += 1
            done = self._rewrite_item(key // _PARTS, item).model_copy(update={"status": "incomplete"})
            out.append(
                ResponseOutputItemDoneEvent.construct(
                    type="response.output_item.done", sequence_number=self._seq, output_index=key // _PARTS, item=done
                )
            )
        return out

    def _rewrite_item(self, output_index: int, item: Any) -> Any:
        """``item`` with each guarded content part's text replaced by the released text."""
        content = getattr(item, "content", None)
        if getattr(item, "type", "") != "message":
            return item
        parts = list(content or [])
        keys = [output_index * _PARTS + j for j in range(max(len(parts), 1))]
        if not any(k in self._released or k in self._cut for k in keys):
            return item
        new_parts = []
        changed = False
        for j, part in enumerate(parts):
            key = output_index * _PARTS + j
            field = "refusal" if getattr(part, "type", "") == "refusal" else "text"
            if (key in self._released or key in self._cut) and getattr(part, field, None) != self._released.get(
                key, ""
            ):
                part = part.model_copy(update={field: self._released.get(key, "")})
                changed = True
            new_parts.append(part)
        if parts and not changed:
            return item
        if not parts and (output_index * _PARTS) in self._released:
            from openai.types.responses import ResponseOutputText

            text = self._released[output_index * _PARTS]
            new_parts = [ResponseOutputText.construct(type="output_text", text=text, annotations=[])]
        return item.model_copy(update={"content": new_parts})


def _key(event: Any) -> int:
    return int(event.output_index) * _PARTS + int(getattr(event, "content_index", 0) or 0)


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
    from openai.types.responses import ResponseUsage

    return ResponseUsage.model_validate(
        {
            "input_tokens": usage.prompt_tokens,
            "output_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }
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
