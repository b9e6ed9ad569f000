"""OpenAI's wire format for streamed chat completions, and its error shape (no Starlette here).

A stream is ``data: {chunk json}\\n\\n`` events ending with ``data: [DONE]\\n\\n``; comments
(``: ping\\n\\n``) keep idle connections open. An error is
``{"error": {"message", "type", "param", "code"}}``: the body of an error response, or one
``data:`` event when the stream has already started (then the stream ends, without ``[DONE]``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import openai
from openai.types.chat import ChatCompletionChunk

from ..exceptions import ModerationError, ModerationTimeout

__all__ = ["DONE", "PING", "chunk_event", "describe_error", "error_event", "error_object", "scrub"]

DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"


def chunk_event(chunk: ChatCompletionChunk) -> bytes:
    """One chunk as an SSE event, in the compact JSON OpenAI sends (unset fields stay unset)."""
    return b"data: " + chunk.to_json(indent=None).encode() + b"\n\n"


def error_object(
    message: str, type: str = "invalid_request_error", *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_event(body: dict[str, Any]) -> bytes:
    """An error body as one SSE ``data:`` event."""
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def scrub(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret replaced by ``***`` (longest first, so no part of a longer one is left)."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return text


def describe_error(exc: BaseException, secrets: Sequence[str] = ()) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI-shaped error body that report ``exc`` to a client.

    Upstream errors keep the upstream's status, message, type and code; connection failures are
    502/504; moderation failures 503; anything else is a 500 that names no internals.
    """
    if isinstance(exc, openai.APIError) and not isinstance(exc, openai.APIConnectionError):
        status = getattr(exc, "status_code", 502)
        body = exc.body
        error = body.get("error", body) if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        if not isinstance(message, str) or not message:
            message = exc.message
        kind = exc.type or ("server_error" if status >= 500 else "invalid_request_error")
        return status, error_object(scrub(message, secrets), kind, param=exc.param, code=exc.code)
    if isinstance(exc, openai.APITimeoutError):
        return 504, error_object("The upstream request timed out.", "server_error", code="upstream_timeout")
    if isinstance(exc, openai.APIConnectionError):
        return 502, error_object("Could not reach the upstream server.", "server_error", code="upstream_unavailable")
    if isinstance(exc, ModerationTimeout):
        return 503, error_object("Moderation timed out.", "server_error", code="moderation_timeout")
    if isinstance(exc, ModerationError):
        return 503, error_object("Moderation failed.", "server_error", code="moderation_failed")
    return 500, error_object("The server had an error while processing your request.", "server_error")
