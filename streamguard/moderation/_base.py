"""The moderator protocol and the verdict value every backend returns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = ["Moderator", "Verdict"]


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
