"""Errors raised by streamguard.

```
StreamGuardError(Exception)
├── ConfigError(StreamGuardError, ValueError)      bad options, missing data files
├── StreamFormatError(StreamGuardError, ValueError) a stream or body of a shape the guard cannot read
├── StreamTimeout(StreamGuardError, TimeoutError)  idle_timeout / max_duration passed
├── UnguardedError(StreamGuardError)              ``wrap()``: a path that would bypass moderation
└── ModerationError(StreamGuardError)              fail_closed mode; raised from the cause
    └── ModerationTimeout(ModerationError, TimeoutError)
```

A cut-off is a normal ending (``finish_reason="content_filter"``), not an exception. Upstream
failures propagate unchanged as the ``openai`` client's own exceptions (``APIConnectionError``,
``APIStatusError``, ...), so code that already handles them keeps working.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ModerationError",
    "ModerationTimeout",
    "StreamFormatError",
    "StreamGuardError",
    "StreamTimeout",
    "UnguardedError",
]


class StreamGuardError(Exception):
    """Base class of every error streamguard raises itself."""


class ConfigError(StreamGuardError, ValueError):
    """An option, argument or data file is invalid; the message names the fix."""


class StreamFormatError(StreamGuardError, ValueError):
    """A raw SSE body is not a chat-completions stream: invalid UTF-8 or JSON, a payload that is not
    a JSON object, or an ``{"error": ...}`` event (its message is included)."""


class StreamTimeout(StreamGuardError, TimeoutError):
    """Upstream sent no text for ``Policy.idle_timeout`` seconds, or the stream ran longer than
    ``Policy.max_duration``. Text with a clean verdict was released before this is raised."""


class UnguardedError(StreamGuardError):
    """A ``wrap()``-ed client was asked for a path that cannot be guarded.

    The message names the path (``client.post``, ``client.files.content``,
    ``client.chat.completions.with_raw_response.create(...).content``, ...) and what to use instead.
    Raised from a refused method, nothing was sent upstream; raised from a raw-bytes accessor of a
    guarded answer, the raw body is never handed out (``.parse()`` gives the guarded one).
    """


class ModerationError(StreamGuardError):
    """The moderator failed and the policy is ``on_error="fail_closed"``.

    Text that already had a clean verdict was released before this is raised; nothing else was.
    """


class ModerationTimeout(ModerationError, TimeoutError):
    """A moderation call took longer than ``Policy.moderation_timeout``."""
