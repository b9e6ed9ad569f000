"""Moderators: the protocol and the backends."""

from __future__ import annotations

from ._base import Moderator, Verdict
from .composite import CompositeModerator
from .embedding import EmbeddingModerator
from .keyword import KeywordModerator
from .local import LocalModerator
from .openai import ModerationStats, OpenAIModerator

__all__ = [
    "CompositeModerator",
    "EmbeddingModerator",
    "KeywordModerator",
    "LocalModerator",
    "ModerationStats",
    "Moderator",
    "OpenAIModerator",
    "Verdict",
]
