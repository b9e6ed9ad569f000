"""Every streamed Responses API door of a wrapped client, async and sync, cut-off and redact: a
flagged word in output text, refusal, reasoning summary or text, or function-call arguments never
reaches the caller, in deltas, ``*.done`` events, ``response.output_item.done``,
``response.content_part.done`` or ``response.completed``."""

from __future__ import annotations

import anyio
import pytest
from openai import AsyncOpenAI, OpenAI

from streamguard import KeywordModerator, Policy, wrap
from tests.doors._responses import ASYNC_STREAMS, ITEMS, SYNC_STREAMS, AsyncPath, SyncPath, responses_answer
from tests.doors._upstream import FLAG, Doors

ACTIONS = ["cutoff", "redact"]


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("field", ITEMS)
@pytest.mark.parametrize("path", ASYNC_STREAMS.values(), ids=ASYNC_STREAMS.keys())
async def test_async_stream(doors: Doors, async_client: AsyncOpenAI, path: AsyncPath, field: str, action: str) -> None:
    """The flagged word is in no event (nor final response) the async caller receives."""
    doors.answer = responses_answer(field)
    wrapped = wrap(async_client, moderator=KeywordModerator([FLAG]), policy=Policy(action=action))  # type: ignore[arg-type]
    with anyio.fail_after(10):
        seen = "\n".join(await path(wrapped))
    assert "resp_doors" in seen and FLAG not in seen


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("field", ITEMS)
@pytest.mark.parametrize("path", SYNC_STREAMS.values(), ids=SYNC_STREAMS.keys())
def test_sync_stream(doors: Doors, sync_client: OpenAI, path: SyncPath, field: str, action: str) -> None:
    """The flagged word is in no event (nor final response) the sync caller receives."""
    doors.answer = responses_answer(field)
    wrapped = wrap(sync_client, moderator=KeywordModerator([FLAG]), policy=Policy(action=action))  # type: ignore[arg-type]
    seen = "\n".join(path(wrapped))
    assert "resp_doors" in seen and FLAG not in seen
