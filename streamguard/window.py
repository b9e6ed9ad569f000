"""``WindowBuffer``: cut one choice's text into windows to moderate. Pure, synchronous, no I/O.

Offsets are character offsets into the choice's whole text. Each window carries *new* text
``[start, end)``, which it is the first to judge, and *context* ``[context_start, start)``:
already-judged text sent again so a phrase straddling the boundary is seen whole. Windows are
contiguous and in order: window ``k + 1`` starts where window ``k`` ends.

Cuts fall just before whitespace (where OpenAI's tokens start), so windows rarely split a chunk
and never split a word while a boundary is in reach; text with no whitespace (e.g. Chinese) is
cut at the target size, never inside a combining sequence. The first window is small, ends with
the delta that fills it (no wait for the next word), and later ones grow, so the first text can be
released after one moderation round trip.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

__all__ = ["Window", "WindowBuffer"]

# How far past the target size a cut may wait for a word boundary before cutting hard.
MAX_WORD_CHARS = 32
_JOINERS = frozenset("\u200d\ufe0e\ufe0f")
_SPACE = re.compile(r"\s")
_NONE: list[Window] = []  # returned when no window is ready (never mutated)


@dataclass(frozen=True)
class Window:
    """One unit of moderation for one choice.

    Attributes:
        seq: Position of this window in its choice, from 0.
        start: Offset of the first new character.
        end: Offset just past the last new character.
        context_start: Offset where the context (already-judged text) begins; ``<= start``.
        text: What the moderator sees: context followed by new text.
    """

    seq: int
    start: int
    end: int
    context_start: int
    text: str

    @property
    def new_text(self) -> str:
        """The part of ``text`` this window is the first to judge."""
        return self.text[self.start - self.context_start :]


class WindowBuffer:
    """Buffer text deltas and cut them into overlapping windows.

    Args:
        window_chars: Target size of a window's new text.
        first_window_chars: Target size of the first window.
        growth: Each window's target is the previous one's times this, up to ``window_chars``.
        overlap_chars: Context characters sent before each window's new text.
    """

    def __init__(
        self, *, window_chars: int, first_window_chars: int, growth: float = 2.0, overlap_chars: int = 0
    ) -> None:
        self._max = window_chars
        self._target = min(first_window_chars, window_chars)
        self._growth = growth
        self._overlap = overlap_chars
        self._buf = ""  # text from offset self._base on
        self._base = 0
        self._start = 0  # offset of the first character not yet in a window
        self._seq = 0
        self._floor = 0  # context never reaches below this (e.g. the end of a redacted span)
        self.total = 0  # characters fed so far

    @property
    def windowed(self) -> int:
        """Offset up to which text has been put into windows."""
        return self._start

    @property
    def pending(self) -> int:
        """Characters fed but not yet in a window."""
        return self.total - self._start

    def pending_text(self) -> str:
        """The text fed but not yet in a window."""
        return self._buf[self._start - self._base :]

    def exclude_context_before(self, offset: int) -> None:
        """Never send text before ``offset`` as context again (it was redacted)."""
        self._floor = max(self._floor, offset)

    def feed(self, text: str) -> list[Window]:
        """Add text; return the windows that became ready (possibly none).

        Linear in ``len(text)``: a long text is taken in steps of a few windows, so the buffer
        never holds more than a few windows and no step re-copies what came before.
        """
        step = 4 * self._max + MAX_WORD_CHARS
        if len(text) <= step:
            self.total += len(text)
            self._buf += text
            if self.total - self._start < self._target:
                return _NONE  # the common case: not a window yet
            windows = []
            while (cut := self._find_cut()) is not None:
                windows.append(self._emit(cut))
            return windows
        windows = []
        for i in range(0, len(text), step):
            piece = text[i : i + step]
            self._buf += piece
            self.total += len(piece)
            while (cut := self._find_cut()) is not None:
                windows.append(self._emit(cut))
        return windows

    def flush(self) -> Window | None:
        """Put all pending text into one window (at a quiet gap or the end), if there is any."""
        if self.pending == 0:
            return None
        return self._emit(self.total)

    def _find_cut(self) -> int | None:
        """Offset at which to end the next window, or None to wait for more text."""
        target = self._target
        start, total = self._start, self.total
        if total - start < target:
            return None
        if self._seq == 0 and total - start <= self._max:
            # The first window decides time-to-first-token: send it with the delta that fills it
            # (a token boundary), not a word later. Later windows overlap it as context.
            return total
        buf, base = self._buf, self._base
        hi = start + target
        # Latest boundary at or before the target ...
        early = _last_space(buf, start + 1 - base, hi - base)
        if early is not None and early + base - start >= max(1, target // 2):
            return early + base
        # ... else the first one after it, within reach ...
        late = _first_space(buf, hi - base, min(total, hi + MAX_WORD_CHARS) - base)
        if late is not None:
            return late + base
        if total < hi + MAX_WORD_CHARS:
            return None  # the word may still end
        # ... else a short window, or a hard cut in a text without spaces.
        if early is not None:
            return early + base
        return _safe_cut(buf, hi - base, start + 1 - base) + base

    def _emit(self, end: int) -> Window:
        start, base, buf = self._start, self._base, self._buf
        context_start = min(start, max(base, start - self._overlap, self._floor))
        # A word split at this boundary is judged whole, whatever the overlap: the context reaches
        # back to the word's start (within MAX_WORD_CHARS).
        word_start = start
        lo = max(base, self._floor, start - MAX_WORD_CHARS)
        while word_start > lo and not buf[word_start - 1 - base].isspace():
            word_start -= 1
        if word_start < context_start:
            context_start = word_start
        elif context_start < word_start and not buf[context_start - base].isspace():
            # Begin the context at a word, not inside one, when a word start is in reach.
            nxt = _first_space(buf, context_start - base, word_start - base)
            if nxt is not None:
                context_start = nxt + base
        window = Window(self._seq, start, end, context_start, buf[context_start - base : end - base])
        self._seq += 1
        self._start = end
        self._target = min(self._max, max(self._target, math.ceil(self._target * self._growth)))
        # Keep only what the next window's context can reach.
        keep_from = max(base, end - max(self._overlap, MAX_WORD_CHARS))
        self._buf = buf[keep_from - base :]
        self._base = keep_from
        return window


def _last_space(buf: str, lo: int, hi: int) -> int | None:
    """Largest i in [lo, hi] with buf[i] a space or a line break (searched in C, not per character)."""
    lo = max(lo, 0)
    end = min(hi, len(buf) - 1) + 1
    if end <= lo:
        return None
    i = max(buf.rfind(" ", lo, end), buf.rfind("\n", lo, end), buf.rfind("\t", lo, end))
    return i if i >= 0 else None


def _first_space(buf: str, lo: int, hi: int) -> int | None:
    """Smallest i in [lo, hi) with buf[i] whitespace."""
    match = _SPACE.search(buf, max(lo, 0), min(hi, len(buf)))
    return match.start() if match else None


def _safe_cut(buf: str, at: int, lo: int) -> int:
    """Move a hard cut back so it never separates a combining mark or joiner from its base."""
    i = at
    while i > lo and (unicodedata.combining(buf[i]) or buf[i] in _JOINERS or buf[i - 1] in _JOINERS):
        i -= 1
    return i
