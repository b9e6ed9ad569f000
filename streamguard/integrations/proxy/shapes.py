"""The fast path: upstream SSE -> plain dicts for the guard -> SSE bytes, forwarding clean chunks as they came.

Each ``data:`` payload is parsed once (orjson) into a plain dict. The source remembers the dict's
original bytes by identity (``raws``: ``id(dict) -> (dict, bytes)``). When the guard releases a
chunk unchanged it yields that very dict object, and the encoder sends the original bytes: no
pydantic object built, nothing serialised. A chunk the guard edited is a new object and is
serialised (orjson for a dict; ``to_json`` for an engine that yields ``ChatCompletionChunk``
objects). ``raws`` is capped: a chunk whose entry was dropped is serialised, never wrong.

Shapes:

- ``chat``: ``data: {chat.completion.chunk}`` ... ``data: [DONE]``.
- ``completions`` (legacy): each ``text_completion`` chunk is read as a chat chunk whose delta
  ``content`` is the choice's ``text``, and turned back on the way out (a chunk released
  unchanged is still its original bytes).
- ``responses``: ``event: response.*`` + ``data: {event}`` pairs, guarded by
  :func:`streamguard.guard_responses`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import httpx2
import openai

from ...exceptions import StreamFormatError
from ._events import EventParser, RawEvent
from ._json import JSONDecodeError, dumps, loads

__all__ = ["Source", "encoder", "starts_body"]

_MAX_RAWS = 4096  # remembered chunks per stream (held or edited ones); past this, the oldest are serialised
# After ``[DONE]``, what is left of upstream's body (the chunked encoding's last chunk) is read so
# the connection goes back to the pool instead of being closed: at most this much, this long.
_TAIL_BYTES = 65_536
_TAIL_SECONDS = 0.25
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})


class Source:
    """Upstream's SSE body as dicts (of the guard's shape), closing the body when closed.

    Args:
        response: Upstream's streaming answer.
        shape: ``chat``, ``completions`` or ``responses``.
    """

    def __init__(self, response: httpx2.Response, shape: str) -> None:
        self._response = response
        # Asked for without compression: raw bytes skip httpx's decoder (unless upstream compressed anyway).
        plain = response.headers.get("content-encoding", "identity").strip().lower() in ("", "identity")
        self._body = response.aiter_raw() if plain else response.aiter_bytes()
        self._parser = EventParser()
        self._pending: deque[RawEvent] = deque()
        self._ended = False
        self._done = False  # [DONE] came: the rest of the body is only read to keep the connection
        self._shape = shape
        self.raws: dict[int, tuple[dict[str, Any], bytes]] = {}
        self.names: dict[int, bytes] = {}  # responses: the event name each dict came with
        self.record = True  # off once the guard yields objects (an engine that never hands dicts back)

    def __aiter__(self) -> Source:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while not self._pending:
            if self._ended:
                raise StopAsyncIteration
            try:
                part = await self._body.__anext__()
            except httpx2.TimeoutException as exc:
                raise openai.APITimeoutError(request=self._response.request) from exc
            except httpx2.TransportError as exc:
                raise openai.APIConnectionError(request=self._response.request) from exc
            except StopAsyncIteration:
                self._ended = True
                self._pending.extend(self._parser.finish())
            else:
                self._pending.extend(self._parser.feed(part))
        name, data = self._pending.popleft()
        if data == b"[DONE]":
            self._ended = self._done = True
            self._pending.clear()
            raise StopAsyncIteration
        try:
            obj: Any = loads(data)
        except JSONDecodeError as exc:
            raise StreamFormatError(f"upstream sent an event that is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise StreamFormatError(f"upstream sent a {type(obj).__name__} event, not an object")
        if self._shape != "responses" and "error" in obj and "choices" not in obj:
            error = obj["error"]
            message = error.get("message") if isinstance(error, dict) else None
            raise openai.APIError(
                message if isinstance(message, str) else "upstream error",
                self._response.request,
                body=error if isinstance(error, dict) else obj,
            )
        if self._shape == "completions":
            obj = _chat_from_completion(obj)
        chunk: dict[str, Any] = obj
        if not self.record:
            return chunk
        raws = self.raws
        if len(raws) >= _MAX_RAWS:
            del raws[next(iter(raws))]
        raws[id(obj)] = (obj, data)
        if name is not None and self._shape == "responses":
            self.names[id(obj)] = name
        return chunk

    async def aclose(self) -> None:
        if self._done:
            self._done = False
            # Upstream said it is done: read its body's end (bounded), so that closing the
            # response keeps the connection for the next request (a new TLS handshake otherwise).
            with anyio.move_on_after(_TAIL_SECONDS):
                size = 0
                try:
                    async for part in self._body:
                        size += len(part)
                        if size > _TAIL_BYTES:
                            break
                except httpx2.HTTPError:
                    pass  # the connection is closed instead; nothing else changes
        await self._response.aclose()


def encoder(source: Source, shape: str) -> Callable[[Any], bytes]:
    """The function that turns one guarded item into SSE bytes."""
    raws = source.raws

    def objects() -> None:
        source.record = False
        raws.clear()
        source.names.clear()

    def original(item: Any) -> bytes | None:
        entry = raws.pop(id(item), None)
        if entry is not None and entry[0] is item:
            data: bytes = entry[1]
            return data
        if entry is not None:  # an id reused by another object: keep the entry
            raws[id(item)] = entry
        return None

    if shape == "chat":

        def chat(item: Any) -> bytes:
            if type(item) is dict:
                data = original(item)
                return b"data: " + (data if data is not None else dumps(item)) + b"\n\n"
            if source.record:
                objects()
            text: str = item.to_json(indent=None)
            return b"data: " + text.encode() + b"\n\n"

        return chat

    if shape == "completions":

        def completion(item: Any) -> bytes:
            if type(item) is dict:
                data = original(item)
                if data is not None:
                    return b"data: " + data + b"\n\n"
            else:
                if source.record:
                    objects()
                item = item.model_dump(mode="json", exclude_unset=True)
            return b"data: " + dumps(_completion_from_chat(item)) + b"\n\n"

        return completion

    names = source.names

    def event(item: Any) -> bytes:
        if type(item) is dict:
            data = original(item)
            kind = names.pop(id(item), None) if data is not None else None
            if data is None:
                data = dumps(item)
            if kind is None:
                kind = str(item.get("type", "")).encode()
        else:
            if source.record:
                objects()
            data = item.to_json(indent=None).encode()
            kind = str(getattr(item, "type", "")).encode()
        return b"event: " + kind + b"\ndata: " + data + b"\n\n"

    return event


def starts_body(item: Any, shape: str) -> bool:
    """Whether ``item`` carries an answer (text, a finish, usage), so the response may begin with it.

    Chunks before it (the role chunk, ``response.created``, ...) are held until it comes: a
    failure before any answer then gets an HTTP status, not a 200 and an error event.
    """
    if shape == "responses":
        kind = item.get("type") if type(item) is dict else getattr(item, "type", None)
        return not isinstance(kind, str) or kind.endswith((".delta", ".done")) or kind in _TERMINAL
    if type(item) is not dict:
        item = item.model_dump(mode="json", exclude_unset=True)
    choices = item.get("choices")
    if not choices:
        return True
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("finish_reason"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for key, value in delta.items():
                if key != "role" and value not in (None, "", [], {}):
                    return True
    return False


def _chat_from_completion(chunk: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in chunk.items() if k not in ("choices", "object")}
    out["object"] = "chat.completion.chunk"
    choices = chunk.get("choices")
    out["choices"] = [
        {
            "index": c.get("index", 0),
            "delta": {"content": c["text"]} if isinstance(c.get("text"), str) else {},
            "finish_reason": c.get("finish_reason"),
            "logprobs": None,
        }
        for c in (choices if isinstance(choices, list) else [])
        if isinstance(c, dict)
    ]
    return out


def _completion_from_chat(chunk: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in chunk.items():
        if key == "object":
            out[key] = "text_completion"
        elif key == "choices":
            out[key] = [
                {
                    "text": (c.get("delta") or {}).get("content") or "",
                    "index": c.get("index", 0),
                    "logprobs": None,
                    "finish_reason": c.get("finish_reason"),
                }
                for c in value or []
            ]
        else:
            out[key] = value
    return out
