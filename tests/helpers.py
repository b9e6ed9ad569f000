"""Test set-up shared by the suites, kept in one place."""

from __future__ import annotations


def words(text: str) -> list[str]:
    """``text`` as the deltas a model streams: the first word, then each next word with its space."""
    parts = text.split(" ")
    return [parts[0]] + [" " + p for p in parts[1:]]
