"""The proxy's configuration: :class:`ProxyConfig`, the ``serve`` options, and ``--config streamguard.toml``.

Precedence: built-in defaults < the config file < command-line flags. Every :class:`~streamguard.Policy`
option is a flag (``--window-chars``, ``--on-error``, ``--threshold violence=0.4``, ...) and a key of
the file's ``[policy]`` table; the flags are generated from the ``Policy`` dataclass, so a new
option is exposed without an edit here. Secrets never come from the file or a flag value: the file
and the flags name environment variables (``upstream_key_env``, ``moderation_key_env``,
``client_keys_env``), as a secret on a command line shows in ``ps`` and a file gets committed.

```toml
# streamguard.toml
upstream = "https://api.openai.com/v1"
moderator = "openai"
upstream_key_env = "OPENAI_API_KEY"     # the proxy holds the upstream key ...
client_keys_env = "STREAMGUARD_KEYS"    # ... and callers present one of these
workers = 4
allow_unguarded = ["audio.transcriptions"]

[policy]
mode = "holdback"
window_chars = 240
thresholds = { violence = 0.4 }
```
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ...exceptions import ConfigError
from ...policy import Policy
from .routes import route_by_name, route_names

__all__ = ["ProxyConfig", "ServeOptions", "add_arguments", "config_from_args", "options_from_args"]

ModeratorName = Literal["openai", "local", "keyword"]
# Policy options the proxy decides per request (the request's stream_options.include_usage).
_PER_REQUEST = frozenset({"include_usage"})
_SECRET_KEYS = frozenset({"upstream_api_key", "moderation_api_key", "client_keys", "api_key", "key"})


@dataclass(frozen=True, kw_only=True)
class ProxyConfig:
    """How the proxy runs. Secrets are left out of ``repr``.

    Attributes:
        upstream: Base URL of the upstream API, e.g. ``"https://api.openai.com/v1"``.
        moderator: ``"openai"`` (the Moderation endpoint at ``moderation_base_url``, else at
            ``upstream``), ``"local"`` (:class:`~streamguard.LocalModerator`) or ``"keyword"``
            (:class:`~streamguard.KeywordModerator` with ``keywords``).
        keywords: Patterns for the keyword moderator.
        policy: The guard's policy, for streamed and non-streamed answers alike.
        upstream_api_key: The upstream key the proxy holds; ``None`` passes the caller's
            ``Authorization`` header through.
        client_keys: Keys callers must present as ``Authorization: Bearer <key>``; empty for
            no check.
        cors_origins: Origins allowed by CORS (``"*"`` for any); empty for no CORS headers.
        moderation_base_url: Base URL of the Moderation endpoint, if not ``upstream``.
        moderation_api_key: The proxy's own key for the Moderation endpoint: one moderator,
            batching the windows of all requests, while callers keep their own upstream keys.
            Else ``upstream_api_key``, else each caller's ``Authorization`` (unbatched).
        max_body_bytes: Larger bodies of guarded requests are refused with 413.
        max_messages: Requests with more ``messages`` are refused with 400 (OpenAI's own limit is 2048).
        timeout: Seconds an upstream request may take (reading its whole answer).
        connect_timeout: Seconds to connect to upstream.
        max_connections: Upstream connections per worker process (new requests wait for one).
        max_keepalive_connections: Idle upstream connections kept per worker process.
        ping: Seconds of silence in a stream after which a ``: ping`` comment is sent.
        playground: Serve the playground page at ``GET /``.
        allow_unguarded: Names of refused routes to relay anyway (see
            :mod:`~streamguard.integrations.proxy.routes`).
        redis_url: Redis holding the Moderation endpoint's rate-limit budget, shared by every
            worker and replica (see :class:`~streamguard.moderation.ModerationBudget`); None:
            each worker paces itself.
        drain_timeout: Seconds streams in flight may still run after SIGTERM before they end
            with a ``server_shutting_down`` error event.
    """

    upstream: str
    moderator: ModeratorName = "openai"
    keywords: Sequence[str] = ()
    policy: Policy = field(default_factory=Policy)
    upstream_api_key: str | None = field(default=None, repr=False)
    client_keys: frozenset[str] = field(default=frozenset(), repr=False)
    cors_origins: Sequence[str] = ()
    moderation_base_url: str | None = None
    moderation_api_key: str | None = field(default=None, repr=False)
    max_body_bytes: int = 8 * 1024 * 1024
    max_messages: int = 2048
    timeout: float = 600.0
    connect_timeout: float = 10.0
    max_connections: int = 4096
    max_keepalive_connections: int = 512
    ping: float | None = 15.0
    playground: bool = True
    allow_unguarded: frozenset[str] = frozenset()
    redis_url: str | None = field(default=None, repr=False)
    drain_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("redis_url must be a redis://, rediss:// or unix:// URL")
        if not (self.drain_timeout >= 0 and math.isfinite(self.drain_timeout)):
            raise ConfigError("drain_timeout must be a non-negative number of seconds")
        for name in ("upstream", "moderation_base_url"):
            url = getattr(self, name)
            if url is not None and not url.startswith(("http://", "https://")):
                raise ConfigError(f"{name} must be an http:// or https:// URL, got {url!r}")
        if self.moderator not in ("openai", "local", "keyword"):
            raise ConfigError(f"moderator must be 'openai', 'local' or 'keyword', got {self.moderator!r}")
        if self.moderator == "keyword" and not self.keywords:
            raise ConfigError("the keyword moderator needs keywords")
        for name in ("max_body_bytes", "max_messages", "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.max_keepalive_connections < 0:
            raise ConfigError("max_keepalive_connections must be >= 0")
        for name in ("timeout", "connect_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be a positive number of seconds")
        if any(not key for key in self.client_keys):
            raise ConfigError("client keys must not be empty")
        for name in self.allow_unguarded:
            route = route_by_name(name)
            if route is None or route.kind != "refused":
                refused = ", ".join(route_names("refused"))
                raise ConfigError(f"allow_unguarded: {name!r} is not a refused route (refused routes: {refused})")
        object.__setattr__(self, "upstream", self.upstream.rstrip("/"))
        object.__setattr__(self, "keywords", tuple(self.keywords))
        object.__setattr__(self, "client_keys", frozenset(self.client_keys))
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        object.__setattr__(self, "allow_unguarded", frozenset(self.allow_unguarded))


@dataclass(frozen=True)
class ServeOptions:
    """How ``streamguard serve`` runs uvicorn."""

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    access_log: bool = True
    log_level: str = "info"


# -- the options -------------------------------------------------------------------------------

_POLICY = "policy."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every ``serve`` option to ``parser``. Unset options are absent from the namespace.

    Args:
        parser: The ``serve`` subcommand's parser.
    """
    s = argparse.SUPPRESS  # absent unless given: flags override the config file only when given
    add = parser.add_argument
    add("--config", metavar="FILE", default=s, help="a TOML file with these options (flags override it)")
    add("--upstream", metavar="URL", default=s, help="upstream API base URL, e.g. https://api.openai.com/v1")
    add("--host", default=s, help="interface to listen on (default: 127.0.0.1)")
    add("--port", type=int, default=s, help="port to listen on (default: 8000)")
    add("--workers", type=int, default=s, metavar="N", help="worker processes (default: 1)")
    add("--access-log", action=argparse.BooleanOptionalAction, default=s, help="log each request (default: on)")
    add("--log-level", choices=["critical", "error", "warning", "info", "debug"], default=s)
    add("--moderator", choices=["openai", "local", "keyword"], default=s)
    add("--keywords", default=s, metavar="A,B", help="comma-separated patterns (keyword moderator)")
    add("--client-key", action="append", default=s, dest="client_keys", metavar="K", help="a key callers present")
    add("--client-keys-env", default=s, metavar="NAME", help="env variable with comma-separated client keys")
    add("--upstream-key-env", default=s, metavar="NAME", help="env variable with the upstream key the proxy holds")
    add(
        "--moderation-key-env",
        default=s,
        metavar="NAME",
        help="env variable with the proxy's own Moderation key: one batched moderator for all requests",
    )
    add("--moderation-base-url", default=s, metavar="URL", help="Moderation endpoint base URL (openai moderator)")
    add("--cors-origin", action="append", default=s, dest="cors_origins", metavar="O")
    add("--max-body-bytes", type=int, default=s, help="largest guarded request body")
    add("--max-messages", type=int, default=s, help="most messages in a request")
    add("--upstream-timeout", type=float, default=s, dest="timeout", metavar="S", help="seconds per upstream request")
    add("--connect-timeout", type=float, default=s, metavar="S", help="seconds to connect upstream")
    add("--max-connections", type=int, default=s, metavar="N", help="upstream connections per worker")
    add("--max-keepalive-connections", type=int, default=s, metavar="N", help="idle upstream connections kept")
    add("--ping", type=float, default=s, metavar="S", help="seconds of stream silence before a ': ping' comment")
    add("--playground", action=argparse.BooleanOptionalAction, default=s, help="serve the playground at / (on)")
    add(
        "--allow-unguarded",
        action="append",
        default=s,
        metavar="ROUTE",
        choices=route_names("refused"),
        help="relay a refused route anyway: its model text is NOT moderated",
    )
    add("--redis-url", default=s, metavar="URL", help="share the moderation budget through this Redis (no password)")
    add("--redis-url-env", default=s, metavar="NAME", help="env variable with the Redis URL (when it has a password)")
    add("--drain-timeout", type=float, default=s, metavar="S", help="seconds streams may finish after SIGTERM (30)")
    policy = parser.add_argument_group("policy", "every streamguard.Policy option (see its docstring)")
    for name, kind in _policy_fields():
        flag = "--" + ("threshold" if name == "thresholds" else name.replace("_", "-"))
        dest = _POLICY + name
        if kind is bool:
            policy.add_argument(flag, action=argparse.BooleanOptionalAction, default=s, dest=dest)
        elif isinstance(kind, tuple):
            policy.add_argument(flag, choices=kind, default=s, dest=dest)
        elif kind == "thresholds":
            policy.add_argument(flag, action="append", default=s, dest=dest, metavar="CATEGORY=SCORE")
        elif kind == "categories":
            policy.add_argument(flag, action="append", default=s, dest=dest, metavar="NAME")
        elif isinstance(kind, _Optional):
            policy.add_argument(flag, type=kind, default=s, dest=dest, metavar=f"{kind.base.__name__.upper()}|none")
        else:
            policy.add_argument(flag, type=kind, default=s, dest=dest)


def _policy_fields() -> list[tuple[str, Any]]:
    """(name, kind) of each Policy option the proxy exposes: a type, a tuple of choices, or a tag."""
    hints = typing.get_type_hints(Policy)
    out: list[tuple[str, Any]] = []
    for f in dataclasses.fields(Policy):
        if f.name in _PER_REQUEST:
            continue
        hint = hints[f.name]
        origin = typing.get_origin(hint)
        if origin is Literal:
            out.append((f.name, typing.get_args(hint)))
        elif hint in (bool, int, float, str):
            out.append((f.name, hint))
        elif f.name == "thresholds":
            out.append((f.name, "thresholds"))
        elif origin in (frozenset, set) or hint is frozenset:
            out.append((f.name, "categories"))
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if len(args) != 1 or args[0] not in (int, float, str):
                raise TypeError(f"Policy.{f.name}: no command-line form for {hint!r}")
            out.append((f.name, _Optional(args[0])))
        else:
            raise TypeError(f"Policy.{f.name}: no command-line form for {hint!r}")
    return out


class _Optional:
    """An optional number or string option: its type, or ``none`` for ``None``."""

    def __init__(self, base: type) -> None:
        self.base = base
        self.__name__ = base.__name__

    def __call__(self, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
            return None
        if isinstance(value, bool):
            raise ValueError(f"expected a {self.base.__name__} or none")
        if self.base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("expected a whole number or none")
        return self.base(value)


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    secrets = sorted(_SECRET_KEYS & data.keys())
    if secrets:
        raise ConfigError(
            f"{path}: {', '.join(secrets)}: secrets come from environment variables only "
            "(use upstream_key_env, moderation_key_env, client_keys_env)"
        )
    options: dict[str, Any] = {}
    policy = data.pop("policy", {})
    if not isinstance(policy, dict):
        raise ConfigError(f"{path}: [policy] must be a table")
    known = {name for name, _ in _policy_fields()}
    for name, value in policy.items():
        if name not in known:
            raise ConfigError(f"{path}: unknown policy option {name!r}")
        options[_POLICY + name] = value
    known_options = _option_names()
    for name, value in data.items():
        name = name.replace("-", "_")
        if name not in known_options:
            raise ConfigError(f"{path}: unknown option {name!r}")
        options[name] = value
    return options


def _option_names() -> set[str]:
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    names = {a.dest for a in parser._actions if not a.dest.startswith(_POLICY)}
    return names - {"config"} | {"upstream_key_env", "moderation_key_env", "client_keys_env", "redis_url_env"}


def _merged(args: argparse.Namespace) -> dict[str, Any]:
    given = vars(args)
    options = _read_file(given["config"]) if given.get("config") else {}
    options.update({k: v for k, v in given.items() if k not in ("config", "run")})
    return options


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ConfigError(f"environment variable {name} is not set")
    return value


def _list(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise ConfigError(f"{name} must be a list of strings")


def _policy(options: Mapping[str, Any]) -> Policy:
    values: dict[str, Any] = {}
    for name, kind in _policy_fields():
        if (key := _POLICY + name) not in options:
            continue
        value = options[key]
        if isinstance(kind, _Optional):
            try:
                values[name] = kind(value)
            except (TypeError, ValueError):
                raise ConfigError(f"policy option {name} must be a {kind.base.__name__} or none") from None
        elif kind == "thresholds":
            values[name] = _thresholds(value)
        elif kind == "categories":
            values[name] = frozenset(_list(value, name))
        elif isinstance(kind, tuple) or kind is str:
            if not isinstance(value, str):
                raise ConfigError(f"policy option {name} must be a string")
            values[name] = value
        elif kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"policy option {name} must be true or false")
            values[name] = value
        else:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"policy option {name} must be a number")
            if kind is int and not float(value).is_integer():
                raise ConfigError(f"policy option {name} must be a whole number")
            values[name] = kind(value)
    return Policy(**values)


def _thresholds(value: Any) -> dict[str, float]:
    if isinstance(value, dict):
        items = list(value.items())
    else:
        items = []
        for item in _list(value, "thresholds"):
            category, eq, score = item.partition("=")
            if not eq:
                raise ConfigError(f"threshold {item!r}: expected CATEGORY=SCORE")
            items.append((category.strip(), score))
    out: dict[str, float] = {}
    for category, score in items:
        try:
            out[str(category)] = float(score)
        except (TypeError, ValueError):
            raise ConfigError(f"threshold for {category!r} must be a number, got {score!r}") from None
    return out


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    """A :class:`ProxyConfig` from parsed ``serve`` arguments (and the ``--config`` file they name).

    Raises:
        ConfigError: An option is invalid, the file cannot be read, or a named environment
            variable is unset.
    """
    options = _merged(args)
    if not options.get("upstream"):
        raise ConfigError("no upstream: give --upstream URL or upstream = ... in the config file")
    client_keys = set(_list(options.get("client_keys", []), "client_keys"))
    if name := options.get("client_keys_env"):
        client_keys |= set(_list(_env(name), "client keys"))
    keys = {
        "upstream_api_key": options.get("upstream_key_env"),
        "moderation_api_key": options.get("moderation_key_env"),
    }
    values: dict[str, Any] = {k: _env(v) for k, v in keys.items() if v}
    if url := options.get("redis_url"):
        if urllib.parse.urlsplit(str(url)).password:
            raise ConfigError("redis_url: a password comes from the environment only (use redis_url_env)")
        values["redis_url"] = url
    if name := options.get("redis_url_env"):
        values["redis_url"] = _env(name)
    for name in (
        "moderator",
        "moderation_base_url",
        "max_body_bytes",
        "max_messages",
        "timeout",
        "connect_timeout",
        "max_connections",
        "max_keepalive_connections",
        "ping",
        "playground",
        "drain_timeout",
    ):
        if name in options:
            values[name] = options[name]
    try:
        return ProxyConfig(
            upstream=options["upstream"],
            keywords=tuple(_list(options.get("keywords", []), "keywords")),
            policy=_policy(options),
            client_keys=frozenset(client_keys),
            cors_origins=tuple(_list(options.get("cors_origins", []), "cors_origins")),
            allow_unguarded=frozenset(_list(options.get("allow_unguarded", []), "allow_unguarded")),
            **values,
        )
    except TypeError as exc:
        raise ConfigError(f"invalid option: {exc}") from exc


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    """How to run uvicorn, from the same arguments and file as :func:`config_from_args`."""
    options = _merged(args)
    fields = {f.name for f in dataclasses.fields(ServeOptions)}
    serve = ServeOptions(**{k: v for k, v in options.items() if k in fields})
    if serve.workers < 1:
        raise ConfigError("workers must be >= 1")
    return serve
