"""Running the proxy: ``streamguard serve`` and :func:`serve` (uvicorn, one process or ``--workers N``).

With several workers, uvicorn's process manager starts each worker from an import string, so
the configuration travels to them as the ``serve`` arguments (in the environment variable
``STREAMGUARD_SERVE_ARGS``), never as secrets: each worker reads the keys from the environment
variables the arguments name, as the first process did.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ...exceptions import ConfigError
from .._drain import GRACE
from .config import ProxyConfig, ServeOptions, add_arguments, config_from_args, options_from_args

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["add_serve_subcommand", "app_from_environment", "run_serve", "serve"]

_ARGS_ENV = "STREAMGUARD_SERVE_ARGS"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def serve(
    config: ProxyConfig, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info", access_log: bool = True
) -> None:
    """Run the proxy in this process with uvicorn until interrupted.

    Args:
        config: How to run.
        host: Interface to listen on.
        port: Port to listen on.
        log_level: uvicorn's log level.
        access_log: Log each request.
    """
    import uvicorn

    from .app import create_app

    app = create_app(config)
    freeze_startup_objects()
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=math.ceil(config.drain_timeout + GRACE),
    )


def serve_workers(argv: Sequence[str], options: ServeOptions, *, drain_timeout: float = 30.0) -> None:
    """Run ``options.workers`` worker processes (uvicorn's process manager), each building its app from ``argv``.

    The workers' metrics are aggregated (prometheus-client's multiprocess mode): unless
    ``PROMETHEUS_MULTIPROC_DIR`` is set already, a fresh temporary directory is made for them
    and removed when the server stops.
    """
    import uvicorn

    os.environ[_ARGS_ENV] = json.dumps(list(argv))
    with multiprocess_metrics_dir():
        uvicorn.run(
            "streamguard.integrations.proxy.serve:app_from_environment",
            factory=True,
            host=options.host,
            port=options.port,
            workers=options.workers,
            log_level=options.log_level,
            access_log=options.access_log,
            timeout_graceful_shutdown=math.ceil(drain_timeout + GRACE),
        )


@contextlib.contextmanager
def multiprocess_metrics_dir() -> Iterator[str]:
    """``PROMETHEUS_MULTIPROC_DIR`` for the workers to come: the one set, else a temporary one, removed after."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        yield given
        return
    directory = tempfile.mkdtemp(prefix="streamguard-metrics-")
    os.environ[MULTIPROC_ENV] = directory
    try:
        yield directory
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)


def app_from_environment() -> Starlette:
    """A worker's app, from the ``serve`` arguments in ``STREAMGUARD_SERVE_ARGS``."""
    from .app import create_app

    parser = argparse.ArgumentParser(prog="streamguard serve")
    add_arguments(parser)
    args = parser.parse_args(json.loads(os.environ[_ARGS_ENV]))
    app = create_app(config_from_args(args))
    freeze_startup_objects()
    return app


def freeze_startup_objects() -> None:
    """Keep what startup built (modules, the app) out of the garbage collector's way (``gc.freeze``).

    A serving process allocates a few dicts a chunk, so collections run often; without this,
    each full collection walks the ~150,000 objects of the imported libraries (~55 ms, a stall of
    every stream). After it, a full collection takes ~13 ms (measured once, with ``gc.callbacks``, in a
    ``serve`` worker under ``benchmarks/proxy_load.py``'s load).
    """
    gc.collect()
    gc.freeze()


def add_serve_subcommand(subparsers: argparse._SubParsersAction[Any]) -> argparse.ArgumentParser:
    """Add ``serve`` to the CLI's subparsers; :func:`run_serve` runs it.

    Args:
        subparsers: What ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The ``serve`` parser (its defaults include ``run=run_serve``, as the CLI dispatches).
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run an OpenAI-compatible moderating proxy",
        description=(
            "Run an OpenAI-compatible proxy: chat completions, Responses and completions are moderated on their "
            "way through, text-free routes relayed, routes with text it cannot moderate refused."
        ),
    )
    add_arguments(parser)
    parser.set_defaults(run=run_serve)
    return parser


def run_serve(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run ``streamguard serve``; returns the exit status (2 for a usage or setup error).

    Args:
        args: The parsed ``serve`` arguments.
        argv: The ``serve`` arguments as given (for ``--workers``); by default ``sys.argv`` after ``serve``.
    """
    missing = [
        m for m in ("starlette", "uvicorn", "prometheus_client", "orjson") if importlib.util.find_spec(m) is None
    ]
    if missing:
        sys.stderr.write(f"streamguard serve needs {', '.join(missing)}: pip install 'streamguard[server]'\n")
        return 2
    from .app import create_app

    try:
        config = config_from_args(args)
        options = options_from_args(args)
        create_app(config)  # fail on bad configuration before binding the port
    except ConfigError as exc:
        sys.stderr.write(f"streamguard serve: {exc}\n")
        return 2
    if options.workers > 1:
        if argv is None:
            argv = sys.argv[sys.argv.index("serve") + 1 :] if "serve" in sys.argv else sys.argv[1:]
        serve_workers(argv, options, drain_timeout=config.drain_timeout)
    else:
        serve(config, host=options.host, port=options.port, log_level=options.log_level, access_log=options.access_log)
    return 0
