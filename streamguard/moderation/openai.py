"""The OpenAI Moderation endpoint as a moderator: batched across streams, paced, retried.

One :class:`OpenAIModerator` is meant to be shared by every guarded stream of a process. Windows
from concurrent streams are coalesced into array-input calls (see ``_batcher.py``), so 100
streams moderating at once make a handful of HTTP requests, not 100.

Pacing: each response's ``x-ratelimit-*`` headers say how many requests and tokens are left and
when the budget resets. A call that would exceed what is left waits for the reset instead of
provoking a 429. Tokens are estimated cheaply (characters / 4); the estimate only paces.

Retries: the client's own retries are turned off (``with_options(max_retries=0)``) so the
policy is in one place: 408/409/429/5xx, connection errors and timeouts are retried with
jittered exponential backoff, honouring ``retry-after-ms`` / ``retry-after``.

Batching, pacing, retries and the counters live in ``_EndpointModerator`` (pacing and retries in
its ``_Retrier``), which :class:`~streamguard.moderation.EmbeddingModerator` extends as well.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, TypeVar

import anyio
import openai
import pydantic
from pydantic import AllowInfNan, Strict

from ..exceptions import ConfigError, ModerationError
from ._base import Verdict
from ._batcher import Batcher
from ._budget import BudgetGate, ModerationBudget, budget_key

if TYPE_CHECKING:
    from openai._legacy_response import LegacyAPIResponse

__all__ = ["ModerationStats", "OpenAIModerator"]

logger = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({408, 409, 429})
_MAX_BACKOFF = 8.0
# A Retry-After longer than this is not honoured as is (the backoff cap applies instead).
_MAX_RETRY_AFTER = 60.0

_T = TypeVar("_T")


@dataclass(frozen=True)
class ModerationStats:
    """Counters of one :class:`OpenAIModerator`, as a snapshot.

    Attributes:
        calls: ``moderate()`` calls.
        texts: Texts moderated.
        moderated_chars: Characters moderated.
        requests: HTTP requests sent, retries included.
        batches: Batched calls (one or more requests each, with retries).
        retries: Requests that were retries.
        paced_seconds: Total time spent waiting for a rate-limit reset before sending.
    """

    calls: int = 0
    texts: int = 0
    moderated_chars: int = 0
    requests: int = 0
    batches: int = 0
    retries: int = 0
    paced_seconds: float = 0.0


class _EndpointModerator:
    """What a moderator that calls an OpenAI endpoint needs: paced, retried, batched calls, and their counters.

    A subclass sends one batch in :meth:`_send`; it may prepare before the first batch in :meth:`_prepare`.

    Raises:
        ConfigError: An option is out of range.
    """

    def __init__(
        self,
        client: openai.AsyncOpenAI | None,
        *,
        max_batch: int,
        max_wait: float,
        max_retries: int,
        timeout: float,
        backoff: float,
    ) -> None:
        if max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {max_retries!r}")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not (backoff >= 0 and math.isfinite(backoff)):
            raise ConfigError(f"backoff must be a non-negative number of seconds, got {backoff!r}")
        if client is not None:  # None: a subclass that computes locally (EmbeddingModerator(backend="local"))
            self._client = client.with_options(max_retries=0, timeout=timeout)
        self._retrier = _Retrier(max_retries=max_retries, backoff=backoff)
        self._batcher: Batcher[str, Verdict] = Batcher(self._send_counted, max_batch=max_batch, max_wait=max_wait)
        self._calls = 0
        self._texts = 0
        self._chars = 0
        self._batches = 0

    @property
    def max_retries(self) -> int:
        """Retries of a failed request."""
        return self._retrier.max_retries

    @max_retries.setter
    def max_retries(self, value: int) -> None:
        self._retrier.max_retries = value

    @property
    def stats(self) -> ModerationStats:
        """Counters so far (a snapshot)."""
        return ModerationStats(
            calls=self._calls,
            texts=self._texts,
            moderated_chars=self._chars,
            requests=self._retrier.requests,
            batches=self._batches,
            retries=self._retrier.retries,
            paced_seconds=self._retrier.paced,
        )

    async def moderate(self, texts: Sequence[str]) -> list[Verdict]:
        """Judge each text; one verdict per text, in order.

        Args:
            texts: Texts to judge, batched with those of concurrent callers.

        Returns:
            One :class:`Verdict` per text.

        Raises:
            ModerationError: The endpoint failed after retries, refused the request, or
                returned a malformed response or a different number of results than inputs.
        """
        self._calls += 1
        if not texts:
            return []
        await self._prepare()
        return await self._batcher.submit(texts)

    async def _prepare(self) -> None:
        """Called before texts are submitted (nothing by default)."""

    async def _send_counted(self, texts: list[str]) -> list[Verdict]:
        """One batched call, counted; the batcher fans the verdicts out."""
        self._batches += 1
        verdicts = await self._send(texts)
        self._texts += len(texts)
        self._chars += sum(map(len, texts))
        return verdicts

    async def _send(self, texts: list[str]) -> list[Verdict]:
        """One batched call, paced and retried through ``self._retrier``: one verdict per text, in order."""
        raise NotImplementedError


class OpenAIModerator(_EndpointModerator):
    """Moderate texts with the OpenAI Moderation endpoint (or any compatible ``base_url``).

    Category names are kept as the endpoint sends them (``"self-harm/intent"``,
    ``"illicit/violent"``, ...); ``Policy.thresholds`` applies to ``category_scores``.

    Args:
        client: The client to call through; its ``base_url``, key and HTTP client are used.
        model: Moderation model.
        max_batch: Most texts in one array-input request.
        max_wait: Seconds the first window of a batch waits for windows of other streams.
        max_retries: Retries of a failed request (429, 5xx, connection error, timeout).
        timeout: Seconds one HTTP request may take.
        backoff: Base of the exponential backoff, in seconds (doubled per retry, jittered).
        redis_url: Keep the rate-limit budget in this Redis, shared by every process that uses the
            same endpoint and key (see :class:`~streamguard.moderation.ModerationBudget`).
        requests_per_minute: The endpoint's request limit; None: learned from its headers.
        tokens_per_minute: The endpoint's token limit; None: learned from its headers.
        budget: A budget to pace through instead (overrides the three options above).

    Raises:
        ConfigError: An option is out of range.
    """

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        *,
        model: str = "omni-moderation-latest",
        max_batch: int = 32,
        max_wait: float = 0.005,
        max_retries: int = 3,
        timeout: float = 10.0,
        backoff: float = 0.25,
        redis_url: str | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        budget: ModerationBudget | None = None,
    ) -> None:
        super().__init__(
            client, max_batch=max_batch, max_wait=max_wait, max_retries=max_retries, timeout=timeout, backoff=backoff
        )
        self.model = model
        if budget is None and (redis_url or requests_per_minute or tokens_per_minute):
            budget = ModerationBudget(
                redis_url,
                key=budget_key(str(client.base_url), client.api_key),
                requests_per_minute=requests_per_minute,
                tokens_per_minute=tokens_per_minute,
            )
        self._retrier.budget = budget
        # With a budget, windows wait for it as groups that become one batch each.
        self._gate = BudgetGate(budget, max_batch, _estimate_tokens) if budget is not None else None

    async def moderate(self, texts: Sequence[str]) -> list[Verdict]:
        """Judge each text; one verdict per text, in order (see :meth:`_EndpointModerator.moderate`).

        With a budget, the texts first wait for it together with those of concurrent callers.
        """
        if self._gate is not None and texts:
            await self._gate.through(texts)
        return await super().moderate(texts)

    @property
    def budget(self) -> ModerationBudget | None:
        """The rate-limit budget paced through beyond the headers (None: headers only, per process)."""
        return self._retrier.budget

    async def _send(self, texts: list[str]) -> list[Verdict]:
        raw = await self._retrier.call(
            lambda: self._client.moderations.with_raw_response.create(input=texts, model=self.model),
            tokens=_estimate_tokens(texts),
            what="moderation",
            prepaid=self._gate is not None,
        )
        verdicts = parse_moderation(raw.content)
        if len(verdicts) != len(texts):
            raise ModerationError(f"moderation endpoint returned {len(verdicts)} results for {len(texts)} inputs")
        return verdicts


class _Retrier:
    """One moderator's requests: paced by ``x-ratelimit-*`` headers, retried with jittered backoff."""

    def __init__(self, *, max_retries: int, backoff: float) -> None:
        self.limits = _RateLimits()
        self.max_retries = max_retries
        self.backoff = backoff
        self.requests = 0  # HTTP requests sent, retries included
        self.retries = 0
        self.paced = 0.0  # seconds spent waiting for a rate-limit reset
        self.budget: ModerationBudget | None = None  # shared (or configured) budget, taken from first

    async def call(
        self,
        send: Callable[[], Awaitable[LegacyAPIResponse[_T]]],
        *,
        tokens: int,
        what: str,
        prepaid: bool = False,
    ) -> LegacyAPIResponse[_T]:
        """Send until a response succeeds; ``what`` names the request in errors and logs.

        ``prepaid``: the first attempt was taken from the budget already (by a gate); retries take anew.

        Raises:
            ModerationError: A non-retryable status, or the last retry failed.
        """
        attempt = 0
        while True:
            if self.budget is not None and (attempt or not prepaid):
                self.paced += await self.budget.acquire(tokens)
            await self._pace(tokens)
            self.requests += 1
            try:
                raw = await send()
            except openai.APIStatusError as exc:
                self.limits.update(exc.response.headers)
                if self.budget is not None:
                    await self.budget.observe(exc.response.headers, exc.status_code)
                retryable = exc.status_code in _RETRY_STATUS or exc.status_code >= 500
                delay = _retry_after(exc.response.headers)
                if not retryable or attempt >= self.max_retries:
                    raise ModerationError(
                        f"{what} request failed with HTTP {exc.status_code}"
                        + (f" after {attempt} retries" if attempt else "")
                    ) from exc
            except openai.APIConnectionError as exc:  # includes APITimeoutError
                delay = None
                if attempt >= self.max_retries:
                    kind = "timed out" if isinstance(exc, openai.APITimeoutError) else "could not connect"
                    raise ModerationError(
                        f"{what} request {kind}" + (f" after {attempt} retries" if attempt else "")
                    ) from exc
            else:
                self.limits.update(raw.headers)
                if self.budget is not None:
                    await self.budget.observe(raw.headers, raw.status_code)
                return raw
            if delay is None:
                delay = min(_MAX_BACKOFF, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)
            attempt += 1
            self.retries += 1
            logger.debug("%s request failed; retry %d in %.3fs", what, attempt, delay)
            await anyio.sleep(delay)

    async def _pace(self, tokens: int) -> None:
        """Wait until the rate-limit budget allows a request of ``tokens`` estimated tokens."""
        # A loop: while we slept, another batch's response may have announced a new reset.
        while (wait := self.limits.reserve(tokens, time.monotonic())) > 0:
            logger.debug("rate limit used up: waiting %.3fs for the reset", wait)
            self.paced += wait
            await anyio.sleep(wait)


class _RateLimits:
    """What the last response said about the budget, minus what was sent since."""

    def __init__(self) -> None:
        self.requests: float | None = None  # remaining; None: unknown
        self.tokens: float | None = None
        self.requests_reset = 0.0  # monotonic time at which the budget is full again
        self.tokens_reset = 0.0

    def update(self, headers: Mapping[str, str]) -> None:
        now = time.monotonic()
        requests = _number(headers.get("x-ratelimit-remaining-requests"))
        tokens = _number(headers.get("x-ratelimit-remaining-tokens"))
        if requests is not None:
            self.requests = requests
            self.requests_reset = now + (_duration(headers.get("x-ratelimit-reset-requests")) or 0.0)
        if tokens is not None:
            self.tokens = tokens
            self.tokens_reset = now + (_duration(headers.get("x-ratelimit-reset-tokens")) or 0.0)

    def reserve(self, tokens: int, now: float) -> float:
        """Seconds to wait before sending; if none, count the request against the budget."""
        if self.requests is not None and now >= self.requests_reset:
            self.requests = None  # reset passed: unknown (plenty) until the next response
        if self.tokens is not None and now >= self.tokens_reset:
            self.tokens = None
        wait = 0.0
        if self.requests is not None and self.requests < 1:
            wait = max(wait, self.requests_reset - now)
        if self.tokens is not None and self.tokens < tokens:
            wait = max(wait, self.tokens_reset - now)
        if wait <= 0:
            if self.requests is not None:
                self.requests -= 1
            if self.tokens is not None:
                self.tokens -= tokens
        return wait


# The Moderation response, validated strictly by pydantic-core straight from the JSON bytes: a
# ``flagged`` that is missing or not a JSON boolean, a category that is not a boolean, a score that
# is not a number is an error, never a clean verdict. ``null`` is allowed where openai's own types
# allow it (``illicit`` of the legacy models) and means "no opinion": it is dropped.
_Flag = Annotated[bool, Strict()]
_Score = Annotated[float, Strict(), AllowInfNan(False)]


class _Result(pydantic.BaseModel):
    flagged: _Flag
    categories: dict[str, _Flag | None]
    category_scores: dict[str, _Score | None]


class _Body(pydantic.BaseModel):
    results: list[_Result]


_BODY = pydantic.TypeAdapter(_Body)


def parse_moderation(body: bytes | str) -> list[Verdict]:
    """Verdicts of a Moderation endpoint response body, validated strictly.

    Args:
        body: The response's JSON bytes.

    Returns:
        One :class:`Verdict` per result, with the endpoint's own category names.

    Raises:
        ModerationError: The body is not a well-formed Moderation response.
    """
    try:
        parsed = _BODY.validate_json(body)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors(include_url=False)[:3]
        )
        raise ModerationError(f"malformed moderation response: {problems}") from exc
    return [
        Verdict(
            flagged=r.flagged,
            categories={k: v for k, v in r.categories.items() if v is not None},
            scores={k: v for k, v in r.category_scores.items() if v is not None},
        )
        for r in parsed.results
    ]


def _estimate_tokens(texts: Sequence[str]) -> int:
    """Cheap token estimate for pacing: about four characters per token."""
    return sum(len(t) // 4 + 1 for t in texts)


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")


def _duration(value: str | None) -> float | None:
    """Seconds in an OpenAI reset header: ``"1s"``, ``"6m0s"``, ``"20ms"``, ``"0.2s"`` or ``"0.2"``."""
    if not value:
        return None
    value = value.strip()
    number = _number(value)
    if number is not None:
        return max(0.0, number)
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value.replace(" ", ""):
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked to wait (``retry-after-ms`` or ``retry-after``), if reasonable."""
    delay = _number(headers.get("retry-after-ms"))
    if delay is not None:
        delay /= 1000
    else:
        raw = headers.get("retry-after")
        delay = _number(raw)
        if delay is None and raw:
            parsed = email.utils.parsedate_tz(raw)
            if parsed is not None:
                delay = email.utils.mktime_tz(parsed) - time.time()
    if delay is None or not 0 <= delay <= _MAX_RETRY_AFTER:
        return None
    return delay
