"""``import streamguard`` loads the library only: no CLI, bench suite, test support or their heavy dependencies.

Each probe runs in a fresh interpreter, so modules other tests imported do not count.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Packages the core never needs: the command line and its suite, the public test support, and the
# optional dependencies behind the [server], [cli] and [bench] extras.
TOOLING = ("streamguard.cli", "streamguard.testing")
HEAVY = ("starlette", "uvicorn", "rich", "matplotlib")


def loaded_after(statement: str) -> set[str]:
    """Names in ``sys.modules`` after running ``statement`` in a fresh interpreter."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    return set(json.loads(out.stdout))


def offending(modules: set[str]) -> set[str]:
    """The tooling modules and heavy top-level packages among ``modules``."""
    return {m for m in modules if any(m == t or m.startswith(t + ".") for t in TOOLING) or m.split(".")[0] in HEAVY}


def test_import_streamguard_loads_no_cli_bench_or_testing_module() -> None:
    """The core imports nothing from ``streamguard.cli`` / ``streamguard.testing``, nor starlette, uvicorn,
    rich or matplotlib."""
    modules = loaded_after("import streamguard")
    assert "streamguard.guard" in modules  # the probe saw the package load
    assert offending(modules) == set()


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("import streamguard.cli", {"streamguard.cli", "streamguard.cli.bench", "streamguard.cli.demo"}),
        ("import streamguard.testing", {"streamguard.testing", "streamguard.testing.upstream"}),
        ("from streamguard.cli import _bench", {"streamguard.cli._bench", "streamguard.testing.fakes"}),
    ],
)
def test_the_probe_sees_tooling_when_it_is_imported(statement: str, expected: set[str]) -> None:
    """The same probe does report tooling modules once they are imported (so the test above can fail)."""
    assert expected <= offending(loaded_after(statement))


def test_cli_parser_imports_no_heavy_dependency() -> None:
    """Building the command line (``streamguard --help``) imports no starlette, uvicorn, rich or matplotlib:
    each command imports what it needs when it runs."""
    modules = loaded_after(
        "from streamguard.cli import _build_parser\n"
        "assert _build_parser().parse_args(['bench', '--quick']).command == 'bench'"
    )
    assert {m for m in modules if m.split(".")[0] in HEAVY} == set()
