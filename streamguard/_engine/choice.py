"""Per-choice, per-channel state of the core: plain mutable records, no logic beyond bookkeeping.

A *channel* is one stream of model text with its own windows and verdicts: a choice's
``content``, ``refusal``, ``reasoning``, each tool call's arguments (``tool:<index>``), a legacy
``function_call``'s arguments (``function``) or an audio transcript (``audio``). An *item* is one
upstream unit (a single-choice chunk, or a chunk with no choice) and the text ranges it carries in
each channel; items leave in order once every range they carry is released.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..moderation._base import Verdict
from ..window import Window, WindowBuffer

__all__ = ["Channel", "ChoiceState", "Item", "Piece", "TOOL_PREFIX", "is_tool"]

TOOL_PREFIX = "tool:"


def is_tool(key: str) -> bool:
    """Tool-call and function-call arguments are withheld until the call is complete and judged."""
    return key.startswith(TOOL_PREFIX) or key == "function"


@dataclass(slots=True, eq=False)
class Channel:
    """One text channel of one choice."""

    choice: int
    key: str
    buffer: WindowBuffer
    tool: bool
    settled: int = 0  # text before this offset has its verdict (clean or redacted)
    released: int = 0  # text before this offset has gone out
    next_settle: int = 0  # seq of the next window to settle, in order
    pending: dict[int, Window] = field(default_factory=dict)
    results: dict[int, tuple[Verdict | BaseException, float]] = field(default_factory=dict)
    redactions: list[tuple[int, int]] = field(default_factory=list)
    context_floor: int = 0  # end of the last redacted span: later context starts here
    closed: bool = False  # no more text will come
    redact_all: bool = False  # a tool call under redact: its whole arguments become a JSON string
    shown: list[str] = field(default_factory=list)  # released text not yet counted for usage
    shown_size: int = 0
    last_text_at: float = 0.0

    @property
    def complete(self) -> bool:
        """Closed, and every character has its verdict."""
        return self.closed and not self.pending and self.settled >= self.buffer.total


@dataclass(slots=True, eq=False)
class Piece:
    """The text one item carries in one channel: ``[start, end)`` of that channel."""

    channel: Channel
    start: int
    end: int
    text: str
    field: str  # the delta field it came from (e.g. ``reasoning_content`` vs ``reasoning``)


@dataclass(slots=True, eq=False)
class Item:
    """One upstream unit in order: its original object and the text it carries."""

    seq: int
    original: Any
    choice: int | None
    pieces: list[Piece]
    finish: str | None = None
    opens: tuple[Channel, ...] = ()  # tool channels whose call this item starts (id, name)
    size: int = 0  # characters of text it holds that verdicts can free (the held-text cap)
    tool_size: int = 0  # characters of tool-call text it holds


@dataclass(slots=True, eq=False)
class ChoiceState:
    """Everything the core knows of one choice."""

    index: int
    template: Any  # the first item's original, for chunks the core makes (cut finish, usage)
    channels: dict[str, Channel] = field(default_factory=dict)
    items: deque[Item] = field(default_factory=deque)
    finished: bool = False  # upstream sent its finish_reason (or ended)
    finish_reason: str | None = None
    cut: bool = False
    cut_sent: bool = False
    after_failure: bool = False  # cut after upstream had failed: the error is the ending
