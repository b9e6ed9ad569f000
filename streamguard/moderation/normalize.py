"""The normalised view of a text that moderators judge: disguises removed, offsets kept.

A model (or whoever steers it) can hide a word from a moderator without hiding it from a reader:
zero-width characters or soft hyphens inside it, combining marks on its letters, fullwidth or
mathematical letters, look-alike letters of another script (Cyrillic ``а``/``е``/``о``), bidi
overrides, or plain NFD. :func:`moderation_view` undoes all of these:

1. compatibility decomposition (NFKD: fullwidth, math alphanumerics, ligatures, circled and
   superscript letters become plain ones);
2. default-ignorable and format characters removed (zero-width space/joiners, soft hyphen, word
   joiner, bidi embeddings/overrides/isolates and marks, variation selectors, tags, BOM, ...);
3. look-alikes folded to the ASCII letter or digit they imitate, from Unicode's confusables table
   (UTS #39 data, as shipped by the ``confusable-homoglyphs`` package, read offline) - only in a
   word that has an ASCII letter or is made of look-alikes only, so a Russian or Greek sentence
   stays Russian or Greek for a moderator that reads it;
4. combining marks on a character that ended up ASCII removed (Zalgo text, ``k̶i̶l̶l̶``,
   accents); marks on other scripts' letters are kept and recomposed (NFC), so Hindi or Korean
   keep their meaning.

Each character of the view remembers the original character it came from, so a flag found in the
view is mapped back to the original text (:meth:`ModerationView.original_span`). Callers always
receive the original text; only moderators see the view. The work is linear in the text's length,
and an ASCII text is its own view (no copy, no table).
"""

from __future__ import annotations

import functools
import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

__all__ = ["ModerationView", "moderation_view"]

# Default_Ignorable_Code_Point (Unicode DerivedCoreProperties.txt) and the bidi controls; every
# other format character (category Cf) is removed as well.
_IGNORABLE_RANGES: tuple[tuple[int, int], ...] = (
    (0x00AD, 0x00AD),  # soft hyphen
    (0x034F, 0x034F),  # combining grapheme joiner
    (0x061C, 0x061C),  # Arabic letter mark
    (0x115F, 0x1160),  # Hangul fillers
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),  # Mongolian variation selectors and vowel separator
    (0x200B, 0x200F),  # zero-width space, ZWNJ, ZWJ, LRM, RLM
    (0x202A, 0x202E),  # bidi embeddings and overrides
    (0x2060, 0x206F),  # word joiner, invisible operators, bidi isolates, deprecated format
    (0x3164, 0x3164),  # Hangul filler
    (0xFE00, 0xFE0F),  # variation selectors
    (0xFEFF, 0xFEFF),  # zero-width no-break space (BOM)
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),  # shorthand format controls
    (0x1D173, 0x1D17A),  # musical format controls
    (0xE0000, 0xE0FFF),  # tags and variation selectors supplement
)


@dataclass(frozen=True, eq=False)
class ModerationView:
    """A text as moderators see it, with the way back to the original.

    Attributes:
        original: The text as it was.
        text: The normalised text (what to send to a moderator).
    """

    original: str
    text: str
    _origins: Sequence[int] | None  # original index of each character of ``text``; None: identity

    def original_offset(self, offset: int) -> int:
        """The original offset of a normalised one.

        Args:
            offset: An offset into :attr:`text`, ``0 <= offset <= len(text)``.

        Returns:
            The index of the original character that ``text[offset]`` came from, or
            ``len(original)`` for ``offset == len(text)``.

        Raises:
            IndexError: ``offset`` is out of range.
        """
        if not 0 <= offset <= len(self.text):
            raise IndexError(f"offset {offset} is outside the view (0..{len(self.text)})")
        if self._origins is None:
            return offset
        return self._origins[offset] if offset < len(self.text) else len(self.original)

    def original_span(self, start: int, end: int) -> tuple[int, int]:
        """The original span ``[start', end')`` that covers the normalised span ``[start, end)``.

        The span includes what the disguise put inside and right after it (a zero-width space
        inside a flagged word, the combining marks on its last letter), and all of an original
        character that expanded into several (``ﬁ``), so a redaction removes the whole disguise.

        Raises:
            IndexError: ``start`` or ``end`` is out of range, or ``start > end``.
        """
        if start > end:
            raise IndexError(f"span start {start} is after its end {end}")
        first = self.original_offset(start)
        if end == start:
            return first, first
        last = self.original_offset(end)  # where the next kept character came from
        if end < len(self.text) and last <= self.original_offset(end - 1):
            last = self.original_offset(end - 1) + 1  # ``end`` cuts an expanded character: take all of it
        return first, last


def moderation_view(text: str) -> ModerationView:
    """Normalise ``text`` for moderation (see the module docstring); linear time.

    Args:
        text: The original text (a window, a message, ...).

    Returns:
        The view: ``moderation_view(t).text`` is what a moderator should judge.
    """
    if text.isascii():
        return ModerationView(text, text, None)
    out: list[str] = []
    origins: list[int] = []
    word: list[_Letter] = []
    fold = _fold_table()
    for index, char in enumerate(text):
        for piece in _decomposed(char):
            if _is_mark(piece):
                if word:
                    word[-1].marks.append((index, piece))
                elif out and not out[-1].isascii():
                    _append(out, origins, piece, index)
                # else: a mark on nothing, or on ASCII punctuation: dropped
            elif _wordy(piece, fold):
                word.append(_Letter(index, piece, []))
            else:
                _flush(word, out, origins, fold)
                _append(out, origins, fold.get(piece, piece), index)
    _flush(word, out, origins, fold)
    return ModerationView(text, "".join(out), origins)


@dataclass
class _Letter:
    """A letter of the word being read: where it came from, its base character and its marks."""

    index: int
    base: str
    marks: list[tuple[int, str]]


def _flush(word: list[_Letter], out: list[str], origins: list[int], fold: dict[str, str]) -> None:
    """Emit a buffered word: folded if it has an ASCII letter or is all look-alikes."""
    if not word:
        return
    folding = any(x.base.isascii() and x.base.isalpha() for x in word) or all(
        x.base.isascii() or x.base in fold for x in word
    )
    for letter in word:
        char = fold.get(letter.base, letter.base) if folding else letter.base
        _append(out, origins, char, letter.index)
        if not char.isascii():  # marks on an ASCII letter are the disguise: dropped
            for index, mark in letter.marks:
                _append(out, origins, mark, index)
    word.clear()


def _append(out: list[str], origins: list[int], char: str, index: int) -> None:
    """Append a character, composed (NFC) with the one before where Unicode composes them."""
    if out and _composes(char) and not out[-1].isascii():
        composed = unicodedata.normalize("NFC", out[-1] + char)
        if len(composed) == 1:
            out[-1] = composed
            return
    out.append(char)
    origins.append(index)


def _composes(char: str) -> bool:
    """Whether ``char`` may compose with the character before it (a mark or a Hangul vowel/final)."""
    return _is_mark(char) or 0x1160 <= ord(char) <= 0x11FF


@functools.lru_cache(maxsize=8192)
def _decomposed(char: str) -> str:
    """NFKD of one character, without default-ignorable or format characters."""
    pieces = unicodedata.normalize("NFKD", char)
    return "".join(p for p in pieces if not _ignorable(p))


def _ignorable(char: str) -> bool:
    code = ord(char)
    if unicodedata.category(char) == "Cf":
        return True
    return any(low <= code <= high for low, high in _IGNORABLE_RANGES)


def _is_mark(char: str) -> bool:
    return unicodedata.category(char).startswith("M")


def _wordy(char: str, fold: dict[str, str]) -> bool:
    """Part of a word: a letter, digit or combining-free character that imitates one."""
    return char.isalnum() or char in fold


@functools.cache
def _fold_table() -> dict[str, str]:
    """Non-ASCII character -> the ASCII letter or digit it imitates (Unicode confusables, UTS #39).

    The table lists, for each character, the characters confusable with it; a character whose
    look-alikes include no ASCII letter or digit is followed through its look-alikes (``к`` ->
    ``ĸ`` -> ``k``), at most three steps. Lower-case letters are preferred, then capitals, then digits.
    """
    raw = resources.files("confusable_homoglyphs").joinpath("confusables.json").read_text(encoding="utf-8")
    graph: dict[str, list[str]] = {
        source: [c for c in (entry["c"].strip("\u200e\u200f") for entry in entries) if len(c) == 1]
        for source, entries in json.loads(raw).items()
        if len(source) == 1
    }
    table: dict[str, str] = {}
    for source in graph:
        if source.isascii() or _is_mark(source):
            continue
        frontier, seen = [source], {source}
        for _ in range(3):
            found = sorted((c for c in frontier for c in graph.get(c, ()) if c.isascii() and c.isalnum()), key=_rank)
            if found:
                table[source] = found[0]
                break
            frontier = [n for c in frontier for n in graph.get(c, ()) if n not in seen]
            seen.update(frontier)
    return table


def _rank(char: str) -> tuple[int, str]:
    return (0 if char.islower() else 1 if char.isupper() else 2), char
