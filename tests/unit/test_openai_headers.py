"""Parsing of the Moderation endpoint's rate-limit and retry headers (pure helpers)."""

from __future__ import annotations

import pytest

from streamguard.moderation.openai import _duration, _RateLimits, _retry_after


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1s", 1.0),
        ("0.2s", 0.2),
        ("200ms", 0.2),
        ("6m0s", 360.0),
        ("1h2m3.5s", 3723.5),
        ("1m30s", 90.0),
        ("0.5", 0.5),
        ("", None),
        (None, None),
        ("soon", None),
        ("5x", None),
    ],
)
def test_reset_durations(value: str | None, seconds: float | None) -> None:
    """OpenAI's reset durations are read as seconds; anything else is unknown."""
    assert _duration(value) == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after": "2"}, 2.0),
        ({"retry-after-ms": "100", "retry-after": "9"}, 0.1),
        ({"retry-after": "3600"}, None),  # unreasonably long: back off normally instead
        ({"retry-after": "-1"}, None),
        ({}, None),
    ],
)
def test_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    """retry-after-ms wins over retry-after; absurd values are ignored."""
    assert _retry_after(headers) == (pytest.approx(seconds) if seconds is not None else None)


def test_budget_is_reserved_then_waits_until_reset() -> None:
    """Requests spend the announced budget; an exhausted budget waits until its reset."""
    limits = _RateLimits()
    assert limits.reserve(100, now=0.0) == 0  # nothing known yet: go
    limits.update({"x-ratelimit-remaining-requests": "2", "x-ratelimit-reset-requests": "10s"})
    now = limits.requests_reset - 10
    assert limits.reserve(1, now) == 0
    assert limits.reserve(1, now) == 0
    assert limits.reserve(1, now) == pytest.approx(10)
    assert limits.reserve(1, now + 10) == 0  # after the reset the budget is unknown again: go


def test_tokens_wait_only_when_the_estimate_exceeds_what_is_left() -> None:
    """A small request fits in the remaining tokens; a bigger one waits for the reset."""
    limits = _RateLimits()
    limits.update({"x-ratelimit-remaining-tokens": "50", "x-ratelimit-reset-tokens": "1s"})
    now = limits.tokens_reset - 1
    assert limits.reserve(40, now) == 0
    assert limits.reserve(40, now) == pytest.approx(1)
