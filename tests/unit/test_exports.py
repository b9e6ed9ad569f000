"""The public namespace: ``__all__`` is sorted and matches what the package exposes."""

from __future__ import annotations

import subprocess
import sys

import streamguard


def test_all_is_sorted_casefold() -> None:
    """__all__ is kept sorted with key=str.casefold."""
    assert streamguard.__all__ == sorted(streamguard.__all__, key=str.casefold)


def test_all_matches_the_namespace() -> None:
    """Every public name in the namespace is exported, and every export exists."""
    public = {
        name
        for name, value in vars(streamguard).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("streamguard")
    }
    assert set(streamguard.__all__) == public


def test_import_does_not_pull_in_servers() -> None:
    """``import streamguard`` never imports starlette or uvicorn (they are the [server] extra)."""
    code = "import sys, streamguard; print(any(m.split('.')[0] in ('starlette', 'uvicorn') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"
