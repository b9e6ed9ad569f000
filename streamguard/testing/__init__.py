"""Public test support for code that uses streamguard.

- :mod:`streamguard.testing.fakes` (no network, no servers): :func:`chat_chunk`,
  :func:`scripted_chunks`, :class:`ScriptedStream`, :class:`FakeModerator`.
- :mod:`streamguard.testing.upstream`: :class:`LoopbackUpstream`, a scriptable OpenAI-compatible
  server on 127.0.0.1 (real HTTP and SSE; needs the ``[server]`` extra when started), with
  :class:`Script` / :class:`Reply` and the handlers :func:`story_chat`, :func:`keyword_moderation`
  and :func:`hashed_embeddings`. ``python -m streamguard.testing`` serves it from the command line.

Like Starlette's test client, this ships with the package; the core (``import streamguard``)
never imports it.
"""

from __future__ import annotations

from .fakes import FakeModerator, ScriptedStream, chat_chunk, scripted_chunks
from .upstream import (
    LoopbackUpstream,
    Reply,
    Script,
    hashed_embeddings,
    hashed_vector,
    keyword_moderation,
    sse_body,
    story_chat,
    text_chunks,
)

__all__ = [
    "chat_chunk",
    "FakeModerator",
    "hashed_embeddings",
    "hashed_vector",
    "keyword_moderation",
    "LoopbackUpstream",
    "Reply",
    "Script",
    "ScriptedStream",
    "scripted_chunks",
    "sse_body",
    "story_chat",
    "text_chunks",
]
