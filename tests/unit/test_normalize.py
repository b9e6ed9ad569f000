"""The normalised view for moderators: every disguise is undone, and offsets lead back to the original."""

from __future__ import annotations

import time
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamguard.moderation import KeywordModerator
from streamguard.moderation.normalize import _view, moderation_view

FULLWIDTH = {c: chr(ord(c) - 0x21 + 0xFF01) for c in "abcdefghijklmnopqrstuvwxyz"}
MATH_BOLD = {c: chr(0x1D41A + ord(c) - ord("a")) for c in "abcdefghijklmnopqrstuvwxyz"}
HIDDEN = ["\u200b", "\u200c", "\u200d", "\u2060", "\u00ad", "\ufeff", "\u202e", "\u202d", "\u2066", "\ufe0f", "\u034f"]

DISGUISES = {
    "zero-width space": "bo\u200bmb",
    "zero-width joiner": "b\u200do\u200dm\u200db",
    "soft hyphen": "bom\u00adb",
    "word joiner": "b\u2060omb",
    "combining marks": "b\u0336o\u0336m\u0336b\u0336",
    "accents": "bómb̈",
    "zalgo": "b\u0300\u0301\u0302o\u0303\u0304m\u0305b\u0306\u0307\u0308",
    "fullwidth": "".join(FULLWIDTH[c] for c in "bomb"),
    "fullwidth capitals": "\uff22\uff2f\uff2d\uff22",
    "cyrillic o": "b\u043emb",
    "cyrillic a e o": "gr\u0435n\u0430d\u0435 b\u043emb",
    "greek omicron": "b\u03bfmb",
    "rtl override": "b\u202eo\u202cmb",
    "bidi isolate": "bo\u2067m\u2069b",
    "math bold": "".join(MATH_BOLD[c] for c in "bomb"),
    "math italic": "\U0001d44f\U0001d45c\U0001d45a\U0001d44f",
    "circled": "\u24d1\u24de\u24dc\u24d1",
    "variation selectors": "b\ufe0eo\ufe0fmb",
    "tags": "bo\U000e0041mb",
    "nfd": unicodedata.normalize("NFD", "bömb"),
    "mixed": "\uff42\u200b\u043e\u0301\U0001d426b",
}


@pytest.mark.parametrize("disguised", DISGUISES.values(), ids=DISGUISES.keys())
async def test_disguise_defeats_nothing(disguised: str) -> None:
    """KeywordModerator flags the word however it is disguised."""
    (verdict,) = await KeywordModerator(["bomb"]).moderate([f"how to build a {disguised} at home"])
    assert verdict.flagged


@pytest.mark.parametrize("disguised", DISGUISES.values(), ids=DISGUISES.keys())
def test_flag_maps_back_to_the_disguised_word(disguised: str) -> None:
    """The word's span in the view maps back to exactly the disguised word in the original."""
    original = f"a {disguised} b"
    view = moderation_view(original)
    start = view.text.lower().index("bomb")
    first, last = view.original_span(start, start + 4)
    assert first >= 2 and original[first:last] in disguised
    assert moderation_view(original[first:last]).text.lower() == "bomb"


@pytest.mark.parametrize(
    "text",
    [
        "привет, как дела?",
        "Καλημέρα κόσμε",
        "नमस्ते दुनिया",
        "안녕하세요 세계",
        "こんにちは世界",
        "مرحبا بالعالم",
        "skills and killer apps",
    ],
)
def test_other_scripts_keep_their_meaning(text: str) -> None:
    """Words of another script are not rewritten into Latin look-alikes; NFC text stays as it was."""
    assert moderation_view(text).text == unicodedata.normalize("NFC", text)


@pytest.mark.parametrize(
    ("disguised", "word"),
    [
        ("\u043aill", "kill"),  # Cyrillic ka: confusable only with kra, then small capital K
        ("\u0138ill", "kill"),  # Latin kra
        ("\u1d0bill", "kill"),  # Latin small capital K
        ("a\u0442\u0442ack", "attack"),  # Cyrillic te
        ("bo\u043cb", "bomb"),  # Cyrillic em
        ("\u043date", "hate"),  # Cyrillic en
    ],
)
def test_letters_that_look_like_small_capitals_fold_in_latin_words(disguised: str, word: str) -> None:
    """In a word with an ASCII letter, a letter that looks like a Latin small capital folds to it."""
    assert moderation_view(disguised).text == word
    assert KeywordModerator([word]).match(f"we {disguised} now")["keyword"]


@pytest.mark.parametrize("text", ["как", "кот", "вот так", "метро", "τότε"])
def test_words_of_small_capital_look_alikes_only_stay_in_their_script(text: str) -> None:
    """Only in a word with an ASCII letter: Russian or Greek words made of such letters stay as they are."""
    assert moderation_view(text).text == text


def test_keyword_moderator_keeps_word_boundaries() -> None:
    """Normalising does not make "skills" match "kill", nor join words split by a space."""
    moderator = KeywordModerator(["kill"])
    assert moderator.match("skills\u200b") == {"keyword": False}
    assert moderator.match("s\u200bkills") == {"keyword": False}
    assert moderator.match("ki ll") == {"keyword": False}


def test_non_ascii_patterns_are_normalised_too() -> None:
    """A pattern in another script matches its own disguises."""
    moderator = KeywordModerator(["сор"])  # Cyrillic, made of look-alikes only
    assert moderator.match("сор")["keyword"]
    assert moderator.match("с\u200bо\u0301р")["keyword"]


def test_ascii_is_its_own_view() -> None:
    """An ASCII text is returned as is, offsets unchanged."""
    view = moderation_view("plain text")
    assert view.text == "plain text"
    assert [view.original_offset(i) for i in range(11)] == list(range(11))


def test_offsets_out_of_range_raise() -> None:
    """Offsets outside the view are an IndexError, not a wrong answer."""
    view = moderation_view("bo\u200bmb")
    with pytest.raises(IndexError):
        view.original_offset(5)
    with pytest.raises(IndexError):
        view.original_span(3, 2)


def test_linear_time() -> None:
    """A 64x longer disguised text costs about 64x more, not 64^2x (8x slack for a loaded machine)."""

    def cost(n: int) -> float:
        text = "b\u200b\u043em\u0301b " * n
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            moderation_view(text)
            best = min(best, time.perf_counter() - start)
        return best

    cost(1)  # loads the confusables table
    small, large = cost(100), cost(100 * 64)
    assert large < small * 64 * 8


_TEXT = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(HIDDEN + list(FULLWIDTH.values()) + ["\u0301", "\u0336", "\u043e", "\ufb01", "\u1100"]),
    ),
    max_size=60,
)


@given(_TEXT)
def test_offsets_are_ordered_and_in_range(text: str) -> None:
    """Each view character comes from an original one; origins never go backwards."""
    view = moderation_view(text)
    origins = [view.original_offset(i) for i in range(len(view.text) + 1)]
    assert origins == sorted(origins)
    assert all(0 <= o < len(text) for o in origins[:-1])
    assert origins[-1] == len(text)


@given(_TEXT, st.data())
def test_spans_cover_their_text(text: str, data: st.DataObject) -> None:
    """Any span of the view maps to an original span whose own view contains the span's letters."""
    view = moderation_view(text)
    start = data.draw(st.integers(0, len(view.text)))
    end = data.draw(st.integers(start, len(view.text)))
    first, last = view.original_span(start, end)
    assert 0 <= first <= last <= len(text)
    letters = [c for c in view.text[start:end] if c.isascii() and c.isalnum()]
    again = moderation_view(text[first:last]).text
    assert all(c in again for c in letters)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz ", max_size=40), st.data())
def test_hidden_characters_vanish_and_map_exactly(plain: str, data: st.DataObject) -> None:
    """Inserting invisible characters anywhere gives back the plain text; each letter maps to itself."""
    disguised = ""
    for char in plain:
        disguised += data.draw(st.sampled_from(["", *HIDDEN])) + char
    view = moderation_view(disguised)
    assert view.text == plain
    assert [disguised[view.original_offset(i)] for i in range(len(plain))] == list(plain)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz ", max_size=40), st.data())
def test_lookalikes_fold_and_map_exactly(plain: str, data: st.DataObject) -> None:
    """Swapping letters for fullwidth or math-bold ones gives back the plain text, offsets one to one."""
    disguised = "".join(data.draw(st.sampled_from([c, FULLWIDTH[c], MATH_BOLD[c]])) if c != " " else c for c in plain)
    view = moderation_view(disguised)
    assert view.text == plain
    assert [view.original_offset(i) for i in range(len(plain))] == list(range(len(plain)))


@given(
    st.text(
        alphabet=st.one_of(
            st.sampled_from("привет мир всё у с о 今日は 안녕 नमस्ते Καλημέρα abc é"),
            st.characters(codec="utf-8"),
        ),
        max_size=40,
    )
)
def test_shortcut_agrees_with_the_general_path(text: str) -> None:
    """A text whose characters are all their own view takes a shortcut; it gives what the general path gives."""
    view, general = moderation_view(text), _view(text)
    assert view.text == general.text
    assert [view.original_offset(i) for i in range(len(view.text) + 1)] == [
        general.original_offset(i) for i in range(len(general.text) + 1)
    ]
