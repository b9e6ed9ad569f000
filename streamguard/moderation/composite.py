"""Several moderators as one: run concurrently, verdicts merged."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import anyio

from ..exceptions import ConfigError, ModerationError
from ._base import Moderator, Verdict

__all__ = ["CompositeModerator"]


class CompositeModerator:
    """Ask several moderators at once and merge their verdicts.

    Categories and scores of all moderators are merged into one verdict (a category flags if any
    moderator flags it; its score is the highest). With ``mode="all"`` a text is flagged only
    when every moderator flags it; otherwise its categories are all reported unflagged (scores
    are kept), so ``Policy.judge`` does not flag it through a category either.

    Args:
        moderators: The moderators, asked concurrently.
        mode: ``"any"``: flagged when any moderator flags. ``"all"``: when all of them do.

    Raises:
        ConfigError: No moderator was given, or ``mode`` is unknown.
    """

    def __init__(self, *moderators: Moderator, mode: Literal["any", "all"] = "any") -> None:
        if not moderators:
            raise ConfigError("CompositeModerator needs at least one moderator")
        if mode not in ("any", "all"):
            raise ConfigError(f"mode must be 'any' or 'all', got {mode!r}")
        self.moderators = moderators
        self.mode = mode

    async def moderate(self, texts: Sequence[str]) -> list[Verdict]:
        """Judge each text with every moderator; one merged verdict per text, in order.

        Args:
            texts: Texts to judge.

        Returns:
            One merged :class:`Verdict` per text.

        Raises:
            Exception: The first error any moderator raised (the others are cancelled).
            ModerationError: A moderator returned the wrong number of verdicts.
        """
        texts = list(texts)
        if not texts:
            return []
        answers: list[list[Verdict] | None] = [None] * len(self.moderators)
        errors: list[Exception] = []

        async def run(i: int, moderator: Moderator, cancel: anyio.CancelScope) -> None:
            try:
                answers[i] = await moderator.moderate(texts)
            except Exception as exc:
                # Collected here instead of escaping as an ExceptionGroup; stop the others.
                errors.append(exc)
                cancel.cancel()

        async with anyio.create_task_group() as tg:
            for i, moderator in enumerate(self.moderators):
                tg.start_soon(run, i, moderator, tg.cancel_scope)
        if errors:
            raise errors[0]
        verdict_lists: list[list[Verdict]] = []
        for moderator, answer in zip(self.moderators, answers, strict=True):
            if answer is None or len(answer) != len(texts):
                got = "no" if answer is None else len(answer)
                raise ModerationError(f"{type(moderator).__name__} returned {got} verdicts for {len(texts)} texts")
            verdict_lists.append(answer)
        return [self._merge(group) for group in zip(*verdict_lists, strict=True)]

    def _merge(self, verdicts: Sequence[Verdict]) -> Verdict:
        flagged = any(v.flagged for v in verdicts) if self.mode == "any" else all(v.flagged for v in verdicts)
        categories: dict[str, bool] = {}
        scores: dict[str, float] = {}
        for v in verdicts:
            for name, on in v.categories.items():
                categories[name] = categories.get(name, False) or on
            for name, score in v.scores.items():
                scores[name] = max(score, scores.get(name, score))
        if not flagged:
            categories = dict.fromkeys(categories, False)
        return Verdict(flagged=flagged, categories=categories, scores=scores)
