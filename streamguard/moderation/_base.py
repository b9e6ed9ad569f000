"""The moderator protocol and the verdict value every backend returns.

A verdict that is not well formed is never read as clean: :class:`Verdict` checks its own fields
(``flagged`` a real ``bool``, categories ``bool``, scores finite numbers) and raises
:class:`~streamguard.ModerationError` otherwise, and :func:`check_verdicts` checks what a
``moderate()`` call returned (a list of ``Verdict``, one per text). Under the default policy
(``on_error="fail_closed"``) either ends the stream with that error.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..exceptions import ModerationError

__all__ = ["Moderator", "Verdict", "check_verdicts"]


@dataclass(frozen=True)
class Verdict:
    """A moderator's judgement of one text.

    Attributes:
        flagged: The backend's own overall decision.
        categories: Category name -> flagged, as the backend names them (the Moderation
            endpoint's names are kept as they are, e.g. ``"self-harm/intent"``).
        scores: Category name -> score in [0, 1].
    """

    flagged: bool
    categories: Mapping[str, bool] = field(default_factory=dict)
    scores: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Strictly bools: 0, 1, None and "true" are not verdicts (a None read as False is a leak).
        if not _is_bool(self.flagged):
            raise ModerationError(f"malformed verdict: flagged must be a bool, got {self.flagged!r}")
        if not isinstance(self.categories, Mapping) or not isinstance(self.scores, Mapping):
            raise ModerationError("malformed verdict: categories and scores must be mappings")
        for name, on in self.categories.items():
            if not isinstance(name, str) or not _is_bool(on):
                raise ModerationError(f"malformed verdict: category {name!r} must map to a bool, got {on!r}")
        for name, score in self.scores.items():
            if not isinstance(name, str) or not _is_score(score):
                raise ModerationError(f"malformed verdict: score {name!r} must be a finite number, got {score!r}")


@runtime_checkable
class Moderator(Protocol):
    """Anything that judges texts: one async method, batched.

    ``moderate`` must return exactly one :class:`Verdict` per input text, in the same order.
    It may raise; the guard applies ``Policy.on_error``. Example::

        class LlamaGuard:
            def __init__(self, client: AsyncOpenAI) -> None:
                self._client = client

            async def moderate(self, texts: Sequence[str]) -> list[Verdict]:
                out = []
                for text in texts:
                    r = await self._client.chat.completions.create(
                        model="llama-guard-3", messages=[{"role": "user", "content": text}]
                    )
                    answer = r.choices[0].message.content or ""
                    out.append(Verdict(flagged=answer.strip().startswith("unsafe")))
                return out
    """

    async def moderate(self, texts: Sequence[str]) -> list[Verdict]:
        """Judge each text; one verdict per text, in order."""
        ...


def check_verdicts(verdicts: object, count: int) -> list[Verdict]:
    """What a ``moderate()`` call returned, checked: a list of exactly ``count`` :class:`Verdict`.

    Args:
        verdicts: The moderator's return value.
        count: How many texts it was given.

    Returns:
        ``verdicts`` as a list.

    Raises:
        ModerationError: Not a list or tuple, the wrong number of verdicts, or an item that is
            not a :class:`Verdict`.
    """
    if not isinstance(verdicts, list | tuple):
        raise ModerationError(f"moderator returned {type(verdicts).__name__}, not a list of verdicts")
    if len(verdicts) != count:
        raise ModerationError(f"moderator returned {len(verdicts)} verdicts for {count} texts")
    for verdict in verdicts:
        if not isinstance(verdict, Verdict):
            raise ModerationError(f"moderator returned {type(verdict).__name__}, not a Verdict")
    return list(verdicts)


def _is_bool(value: object) -> bool:
    """``bool``, or numpy's ``bool_`` (what a model's ``score >= threshold`` gives)."""
    kind = type(value)
    return kind is bool or (kind.__name__ in ("bool_", "bool") and kind.__module__ == "numpy")


def _is_score(value: object) -> bool:
    """A finite real number (numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not _is_bool(value) and math.isfinite(value)
