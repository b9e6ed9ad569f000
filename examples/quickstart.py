"""Guard a streamed chat completion, offline: a loopback upstream, the real openai client.

Run: ``.venv/bin/python examples/quickstart.py``
"""

from __future__ import annotations

import anyio
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

import streamguard as sg
from streamguard.testing.upstream import LoopbackUpstream, Script, text_chunks

ANSWER = (
    "Sure. The old lighthouse keeper climbed the stairs every night. "
    "One stormy evening he swore he would attack the next ship that came too close, "
    "but the storm passed and he lit the lamp as always."
)


async def main(base_url: str) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a short story."}]
    async with AsyncOpenAI(api_key="offline", base_url=base_url) as client:
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True)
        async with sg.guard(
            stream,
            moderator=sg.KeywordModerator({"violence": ["attack"]}),
            policy=sg.Policy(mode="holdback", action="cutoff"),
            model="gpt-4o-mini",
            messages=messages,
        ) as guarded:
            async for chunk in guarded:
                for choice in chunk.choices:
                    print(choice.delta.content or "", end="", flush=True)
                    if choice.finish_reason:
                        print(f"\n[finish_reason={choice.finish_reason}]")
        print(guarded.report)


if __name__ == "__main__":
    words = ANSWER.split(" ")
    deltas = [words[0]] + [" " + w for w in words[1:]]
    with LoopbackUpstream(chat=lambda body: Script(text_chunks(deltas), delay=0.02)) as upstream:
        anyio.run(main, upstream.base_url)
