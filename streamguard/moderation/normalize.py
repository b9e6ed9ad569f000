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
   stays Russian or Greek for a moderator that reads it. In a word with an ASCII letter, Latin
   small capitals count as their letter too, and so what looks only like one (Cyrillic ``к``);
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
    chars = set(text)
    if all(_stable(char) for char in chars):  # e.g. Chinese or Hindi text, undisguised
        return ModerationView(text, text, None)
    return _view(text)


def _view(text: str) -> ModerationView:
    """The general case, character by character (see the module docstring)."""
    fold = _fold_table()
    mixed = _mixed_fold_table()
    # Pass 1: decompose, drop ignorables, fold each word that has an ASCII letter or is all look-alikes.
    pieces: list[str] = []
    kinds: list[int] = []
    origins: list[int] = []
    start = -1  # where the current word started in ``pieces`` (-1: not in a word)
    latin, lookalike = False, True  # the current word: has an ASCII letter; is made of look-alikes only
    for index, char in enumerate(text):
        for piece, kind in _INFO.get(char) or _info(char):
            if kind == _WORDY:
                if start < 0:
                    start, latin, lookalike = len(pieces), False, True
                latin = latin or (piece.isascii() and piece.isalpha())
                lookalike = lookalike and (piece.isascii() or piece in fold)
            elif kind == _OTHER:
                if start >= 0 and (latin or lookalike):
                    _fold_word(pieces, kinds, start, mixed if latin else fold)
                start = -1
                piece = fold.get(piece, piece)
            pieces.append(piece)
            kinds.append(kind)
            origins.append(index)
    if start >= 0 and (latin or lookalike):
        _fold_word(pieces, kinds, start, mixed if latin else fold)
    # Pass 2: drop marks on ASCII (or on nothing), compose the rest (NFC) with their base.
    out: list[str] = []
    kept: list[int] = []
    for piece, kind, index in zip(pieces, kinds, origins, strict=True):
        if kind >= _MARK:
            if out and not out[-1].isascii():
                composed = unicodedata.normalize("NFC", out[-1] + piece)
                if len(composed) == 1:
                    out[-1] = composed
                    continue
            elif kind == _MARK:
                continue  # a mark on an ASCII character (the disguise) or on nothing
        out.append(piece)
        kept.append(index)
    return ModerationView(text, "".join(out), kept)


def _fold_word(pieces: list[str], kinds: list[int], start: int, fold: dict[str, str]) -> None:
    for i in range(start, len(pieces)):
        if kinds[i] == _WORDY:
            pieces[i] = fold.get(pieces[i], pieces[i])


_WORDY, _OTHER, _MARK, _JAMO = 0, 1, 2, 3
# char -> its pieces, classified; filled as characters are met (at most one entry per code point).
_INFO: dict[str, tuple[tuple[str, int], ...]] = {}


def _info(char: str) -> tuple[tuple[str, int], ...]:
    """NFKD of one character without default-ignorable or format characters, each piece classified."""
    fold = _mixed_fold_table()
    out = []
    for piece in unicodedata.normalize("NFKD", char):
        if _ignorable(piece):
            continue
        if _is_mark(piece):
            kind = _MARK
        elif 0x1160 <= ord(piece) <= 0x11FF:  # a Hangul vowel or final: composes with what precedes
            kind = _JAMO
        else:
            kind = _WORDY if _wordy(piece, fold) else _OTHER
        out.append((piece, kind))
    info = _INFO[char] = tuple(out)
    return info


@functools.lru_cache(maxsize=65536)
def _stable(char: str) -> bool:
    """Whether ``char`` is its own view in any context: nothing to drop, fold, strip or compose."""
    if char.isascii():
        return True
    fold = _mixed_fold_table()
    if char in fold or _ignorable(char) or _is_mark(char) or 0x1100 <= ord(char) <= 0x11FF:
        return False
    pieces = unicodedata.normalize("NFKD", char)
    if any(p.isascii() or p in fold or _ignorable(p) for p in pieces):
        return False  # folds, or is a letter whose marks would be stripped
    return unicodedata.normalize("NFC", pieces) == char


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
def _mixed_fold_table() -> dict[str, str]:
    """:func:`_fold_table` and more, for words that have an ASCII letter: Latin small capitals count
    as their letter (``ᴋ`` -> ``k``), so what is confusable only with one folds too (Cyrillic ``к``
    -> ``ĸ`` -> ``ᴋ`` -> ``k``, Greek ``τ``, Cyrillic ``т``, ``м``, ``н``, ``в``). Not used for words
    of look-alikes only: with these, too many Russian or Greek words would turn Latin."""
    return _build_fold_table(small_capitals=True)


@functools.cache
def _fold_table() -> dict[str, str]:
    return _build_fold_table(small_capitals=False)


def _build_fold_table(*, small_capitals: bool) -> dict[str, str]:
    """Non-ASCII character -> the ASCII letter or digit it imitates (Unicode confusables, UTS #39).

    The table lists, for each character, the characters confusable with it; a character whose
    look-alikes include no ASCII letter or digit is followed through its look-alikes, at most three
    steps. Lower-case letters are preferred, then capitals, then digits.
    """
    graph = _confusables()
    ascii_like = _ascii_or_small_capital if small_capitals else _ascii_alnum
    table: dict[str, str] = {}
    for source in graph:
        if source.isascii() or _is_mark(source):
            continue
        if small_capitals and (letter := _small_capital(source)):
            table[source] = letter
            continue
        frontier, seen = [source], {source}
        for _ in range(3):
            found = sorted((a for c in frontier for n in graph.get(c, ()) if (a := ascii_like(n))), key=_rank)
            if found:
                table[source] = found[0]
                break
            frontier = [n for c in frontier for n in graph.get(c, ()) if n not in seen]
            seen.update(frontier)
    return table


@functools.cache
def _confusables() -> dict[str, list[str]]:
    """Character -> the single characters Unicode lists as confusable with it (read once; both tables use it)."""
    raw = resources.files("confusable_homoglyphs").joinpath("confusables.json").read_text(encoding="utf-8")
    return {
        source: [c for c in (entry["c"].strip("\u200e\u200f") for entry in entries) if len(c) == 1]
        for source, entries in json.loads(raw).items()
        if len(source) == 1
    }


_SMALL_CAPITAL = "LATIN LETTER SMALL CAPITAL "


def _small_capital(char: str) -> str | None:
    """The letter a Latin small capital reads as (``ᴋ`` -> ``k``), else None."""
    name = unicodedata.name(char, "")
    if name.startswith(_SMALL_CAPITAL) and len(name) == len(_SMALL_CAPITAL) + 1:
        return name[-1].lower()
    return None


def _ascii_alnum(char: str) -> str | None:
    return char if char.isascii() and char.isalnum() else None


def _ascii_or_small_capital(char: str) -> str | None:
    return _ascii_alnum(char) if char.isascii() else _small_capital(char)


def _rank(char: str) -> tuple[int, str]:
    return (0 if char.islower() else 1 if char.isupper() else 2), char
