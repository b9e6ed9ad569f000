"""The door table against the INSTALLED openai client: every public method is guarded, passed or refused.

A new openai release that adds a method makes ``test_every_method_is_classified`` fail until the
method is put in the table (``streamguard/_doors.py``); until then the wrapped client refuses it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from functools import cached_property
from typing import Any

import pytest
from openai import AsyncOpenAI, OpenAI
from openai._resource import AsyncAPIResource, SyncAPIResource

from streamguard import KeywordModerator, UnguardedError, wrap
from streamguard._doors import GUARDED, PASSED, REFUSED, door

MODES = ("with_raw_response", "with_streaming_response")
# Defined by the wrapper itself: copies return a wrapped client; a sync client's close() also closes
# the default moderator's async twin.
REWRAPPED = frozenset({"copy", "with_options", "close"})
UNREACHABLE = "http://127.0.0.1:9/v1"  # nothing is sent: refused doors raise before any request


METHOD = object()  # marks a method among an object's children


def _children(obj: Any) -> Iterator[tuple[str, Any]]:
    for name in sorted(dir(type(obj))):
        if name.startswith("_"):
            continue
        attr = inspect.getattr_static(type(obj), name)
        if isinstance(attr, property | cached_property):
            yield name, getattr(obj, name)
        elif callable(attr):
            yield name, METHOD


def _is_resource(value: object) -> bool:
    if isinstance(value, SyncAPIResource | AsyncAPIResource):
        return True
    return type(value).__name__.endswith(("WithRawResponse", "WithStreamingResponse"))


def public_methods(obj: Any) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(path, steps) of every public method reachable from ``obj``: resources, sub-resources and their
    ``with_raw_response`` / ``with_streaming_response`` views. ``steps`` are the attribute names that
    lead to the method (the path with the views where they were taken)."""
    yield from _walk(obj, (), set())


def _walk(obj: Any, steps: tuple[str, ...], seen: set[int]) -> Iterator[tuple[str, tuple[str, ...]]]:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    names = dict(_children(obj))
    if any(step in MODES for step in steps):  # a view's methods are set in its __init__
        names.update((k, METHOD) for k, v in vars(obj).items() if not k.startswith("_") and callable(v))
    for name, value in names.items():
        here = (*steps, name)
        if value is METHOD:
            yield ".".join(s for s in here if s not in MODES), here
        elif name in MODES or _is_resource(value):
            yield from _walk(value, here, seen)


def _named(path: str) -> bool:
    """Whether a rule of the table names ``path`` (not just the refuse-by-default fallback)."""
    if path in GUARDED or path in REWRAPPED:
        return True
    parts = path.split(".")
    return any(".".join(parts[:n]) in PASSED or ".".join(parts[:n]) in REFUSED for n in range(len(parts), 0, -1))


CLIENTS = [
    pytest.param(lambda: OpenAI(api_key="test", base_url=UNREACHABLE), id="sync"),
    pytest.param(lambda: AsyncOpenAI(api_key="test", base_url=UNREACHABLE), id="async"),
]


@pytest.mark.parametrize("make", CLIENTS)
def test_every_method_is_classified(make: Any) -> None:
    """Every public method of the installed client (and its raw views) is named by the table."""
    client = make()
    paths = sorted({path for path, _ in public_methods(client)})
    assert len(paths) > 100  # the walk really went through the resources
    assert {"chat.completions.create", "responses.stream", "post", "files.content"} <= set(paths)
    unnamed = [p for p in paths if not _named(p)]
    assert not unnamed, f"classify these in streamguard/_doors.py: {unnamed}"


@pytest.mark.parametrize("make", CLIENTS)
def test_guarded_methods_exist(make: Any) -> None:
    """Each guarded path is a real method of the installed client (the table is not stale)."""
    paths = {path for path, _ in public_methods(make())}
    assert GUARDED <= paths


@pytest.mark.parametrize("make", CLIENTS)
def test_wrapped_client_follows_the_table(make: Any) -> None:
    """Through the wrapper, each method is openai's own (passed), replaced (guarded) or raises
    UnguardedError naming its path (refused), in every mode."""
    client = make()
    wrapped = wrap(client, moderator=KeywordModerator(["bomb"]))
    counts = {"passed": 0, "guarded": 0, "refused": 0}
    for path, steps in public_methods(client):
        if path in REWRAPPED:
            continue
        own, via = client, wrapped
        for step in steps[:-1]:
            own, via = getattr(own, step), getattr(via, step)
        original, seen = getattr(own, steps[-1]), getattr(via, steps[-1])
        kind = door(path).kind
        counts[kind] += 1
        if kind == "passed":
            assert seen == original, steps
        elif kind == "guarded":
            assert seen != original, steps
        else:
            with pytest.raises(UnguardedError, match=r"\.".join(steps)):
                seen()
    assert all(counts.values()), counts


def test_unknown_paths_are_refused() -> None:
    """A path no rule names is refused, with advice."""
    rule = door("brand_new_resource.generate")
    assert rule.kind == "refused" and "unwrapped client" in rule.advice
    assert door("chat.completions.create").kind == "guarded"
    assert door("files.content").kind == "refused" and door("files.list").kind == "passed"
