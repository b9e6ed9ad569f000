"""CompositeModerator: moderators run concurrently, verdicts merged."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest

from streamguard.exceptions import ConfigError, ModerationError
from streamguard.moderation import CompositeModerator, KeywordModerator, Moderator, Verdict
from streamguard.policy import Policy
from streamguard.testing import FakeModerator


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Static:
    """Returns given verdicts (the same for every text)."""

    def __init__(self, verdict: Verdict, *, count: int | None = None) -> None:
        self.verdict = verdict
        self.count = count

    async def moderate(self, texts: Sequence[str]) -> list[Verdict]:
        await anyio.lowlevel.checkpoint()
        return [self.verdict] * (len(texts) if self.count is None else self.count)


class Rendezvous:
    """Finishes only once its partner has started: proves the two run concurrently."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.partner: Rendezvous | None = None

    async def moderate(self, texts: Sequence[str]) -> list[Verdict]:
        self.started.set()
        assert self.partner is not None
        await self.partner.started.wait()
        return [Verdict(False)] * len(texts)


async def test_any_mode_merges_categories_and_scores() -> None:
    """In "any" mode a flag from one moderator flags; categories and scores are merged."""
    words = KeywordModerator({"weapons": ["gun"], "insults": ["idiot"]})
    fake = FakeModerator(["kill"])
    composite = CompositeModerator(words, fake)
    with anyio.fail_after(10):
        gun, kill, calm = await composite.moderate(["a gun", "kill it", "calm"])
    assert gun.flagged and gun.categories == {"weapons": True, "insults": False, "violence": False}
    assert kill.flagged and kill.categories == {"weapons": False, "insults": False, "violence": True}
    assert kill.scores == {"weapons": 0.0, "insults": 0.0, "violence": 0.99}
    assert not calm.flagged and not any(calm.categories.values())
    assert Policy().judge(kill) is not None and Policy().judge(calm) is None


async def test_all_mode_flags_only_when_every_moderator_does() -> None:
    """In "all" mode one flag is not enough, and no category then flags through the policy."""
    composite = CompositeModerator(KeywordModerator(["kill"]), FakeModerator(["kill", "gun"]), mode="all")
    with anyio.fail_after(10):
        both, one = await composite.moderate(["kill", "gun"])
    assert both.flagged and both.categories == {"keyword": True, "violence": True}
    assert not one.flagged and one.categories == {"keyword": False, "violence": False}
    assert one.scores["violence"] == 0.99  # scores kept
    assert Policy().judge(one) is None


async def test_same_category_takes_the_highest_score_and_any_flag() -> None:
    """Two moderators reporting one category: flagged if either flags it, the higher score wins."""
    low = Static(Verdict(True, {"hate": True}, {"hate": 0.6}))
    high = Static(Verdict(False, {"hate": False}, {"hate": 0.8}))
    with anyio.fail_after(10):
        [merged] = await CompositeModerator(low, high).moderate(["x"])
    assert merged == Verdict(True, {"hate": True}, {"hate": 0.8})


async def test_moderators_run_concurrently() -> None:
    """Each moderator is asked at the same time (sequential calls would never finish)."""
    a, b = Rendezvous(), Rendezvous()
    a.partner, b.partner = b, a
    with anyio.fail_after(10):
        verdicts = await CompositeModerator(a, b).moderate(["x", "y"])
    assert [v.flagged for v in verdicts] == [False, False]


async def test_an_error_cancels_the_others_and_propagates_unwrapped() -> None:
    """A failing moderator's error is raised as is (no ExceptionGroup); the others are cancelled."""
    hanging = FakeModerator(latency=float("inf"))
    failing = FakeModerator(fail=RuntimeError("backend down"))
    with anyio.fail_after(10), pytest.raises(RuntimeError, match="backend down"):
        await CompositeModerator(hanging, failing).moderate(["x"])
    assert hanging.cancelled == 1


async def test_wrong_verdict_count_is_a_moderation_error() -> None:
    """A member returning the wrong number of verdicts is reported, not zipped short."""
    bad: Moderator = Static(Verdict(False), count=1)
    with anyio.fail_after(10), pytest.raises(ModerationError, match="Static returned 1 verdicts for 2"):
        await CompositeModerator(FakeModerator(), bad).moderate(["a", "b"])


async def test_cancellation_reaches_every_member() -> None:
    """Cancelling the composite cancels all members."""
    a, b = FakeModerator(latency=float("inf")), FakeModerator(latency=float("inf"))
    with anyio.fail_after(10):
        with anyio.move_on_after(0.05):
            await CompositeModerator(a, b).moderate(["x"])
    assert (a.cancelled, b.cancelled, a.in_flight, b.in_flight) == (1, 1, 0, 0)


def test_bad_options_raise_config_error() -> None:
    """No moderators, or an unknown mode, is rejected."""
    with pytest.raises(ConfigError):
        CompositeModerator()
    with pytest.raises(ConfigError):
        CompositeModerator(FakeModerator(), mode="most")  # type: ignore[arg-type]
