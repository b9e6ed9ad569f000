"""Terminal rendering for the CLI (rich, extra ``[cli]``): the live transcript and the report tables.

The transcript keeps what the consumer was shown as styled segments, each tagged with its offset
in the choice's *original* text, so a flag that arrives after its text was shown (stream-first
mode) can be marked where it was shown. Offsets stay in step because a redaction marker in the
output stands for exactly one redact flag's span.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from ..report import Flag, GuardReport

__all__ = ["Transcript", "flag_label", "ms", "report_tables", "status_line"]

STYLES = {
    "text": "",
    "redacted": "bold white on red",
    "leaked": "red strike",
    "cut": "bold white on dark_red",
}


@dataclass
class _Segment:
    text: str
    style: str
    start: int | None  # offset in the original text; None for markers


@dataclass
class Transcript:
    """What one choice's consumer was shown, with redactions, leaks and the cut marked."""

    redaction: str = "[redacted]"
    segments: list[_Segment] = field(default_factory=list)
    shown_to: int = 0  # original offset just past the last shown character
    _redact_flags: deque[Flag] = field(default_factory=deque)

    def add_text(self, text: str) -> None:
        """Append released text; a redaction marker in it is matched with its flag."""
        parts = text.split(self.redaction) if self.redaction else [text]
        for i, part in enumerate(parts):
            if i:
                self.segments.append(_Segment(self.redaction, "redacted", None))
                if self._redact_flags:
                    self.shown_to = max(self.shown_to, self._redact_flags.popleft().end)
            if part:
                self.segments.append(_Segment(part, "text", self.shown_to))
                self.shown_to += len(part)

    def on_flag(self, flag: Flag) -> None:
        """Mark what of the flagged window was shown already (stream-first mode)."""
        if flag.start < self.shown_to:
            self._mark(flag.start, min(flag.end, self.shown_to), "leaked")
            if flag.action == "redact":
                # Its unshown rest is dropped without a marker: the next text starts past it.
                self.shown_to = max(self.shown_to, flag.end)
        elif flag.action == "redact":
            self._redact_flags.append(flag)

    def add_cut(self, flag: Flag | None) -> None:
        """Append the cut-off marker."""
        self.segments.append(_Segment(f" [cut off: {flag_label(flag)}] ", "cut", None))

    def _mark(self, start: int, end: int, style: str) -> None:
        out: list[_Segment] = []
        for seg in self.segments:
            s = seg.start
            if s is None or seg.style != "text" or s + len(seg.text) <= start or s >= end:
                out.append(seg)
                continue
            a, b = max(start, s) - s, min(end, s + len(seg.text)) - s
            for piece, piece_style, offset in (
                (seg.text[:a], "text", s),
                (seg.text[a:b], style, s + a),
                (seg.text[b:], "text", s + b),
            ):
                if piece:
                    out.append(_Segment(piece, piece_style, offset))
        self.segments = out

    @property
    def text(self) -> str:
        return "".join(seg.text for seg in self.segments)

    def rich(self) -> Text:
        """The transcript as styled rich text."""
        out = Text()
        for seg in self.segments:
            out.append(seg.text, STYLES[seg.style])
        return out

    def plain(self) -> str:
        """The transcript with the marks spelt out, for output without colour."""
        out: list[str] = []
        leaked: list[str] = []
        for seg in [*self.segments, _Segment("", "text", None)]:
            if seg.style == "leaked":
                leaked.append(seg.text)
                continue
            if leaked:
                out.append(f"[shown, then flagged: {''.join(leaked)}]")
                leaked = []
            out.append(seg.text)
        return "".join(out)


def flag_label(flag: Flag | None) -> str:
    """``profanity 0.98``-style description of a flag."""
    if flag is None:
        return "flagged"
    category = flag.category or "flagged"
    return category if flag.score is None else f"{category} {flag.score:.2f}"


def ms(seconds: float | None) -> str:
    """Seconds as a short millisecond string."""
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def status_line(report: GuardReport, *, state: str, first_token: float | None, in_flight: int) -> Text:
    """One line: windows moderated, their latency, characters released."""
    lat = report.latencies
    parts = [
        f"{state}",
        f"windows moderated {report.moderation_calls}" + (f" (+{in_flight} in flight)" if in_flight else ""),
        f"latency last {ms(lat[-1] if lat else None)}, median {ms(statistics.median(lat) if lat else None)}",
        f"released {report.released_chars}/{report.generated_chars} chars",
        f"first token {ms(first_token)}",
    ]
    if report.flags:
        parts.append(f"flags {len(report.flags)}")
    return Text(" | ".join(parts), style="dim")


def report_tables(
    report: GuardReport,
    *,
    timings: Mapping[str, tuple[float | None, float | None]] | None = None,
) -> RenderableType:
    """The flags table and the report table (plus time-to-first-token, raw vs guarded)."""
    parts: list[RenderableType] = []
    flags = Table(title="Flags", title_justify="left", expand=False)
    for name in ("choice", "chars", "category", "score", "action", "source"):
        flags.add_column(name)
    for flag in report.flags:
        flags.add_row(
            str(flag.choice),
            f"{flag.start}-{flag.end}",
            flag.category or "-",
            "-" if flag.score is None else f"{flag.score:.3f}",
            flag.action,
            flag.source,
        )
    if not report.flags:
        flags.add_row("-", "-", "none", "-", "-", "-")
    parts.append(flags)

    table = Table(title="Report", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    lat = sorted(report.latencies)
    table.add_row("moderation calls", str(report.moderation_calls))
    if lat:
        p95 = lat[min(len(lat) - 1, max(0, -(-95 * len(lat) // 100) - 1))]
        table.add_row("moderation latency", f"median {ms(statistics.median(lat))}, p95 {ms(p95)}, max {ms(lat[-1])}")
    table.add_row(
        "characters",
        f"generated {report.generated_chars}, released {report.released_chars}, leaked {report.leaked_chars}",
    )
    table.add_row("finish reasons", ", ".join(f"{i}: {r}" for i, r in report.finish_reasons.items()) or "-")
    if report.usage is not None:
        usage = report.usage
        table.add_row(
            "usage",
            f"prompt {usage.prompt_tokens}, completion {usage.completion_tokens}, total {usage.total_tokens}"
            f" ({report.usage_source}); shown completion tokens {report.shown_completion_tokens}",
        )
    if report.unmoderated:
        table.add_row("unmoderated spans", str(len(report.unmoderated)))
    if report.error is not None:
        table.add_row("error", f"{type(report.error).__name__}: {report.error}")
    for name, (raw, guarded) in (timings or {}).items():
        added = f" ({(guarded - raw) * 1000:+.0f} ms)" if raw is not None and guarded is not None else ""
        table.add_row(name, f"raw {ms(raw)}, guarded {ms(guarded)}{added}")
    parts.append(table)
    return Group(*parts)


def print_report(
    console: Console,
    report: GuardReport,
    *,
    timings: Mapping[str, tuple[float | None, float | None]] | None = None,
) -> None:
    """Print :func:`report_tables`."""
    console.print(report_tables(report, timings=timings))
