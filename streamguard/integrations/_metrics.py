"""The proxy's Prometheus metrics, in a registry of its own per app (so apps and tests never share counts).

Exposed at ``GET /metrics`` in the Prometheus text format:

- ``streamguard_streams_total{outcome}``: streamed answers by how they ended: ``completed``,
  ``content_filter`` (a choice was cut off), ``error`` (upstream or moderation failed, before or
  during the stream), ``disconnected`` (the client left) or ``shutdown`` (ended by the drain deadline).
- ``streamguard_flags_total{category,action,source}``: flagged windows, of streamed and
  non-streamed answers alike (both are judged in windows).
- ``streamguard_moderation_latency_seconds``: a histogram of moderation calls, one per window.
- ``streamguard_upstream_errors_total{kind,status}``: upstream failures: ``kind`` is ``status``
  (an HTTP error, with its ``status``), ``timeout``, ``connection``, or ``stream`` (an error event
  inside a started stream).
- ``streamguard_moderation_errors_total``: moderation failures that ended an answer (fail-closed).
- ``streamguard_windows_per_request{route,moderator}``: a histogram of windows judged per streamed answer.
- ``streamguard_budget_waits_total{moderator}`` and ``streamguard_budget_wait_seconds_total{moderator}``:
  moderation requests that waited for the rate-limit budget, and how long in all.
- ``streamguard_redis_fallbacks_total{moderator}``: moderation requests paced locally because Redis
  failed; ``streamguard_redis_errors_total{moderator}``: the failed Redis calls.

``flags`` and ``moderation_latency_seconds`` are labelled by ``route`` (e.g. ``chat.completions``)
and ``moderator`` (``openai``, ``local``, ``keyword``) too. With ``serve --workers N`` the workers
write their samples to ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode) and
any worker's ``/metrics`` reports the sum over all of them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import openai
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import multiprocess as _multiprocess

from ..exceptions import ModerationError
from ..report import Flag, VerdictEvent

if TYPE_CHECKING:
    from ..moderation import ModerationBudget
    from .proxy.stream import GuardedAnswer
    from .starlette import GuardedSSEResponse

__all__ = ["CONTENT_TYPE", "ProxyMetrics"]

logger = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Moderation round trips: a few ms (keyword, local) to seconds (a remote endpoint under load).
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_WINDOW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ProxyMetrics:
    """Counters and a latency histogram, fed by the proxy's hooks."""

    def __init__(self, *, moderator: str = "unknown") -> None:
        self.moderator = moderator
        # Set for the workers by `serve --workers`: then every worker's samples are summed.
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self._budget_seen: dict[int, tuple[int, float, int, int]] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.streams = Counter(
            "streamguard_streams", "Streamed answers, by how they ended.", ["outcome"], registry=self.registry
        )
        self.flags = Counter(
            "streamguard_flags",
            "Flagged windows (of streamed and non-streamed answers).",
            ["category", "action", "source", "route", "moderator"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "streamguard_moderation_latency_seconds",
            "Seconds each moderation call took.",
            ["route", "moderator"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.windows = Histogram(
            "streamguard_windows_per_request",
            "Windows judged per streamed answer.",
            ["route", "moderator"],
            buckets=_WINDOW_BUCKETS,
            registry=self.registry,
        )
        self.budget_waits = Counter(
            "streamguard_budget_waits",
            "Moderation requests that waited for the rate-limit budget.",
            ["moderator"],
            registry=self.registry,
        )
        self.budget_wait_seconds = Counter(
            "streamguard_budget_wait_seconds",
            "Seconds moderation requests waited for the rate-limit budget, in all.",
            ["moderator"],
            registry=self.registry,
        )
        self.redis_fallbacks = Counter(
            "streamguard_redis_fallbacks",
            "Moderation requests paced locally because Redis failed.",
            ["moderator"],
            registry=self.registry,
        )
        self.redis_errors = Counter(
            "streamguard_redis_errors", "Redis calls that failed.", ["moderator"], registry=self.registry
        )
        for counter in (self.budget_waits, self.budget_wait_seconds, self.redis_fallbacks, self.redis_errors):
            counter.labels(moderator=moderator)  # present at zero from the start
        self.upstream_errors = Counter(
            "streamguard_upstream_errors", "Upstream failures.", ["kind", "status"], registry=self.registry
        )
        self.moderation_errors = Counter(
            "streamguard_moderation_errors",
            "Moderation failures that ended an answer (fail-closed).",
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The registry in Prometheus' text format (every worker's samples summed in multiprocess mode)."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    def route(self, route: str) -> RouteHooks:
        """The ``on_verdict`` / ``on_flag`` hooks of one request to ``route``."""
        return RouteHooks(self, route)

    def sync_budget(self, budget: ModerationBudget | None) -> None:
        """Add what ``budget`` counted since the last call to the budget and Redis counters."""
        if budget is None:
            return
        stats = budget.stats
        now = (stats.waits, stats.waited_seconds, stats.local_acquires, stats.redis_errors)
        waits, waited, local, errors = self._budget_seen.get(id(budget), (0, 0.0, 0, 0))
        self._budget_seen[id(budget)] = now
        labels = {"moderator": self.moderator}
        if now[0] > waits:
            self.budget_waits.labels(**labels).inc(now[0] - waits)
        if now[1] > waited:
            self.budget_wait_seconds.labels(**labels).inc(now[1] - waited)
        if now[2] > local:
            self.redis_fallbacks.labels(**labels).inc(now[2] - local)
        if now[3] > errors:
            self.redis_errors.labels(**labels).inc(now[3] - errors)

    # -- hooks -------------------------------------------------------------------------------

    def verdict(self, event: VerdictEvent, route: str = "unknown") -> None:
        """``on_verdict``: one window's moderation latency."""
        self.latency.labels(route=route, moderator=self.moderator).observe(event.latency)

    def flag(self, flag: Flag, route: str = "unknown") -> None:
        """``on_flag``: one flagged window."""
        self.count_flag(flag.category, flag.action, flag.source, route)

    def count_flag(self, category: str | None, action: str, source: str, route: str = "unknown") -> None:
        """One flagged window."""
        self.flags.labels(
            category=category or "unknown", action=action, source=source, route=route, moderator=self.moderator
        ).inc()

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
        elif getattr(response, "shutdown", False):
            outcome = "shutdown"
        elif response.error is not None:
            outcome = "error"
            self.error(response.error)
        elif report is not None and "content_filter" in report.finish_reasons.values():
            outcome = "content_filter"
        else:
            outcome = "completed"
        self.streams.labels(outcome=outcome).inc()
        route = getattr(response, "route", None)
        if route is not None and report is not None:
            self.windows.labels(route=route, moderator=self.moderator).observe(len(report.latencies))


class RouteHooks:
    """The metrics hooks of one request, labelled with its route."""

    def __init__(self, metrics: ProxyMetrics, route: str) -> None:
        self.metrics = metrics
        self.route = route

    def verdict(self, event: VerdictEvent) -> None:
        """``on_verdict``."""
        self.metrics.verdict(event, self.route)

    def flag(self, flag: Flag) -> None:
        """``on_flag``."""
        self.metrics.flag(flag, self.route)

    def ended(self, budget: ModerationBudget | None) -> Callable[[Any], None]:
        """``on_end`` of a streamed answer: the outcome, then the budget's counters."""

        def on_end(response: Any) -> None:
            self.metrics.stream_ended(response)
            self.metrics.sync_budget(budget)

        return on_end
