"""Moderators: the protocol and the backends."""

from __future__ import annotations

from ._base import Moderator, Verdict
from .composite import CompositeModerator
from .keyword import KeywordModerator
from .local import LocalModerator
from .openai import ModerationStats, OpenAIModerator

__all__ = [
    "CompositeModerator",
    "KeywordModerator",
    "LocalModerator",
    "ModerationStats",
    "Moderator",
    "OpenAIModerator",
    "Verdict",
]
