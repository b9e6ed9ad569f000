"""Verdict validation: a moderation result that is not well formed is a ModerationError, never clean."""

from __future__ import annotations

import json
from typing import Any

import pytest

from streamguard.exceptions import ModerationError
from streamguard.moderation import Verdict
from streamguard.moderation._base import check_verdicts
from streamguard.moderation.openai import parse_moderation


@pytest.mark.parametrize(
    "fields",
    [
        {"flagged": None},
        {"flagged": 1},
        {"flagged": "false"},
        {"flagged": True, "categories": {"hate": "yes"}},
        {"flagged": True, "categories": {"hate": None}},
        {"flagged": False, "categories": ["hate"]},
        {"flagged": False, "scores": {"hate": "0.9"}},
        {"flagged": False, "scores": {"hate": True}},
        {"flagged": False, "scores": {"hate": float("nan")}},
        {"flagged": False, "scores": {"hate": float("inf")}},
    ],
)
def test_malformed_verdict_raises(fields: dict[str, Any]) -> None:
    """A verdict with a non-bool flag or category, or a non-finite score, cannot be built."""
    with pytest.raises(ModerationError, match="malformed verdict"):
        Verdict(**fields)


def test_numpy_scalars_are_verdicts() -> None:
    """numpy's bool_ and float32 (what a local model's comparisons give) are accepted."""
    np = pytest.importorskip("numpy")
    score = np.float32(0.7)
    verdict = Verdict(np.bool_(True), {"x": score >= 0.5}, {"x": score})
    assert verdict.categories["x"]


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (None, "not a list"),
        ([Verdict(False)], "1 verdicts for 2 texts"),
        ([Verdict(False)] * 3, "3 verdicts for 2 texts"),
        ([Verdict(False), {"flagged": False}], "not a Verdict"),
    ],
)
def test_check_verdicts(returned: object, message: str) -> None:
    """What moderate() returned must be one Verdict per text."""
    with pytest.raises(ModerationError, match=message):
        check_verdicts(returned, 2)


def test_check_verdicts_passes_a_good_list() -> None:
    """A well-formed answer comes back as a list, unchanged."""
    verdicts = (Verdict(False), Verdict(True))
    assert check_verdicts(verdicts, 2) == list(verdicts)


def result(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "flagged": True,
        "categories": {"violence": True, "hate": False, "illicit": None},
        "category_scores": {"violence": 0.9, "hate": 0, "illicit": 0.01},
        "category_applied_input_types": {"violence": ["text"]},
    }
    base.update(overrides)
    return base


def body(*results: dict[str, Any]) -> bytes:
    return json.dumps({"id": "modr-1", "model": "m", "results": list(results)}).encode()


def test_parse_moderation_reads_a_good_body() -> None:
    """Category names are kept, integer scores are numbers, null categories are dropped."""
    (verdict,) = parse_moderation(body(result()))
    assert verdict == Verdict(True, {"violence": True, "hate": False}, {"violence": 0.9, "hate": 0.0, "illicit": 0.01})


@pytest.mark.parametrize(
    "raw",
    [
        body(result(flagged=None)),
        body(result(flagged="true")),
        body(result(flagged=1)),
        body({k: v for k, v in result().items() if k != "flagged"}),
        body(result(categories={"violence": "true"})),
        body(result(categories="yes")),
        body(result(category_scores={"violence": "0.9"})),
        body(result(category_scores={"violence": True})),
        json.dumps({"id": "modr-1", "results": None}).encode(),
        json.dumps({"id": "modr-1"}).encode(),
        b"[]",
        b"not json",
    ],
)
def test_parse_moderation_rejects_malformed(raw: bytes) -> None:
    """A body that is not a well-formed Moderation response is a ModerationError naming the field."""
    with pytest.raises(ModerationError, match="malformed moderation response"):
        parse_moderation(raw)
