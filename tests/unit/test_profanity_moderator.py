"""ProfanityModerator: alt-profanity-check's bundled model, off the event loop, batched."""

from __future__ import annotations

import subprocess
import sys

import anyio
import pytest

from streamguard.exceptions import ConfigError
from streamguard.moderation import ProfanityModerator, Verdict
from streamguard.policy import Policy

CLEAN = "Thanks for the lovely afternoon, see you tomorrow."
PROFANE = "shut up you stupid fucking idiot"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def moderator() -> ProfanityModerator:
    m = ProfanityModerator()
    m.load()  # once per module: loading the model takes about a second
    return m


async def test_flags_profanity_and_passes_clean_text(moderator: ProfanityModerator) -> None:
    """Profane text is flagged in category "profanity", with its probability as the score."""
    with anyio.fail_after(10):
        profane, clean = await moderator.moderate([PROFANE, CLEAN])
    assert profane.flagged and profane.categories == {"profanity": True}
    assert profane.scores["profanity"] >= 0.5
    assert not clean.flagged and clean.categories == {"profanity": False}
    assert 0.0 <= clean.scores["profanity"] < 0.5
    assert Policy().judge(profane) is not None
    assert Policy().judge(clean) is None


async def test_threshold_decides_the_flag() -> None:
    """A text is flagged exactly when its probability reaches the threshold."""
    texts = [PROFANE, CLEAN, "damn this is hard"]
    probe = ProfanityModerator()
    probabilities = probe.probabilities(texts)
    threshold = sorted(probabilities)[1]  # the middle one: flagged (>=), the lowest is not
    with anyio.fail_after(10):
        verdicts = await ProfanityModerator(threshold=threshold).moderate(texts)
    assert [v.flagged for v in verdicts] == [p >= threshold for p in probabilities]
    assert sum(v.flagged for v in verdicts) == 2
    assert [v.scores["profanity"] for v in verdicts] == pytest.approx(probabilities)


async def test_concurrent_callers_share_predictions(moderator: ProfanityModerator) -> None:
    """Concurrent callers are batched into few prediction calls and get their own verdicts."""
    texts = [PROFANE if i % 3 == 0 else f"{CLEAN} ({i})" for i in range(30)]
    verdicts: dict[int, list[Verdict]] = {}
    local = ProfanityModerator(max_wait=0.05)
    local.load()

    async def call(i: int) -> None:
        verdicts[i] = await local.moderate([texts[i]])

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(call, i)
    assert [verdicts[i][0].flagged for i in range(30)] == [i % 3 == 0 for i in range(30)]
    assert local.batches <= 3


async def test_empty_input_needs_no_prediction() -> None:
    """No texts: no verdicts."""
    local = ProfanityModerator()
    with anyio.fail_after(10):
        assert await local.moderate([]) == []
    assert local.batches == 0


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_bad_threshold_raises_config_error(threshold: float) -> None:
    """A threshold outside [0, 1] is rejected."""
    with pytest.raises(ConfigError):
        ProfanityModerator(threshold=threshold)


def test_missing_package_is_a_config_error_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without alt-profanity-check, construction names the extra to install."""
    monkeypatch.setitem(sys.modules, "profanity_check", None)  # what an absent package looks like
    with pytest.raises(ConfigError, match=r"streamguard\[local\]"):
        ProfanityModerator()


def test_package_imports_without_scikit_learn() -> None:
    """streamguard.moderation imports when scikit-learn and profanity_check are absent."""
    code = (
        "import sys\n"
        "for name in ('sklearn', 'profanity_check', 'joblib'): sys.modules[name] = None\n"
        "from streamguard.moderation import ProfanityModerator\n"
        "try:\n"
        "    ProfanityModerator()\n"
        "except ValueError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.startswith("ConfigError")
    assert "pip install 'streamguard[local]'" in out.stdout
