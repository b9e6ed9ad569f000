"""One moderating process for the shared-budget tests: ``python -m tests.integration._budget_worker JSON``.

The JSON argument: ``base_url``, ``redis_url`` (null: per-process pacing from the headers),
``calls``, ``concurrency``. It makes ``calls`` one-text ``moderate()`` calls, ``concurrency`` at a
time, through a real ``OpenAIModerator`` (one request per call: ``max_batch=1``), and prints its
counters as one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict

import anyio
from openai import AsyncOpenAI

from streamguard.exceptions import ModerationError
from streamguard.moderation import OpenAIModerator


async def run(options: dict[str, object]) -> dict[str, object]:
    """Moderate as told; the counters."""
    calls = int(str(options["calls"]))
    concurrency = int(str(options["concurrency"]))
    redis_url = options.get("redis_url")
    errors = 0
    async with AsyncOpenAI(api_key="test", base_url=str(options["base_url"]), max_retries=0) as client:
        moderator = OpenAIModerator(
            client, max_batch=1, max_wait=0.0, redis_url=str(redis_url) if redis_url else None, backoff=0.1
        )
        limiter = anyio.CapacityLimiter(concurrency)

        async def one(i: int) -> None:
            nonlocal errors
            async with limiter:
                try:
                    await moderator.moderate([f"window {i} of a quiet story about the river"])
                except ModerationError:
                    errors += 1

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for i in range(calls):
                tg.start_soon(one, i)
        elapsed = time.monotonic() - started
        budget = moderator.budget
        if budget is not None:
            await budget.aclose()
        return {
            "elapsed": elapsed,
            "errors": errors,
            "moderation": asdict(moderator.stats),
            "budget": asdict(budget.stats) if budget is not None else None,
        }


def main() -> None:
    """Entry point."""
    options = json.loads(sys.argv[1])
    sys.stdout.write(json.dumps(anyio.run(run, options)) + "\n")


if __name__ == "__main__":
    main()
