"""KeywordModerator: case-insensitive regular expressions on word boundaries."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import anyio
import pytest

from streamguard.exceptions import ConfigError
from streamguard.moderation import KeywordModerator, Verdict


@pytest.mark.parametrize(
    ("patterns", "text", "flagged"),
    [
        (["kill"], "I will kill it", True),
        (["kill"], "I will KILL it", True),
        (["kill"], "Kill.", True),
        (["kill"], "new skills", False),
        (["kill"], "killer app", False),
        (["kill"], "overkill", False),
        (["kill\\w*"], "killer app", True),
        (["gun"], "begun", False),
        (["\\$\\$\\$"], "cash$$$now", True),  # no word characters at the edges: no anchoring
        (["bad word"], "a BAD   word", False),
        (["bad\\s+word"], "a BAD   word", True),
        (["c4", "tnt"], "some TNT here", True),
    ],
)
def test_match_is_case_insensitive_on_word_boundaries(patterns: list[str], text: str, flagged: bool) -> None:
    """Patterns match regardless of case and only as whole words where they start/end with one."""
    assert any(KeywordModerator(patterns).match(text).values()) is flagged


async def test_categories_map_to_verdicts() -> None:
    """Each category is reported, with score 1.0 when it matches and 0.0 when not."""
    moderator = KeywordModerator({"violence": ["kill", "stab"], "weapons": ["gun"], "empty": []})
    with anyio.fail_after(10):
        verdicts = await moderator.moderate(["stab with a GUN", "kill", "skills and guns"])
    assert verdicts == [
        Verdict(True, {"violence": True, "weapons": True}, {"violence": 1.0, "weapons": 1.0}),
        Verdict(True, {"violence": True, "weapons": False}, {"violence": 1.0, "weapons": 0.0}),
        Verdict(False, {"violence": False, "weapons": False}, {"violence": 0.0, "weapons": 0.0}),
    ]


def test_plain_list_uses_the_keyword_category() -> None:
    """A list of patterns is one category, "keyword"."""
    assert KeywordModerator(["x"]).match("x") == {"keyword": True}


@pytest.mark.parametrize(
    "patterns",
    [["(unclosed"], {"ok": ["fine"], "bad": ["[a-"]}, [], {"empty": []}],
)
def test_bad_or_missing_patterns_raise_config_error(patterns: Iterable[str] | Mapping[str, Iterable[str]]) -> None:
    """A pattern that does not compile, or no pattern at all, is a ConfigError."""
    with pytest.raises(ConfigError):
        KeywordModerator(patterns)


def test_config_error_names_the_category() -> None:
    """The error says which category holds the bad pattern."""
    with pytest.raises(ConfigError, match="'bad'"):
        KeywordModerator({"ok": ["fine"], "bad": ["[a-"]})
