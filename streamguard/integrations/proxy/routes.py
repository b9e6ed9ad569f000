"""The proxy's fixed route table, and how a request path is matched against it. Pure, no I/O.

Every upstream path the proxy ever requests comes from this table: a request path is
percent-decoded once, checked, dot-segment normalised (RFC 3986 §5.2.4), and only then matched.
The path sent upstream is rebuilt from the normalised segments, never copied from the request,
so ``/v1/models/../files``, ``..%2f..%2forganization%2fusage`` and double-encoded traversal
(``%252e%252e%252f``) cannot reach a path the table does not name with the proxy's key.

Each route is one of three kinds:

- ``guarded``: the answer carries model text the proxy moderates (streamed and not).
- ``passed``: text-free (models, embeddings, files' metadata, audio speech, images, ...): relayed
  byte for byte, with upstream's status and headers, streamed when upstream streams.
- ``refused``: the answer carries model text the proxy cannot moderate (stored responses, batch
  output files, transcriptions, assistants and threads, ...): a 403 in OpenAI's error shape,
  unless the operator allows the route by name (``--allow-unguarded NAME``), which makes it
  ``passed``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote_to_bytes

__all__ = ["ROUTES", "Match", "Route", "match", "normalise", "route_names"]

Kind = Literal["guarded", "passed", "refused"]
Shape = Literal["chat", "responses", "completions"]

# One path segment taken from the request: an id (file-abc, batch_123, ft:gpt-4o:org::x, v1.2).
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=~-]*\Z")


@dataclass(frozen=True)
class Route:
    """One row of the table.

    Attributes:
        name: What ``--allow-unguarded`` names, e.g. ``"files.content"``.
        methods: HTTP methods served.
        pattern: Path under ``/v1``; ``{id}`` is one segment, ``{rest}`` one or more.
        kind: ``guarded``, ``passed`` or ``refused`` (see the module docstring).
        shape: For guarded routes, the answer's shape.
        why: For refused routes, what text it would carry unmoderated.
    """

    name: str
    methods: frozenset[str]
    pattern: str
    kind: Kind
    shape: Shape | None = None
    why: str = ""

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.pattern.strip("/").split("/"))


def _r(name: str, methods: str, pattern: str, kind: Kind, shape: Shape | None = None, why: str = "") -> Route:
    return Route(name, frozenset(methods.split()), pattern, kind, shape, why)


ROUTES: tuple[Route, ...] = (
    # Guarded: every answer is moderated, streamed or not.
    _r("chat.completions", "POST", "/chat/completions", "guarded", "chat"),
    _r("responses", "POST", "/responses", "guarded", "responses"),
    _r("completions", "POST", "/completions", "guarded", "completions"),
    # Passed: text-free answers.
    _r("models", "GET", "/models", "passed"),
    _r("models.retrieve", "GET DELETE", "/models/{rest}", "passed"),
    _r("embeddings", "POST", "/embeddings", "passed"),
    _r("moderations", "POST", "/moderations", "passed"),
    _r("files", "GET POST", "/files", "passed"),
    _r("files.retrieve", "GET DELETE", "/files/{id}", "passed"),
    _r("uploads", "POST", "/uploads", "passed"),
    _r("uploads.parts", "POST", "/uploads/{id}/parts", "passed"),
    _r("uploads.complete", "POST", "/uploads/{id}/complete", "passed"),
    _r("uploads.cancel", "POST", "/uploads/{id}/cancel", "passed"),
    _r("batches", "GET POST", "/batches", "passed"),
    _r("batches.retrieve", "GET", "/batches/{id}", "passed"),
    _r("batches.cancel", "POST", "/batches/{id}/cancel", "passed"),
    _r("audio.speech", "POST", "/audio/speech", "passed"),
    _r("images.generations", "POST", "/images/generations", "passed"),
    _r("images.edits", "POST", "/images/edits", "passed"),
    _r("images.variations", "POST", "/images/variations", "passed"),
    _r("responses.delete", "DELETE", "/responses/{id}", "passed"),
    _r("chat.completions.delete", "DELETE", "/chat/completions/{id}", "passed"),
    # Refused: model text the proxy cannot moderate.
    _r("files.content", "GET", "/files/{id}/content", "refused", why="a file's content (batch output holds answers)"),
    _r("responses.retrieve", "GET", "/responses/{id}", "refused", why="a stored response's output"),
    _r("responses.cancel", "POST", "/responses/{id}/cancel", "refused", why="a background response's output"),
    _r("responses.input_items", "GET", "/responses/{id}/input_items", "refused", why="stored conversation items"),
    _r("chat.completions.retrieve", "GET POST", "/chat/completions/{id}", "refused", why="a stored completion"),
    _r("chat.completions.messages", "GET", "/chat/completions/{id}/messages", "refused", why="stored messages"),
    _r("audio.transcriptions", "POST", "/audio/transcriptions", "refused", why="a transcript"),
    _r("audio.translations", "POST", "/audio/translations", "refused", why="a translation"),
    _r("conversations", "GET POST DELETE", "/conversations/{rest}", "refused", why="conversation items"),
    _r("assistants", "GET POST DELETE", "/assistants/{rest}", "refused", why="assistants' instructions"),
    _r("threads", "GET POST DELETE", "/threads/{rest}", "refused", why="thread messages and runs"),
    _r("threads.create", "POST", "/threads", "refused", why="thread messages and runs"),
)

_BY_NAME = {route.name: route for route in ROUTES}


def route_names(kind: Kind | None = None) -> list[str]:
    """The routes' names (of one kind, if given), in table order."""
    return [route.name for route in ROUTES if kind is None or route.kind == kind]


def route_by_name(name: str) -> Route | None:
    """The route called ``name``, if any."""
    return _BY_NAME.get(name)


@dataclass(frozen=True)
class Match:
    """A request matched to a route: the route and the upstream path (under the upstream base URL)."""

    route: Route
    path: str


def normalise(raw_path: str) -> tuple[str, ...] | None:
    """The request path's segments, decoded once and dot-segment normalised; ``None`` if unsafe.

    Unsafe: anything left looking encoded after one decoding (``%``), a backslash, a control
    character, bytes that are not UTF-8, an empty segment in the middle (``a//b``), or ``..``
    climbing above the root.
    """
    try:
        path = unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "%" in path or "\\" in path or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return None
    out: list[str] = []
    segments = path.split("/")
    for i, segment in enumerate(segments):
        if segment in ("", "."):
            if segment == "" and 0 < i < len(segments) - 1:
                return None
            continue
        if segment == "..":
            if not out:
                return None
            out.pop()
            continue
        out.append(segment)
    return tuple(out)


def match(raw_path: str, method: str) -> Match | None | Route:
    """Match a request under ``/v1``.

    Returns:
        A :class:`Match`; the :class:`Route` whose path matched but not its method (for a 405);
        or ``None`` when no route names the path (a 404).
    """
    segments = normalise(raw_path)
    if segments is None or segments[:1] != ("v1",):
        return None
    segments = segments[1:]
    wrong_method: Route | None = None
    for route in ROUTES:
        if _fits(route.parts, segments):
            if method in route.methods:
                return Match(route, "/" + "/".join(segments))
            wrong_method = wrong_method or route
    return wrong_method


def _fits(parts: Sequence[str], segments: Sequence[str]) -> bool:
    if parts and parts[-1] == "{rest}":
        head = parts[:-1]
        rest = segments[len(head) :]
        return len(segments) > len(head) and _fits(head, segments[: len(head)]) and all(map(_safe, rest))
    if len(parts) != len(segments):
        return False
    for part, segment in zip(parts, segments, strict=True):
        if part == "{id}":
            if not _safe(segment):
                return False
        elif part != segment:
            return False
    return True


def _safe(segment: str) -> bool:
    return _SEGMENT.match(segment) is not None
