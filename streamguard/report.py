"""What happened to a guarded stream: flags, moderation calls, leaks, usage. Frozen values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from openai.types import CompletionUsage

__all__ = ["Flag", "GuardReport", "Span", "VerdictEvent"]


@dataclass(frozen=True)
class Flag:
    """One flagged window.

    Attributes:
        choice: Choice index (``-1`` for a flag on the request's input).
        start: Offset (in the choice's text) of the flagged window's new text.
        end: Offset just past it.
        context_start: Where the context sent with it began.
        category: The category that decided (``None`` if the moderator named none).
        score: That category's score, if any.
        categories: Every category the moderator returned.
        scores: Every score the moderator returned.
        action: What was done: ``"cutoff"`` or ``"redact"``.
        source: ``"output"`` (a window of generated text), ``"input"`` (the request's messages,
            with ``Policy(moderate_input=True)``; offsets are into the moderated input text) or
            ``"upstream"`` (a flag the provider itself reported in the stream).
        channel: The text channel flagged: ``"content"``, ``"refusal"``, ``"reasoning"``,
            ``"tool:<index>"`` (a tool call's arguments), ``"function"``, ``"audio"`` or
            ``"input"``; offsets are into that channel's text.
    """

    choice: int
    start: int
    end: int
    context_start: int
    category: str | None
    score: float | None
    categories: Mapping[str, bool] = field(default_factory=dict)
    scores: Mapping[str, float] = field(default_factory=dict)
    action: Literal["cutoff", "redact"] = "cutoff"
    source: Literal["output", "input", "upstream"] = "output"
    channel: str = "content"


@dataclass(frozen=True)
class Span:
    """A range of one choice's text, e.g. text released without a verdict (``fail_open``)."""

    choice: int
    start: int
    end: int
    reason: str = ""
    channel: str = "content"


@dataclass(frozen=True)
class VerdictEvent:
    """Passed to ``on_verdict``: one window's verdict as the guard applied it."""

    choice: int
    seq: int
    start: int
    end: int
    text: str
    flag: Flag | None
    latency: float
    error: BaseException | None = None
    channel: str = "content"


@dataclass(frozen=True)
class GuardReport:
    """A snapshot of a guarded stream's state; final once the stream has ended.

    Attributes:
        flags: Every flag, in the order they were decided.
        moderation_calls: Windows sent to the moderator (calls that returned or failed).
        moderated_chars: Characters sent to the moderator, context included.
        generated_chars: Text characters upstream generated, all choices.
        released_chars: Text characters released to the consumer (before redaction).
        leaked_chars: Flagged characters the consumer saw (stream-first mode only; 0 in
            hold-back mode).
        watermarks: Choice -> offset up to which text has a settled verdict (like Azure's
            ``check_offset``).
        finish_reasons: Choice -> how it ended (``"content_filter"`` after a cut-off; ``None``
            while running or if upstream ended without one).
        unmoderated: Spans released without a verdict because the moderator failed
            (``on_error="fail_open"``).
        latencies: Seconds each moderation call took, in completion order.
        usage: Token usage (upstream's when it sent one, else estimated); set at the end.
        usage_source: ``"upstream"`` or ``"estimated"``; ``None`` until the end.
        shown_completion_tokens: Completion tokens of the text the consumer was shown.
        input_moderated_chars: Characters of the request's messages sent to the moderator.
        input_truncated: Whether older messages were left out of input moderation (too long).
        error: The exception the stream ended with, if any.
        paused_seconds: How long reading upstream was paused because ``Policy.max_held_chars``
            of text were held (moderation slower than generation).
        dropped: Fields or event types an adapter did not know and dropped rather than pass
            on unmoderated.
    """

    flags: tuple[Flag, ...] = ()
    moderation_calls: int = 0
    moderated_chars: int = 0
    generated_chars: int = 0
    released_chars: int = 0
    leaked_chars: int = 0
    watermarks: Mapping[int, int] = field(default_factory=dict)
    finish_reasons: Mapping[int, str | None] = field(default_factory=dict)
    unmoderated: tuple[Span, ...] = ()
    latencies: tuple[float, ...] = ()
    usage: CompletionUsage | None = None
    usage_source: Literal["upstream", "estimated"] | None = None
    shown_completion_tokens: int = 0
    input_moderated_chars: int = 0
    input_truncated: bool = False
    error: BaseException | None = None
    paused_seconds: float = 0.0
    dropped: tuple[str, ...] = ()

    @property
    def moderated_per_generated(self) -> float:
        """Characters sent to the moderator per character generated (overlap makes it > 1)."""
        return self.moderated_chars / self.generated_chars if self.generated_chars else 0.0

    @property
    def flagged(self) -> bool:
        """Whether any window was flagged."""
        return bool(self.flags)
