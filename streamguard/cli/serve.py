"""``streamguard serve``: the OpenAI-compatible moderating proxy (``streamguard.integrations.proxy``).

A thin module: the options and the runner live with the proxy, which imports no Starlette until it runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..integrations.proxy import add_serve_subcommand


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``serve``."""
    add_serve_subcommand(sub)
