"""Every chat-completions door of a wrapped client, async and sync, streamed and not, cut-off and
redact: a flagged word in ``content`` or ``refusal`` never reaches the caller in hold-back mode."""

from __future__ import annotations

from collections.abc import Mapping

import anyio
import pytest
from openai import AsyncOpenAI, OpenAI

from streamguard import KeywordModerator, Policy, wrap
from tests.doors._chat import ASYNC_PATHS, SAFE, SYNC_PATHS, AsyncPath, SyncPath, chat_answer
from tests.doors._upstream import FLAG, Doors

FIELDS = ["content", "refusal", "content_parts"]
ACTIONS = ["cutoff", "redact"]


def combos(paths: Mapping[str, object]) -> list[object]:
    """(path, field) pairs; openai's own ``parse()`` helpers cannot read ``content`` as a list of parts,
    so that pair is not a door."""
    return [
        pytest.param(path, field, id=f"{name}-{field}")
        for name, path in paths.items()
        for field in FIELDS
        if not (field == "content_parts" and "parse" in name)
    ]


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize(("path", "field"), combos(ASYNC_PATHS))
async def test_async_door(doors: Doors, async_client: AsyncOpenAI, path: AsyncPath, field: str, action: str) -> None:
    """The flagged word is in nothing the async caller receives; the clean text before it is."""
    doors.answer = chat_answer(field)
    wrapped = wrap(async_client, moderator=KeywordModerator([FLAG]), policy=Policy(action=action))  # type: ignore[arg-type]
    with anyio.fail_after(10):
        seen = "\n".join(await path(wrapped))
    assert FLAG not in seen
    assert SAFE.split()[0] in seen or "content filter" in seen


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize(("path", "field"), combos(SYNC_PATHS))
def test_sync_door(doors: Doors, sync_client: OpenAI, path: SyncPath, field: str, action: str) -> None:
    """The flagged word is in nothing the sync caller receives; the clean text before it is."""
    doors.answer = chat_answer(field)
    wrapped = wrap(sync_client, moderator=KeywordModerator([FLAG]), policy=Policy(action=action))  # type: ignore[arg-type]
    seen = "\n".join(path(wrapped))
    assert FLAG not in seen
    assert SAFE.split()[0] in seen or "content filter" in seen
