"""What the guard does with text and verdicts: a frozen, validated value with safe defaults.

Pure: no I/O. ``Policy.judge`` turns a moderator's :class:`Verdict` into a :class:`Decision`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from .exceptions import ConfigError
from .moderation._base import Verdict

__all__ = ["CHANNELS", "Decision", "Mode", "Action", "OnError", "Policy"]

Mode = Literal["holdback", "stream_first"]
Action = Literal["cutoff", "redact"]
OnError = Literal["fail_closed", "fail_open"]

#: The kinds of model text the guard moderates (``Policy.channels``).
CHANNELS = frozenset({"content", "refusal", "reasoning", "tool_arguments", "audio"})


@dataclass(frozen=True)
class Decision:
    """Why a text was flagged: the deciding category (``None`` if the backend gave none) and score."""

    category: str | None
    score: float | None
    categories: Mapping[str, bool] = field(default_factory=dict)
    scores: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Policy:
    """How a stream is guarded. Defaults are safe first: hold back, cut off, fail closed.

    Attributes:
        mode: ``"holdback"``: no text reaches the consumer before its window has a clean verdict
            (adds about one moderation round trip to time-to-first-token). ``"stream_first"``:
            text passes at once and is moderated in the background; on a flag the choice is cut
            and what was shown past the flagged window's start is counted in
            ``GuardReport.leaked_chars``.
        action: ``"cutoff"`` ends the flagged choice with ``finish_reason="content_filter"``
            (upstream is closed once every choice has ended). ``"redact"`` replaces the flagged
            window's new text with ``redaction`` and goes on (in stream-first mode the text was
            already shown: the flag is reported and ``on_flag`` may retract it).
        redaction: Text that replaces a redacted span.
        window_chars: Target size of a window's new text, in characters.
        first_window_chars: Size of the first window; later windows grow by ``window_growth``
            up to ``window_chars``. Small, so the first text is released quickly.
        window_growth: Factor by which each window grows over the one before.
        overlap_chars: Already-moderated text sent again before each window as context, so a
            phrase straddling a boundary is seen whole. Context only: it is never re-released.
        flush_after: Seconds without new text after which a partial window is moderated
            anyway (a stalled or slow upstream still gets its text through).
        max_in_flight: Moderation calls in flight at once for one stream.
        moderation_timeout: Seconds one moderation call may take before it counts as failed.
        on_error: ``"fail_closed"`` raises :class:`~streamguard.ModerationError` after
            releasing only text with a clean verdict; ``"fail_open"`` lets the text through and
            records it in ``GuardReport.unmoderated``.
        thresholds: Category -> minimum score that flags, on ``category_scores``; applies in
            addition to the backend's own per-category flags for categories not listed here. A
            category listed here that has no score keeps the backend's own flag.
        ignore_categories: Categories that never flag.
        moderate_input: Also moderate the request's messages (the ``messages`` given to
            ``guard``), concurrently with upstream's generation, never before it. In hold-back mode
            no output text is released until the input verdict is in; a flagged input ends every
            choice with ``finish_reason="content_filter"`` and closes upstream.
        input_max_chars: How much of the conversation input moderation sends: the newest
            messages first, up to this many characters (the report says when it was cut short).
        include_usage: Yield a final usage chunk (``choices == []``) at stream end when upstream
            sent none. Turn off for consumers that index ``choices[0]`` blindly.
        close_timeout: Seconds that shielded cleanup (closing upstream) may take.
        max_held_chars: Text read from upstream but not yet released, per stream, at which the
            guard stops reading upstream until verdicts free room (backpressure reaches the
            provider through TCP). ``None``: eight windows. ``GuardReport.paused_seconds`` says
            how long reading was paused.
        idle_timeout: Seconds without new text from upstream after which the stream ends with
            :class:`~streamguard.StreamTimeout` (``None``: no limit). Time paused by
            ``max_held_chars`` does not count.
        max_duration: Seconds a stream may last in all before it ends with
            :class:`~streamguard.StreamTimeout` (``None``: no limit).
        channels: Which kinds of text are moderated: ``"content"``, ``"refusal"``,
            ``"reasoning"`` (``reasoning_content`` / ``reasoning``), ``"tool_arguments"``
            (tool-call and function-call arguments) and ``"audio"`` (transcripts). Default: all.
            A kind left out passes unmoderated.
    """

    mode: Mode = "holdback"
    action: Action = "cutoff"
    redaction: str = "[redacted]"
    window_chars: int = 240
    first_window_chars: int = 1
    window_growth: float = 4.0
    overlap_chars: int = 64
    flush_after: float = 0.1
    max_in_flight: int = 4
    moderation_timeout: float = 10.0
    on_error: OnError = "fail_closed"
    thresholds: Mapping[str, float] = field(default_factory=dict)
    ignore_categories: frozenset[str] = frozenset()
    moderate_input: bool = False
    input_max_chars: int = 8000
    include_usage: bool = True
    close_timeout: float = 2.0
    max_held_chars: int | None = None
    idle_timeout: float | None = 300.0
    max_duration: float | None = 3600.0
    channels: frozenset[str] = CHANNELS

    def __post_init__(self) -> None:
        _choice("mode", self.mode, ("holdback", "stream_first"))
        _choice("action", self.action, ("cutoff", "redact"))
        _choice("on_error", self.on_error, ("fail_closed", "fail_open"))
        if self.window_chars < 1 or self.first_window_chars < 1:
            raise ConfigError("window_chars and first_window_chars must be >= 1")
        if self.first_window_chars > self.window_chars:
            raise ConfigError("first_window_chars must not exceed window_chars")
        if self.overlap_chars < 0:
            raise ConfigError("overlap_chars must be >= 0")
        if not self.window_growth >= 1.0:
            raise ConfigError("window_growth must be >= 1")
        if self.input_max_chars < 1:
            raise ConfigError("input_max_chars must be >= 1")
        if self.max_in_flight < 1:
            raise ConfigError("max_in_flight must be >= 1")
        for name in ("flush_after", "moderation_timeout", "close_timeout"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        for category, threshold in self.thresholds.items():
            if not 0.0 <= threshold <= 1.0:
                raise ConfigError(f"threshold for {category!r} must be in [0, 1], got {threshold!r}")
        for name in ("idle_timeout", "max_duration"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a positive number of seconds or None, got {value!r}")
        if self.max_held_chars is None:
            object.__setattr__(self, "max_held_chars", 8 * self.window_chars)
        elif self.max_held_chars < self.window_chars:
            raise ConfigError("max_held_chars must be at least window_chars")
        unknown = set(self.channels) - CHANNELS
        if unknown:
            raise ConfigError(f"unknown channels {sorted(unknown)}; known: {sorted(CHANNELS)}")
        object.__setattr__(self, "channels", frozenset(self.channels))
        object.__setattr__(self, "thresholds", dict(self.thresholds))
        object.__setattr__(self, "ignore_categories", frozenset(self.ignore_categories))

    def judge(self, verdict: Verdict) -> Decision | None:
        """Return why ``verdict`` flags under this policy, or ``None`` when it is clean."""
        hits: list[tuple[str, float | None]] = []
        for category, score in verdict.scores.items():
            threshold = self.thresholds.get(category)
            if threshold is not None and category not in self.ignore_categories and score >= threshold:
                hits.append((category, score))
        for category, on in verdict.categories.items():
            # A threshold replaces the backend's flag only where there is a score to apply it to.
            scored = category in self.thresholds and category in verdict.scores
            if on and category not in self.ignore_categories and not scored:
                hits.append((category, verdict.scores.get(category)))
        if hits:
            best = max(hits, key=lambda hit: -1.0 if hit[1] is None else hit[1])
            return Decision(best[0], best[1], verdict.categories, verdict.scores)
        if verdict.flagged and not any(verdict.categories.values()):
            # The backend flagged without naming a category (e.g. a custom moderator).
            return Decision(None, None, verdict.categories, verdict.scores)
        return None


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
