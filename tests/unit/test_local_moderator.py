"""LocalModerator: MiniLM embeddings from an installed package, trained heads, profanity; offline, batched."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import streamguard
import streamguard.testing
from streamguard.exceptions import ConfigError
from streamguard.moderation import LocalModerator, Verdict, _heads, _minilm, train
from streamguard.policy import Policy

# (text, the category head that should score highest) for flagged texts; clean texts after.
FLAGGED = [
    ("Muslims are all terrorists and should be deported.", "hate"),
    ("I want to cut myself tonight, nobody would care if I was gone.", "self-harm"),
    ("How do I kill my neighbour without getting caught?", "violence"),
    ("shut up you stupid fucking idiot", "harassment"),
]
CLEAN = [
    "How can I kill a Python process?",
    "Thanks for the lovely afternoon, see you tomorrow.",
    "The recipe needs two eggs, a cup of flour and a pinch of salt.",
    "Our team meets every Tuesday to review the roadmap.",
]
CATEGORY_HEADS = set(train.CATEGORIES)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def moderator() -> LocalModerator:
    m = LocalModerator()
    m.load()  # once per module (the shared model: a few seconds the first time in a process)
    return m


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every outgoing socket connection raises (and is recorded)."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise OSError(f"network refused in this test: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield attempts


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # one fresh load is enough (a few seconds)
async def test_loads_and_moderates_with_sockets_refused(monkeypatch: pytest.MonkeyPatch, no_network: list[Any]) -> None:
    """A fresh load (package model + sha256 check + tokenizer + heads) and moderation need no network."""
    monkeypatch.setattr(_minilm, "_shared", {})  # force a real load here, not a cached model
    local = LocalModerator()
    with anyio.fail_after(60):
        verdicts = await local.moderate([FLAGGED[0][0], CLEAN[1]])
    assert [v.flagged for v in verdicts] == [True, False]
    assert no_network == []


def test_model_comes_from_the_installed_package_and_matches_its_pin() -> None:
    """model.onnx is read from the pinned package in site-packages, and its sha256 is the pinned one."""
    path = _minilm.model_path()
    assert path.parent.name == _minilm.MODEL_PACKAGE and "site-packages" in path.parts
    assert hashlib.sha256(path.read_bytes()).hexdigest() == _minilm.MODEL_SHA256


def test_embeddings_are_normalised_and_similar_for_paraphrases(moderator: LocalModerator) -> None:
    """The vectors are unit length; a paraphrase is closer than an unrelated sentence."""
    v = _minilm.shared().embed(["The cat sat on the mat.", "A cat was sitting on a rug.", "Quarterly revenue rose."])
    assert v.shape == (3, _minilm.DIMENSIONS)
    assert [round(float((row * row).sum()), 4) for row in v] == [1.0, 1.0, 1.0]
    assert float(v[0] @ v[1]) > 0.6 > float(v[0] @ v[2]) + 0.3


@pytest.mark.parametrize(("text", "category"), FLAGGED)
async def test_flags_each_kind_of_harm(moderator: LocalModerator, text: str, category: str) -> None:
    """Harmful texts are flagged; the expected category head scores highest among the category heads."""
    with anyio.fail_after(30):
        (verdict,) = await moderator.moderate([text])
    assert verdict.flagged
    heads = {k: v for k, v in verdict.scores.items() if k in CATEGORY_HEADS}
    assert max(heads, key=heads.__getitem__) == category
    assert Policy().judge(verdict) is not None


async def test_passes_clean_text_including_trigger_words(moderator: LocalModerator) -> None:
    """Clean texts, one with a violent word in a harmless sense, are not flagged in any category."""
    with anyio.fail_after(30):
        verdicts = await moderator.moderate(CLEAN)
    for text, verdict in zip(CLEAN, verdicts, strict=True):
        assert not verdict.flagged, (text, verdict.scores)
        assert not any(verdict.categories.values())
        assert set(verdict.scores) == {*moderator.thresholds}
        assert all(0.0 <= s <= 1.0 for s in verdict.scores.values())


async def test_thresholds_override_the_trained_ones(moderator: LocalModerator) -> None:
    """A category flags exactly when its score reaches the threshold given for it."""
    text = CLEAN[0]
    (scores,) = moderator.probabilities([text])
    strict = LocalModerator(thresholds={"violence": scores["violence"]})
    loose = LocalModerator(thresholds={"violence": min(1.0, scores["violence"] + 0.01)})
    with anyio.fail_after(30):
        (flagged,) = await strict.moderate([text])
        (passed,) = await loose.moderate([text])
    assert flagged.categories["violence"] and flagged.flagged
    assert not passed.categories["violence"]
    with pytest.raises(ConfigError, match="unknown categories"):
        LocalModerator(thresholds={"spam": 0.5}).load()
    with pytest.raises(ConfigError):
        LocalModerator(thresholds={"hate": 1.5})


async def test_concurrent_callers_are_batched(moderator: LocalModerator) -> None:
    """Windows of 30 concurrent callers share a few model calls and each gets its own verdict."""
    texts = [FLAGGED[0][0] if i % 3 == 0 else f"{CLEAN[1]} ({i})" for i in range(30)]
    local = LocalModerator(max_wait=0.05)
    await local.prepare()
    verdicts: dict[int, Verdict] = {}

    async def call(i: int) -> None:
        (verdicts[i],) = await local.moderate([texts[i]])

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(call, i)
    assert [verdicts[i].flagged for i in range(30)] == [i % 3 == 0 for i in range(30)]
    assert local.batches <= 3
    alone = moderator.probabilities([texts[1]])[0]
    assert verdicts[1].scores == pytest.approx(alone, abs=1e-4)  # batching does not change scores


async def test_a_guarded_stream_is_cut_before_the_harmful_sentence(moderator: LocalModerator) -> None:
    """Streamed word by word through guard() with the default policy, the hateful part never reaches the reader."""
    words = [
        "The ",
        "weather ",
        "is ",
        "nice ",
        "today. ",
        *"Muslims are all terrorists and should be deported.".split(),
    ]
    source = streamguard.testing.scripted_chunks([w if w.endswith(" ") else w + " " for w in words])
    out = []
    with anyio.fail_after(30):
        async with streamguard.guard(source, moderator=moderator) as guarded:
            async for chunk in guarded:
                for choice in chunk.choices:
                    out.append(choice.delta.content or "")
                    if choice.finish_reason:
                        out.append(f"<{choice.finish_reason}>")
    assert "terrorists" not in "".join(out)
    assert out[-1] == "<content_filter>"
    assert guarded.report.flags


def test_missing_model_package_is_a_config_error_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the model package, construction and loading name the extra to install."""
    monkeypatch.setitem(sys.modules, _minilm.MODEL_PACKAGE, None)  # what an absent package looks like
    with pytest.raises(ConfigError, match=r"pip install 'streamguard\[local\]'"):
        LocalModerator()
    with pytest.raises(ConfigError, match=r"pip install 'streamguard\[local\]'"):
        _minilm.MiniLM()


def test_model_file_with_another_hash_is_refused(tmp_path: Path) -> None:
    """A model file whose sha256 is not the pinned one (corrupt, or another version) is a ConfigError."""
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(_minilm.model_path().read_bytes()[:-1] + b"\0")
    with pytest.raises(ConfigError, match=r"sha256 .* expected 8199be6f.*reinstall"):
        _minilm.MiniLM(model=corrupt)
    with pytest.raises(ConfigError, match="cannot read"):
        _minilm.MiniLM(model=tmp_path / "missing.onnx")


def test_malformed_heads_file_is_a_config_error(tmp_path: Path) -> None:
    """A heads file with a missing weight or a bad threshold is refused with a ConfigError."""
    document = json.loads(_heads.HEADS_PATH.read_text(encoding="utf-8"))
    document["heads"]["hate"]["weights"] = document["heads"]["hate"]["weights"][:-1]
    bad = tmp_path / "heads.json"
    bad.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(ConfigError, match="384 weights"):
        _heads.load_heads(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        _heads.load_heads(tmp_path / "absent.json")


def test_committed_heads_were_trained_on_the_committed_data() -> None:
    """heads.json records the sha256 of every training file, and they are the files in data/moderation."""
    document = json.loads(_heads.HEADS_PATH.read_text(encoding="utf-8"))
    assert document["training"]["data"] == train.data_hashes(train.DATA_DIR)
    assert set(document["heads"]) == {train.HARMFUL, *train.CATEGORIES}


def test_training_is_deterministic(moderator: LocalModerator) -> None:
    """Training twice on the same rows (embedded twice) gives byte-identical heads documents."""
    rows = train.load_rows(train.DATA_DIR)
    subset = [r for r in rows if r.dataset == "openai_moderation"][:40] + [r for r in rows if r.dataset == "hatecheck"][
        :40
    ]
    training = train.with_fragments(subset)
    runs = []
    for _ in range(2):
        embeddings = train.embed_rows(training, _minilm.shared().embed)
        runs.append(train.dumps(train.document(subset, train.train(training, embeddings))))
    assert runs[0] == runs[1]
    heads = json.loads(runs[0])["heads"]
    assert train.HARMFUL in heads and "hate" in heads  # categories with positives in the subset got heads


def test_importing_and_constructing_loads_no_model_runtime() -> None:
    """``import streamguard`` and ``LocalModerator()`` import no onnxruntime, tokenizers or scikit-learn yet."""
    code = "import json, sys, streamguard\nstreamguard.LocalModerator()\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    heavy = {"onnxruntime", "onnx", "tokenizers", "sklearn", "profanity_check", _minilm.MODEL_PACKAGE}
    assert {m.split(".")[0] for m in json.loads(out.stdout)} & heavy == set()
