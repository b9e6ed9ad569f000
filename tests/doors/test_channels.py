"""Every chat-completions door with the flagged word in a channel besides ``content``: reasoning
(``reasoning_content`` / ``reasoning``), tool-call and function-call arguments, the audio transcript. Async and sync,
streamed and not, cut-off and redact: it never reaches the caller in hold-back mode."""

from __future__ import annotations

import anyio
import pytest
from openai import AsyncOpenAI, OpenAI

from streamguard import KeywordModerator, Policy, wrap
from tests.doors._chat import ASYNC_PATHS, SYNC_PATHS, AsyncPath, SyncPath, chat_answer
from tests.doors._upstream import FLAG, Doors

CHANNELS = ["reasoning_content", "reasoning", "tool_call_arguments", "function_call_arguments", "audio_transcript"]
ACTIONS = ["cutoff", "redact"]


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("field", CHANNELS)
@pytest.mark.parametrize("path", ASYNC_PATHS.values(), ids=ASYNC_PATHS.keys())
async def test_async_channel(doors: Doors, async_client: AsyncOpenAI, path: AsyncPath, field: str, action: str) -> None:
    """The flagged word is in nothing the async caller receives, whatever channel carried it."""
    doors.answer = chat_answer(field)
    wrapped = wrap(async_client, moderator=KeywordModerator([FLAG]), policy=Policy(action=action))  # type: ignore[arg-type]
    with anyio.fail_after(10):
        seen = "\n".join(await path(wrapped))
    assert seen and FLAG not in seen


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("field", CHANNELS)
@pytest.mark.parametrize("path", SYNC_PATHS.values(), ids=SYNC_PATHS.keys())
def test_sync_channel(doors: Doors, sync_client: OpenAI, path: SyncPath, field: str, action: str) -> None:
    """The flagged word is in nothing the sync caller receives, whatever channel carried it."""
    doors.answer = chat_answer(field)
    wrapped = wrap(sync_client, moderator=KeywordModerator([FLAG]), policy=Policy(action=action))  # type: ignore[arg-type]
    seen = "\n".join(path(wrapped))
    assert seen and FLAG not in seen
