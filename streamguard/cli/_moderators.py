"""The moderator options of ``bench --upstream`` and ``eval``, API keys from the environment, and scrubbing.

Keys are read from environment variables only (never from arguments, so they stay out of shell
history and process lists) and every text the commands write passes through :func:`Secrets.scrub`.
"""

from __future__ import annotations

import argparse
import os
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._common import CLIError, keywords

if TYPE_CHECKING:
    from ..moderation import Moderator

MODERATORS = ("openai", "local", "keyword")
MIN_SECRET_CHARS = 8  # shorter values are placeholders for servers without authentication
UPSTREAM_KEY_VARS = ("STREAMGUARD_UPSTREAM_API_KEY", "OPENAI_API_KEY")
MODERATION_KEY_VARS = ("STREAMGUARD_MODERATION_API_KEY", "OPENAI_API_KEY")
# The keyword moderator's words when --keywords is not given: common profanity, insults and
# violent words (no slurs), a baseline rather than a moderator to rely on.
DEFAULT_KEYWORDS = (
    r"fuck\w*",
    r"shit\w*",
    r"bitch\w*",
    r"cunt\w*",
    r"asshole\w*",
    r"bastard\w*",
    r"whore\w*",
    r"slut\w*",
    r"idiot\w*",
    r"moron\w*",
    "stupid",
    "kill",
    "murder",
    "rape",
)


def add_moderator_args(parser: Any, *, default: str | None) -> None:
    """``--moderator``, ``--moderation-base-url``, ``--moderation-model``, ``--keywords`` on ``parser``
    (a parser or an argument group)."""
    group = parser
    group.add_argument(
        "--moderator",
        choices=MODERATORS,
        default=default,
        help=f"openai: a Moderation endpoint (key from {' or '.join(MODERATION_KEY_VARS)}); local: the offline "
        f"classifier; keyword: --keywords (default {default or 'openai'})",
    )
    group.add_argument(
        "--moderation-base-url",
        help="base URL of the Moderation endpoint for --moderator openai (default: the openai client's, "
        "i.e. OPENAI_BASE_URL or https://api.openai.com/v1)",
    )
    group.add_argument(
        "--moderation-model",
        default="omni-moderation-latest",
        help="model for --moderator openai (default %(default)s)",
    )
    group.add_argument(
        "--keywords",
        type=keywords,
        help="comma-separated words or regular expressions for --moderator keyword (default: a small profanity list)",
    )


def env_key(names: Sequence[str]) -> tuple[str, str] | None:
    """The first of ``names`` set in the environment, as (variable, value)."""
    for name in names:
        value = os.environ.get(name)
        if value:
            return name, value
    return None


def require_key(names: Sequence[str], what: str) -> str:
    """The key for ``what`` from the environment, or a one-line :class:`CLIError` (exit code 2)."""
    found = env_key(names)
    if found is None:
        raise CLIError(
            f"{what} needs an API key: set {' or '.join(names)} (any value for a server without authentication)",
            code=2,
        )
    return found[1]


def public_url(url: str | None) -> str | None:
    """``url`` without user info, query or fragment (they may carry credentials)."""
    if url is None:
        return None
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass
class Secrets:
    """The keys in use; :meth:`scrub` removes them from any text before it is shown or written."""

    values: list[str] = field(default_factory=list)

    @classmethod
    def from_env(cls) -> Secrets:
        """The keys the commands may read from the environment."""
        secrets = cls()
        for name in dict.fromkeys((*UPSTREAM_KEY_VARS, *MODERATION_KEY_VARS)):
            secrets.add(os.environ.get(name))
        return secrets

    def add(self, value: str | None) -> None:
        # A placeholder such as "x" or "unused" is no secret, and replacing it would mangle the output.
        if value and len(value) >= MIN_SECRET_CHARS and value not in self.values:
            self.values.append(value)

    def scrub(self, text: str) -> str:
        for value in sorted(self.values, key=len, reverse=True):
            text = text.replace(value, "[key]")
        return text


@dataclass(frozen=True)
class ModeratorInfo:
    """What judged the texts, as written to ``results.json`` (no key, URL without credentials)."""

    kind: str
    name: str
    model: str | None = None
    base_url: str | None = None
    keywords: tuple[str, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "model": self.model,
            "base_url": self.base_url,
            "keywords": None if self.keywords is None else list(self.keywords),
        }


def moderator_info(args: argparse.Namespace) -> ModeratorInfo:
    """Validate the moderator options (before anything runs) and describe the moderator."""
    if args.keywords and args.moderator != "keyword":
        raise CLIError("--keywords goes with --moderator keyword", code=2)
    if args.moderation_base_url and args.moderator != "openai":
        raise CLIError("--moderation-base-url goes with --moderator openai", code=2)
    if args.moderator == "openai":
        url = args.moderation_base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        return ModeratorInfo("openai", "OpenAIModerator", model=args.moderation_model, base_url=public_url(url))
    if args.moderator == "local":
        return ModeratorInfo("local", "LocalModerator")
    return ModeratorInfo("keyword", "KeywordModerator", keywords=tuple(args.keywords or DEFAULT_KEYWORDS))


@asynccontextmanager
async def open_moderator(args: argparse.Namespace, secrets: Secrets) -> AsyncIterator[Moderator]:
    """The moderator the options name, ready to use (the local model loaded); closes its client."""
    import anyio

    from ..moderation import KeywordModerator, LocalModerator, OpenAIModerator

    info = moderator_info(args)
    if info.kind == "openai":
        from openai import AsyncOpenAI

        key = require_key(MODERATION_KEY_VARS, "--moderator openai")
        secrets.add(key)
        async with AsyncOpenAI(api_key=key, base_url=args.moderation_base_url, max_retries=0, timeout=30) as client:
            yield OpenAIModerator(client, model=args.moderation_model)
        return
    if info.kind == "local":
        local = LocalModerator()
        await anyio.to_thread.run_sync(local.load)
        await local.moderate(["warm up"])  # the first prediction is slow; no measured call pays for it
        yield local
        return
    yield KeywordModerator(info.keywords or DEFAULT_KEYWORDS)
