"""streamguard: content moderation inside a streamed LLM response.

```python
async with streamguard.guard(stream, moderator=streamguard.OpenAIModerator(client)) as guarded:
    async for chunk in guarded:
        ...
```
"""

from __future__ import annotations

from ._sync import SyncGuardedStream, guard_sync
from .exceptions import (
    ConfigError,
    ModerationError,
    ModerationTimeout,
    StreamFormatError,
    StreamGuardError,
    StreamTimeout,
    UnguardedError,
)
from .guard import GuardedStream, guard
from .moderation import (
    CompositeModerator,
    EmbeddingModerator,
    KeywordModerator,
    LocalModerator,
    Moderator,
    OpenAIModerator,
    ProfanityModerator,
    Verdict,
)
from .policy import Decision, Policy
from .report import Flag, GuardReport, Span, VerdictEvent
from .responses import GuardedResponseStream, guard_responses
from .sse import GuardedSSE, guard_sse
from .usage import UsageTracker, count_prompt_tokens, count_tokens
from .wrap import wrap

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
    "guard_sse",
    "guard_sync",
    "GuardedResponseStream",
    "GuardedSSE",
    "GuardedStream",
    "GuardReport",
    "KeywordModerator",
    "LocalModerator",
    "ModerationError",
    "ModerationTimeout",
    "Moderator",
    "OpenAIModerator",
    "Policy",
    "ProfanityModerator",
    "Span",
    "StreamFormatError",
    "StreamGuardError",
    "StreamTimeout",
    "SyncGuardedStream",
    "UnguardedError",
    "UsageTracker",
    "Verdict",
    "VerdictEvent",
    "wrap",
]
