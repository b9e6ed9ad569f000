"""Moderators: the protocol and the backends."""

from __future__ import annotations

from ._base import Moderator, Verdict
from ._budget import BudgetStats, ModerationBudget
from .composite import CompositeModerator
from .embedding import EmbeddingModerator
from .keyword import KeywordModerator
from .local import LocalModerator
from .openai import ModerationStats, OpenAIModerator
from .profanity import ProfanityModerator

__all__ = [
    "BudgetStats",
    "CompositeModerator",
    "EmbeddingModerator",
    "KeywordModerator",
    "LocalModerator",
    "ModerationBudget",
    "ModerationStats",
    "Moderator",
    "OpenAIModerator",
    "ProfanityModerator",
    "Verdict",
]
