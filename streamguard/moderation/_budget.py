"""A moderation budget (requests and tokens per minute) shared by every worker and replica through Redis.

The Moderation endpoint's rate limits belong to the organisation, not to a process. N workers that
each pace themselves from the ``x-ratelimit-*`` headers they see each believe they own the whole
budget, and together run into 429s. A :class:`ModerationBudget` with a ``redis_url`` keeps one
token bucket per limit (requests, tokens) in a Redis hash, taken from by an atomic Lua script that
reads the clock of the Redis server (so replicas with skewed clocks agree):

- Rates come from the configuration (``requests_per_minute`` / ``tokens_per_minute``) or, when not
  configured, are learned from the endpoint's ``x-ratelimit-limit-*`` headers and shared in Redis.
  Until a limit is known, one request at a time probes the endpoint.
- The bucket refills at ``(1 - headroom)`` of the limit and holds ``burst`` seconds of refill (at
  least one request): the endpoint may enforce its per-minute limit over much shorter periods.
- A response that says nothing is left (``x-ratelimit-remaining-* = 0``), or a 429 with a
  ``retry-after``, pauses every process until the reset.
- A request that does not fit waits (the caller's ``moderation_timeout`` bounds the wait and the
  policy's ``on_error`` decides).

Redis unreachable or erroring: the budget falls back to the same bucket kept in the process (local
pacing), logs one warning per outage, counts it (:attr:`BudgetStats.redis_errors`) and tries Redis
again after ``recheck`` seconds. Every Redis call has bounded socket timeouts and a time limit, so a
dead Redis never hangs a window.

Without a ``redis_url`` the budget is local only (configured limits paced per process).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from ..exceptions import ConfigError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["BudgetGate", "BudgetStats", "ModerationBudget", "budget_key"]

logger = logging.getLogger(__name__)

# KEYS[1]: the budget hash. ARGV: request cost, token cost, configured requests/min and tokens/min
# (0: not configured), headroom, burst seconds, probe milliseconds, TTL milliseconds.
# Returns {granted (0/1), milliseconds to wait}.
_ACQUIRE = """
local key = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local creq, ctok = tonumber(ARGV[1]), tonumber(ARGV[2])
local rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4])
local share, burst = 1 - tonumber(ARGV[5]), tonumber(ARGV[6])
local probe_ms, ttl = tonumber(ARGV[7]), tonumber(ARGV[8])
local h = redis.call('HMGET', key, 'rl', 'tl', 'ts', 'lrpm', 'ltpm', 'pause', 'probed', 'probe')
if rpm <= 0 then rpm = tonumber(h[4]) or 0 end
if tpm <= 0 then tpm = tonumber(h[5]) or 0 end
local pause = tonumber(h[6]) or 0
if pause > now then return {0, math.ceil(pause - now)} end
if rpm <= 0 and tpm <= 0 then
  if h[7] == '1' then return {1, 0} end
  local probe = tonumber(h[8]) or 0
  if probe > now then return {0, math.ceil(probe - now)} end
  redis.call('HSET', key, 'probe', now + probe_ms)
  redis.call('PEXPIRE', key, ttl)
  return {1, 0}
end
local ts = tonumber(h[3]) or now
local elapsed = math.max(0, now - ts)
local wait = 0
local rl, tl = tonumber(h[1]), tonumber(h[2])
if rpm > 0 then
  local rate = rpm * share / 60000
  local cap = math.max(1, rate * burst * 1000)
  rl = math.min(cap, (rl or cap) + elapsed * rate)
  local need = math.min(creq, cap)
  if rl < need then wait = math.max(wait, (need - rl) / rate) end
end
if tpm > 0 then
  local rate = tpm * share / 60000
  local cap = math.max(1, rate * burst * 1000)
  tl = math.min(cap, (tl or cap) + elapsed * rate)
  local need = math.min(ctok, cap)
  if tl < need then wait = math.max(wait, (need - tl) / rate) end
end
if wait > 0 then return {0, math.max(1, math.ceil(wait))} end
if rpm > 0 then redis.call('HSET', key, 'rl', rl - creq) end
if tpm > 0 then redis.call('HSET', key, 'tl', tl - ctok) end
redis.call('HSET', key, 'ts', now)
redis.call('PEXPIRE', key, ttl)
return {1, 0}
"""

# KEYS[1]: the budget hash. ARGV: learned requests/min, tokens/min ('' if not sent), pause
# milliseconds from now (0: none), TTL milliseconds.
_OBSERVE = """
local key = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
if ARGV[1] ~= '' then redis.call('HSET', key, 'lrpm', ARGV[1]) end
if ARGV[2] ~= '' then redis.call('HSET', key, 'ltpm', ARGV[2]) end
redis.call('HSET', key, 'probed', '1')
local pause_ms = tonumber(ARGV[3])
if pause_ms > 0 then
  local until_ = now + pause_ms
  local old = tonumber(redis.call('HGET', key, 'pause')) or 0
  if until_ > old then redis.call('HSET', key, 'pause', until_) end
end
redis.call('PEXPIRE', key, tonumber(ARGV[4]))
return 1
"""

_TTL_MS = 3_600_000  # an idle budget is forgotten after an hour
_PROBE_MS = 1000
_MAX_PAUSE = 60.0


@dataclass(frozen=True)
class BudgetStats:
    """Counters of one :class:`ModerationBudget` in this process, as a snapshot.

    Attributes:
        acquired: Requests let through.
        waits: Times a request had to wait for the budget.
        waited_seconds: Total seconds spent waiting.
        redis_errors: Redis calls that failed (unreachable, timed out, erroring).
        local_acquires: Requests paced locally because Redis was failing.
        outages: Times Redis went from working (or untried) to failing.
    """

    acquired: int = 0
    waits: int = 0
    waited_seconds: float = 0.0
    redis_errors: int = 0
    local_acquires: int = 0
    outages: int = 0


def budget_key(base_url: str, api_key: str) -> str:
    """The default Redis key of a budget: one per endpoint and API key (hashed, never stored in clear)."""
    digest = hashlib.sha256(f"{base_url}\0{api_key}".encode()).hexdigest()[:20]
    return f"streamguard:moderation-budget:{digest}"


class _LocalBucket:
    """The same buckets as the Lua script, in this process: the fallback, and the budget without Redis."""

    def __init__(self, *, headroom: float, burst: float) -> None:
        self.share = 1.0 - headroom
        self.burst = burst
        self.levels: dict[str, float] = {}
        self.stamp: float | None = None
        self.pause_until = 0.0

    def reserve(self, costs: Mapping[str, tuple[float, float]], now: float) -> float:
        """Seconds to wait; if none, take ``costs`` (name -> (cost, per-minute limit)) from the buckets."""
        if self.pause_until > now:
            return self.pause_until - now
        elapsed = 0.0 if self.stamp is None else max(0.0, now - self.stamp)
        wait = 0.0
        levels: dict[str, float] = {}
        for name, (cost, per_minute) in costs.items():
            rate = per_minute * self.share / 60.0
            cap = max(1.0, rate * self.burst)
            level = min(cap, self.levels.get(name, cap) + elapsed * rate)
            need = min(cost, cap)
            if level < need:
                wait = max(wait, (need - level) / rate)
            levels[name] = level - cost
        if wait > 0:
            return wait
        self.levels.update(levels)
        self.stamp = now
        return 0.0


class ModerationBudget:
    """Requests and tokens per minute for one Moderation endpoint, shared through Redis (or local).

    Args:
        redis_url: ``redis://host:port/db`` (or ``rediss://``, ``unix://``); None: local pacing only.
        key: The Redis hash that holds the budget; every process sharing one budget uses the same
            key (see :func:`budget_key`).
        requests_per_minute: The request limit; None: learned from ``x-ratelimit-limit-requests``.
        tokens_per_minute: The token limit; None: learned from ``x-ratelimit-limit-tokens``.
        headroom: Fraction of each limit left unused (0 <= headroom < 1).
        burst: Seconds of refill a bucket holds (at least one request's worth).
        timeout: Seconds one Redis call may take (connect, read, whole call).
        recheck: Seconds between attempts to reach Redis again after a failure.

    Raises:
        ConfigError: An option is out of range, or ``redis_url`` is given without the ``redis`` extra.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        key: str = "streamguard:moderation-budget:default",
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        headroom: float = 0.1,
        burst: float = 0.1,
        timeout: float = 0.25,
        recheck: float = 2.0,
    ) -> None:
        for name, value in (("requests_per_minute", requests_per_minute), ("tokens_per_minute", tokens_per_minute)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if not (0 <= headroom < 1):
            raise ConfigError(f"headroom must be in [0, 1), got {headroom!r}")
        for name, value in (("burst", burst), ("timeout", timeout), ("recheck", recheck)):
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        if not key:
            raise ConfigError("key must not be empty")
        if redis_url is not None:
            try:
                import redis.asyncio  # noqa: F401
            except ImportError as exc:  # pragma: no cover - depends on the installed extras
                raise ConfigError("a shared budget needs the redis extra: pip install 'streamguard[redis]'") from exc
        self.redis_url = redis_url
        self.key = key
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.headroom = headroom
        self.burst = burst
        self.timeout = timeout
        self.recheck = recheck
        self._local = _LocalBucket(headroom=headroom, burst=burst)
        self._learned_rpm: float | None = None
        self._learned_tpm: float | None = None
        self._written: tuple[str, str] | None = None  # learned limits last written to Redis
        self._redis: Redis | None = None
        self._scripts: tuple[AsyncScript, AsyncScript] | None = None
        self._down_until: float | None = None  # monotonic; None: Redis working (or untried)
        self._acquired = 0
        self._waits = 0
        self._waited = 0.0
        self._redis_errors = 0
        self._local_acquires = 0
        self._outages = 0

    @property
    def stats(self) -> BudgetStats:
        """Counters so far (a snapshot)."""
        return BudgetStats(
            acquired=self._acquired,
            waits=self._waits,
            waited_seconds=self._waited,
            redis_errors=self._redis_errors,
            local_acquires=self._local_acquires,
            outages=self._outages,
        )

    @property
    def shared(self) -> bool:
        """Whether the budget is kept in Redis and Redis is currently answering (or untried)."""
        return self.redis_url is not None and self._down_until is None

    async def acquire(self, tokens: int, requests: int = 1) -> float:
        """Wait until ``requests`` requests of ``tokens`` estimated tokens fit the budget, and take them.

        Args:
            tokens: Estimated tokens of the request.
            requests: Requests to take (0: tokens only, e.g. for texts that joined a request late).

        Returns:
            Seconds waited.
        """
        waited = 0.0
        while True:
            wait, local = await self._try(tokens, requests)
            if wait <= 0:
                self._acquired += 1
                self._local_acquires += local
                if waited:
                    self._waits += 1
                    self._waited += waited
                return waited
            wait = min(wait, _MAX_PAUSE)
            logger.debug("moderation budget spent: waiting %.3fs", wait)
            waited += wait
            await anyio.sleep(wait)

    async def observe(self, headers: Mapping[str, str], status: int) -> None:
        """Learn from one endpoint response: its limits, and a pause when nothing is left or on a 429.

        Args:
            headers: The response's headers.
            status: Its HTTP status.
        """
        rpm = _number(headers.get("x-ratelimit-limit-requests"))
        tpm = _number(headers.get("x-ratelimit-limit-tokens"))
        if rpm is not None and rpm > 0:
            self._learned_rpm = rpm
        if tpm is not None and tpm > 0:
            self._learned_tpm = tpm
        pause = _pause_of(headers, status)
        if pause > 0:
            self._local.pause_until = max(self._local.pause_until, time.monotonic() + pause)
        if self.redis_url is None:
            return
        learned = (_arg(self._learned_rpm), _arg(self._learned_tpm))
        if learned == self._written and pause <= 0:
            return
        scripts = await self._connected()
        if scripts is None:
            return
        try:
            with anyio.fail_after(self.timeout * 2):
                await scripts[1](keys=[self.key], args=[*learned, round(pause * 1000), _TTL_MS])
        except Exception as exc:  # any Redis failure: keep pacing locally
            self._failed(exc)
        else:
            self._answered()
            self._written = learned

    async def aclose(self) -> None:
        """Close the Redis connections (the budget reconnects if used again)."""
        redis, self._redis, self._scripts = self._redis, None, None
        if redis is not None:
            with anyio.move_on_after(self.timeout * 2, shield=True):
                await redis.aclose()

    def _limits(self) -> tuple[float | None, float | None]:
        return (self.requests_per_minute or self._learned_rpm, self.tokens_per_minute or self._learned_tpm)

    async def _try(self, tokens: int, requests: int) -> tuple[float, bool]:
        """(seconds to wait, paced locally); 0 seconds: the request is taken. Redis if it answers, else local."""
        scripts = await self._connected() if self.redis_url is not None else None
        if scripts is not None:
            try:
                with anyio.fail_after(self.timeout * 2):
                    granted, wait_ms = await scripts[0](
                        keys=[self.key],
                        args=[
                            requests,
                            tokens,
                            self.requests_per_minute or 0,
                            self.tokens_per_minute or 0,
                            self.headroom,
                            self.burst,
                            _PROBE_MS,
                            _TTL_MS,
                        ],
                    )
            except Exception as exc:  # any Redis failure: pace locally
                self._failed(exc)
            else:
                self._answered()
                return (0.0 if int(granted) else max(0.001, int(wait_ms) / 1000)), False
        rpm, tpm = self._limits()
        costs: dict[str, tuple[float, float]] = {}
        if rpm:
            costs["requests"] = (float(requests), rpm)
        if tpm:
            costs["tokens"] = (float(tokens), tpm)
        return self._local.reserve(costs, time.monotonic()), self.redis_url is not None

    async def _connected(self) -> tuple[AsyncScript, AsyncScript] | None:
        """The scripts, connecting lazily; None while Redis is considered down."""
        if self._down_until is not None:
            now = time.monotonic()
            if now < self._down_until:
                return None
            self._down_until = now + self.recheck  # one caller tries again; the others stay local meanwhile
        if self._scripts is None:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            assert self.redis_url is not None
            client: Redis = Redis.from_url(
                self.redis_url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                retry=Retry(NoBackoff(), 0),
                health_check_interval=0,
            )
            self._redis = client
            self._scripts = (client.register_script(_ACQUIRE), client.register_script(_OBSERVE))
        return self._scripts

    def _failed(self, exc: BaseException) -> None:
        self._redis_errors += 1
        if self._down_until is None:
            self._outages += 1
            logger.warning(
                "moderation budget: Redis at %s failed (%s: %s); pacing locally, retrying every %.1fs",
                _safe_url(self.redis_url),
                type(exc).__name__,
                exc,
                self.recheck,
            )
        self._down_until = time.monotonic() + self.recheck

    def _answered(self) -> None:
        if self._down_until is not None:
            logger.warning(
                "moderation budget: Redis at %s answers again; sharing the budget", _safe_url(self.redis_url)
            )
            self._down_until = None


class _Group:
    """Texts waiting for the budget together (one request's worth)."""

    def __init__(self, size: int, tokens: int) -> None:
        self.size = size
        self.tokens = tokens
        self.passed = False
        self.done = anyio.Event()


class BudgetGate:
    """Windows wait here for the budget as a group, so a spent budget makes batches bigger, not more numerous.

    The first caller leads a group: it takes one request (and the group's estimated tokens) from the
    budget, waiting as long as needed, while later callers join its group, up to ``max_group``
    texts. Then the whole group goes on at once, into the same batch. A leader that fails or is
    cancelled lets its group try again.

    Args:
        budget: The budget to take from.
        max_group: Most texts in one group (the moderator's ``max_batch``).
        estimate: Estimated tokens of some texts.
    """

    def __init__(self, budget: ModerationBudget, max_group: int, estimate: Callable[[Sequence[str]], int]) -> None:
        self.budget = budget
        self.max_group = max_group
        self.estimate = estimate
        self._open: _Group | None = None

    async def through(self, texts: Sequence[str]) -> None:
        """Return once the budget has let ``texts`` through (with their group)."""
        while True:
            group = self._open
            if group is not None and group.size + len(texts) <= self.max_group:
                group.size += len(texts)
                group.tokens += self.estimate(texts)
                await group.done.wait()
                if group.passed:
                    return
                continue  # the leader failed: lead or join anew
            group = self._open = _Group(len(texts), self.estimate(texts))
            try:
                charged = group.tokens
                await self.budget.acquire(charged)
                if self._open is group:
                    self._open = None
                if group.tokens > charged:  # texts that joined while the leader waited
                    await self.budget.acquire(group.tokens - charged, requests=0)
            except BaseException:
                if self._open is group:
                    self._open = None
                group.done.set()
                raise
            group.passed = True
            group.done.set()
            return


def _safe_url(url: str | None) -> str:
    """The URL without its password."""
    if not url or "@" not in url:
        return str(url)
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def _pause_of(headers: Mapping[str, str], status: int) -> float:
    """Seconds every process should pause after this response (0: none)."""
    pause = 0.0
    for kind in ("requests", "tokens"):
        remaining = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
        if remaining is not None and remaining <= 0:
            pause = max(pause, _duration(headers.get(f"x-ratelimit-reset-{kind}")) or 0.0)
    if status == 429:
        retry_ms = _number(headers.get("retry-after-ms"))
        retry = retry_ms / 1000 if retry_ms is not None else _number(headers.get("retry-after"))
        if retry is not None:
            pause = max(pause, retry)
    return min(max(0.0, pause), _MAX_PAUSE)


def _arg(value: float | None) -> str:
    return "" if value is None else repr(value)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _duration(value: str | None) -> float | None:
    from .openai import _duration as parse

    return parse(value)
