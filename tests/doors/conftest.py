"""Fixtures of the door tests: one loopback upstream per module, real openai clients on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from openai import AsyncOpenAI, OpenAI

from tests.doors._upstream import Doors, doors_upstream


@pytest.fixture(scope="module")
def doors() -> Iterator[Doors]:
    """The loopback upstream, shared by a module's tests (each sets ``answer``)."""
    with doors_upstream() as state:
        yield state


@pytest.fixture
async def async_client(doors: Doors) -> AsyncIterator[AsyncOpenAI]:
    """The real async openai client over real HTTP to the door upstream."""
    async with AsyncOpenAI(api_key="test", base_url=doors.base_url, max_retries=0, timeout=10) as client:
        yield client


@pytest.fixture
def sync_client(doors: Doors) -> Iterator[OpenAI]:
    """The real sync openai client over real HTTP to the door upstream."""
    with OpenAI(api_key="test", base_url=doors.base_url, max_retries=0, timeout=10) as client:
        yield client
