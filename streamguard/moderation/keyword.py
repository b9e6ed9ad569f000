"""A deterministic, local moderator: case-insensitive regular expressions on word boundaries.

Patterns are matched on the normalised view of each text (``moderation_view``, in ``normalize.py``),
so zero-width characters, soft hyphens, combining marks, fullwidth or mathematical letters,
look-alike letters of other scripts and bidi overrides do not hide a word. Patterns go through the
same view.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from ..exceptions import ConfigError
from ._base import Verdict
from .normalize import moderation_view

__all__ = ["KeywordModerator"]


class KeywordModerator:
    """Flag texts that match any of the given patterns.

    Args:
        patterns: Either an iterable of patterns (all in category ``"keyword"``) or a mapping of
            category name -> patterns. Each pattern is a regular expression, matched
            case-insensitively on the text's normalised view; a pattern that starts or ends
            with a word character is anchored at a word boundary there, so ``"kill"`` does not
            flag ``"skills"``.

    Raises:
        ConfigError: A pattern does not compile, or no pattern was given.
    """

    def __init__(self, patterns: Iterable[str] | Mapping[str, Iterable[str]]) -> None:
        groups = patterns if isinstance(patterns, Mapping) else {"keyword": patterns}
        self._rules: dict[str, re.Pattern[str]] = {}
        for category, items in groups.items():
            parts = [_bounded(moderation_view(p).text) for p in items]
            if not parts:
                continue
            try:
                self._rules[category] = re.compile("|".join(parts), re.IGNORECASE)
            except re.error as exc:
                raise ConfigError(f"KeywordModerator: bad pattern in {category!r}: {exc}") from exc
        if not self._rules:
            raise ConfigError("KeywordModerator needs at least one pattern")

    def match(self, text: str) -> dict[str, bool]:
        """Category -> whether it matches ``text`` (its normalised view)."""
        seen = moderation_view(text).text
        return {category: rule.search(seen) is not None for category, rule in self._rules.items()}

    async def moderate(self, texts: Sequence[str]) -> list[Verdict]:
        """Judge each text; never awaits, never fails."""
        verdicts = []
        for text in texts:
            categories = self.match(text)
            scores = {c: 1.0 if hit else 0.0 for c, hit in categories.items()}
            verdicts.append(Verdict(flagged=any(categories.values()), categories=categories, scores=scores))
        return verdicts


def _bounded(pattern: str) -> str:
    """Wrap a pattern in word boundaries where it starts or ends with a word character."""
    head = r"\b" if re.match(r"\w", pattern) else ""
    tail = r"\b" if re.search(r"\w$", pattern) else ""
    return f"(?:{head}{pattern}{tail})"
