"""The proxy's Prometheus metrics, in a registry of its own per app (so apps and tests never share counts).

Exposed at ``GET /metrics`` in the Prometheus text format:

- ``streamguard_streams_total{outcome}``: streamed answers by how they ended: ``completed``,
  ``content_filter`` (a choice was cut off), ``error`` (upstream or moderation failed, before or
  during the stream) or ``disconnected`` (the client left).
- ``streamguard_flags_total{category,action,source}``: flagged windows, of streamed and
  non-streamed answers alike (both are judged in windows).
- ``streamguard_moderation_latency_seconds``: a histogram of moderation calls, one per window.
- ``streamguard_upstream_errors_total{kind,status}``: upstream failures: ``kind`` is ``status``
  (an HTTP error, with its ``status``), ``timeout``, ``connection``, or ``stream`` (an error event
  inside a started stream).
- ``streamguard_moderation_errors_total``: moderation failures that ended an answer (fail-closed).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import openai
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from ..exceptions import ModerationError
from ..report import Flag, VerdictEvent

if TYPE_CHECKING:
    from .proxy.stream import GuardedAnswer
    from .starlette import GuardedSSEResponse

__all__ = ["CONTENT_TYPE", "ProxyMetrics"]

logger = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Moderation round trips: a few ms (keyword, local) to seconds (a remote endpoint under load).
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ProxyMetrics:
    """Counters and a latency histogram, fed by the proxy's hooks."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.streams = Counter(
            "streamguard_streams", "Streamed answers, by how they ended.", ["outcome"], registry=self.registry
        )
        self.flags = Counter(
            "streamguard_flags",
            "Flagged windows (of streamed and non-streamed answers).",
            ["category", "action", "source"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "streamguard_moderation_latency_seconds",
            "Seconds each moderation call took.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "streamguard_upstream_errors", "Upstream failures.", ["kind", "status"], registry=self.registry
        )
        self.moderation_errors = Counter(
            "streamguard_moderation_errors",
            "Moderation failures that ended an answer (fail-closed).",
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)

    # -- hooks -------------------------------------------------------------------------------

    def verdict(self, event: VerdictEvent) -> None:
        """``on_verdict``: one window's moderation latency."""
        self.latency.observe(event.latency)

    def flag(self, flag: Flag) -> None:
        """``on_flag``: one flagged window."""
        self.count_flag(flag.category, flag.action, flag.source)

    def count_flag(self, category: str | None, action: str, source: str) -> None:
        """One flagged window."""
        self.flags.labels(category=category or "unknown", action=action, source=source).inc()

    def error(self, exc: BaseException) -> None:
        """An upstream or moderation failure; anything else is not counted here."""
        if isinstance(exc, ModerationError):
            self.moderation_errors.inc()
        elif isinstance(exc, openai.APIStatusError):
            self.upstream_errors.labels(kind="status", status=str(exc.status_code)).inc()
        elif isinstance(exc, openai.APITimeoutError):
            self.upstream_errors.labels(kind="timeout", status="").inc()
        elif isinstance(exc, openai.APIError):  # connection errors, and errors sent inside the stream
            kind = "connection" if isinstance(exc, openai.APIConnectionError) else "stream"
            self.upstream_errors.labels(kind=kind, status="").inc()

    def stream_ended(self, response: GuardedSSEResponse | GuardedAnswer) -> None:
        """``on_end`` of a streamed answer: its outcome, and the error it ended with."""
        report = response.report
        if response.disconnected:
            outcome = "disconnected"
        elif response.error is not None:
            outcome = "error"
            self.error(response.error)
        elif report is not None and "content_filter" in report.finish_reasons.values():
            outcome = "content_filter"
        else:
            outcome = "completed"
        self.streams.labels(outcome=outcome).inc()
