"""What the bench and eval commands do to keep keys out of their output."""

from __future__ import annotations

import pytest

from streamguard.cli._moderators import Secrets, public_url


def test_scrub_replaces_every_key_longest_first() -> None:
    """Each key, wherever it appears, becomes ``[key]``; a key that contains another is replaced whole."""
    secrets = Secrets()
    secrets.add("sk-abcdefgh")
    secrets.add("sk-abcdefgh-longer")
    text = "tried sk-abcdefgh-longer, then sk-abcdefgh and sk-abcdefgh again"
    assert secrets.scrub(text) == "tried [key], then [key] and [key] again"


def test_placeholders_are_not_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """A short placeholder key (for servers without authentication) is not scrubbed out of the output."""
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    monkeypatch.setenv("STREAMGUARD_MODERATION_API_KEY", "sk-moderation-123")
    monkeypatch.delenv("STREAMGUARD_UPSTREAM_API_KEY", raising=False)
    secrets = Secrets.from_env()
    assert secrets.values == ["sk-moderation-123"]
    assert secrets.scrub('{"unused": "sk-moderation-123\\n"}') == '{"unused": "[key]\\n"}'


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pass@example.com:8443/v1?key=sk-1#frag", "https://example.com:8443/v1"),
        ("http://127.0.0.1:8765/v1", "http://127.0.0.1:8765/v1"),
        ("http://[::1]:9000/v1", "http://[::1]:9000/v1"),
        (None, None),
    ],
)
def test_public_url_drops_credentials(url: str | None, shown: str | None) -> None:
    """URLs are written without user info, query or fragment."""
    assert public_url(url) == shown
