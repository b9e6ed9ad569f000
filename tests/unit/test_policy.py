"""Policy: validation and how verdicts become decisions."""

from __future__ import annotations

from typing import Any

import pytest

from streamguard import ConfigError, Policy, Verdict


@pytest.mark.parametrize(
    "options",
    [
        {"mode": "later"},
        {"action": "delete"},
        {"on_error": "ignore"},
        {"window_chars": 0},
        {"first_window_chars": 500, "window_chars": 100},
        {"overlap_chars": -1},
        {"window_growth": 0.5},
        {"max_in_flight": 0},
        {"moderation_timeout": 0},
        {"flush_after": float("nan")},
        {"thresholds": {"violence": 1.5}},
    ],
)
def test_bad_options_raise_config_error(options: dict[str, Any]) -> None:
    """Invalid options fail at construction, with a ConfigError (a ValueError)."""
    with pytest.raises(ConfigError):
        Policy(**options)


def test_defaults_are_safe_first() -> None:
    """Hold back, cut off, fail closed by default."""
    p = Policy()
    assert (p.mode, p.action, p.on_error) == ("holdback", "cutoff", "fail_closed")


@pytest.mark.parametrize(
    ("policy", "verdict", "expected"),
    [
        (Policy(), Verdict(False, {"violence": False}, {"violence": 0.3}), None),
        (Policy(), Verdict(True, {"violence": True}, {"violence": 0.9}), ("violence", 0.9)),
        (
            Policy(thresholds={"violence": 0.4}),
            Verdict(False, {"violence": False}, {"violence": 0.5}),
            ("violence", 0.5),
        ),
        (Policy(thresholds={"violence": 0.95}), Verdict(True, {"violence": True}, {"violence": 0.9}), None),
        (Policy(ignore_categories=frozenset({"violence"})), Verdict(True, {"violence": True}, {"violence": 0.9}), None),
        (
            Policy(),
            Verdict(True, {"self-harm/intent": True, "hate": True}, {"self-harm/intent": 0.7, "hate": 0.8}),
            ("hate", 0.8),
        ),
        (Policy(), Verdict(True), (None, None)),
        (Policy(thresholds={"violence": 0.5}), Verdict(True, {"violence": True}, {}), ("violence", None)),
        (Policy(thresholds={"violence": 0.5}), Verdict(True, {"violence": True}, {"hate": 0.1}), ("violence", None)),
    ],
)
def test_judge(policy: Policy, verdict: Verdict, expected: tuple[str | None, float | None] | None) -> None:
    """Thresholds, ignored categories and the backend's own flags decide, highest score first."""
    decision = policy.judge(verdict)
    assert (None if decision is None else (decision.category, decision.score)) == expected
