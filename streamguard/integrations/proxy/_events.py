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
    """Feed body bytes as they arrive; get the ``(event, data)`` pairs each feed completes."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._event: bytes | None = None
        self._started = False

    def feed(self, chunk: bytes) -> list[RawEvent]:
        """Parse ``chunk``; return the events it completes (possibly none)."""
        buffer = self._buffer + chunk if self._buffer else chunk
        if not self._started:
            if len(buffer) < 3 and b"\xef\xbb\xbf".startswith(buffer):
                self._buffer = buffer
                return []
            self._started = True
            if buffer.startswith(b"\xef\xbb\xbf"):
                buffer = buffer[3:]
        if b"\r" in buffer:
            if buffer.endswith(b"\r"):  # its "\n" may be in the next chunk: decide then
                self._buffer = buffer
                buffer = buffer[:-1]
                keep_cr = True
            else:
                keep_cr = False
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        else:
            keep_cr = False
        events: list[RawEvent] = []
        start = 0
        find = buffer.find
        while True:
            end = find(b"\n", start)
            if end < 0:
                break
            self._line(buffer[start:end], events)
            start = end + 1
        rest = buffer[start:]
        self._buffer = rest + b"\r" if keep_cr else rest
        return events

    def finish(self) -> list[RawEvent]:
        """The body ended: dispatch a last event left without its blank line."""
        events: list[RawEvent] = []
        if self._buffer:
            self._line(self._buffer.rstrip(b"\r"), events)
            self._buffer = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[RawEvent]) -> None:
        if not line:
            if self._data:
                events.append((self._event, b"\n".join(self._data)))
            self._data = []
            self._event = None
            return
        if line[:1] == b":":
            return
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value
