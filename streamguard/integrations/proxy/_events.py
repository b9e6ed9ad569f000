"""Upstream SSE bytes -> events whose ``data`` stays bytes (so a clean chunk can go out as it came). Pure.

Same rules as :mod:`streamguard._sse_parse` (lines end with ``\\r\\n``, ``\\n`` or ``\\r``; ``data:``
lines of one event joined with ``\\n``; one space after the colon dropped; ``:`` comments skipped;
a blank line dispatches; an event without data is not dispatched; a trailing event without its
blank line is dispatched by :meth:`EventParser.finish`), but nothing is decoded: the common case,
``data: {json}\\n\\n`` with ``\\n`` line ends, is a ``find`` and a slice per event.
"""

from __future__ import annotations

__all__ = ["EventParser", "RawEvent"]

RawEvent = tuple[bytes | None, bytes]  # (event name, data)


class EventParser:
    """Feed body bytes as they arrive; get the ``(event, data)`` pairs each feed completes.

    Works a block (the text between two blank lines) at a time: a block that is one ``data: ``
    line is sliced out whole; any other block is read line by line.
    """

    def __init__(self) -> None:
        self._buffer = b""  # text after the last complete block, line ends already made "\n"
        self._cr = False  # the last chunk ended with "\r": a "\n" starting the next one belongs to it
        self._started = False

    def feed(self, chunk: bytes) -> list[RawEvent]:
        """Parse ``chunk``; return the events it completes (possibly none)."""
        if not self._started:
            if len(self._buffer) + len(chunk) < 3 and b"\xef\xbb\xbf".startswith(self._buffer + chunk):
                self._buffer += chunk
                return []
            chunk, self._buffer = self._buffer + chunk, b""
            self._started = True
            if chunk.startswith(b"\xef\xbb\xbf"):
                chunk = chunk[3:]
        if not chunk:
            return []
        if self._cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._cr = chunk[-1:] == b"\r"
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        old = len(self._buffer)
        buffer = self._buffer + chunk if old else chunk
        events: list[RawEvent] = []
        start = 0
        end = buffer.find(b"\n\n", old - 1 if old else 0)
        while end >= 0:
            self._block(buffer[start:end], events)
            start = end + 2
            end = buffer.find(b"\n\n", start)
        self._buffer = buffer[start:]
        return events

    def finish(self) -> list[RawEvent]:
        """The body ended: dispatch a last event left without its blank line."""
        events: list[RawEvent] = []
        if self._buffer:
            self._block(self._buffer, events)
            self._buffer = b""
        return events

    @staticmethod
    def _block(block: bytes, events: list[RawEvent]) -> None:
        if block[:6] == b"data: " and b"\n" not in block:  # nearly every event of an LLM stream
            events.append((None, block[6:]))
            return
        data: list[bytes] = []
        event: bytes | None = None
        for line in block.split(b"\n"):
            if not line:  # a blank line (only at the block's start): dispatch, reset
                if data:
                    events.append((event, b"\n".join(data)))
                data, event = [], None
                continue
            if line[:1] == b":":
                continue
            name, colon, value = line.partition(b":")
            if colon and value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                data.append(value)
            elif name == b"event":
                event = value
        if data:
            events.append((event, b"\n".join(data)))
