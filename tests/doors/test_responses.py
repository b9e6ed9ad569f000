"""Every non-streamed Responses API door of a wrapped client, async and sync, cut-off and redact:
a flagged word in output text, refusal, reasoning summary or text, or function-call arguments never
reaches the caller."""

from __future__ import annotations

import anyio
import pytest
from openai import AsyncOpenAI, OpenAI

from streamguard import KeywordModerator, Policy, wrap
from tests.doors._responses import ASYNC_ANSWERS, ITEMS, SYNC_ANSWERS, AsyncPath, SyncPath, responses_answer
from tests.doors._upstream import FLAG, Doors

ACTIONS = ["cutoff", "redact"]


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("field", ITEMS)
@pytest.mark.parametrize("path", ASYNC_ANSWERS.values(), ids=ASYNC_ANSWERS.keys())
async def test_async_answer(doors: Doors, async_client: AsyncOpenAI, path: AsyncPath, field: str, action: str) -> None:
    """The flagged word is in nothing the async caller receives."""
    doors.answer = responses_answer(field)
    wrapped = wrap(async_client, moderator=KeywordModerator([FLAG]), policy=Policy(action=action))  # type: ignore[arg-type]
    with anyio.fail_after(10):
        seen = "\n".join(await path(wrapped))
    assert "resp_doors" in seen and FLAG not in seen


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("field", ITEMS)
@pytest.mark.parametrize("path", SYNC_ANSWERS.values(), ids=SYNC_ANSWERS.keys())
def test_sync_answer(doors: Doors, sync_client: OpenAI, path: SyncPath, field: str, action: str) -> None:
    """The flagged word is in nothing the sync caller receives."""
    doors.answer = responses_answer(field)
    wrapped = wrap(sync_client, moderator=KeywordModerator([FLAG]), policy=Policy(action=action))  # type: ignore[arg-type]
    seen = "\n".join(path(wrapped))
    assert "resp_doors" in seen and FLAG not in seen
