"""An OpenAI-compatible moderating proxy: point any OpenAI client's ``base_url`` at it.

Every ``/v1`` request is matched against a fixed route table (:mod:`.routes`), after
percent-decoding and dot-segment normalisation, and is then

- **guarded** (chat completions, Responses, legacy completions; streamed and not): the answer's
  text is moderated by :func:`streamguard.guard` under the configured policy before it leaves
  (:mod:`.stream` for streamed answers, :mod:`.complete` for non-streamed ones, with the same
  windows and semantics);
- **passed** (models, embeddings, moderations, files' metadata, uploads, batches, audio speech,
  images, ...): relayed byte for byte with upstream's status and headers (:mod:`.passthrough`);
- **refused** (routes whose answers carry model text the proxy cannot moderate): a 403 in
  OpenAI's error shape, unless the operator names the route in ``--allow-unguarded``.

Anything else is a 404 whose message lists what the proxy serves; the upstream URL comes from
configuration only, and the upstream path is rebuilt from the route table.

Also ``GET /healthz``, ``GET /metrics`` (Prometheus text format, see :mod:`.._metrics`; neither
needs a client key) and ``GET /``, the playground page.

Needs the ``[server]`` extra. Starlette and uvicorn are imported by :func:`create_app` and
:func:`serve` only, so the CLI can register ``streamguard serve`` without the extra installed.

Credentials: by default the caller's ``Authorization`` passes through to upstream. With
``ProxyConfig.upstream_api_key`` the proxy holds the upstream key and callers present one of
``ProxyConfig.client_keys`` (compared in constant time). The upstream key is never logged and
never sent to a caller (an upstream 401/403 becomes a 502 that does not echo its message); the
caller's own credentials are scrubbed from that request's errors and log lines too.

Headers: guarded answers carry upstream's ``x-request-id``, ``x-ratelimit-*``,
``openai-processing-ms``, ``openai-version`` and retry hints, streamed or not; passed answers
carry all of upstream's headers but hop-by-hop ones. The proxy's own headers:
``x-streamguard-route`` on answers (``guarded``, ``passed`` or ``unguarded``, the last for a
refused route an operator allowed), and ``x-streamguard-debug: 1`` on a streamed request, which
adds the policy and each window's verdict as SSE comments (see
:mod:`streamguard.integrations.starlette`; the playground sends it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import ProxyConfig, ServeOptions, add_arguments, config_from_args, options_from_args
from .serve import add_serve_subcommand, run_serve, serve

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = [
    "ProxyConfig",
    "ServeOptions",
    "add_arguments",
    "add_serve_subcommand",
    "config_from_args",
    "create_app",
    "options_from_args",
    "run_serve",
    "serve",
]


def create_app(config: ProxyConfig) -> Starlette:
    """The proxy as a Starlette app (see :func:`.app.create_app`)."""
    from .app import create_app as create

    return create(config)
