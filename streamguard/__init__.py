"""streamguard: content moderation inside a streamed LLM response."""

from __future__ import annotations

from .exceptions import ConfigError, ModerationError, ModerationTimeout, StreamGuardError
from .moderation import KeywordModerator, Moderator, Verdict
from .policy import Decision, Policy

__all__ = [
    "ConfigError",
    "Decision",
    "KeywordModerator",
    "ModerationError",
    "ModerationTimeout",
    "Moderator",
    "Policy",
    "StreamGuardError",
    "Verdict",
]
