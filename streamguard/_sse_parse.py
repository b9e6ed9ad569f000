"""An incremental Server-Sent Events parser: bytes in, events out. Pure, no I/O.

Follows the WHATWG event-stream rules that matter for LLM streams: lines end with ``\\r\\n``,
``\\n`` or ``\\r``; ``data:`` lines of one event are joined with ``\\n``; one space after the
colon is dropped; ``:`` lines are comments; a blank line dispatches the event; an event with no
``data`` is not dispatched. A leading UTF-8 BOM is skipped.

Invariant: chunk boundaries do not matter. Lines are split on bytes (``\\r`` and ``\\n`` never
occur inside a multi-byte UTF-8 character) and decoded whole, so a boundary anywhere, even
inside a character or between ``\\r`` and ``\\n``, gives the same events.

Unlike the spec (which drops it), an event left without its closing blank line when the body
ends is dispatched by :meth:`SSEParser.finish`: some providers omit the last blank line.
"""

from __future__ import annotations

from dataclasses import dataclass

from .exceptions import StreamFormatError

__all__ = ["SSEEvent", "SSEParser"]

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched event: its ``event`` name (``None`` if unnamed), ``data`` and ``id``."""

    data: str
    event: str | None = None
    id: str | None = None


class SSEParser:
    """Feed bytes as they arrive; get the events each feed completes."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._skip_lf = False  # the last chunk ended with "\r": a leading "\n" belongs to it
        self._started = False
        self._data: list[str] = []
        self._event: str | None = None
        self._last_id: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse ``chunk``; return the events it completes (possibly none)."""
        if not self._started:
            self._buffer += chunk
            if len(self._buffer) < len(_BOM) and _BOM.startswith(bytes(self._buffer)):
                return []  # can't tell yet whether this is a BOM
            self._started = True
            chunk = bytes(self._buffer[3:] if self._buffer.startswith(_BOM) else self._buffer)
            self._buffer.clear()
        if not chunk:
            return []
        events: list[SSEEvent] = []
        start = 0
        if self._skip_lf and chunk[:1] == b"\n":
            start = 1
        self._skip_lf = False
        size = len(chunk)
        while start < size:
            lf = chunk.find(b"\n", start)
            cr = chunk.find(b"\r", start, lf if lf >= 0 else size)
            end = cr if cr >= 0 else lf
            if end < 0:
                self._buffer += chunk[start:]
                break
            self._buffer += chunk[start:end]
            line = bytes(self._buffer)
            self._buffer.clear()
            start = end + 1
            if chunk[end] == 13:  # "\r": a following "\n" is part of the same line ending
                if start < size:
                    if chunk[start] == 10:
                        start += 1
                else:
                    self._skip_lf = True
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def finish(self) -> list[SSEEvent]:
        """The body ended: dispatch what is left (an unterminated last line and event)."""
        events: list[SSEEvent] = []
        if not self._started and self._buffer:
            self._started = True
            rest = bytes(self._buffer)
            self._buffer.clear()
            events += self.feed(rest)
        if self._buffer:
            line = bytes(self._buffer)
            self._buffer.clear()
            event = self._line(line)
            if event is not None:
                events.append(event)
        event = self._line(b"")
        if event is not None:
            events.append(event)
        return events

    def _line(self, raw: bytes) -> SSEEvent | None:
        """Process one line; return an event if it was the blank line ending one."""
        if not raw:
            if not self._data:
                self._event = None
                return None
            event = SSEEvent("\n".join(self._data), self._event, self._last_id)
            self._data = []
            self._event = None
            return event
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StreamFormatError(f"SSE line is not valid UTF-8: {raw[:80]!r}") from exc
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value or None
        elif name == "id" and "\0" not in value:
            self._last_id = value
        return None
