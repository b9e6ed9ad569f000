"""WindowBuffer: windows are contiguous, boundary-aligned, overlapping by context."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamguard.window import MAX_WORD_CHARS, Window, WindowBuffer


def buffer(window: int = 20, first: int = 8, overlap: int = 10, growth: float = 2.0) -> WindowBuffer:
    return WindowBuffer(window_chars=window, first_window_chars=first, growth=growth, overlap_chars=overlap)


def feed_all(buf: WindowBuffer, deltas: list[str]) -> list[Window]:
    windows = [w for d in deltas for w in buf.feed(d)]
    last = buf.flush()
    return windows + ([last] if last else [])


@pytest.mark.parametrize(
    ("deltas", "expected_new"),
    [
        (["Hello there general Kenobi"], ["Hello", " there", " general Kenobi"]),
        (["Hi"], ["Hi"]),
        ([""], []),
        (["one two three four five six seven"], ["one", " two three", " four five six", " seven"]),
    ],
)
def test_cuts_fall_before_whitespace(deltas: list[str], expected_new: list[str]) -> None:
    """New text of each window ends just before a space, where OpenAI tokens start."""
    windows = feed_all(buffer(window=16, first=6, overlap=0), deltas)
    assert [w.new_text for w in windows] == expected_new


def test_first_window_goes_with_the_delta_that_fills_it() -> None:
    """The first window does not wait for the next word: time-to-first-token is one round trip."""
    buf = buffer(window=20, first=4, overlap=0)
    assert buf.feed("He") == []
    assert [w.new_text for w in buf.feed("llo")] == ["Hello"]
    assert buf.feed(" wor") == []  # later windows end before whitespace, so they wait for the word


def test_window_waits_for_the_word_to_end() -> None:
    """A partial word is not cut while its end may still arrive."""
    buf = buffer(window=20, first=2, overlap=0)
    assert [w.new_text for w in buf.feed("Hi")] == ["Hi"]  # the first window goes at once
    assert buf.feed(" Extraordinar") == []  # no boundary yet, within reach of MAX_WORD_CHARS
    windows = buf.feed("ily long words")
    assert windows and windows[0].new_text == " Extraordinarily"


def test_text_without_spaces_is_cut_hard_at_target() -> None:
    """Chinese-like text without spaces still gets windows, of the target size."""
    buf = buffer(window=10, first=10, overlap=0)
    windows = buf.feed("字" * (10 + MAX_WORD_CHARS))
    assert windows[0].new_text == "字" * 10


def test_hard_cut_never_splits_a_combining_sequence() -> None:
    """A hard cut moves back so a combining mark stays with its base letter."""
    buf = buffer(window=10, first=10, overlap=0)
    text = "a" * 9 + "e\u0301" + "b" * 40  # 'é' as e + combining acute at offsets 9-10
    windows = buf.feed(text)
    assert not windows[1].new_text.startswith("\u0301")
    assert "".join(w.new_text for w in windows) + (buf.flush() or Window(0, 0, 0, 0, "")).new_text == text


def test_context_is_aligned_to_a_word_and_bounded() -> None:
    """Each window's context is at most ``overlap`` characters of earlier text, starting at a word."""
    buf = buffer(window=16, first=16, overlap=10)
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    windows = feed_all(buf, [text])
    for w in windows[1:]:
        context = text[w.context_start : w.start]
        assert len(context) <= 10
        assert w.context_start == 0 or text[w.context_start].isspace()
        assert w.text == text[w.context_start : w.end]


def test_windows_grow_from_first_to_max() -> None:
    """The first window is small; later targets double up to ``window_chars``."""
    buf = buffer(window=64, first=8, overlap=0)
    windows = feed_all(buf, ["word " * 60])
    sizes = [w.end - w.start for w in windows]
    assert sizes[0] <= 8 + 1
    assert max(sizes) <= 64 + MAX_WORD_CHARS and max(sizes) > 32


def test_context_floor_excludes_redacted_text() -> None:
    """After ``exclude_context_before``, no later window sends earlier text as context."""
    buf = buffer(window=10, first=10, overlap=50)
    buf.feed("first part here ")
    buf.exclude_context_before(15)
    windows = feed_all(buf, ["then more words follow on"])
    assert windows[0].context_start == windows[0].start  # began before the floor: no context at all
    assert all(w.context_start >= 15 for w in windows[1:])


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(st.text(alphabet=st.sampled_from("ab c\n字é\u0301"), max_size=30), max_size=40),
    window=st.integers(1, 40),
    first=st.integers(1, 40),
    overlap=st.integers(0, 30),
)
def test_windows_partition_the_text(pieces: list[str], window: int, first: int, overlap: int) -> None:
    """For any chunking, windows are contiguous, cover all text once, and carry correct context."""
    first = min(first, window)
    buf = buffer(window=window, first=first, overlap=overlap)
    windows = feed_all(buf, pieces)
    text = "".join(pieces)
    assert "".join(w.new_text for w in windows) == text
    position = 0
    for seq, w in enumerate(windows):
        assert (w.seq, w.start) == (seq, position)
        assert w.end > w.start
        context = text[w.context_start : w.start]
        if len(context) > overlap:
            # Past the overlap only to reach the start of a word split at the boundary.
            assert len(context) <= MAX_WORD_CHARS and not any(c.isspace() for c in context)
            assert w.context_start == 0 or text[w.context_start - 1].isspace()
        assert w.text == text[w.context_start : w.end]
        position = w.end
    assert buf.pending == 0 and buf.total == len(text)
