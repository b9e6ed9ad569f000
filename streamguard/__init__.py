"""streamguard: content moderation inside a streamed LLM response.

```python
async with streamguard.guard(stream, moderator=streamguard.OpenAIModerator(client)) as guarded:
    async for chunk in guarded:
        ...
```
"""

from __future__ import annotations

from .exceptions import ConfigError, ModerationError, ModerationTimeout, StreamGuardError
from .guard import GuardedStream, guard
from .moderation import (
    CompositeModerator,
    EmbeddingModerator,
    KeywordModerator,
    LocalModerator,
    Moderator,
    OpenAIModerator,
    Verdict,
)
from .policy import Decision, Policy
from .report import Flag, GuardReport, Span, VerdictEvent
from .responses import GuardedResponseStream, guard_responses
from .usage import UsageTracker, count_prompt_tokens, count_tokens

__all__ = [
    "CompositeModerator",
    "ConfigError",
    "count_prompt_tokens",
    "count_tokens",
    "Decision",
    "EmbeddingModerator",
    "Flag",
    "guard",
    "guard_responses",
    "GuardedResponseStream",
    "GuardedStream",
    "GuardReport",
    "KeywordModerator",
    "LocalModerator",
    "ModerationError",
    "ModerationTimeout",
    "Moderator",
    "OpenAIModerator",
    "Policy",
    "Span",
    "StreamGuardError",
    "UsageTracker",
    "Verdict",
    "VerdictEvent",
]
