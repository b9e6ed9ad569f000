"""Every door of a wrapped openai client: guarded, passed (text-free) or refused.

Paths are the attribute paths from the client (``"chat.completions.create"``); a rule for a
resource (``"beta.threads"``) covers everything under it, and the longest matching rule wins.
A path no rule names is refused: a method that a newer openai release adds stays closed until
it is classified here (``tests/doors/test_table.py`` walks the installed client and fails on any
public method this table does not name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["GUARDED", "PASSED", "REFUSED", "Door", "door", "wholly_passed"]

Kind = Literal["guarded", "passed", "refused"]

# Methods whose answers streamed and not are judged (see wrap.py).
GUARDED: frozenset[str] = frozenset(
    {
        "chat.completions.create",
        "chat.completions.parse",
        "chat.completions.stream",
        "beta.chat.completions.create",
        "beta.chat.completions.parse",
        "beta.chat.completions.stream",
        "responses.create",
        "responses.parse",
        "responses.stream",
        "responses.retrieve",
        "responses.cancel",
        "completions.create",
    }
)

# Methods and resources that return no model-written text.
PASSED: frozenset[str] = frozenset(
    {
        # the client's own plumbing
        "close",
        "is_closed",
        "platform_headers",
        # text-free resources
        "admin",
        "audio.speech",
        "audio.voice_consents",
        "audio.voices",
        "batches",
        "beta.assistants",
        "containers",
        "conversations.create",
        "conversations.delete",
        "conversations.items.create",
        "conversations.items.delete",
        "conversations.retrieve",
        "conversations.update",
        "embeddings",
        "evals",
        "files",
        "fine_tuning",
        "images",
        "models",
        "moderations",
        "realtime.calls",
        "realtime.client_secrets",
        "skills",
        "uploads",
        "vector_stores",
        "videos",
        "webhooks",
        # deletions and counts of stored answers
        "chat.completions.delete",
        "beta.chat.completions.delete",
        "responses.delete",
        "responses.input_tokens",
    }
)

_STORED = (
    "stored answers carry model text that streamguard has not judged; read them from the unwrapped "
    "client and moderate them yourself (streamguard.guard, a moderator's moderate())"
)
_SOCKET = "a realtime/websocket session is not guarded; use chat.completions.create or responses.create(stream=True)"
_RAW = (
    "a raw HTTP call bypasses moderation; call the resource method instead (e.g. "
    "client.chat.completions.create), or the unwrapped client deliberately"
)
_UNSURE = "not known to be text-free; call the unwrapped client deliberately"
_FILES = "file bytes may hold model output (batch results, generated files) and cannot be judged as they are"

# Methods and resources that return model text streamguard cannot judge, with what to use instead.
REFUSED: dict[str, str] = {
    "post": _RAW,
    "get": _RAW,
    "put": _RAW,
    "patch": _RAW,
    "delete": _RAW,
    "request": _RAW,
    "get_api_list": _RAW,
    "chat.completions.retrieve": _STORED,
    "chat.completions.list": _STORED,
    "chat.completions.update": _STORED,
    "chat.completions.messages": _STORED,
    "beta.chat.completions.retrieve": _STORED,
    "beta.chat.completions.list": _STORED,
    "beta.chat.completions.update": _STORED,
    "beta.chat.completions.messages": _STORED,
    "responses.compact": "compacted output items are not guarded; use responses.create",
    "responses.connect": _SOCKET,
    "responses.input_items": _STORED,
    "beta.responses": "the beta Responses resource is not guarded; use client.responses",
    "beta.threads": "Assistants threads and runs are not guarded; use chat.completions or responses",
    "beta.agents": "agents are not guarded; use chat.completions or responses",
    "beta.chatkit": "ChatKit threads and sessions are not guarded; use chat.completions or responses",
    "beta.realtime": _SOCKET,
    "realtime.connect": _SOCKET,
    "realtime.translations": _SOCKET,
    "live": _SOCKET,
    "conversations.items.list": _STORED,
    "conversations.items.retrieve": _STORED,
    "evals.runs.output_items": _STORED,
    "audio.transcriptions": "transcripts are model-written text and are not guarded",
    "audio.translations": "translations are model-written text and are not guarded",
    "files.content": _FILES,
    "files.retrieve_content": _FILES,
    "containers.files.content": _FILES,
    "skills.content": _FILES,
    "skills.versions.content": _FILES,
    "safety": _UNSURE,
    "decisions": _UNSURE,
    "content_provenance_checks": _UNSURE,
}

_UNKNOWN = (
    "this streamguard version does not know whether it returns model text, so it is refused; "
    "call the unwrapped client deliberately"
)


@dataclass(frozen=True)
class Door:
    """How a path of a wrapped client is treated, and (refused) what to use instead."""

    path: str
    kind: Kind
    advice: str = ""


def door(path: str) -> Door:
    """The rule for ``path`` (the longest matching one); an unknown path is refused."""
    if path in GUARDED:
        return Door(path, "guarded")
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in REFUSED:
            return Door(path, "refused", REFUSED[prefix])
        if prefix in PASSED:
            return Door(path, "passed")
    return Door(path, "refused", _UNKNOWN)


def wholly_passed(path: str) -> bool:
    """Whether a resource and everything under it is passed (it can be handed out unwrapped)."""
    if door(path).kind != "passed":
        return False
    below = path + "."
    return not any(p.startswith(below) for p in (*GUARDED, *REFUSED))
