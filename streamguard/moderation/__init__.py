"""Moderators: the protocol and the backends."""

from __future__ import annotations

from ._base import Moderator, Verdict
from .keyword import KeywordModerator

__all__ = ["KeywordModerator", "Moderator", "Verdict"]
