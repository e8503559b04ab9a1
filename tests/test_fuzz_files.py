"""Fuzzing the files polysae reads (issue #29): mutated activation manifests, shard headers,
checkpoint config.json and run.json files either load, or fail with a clear error that names the
file: ``ValueError`` / ``OSError`` (``FileNotFoundError`` ...) / ``CLIError`` whose message holds
the folder's path, never a traceback of another type (KeyError, TypeError, OverflowError,
MemoryError ...). Bounded (50 examples per file kind, no deadline) so the suite stays fast.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polysae import SAE, SAEConfig
from polysae.__main__ import main as cli_main
from polysae.cli import CLIError

from test_hostile import HOOK, TRAIN, harvest_tiny

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
CLEAR = (ValueError, OSError, CLIError)

# Values a hostile edit puts somewhere in a JSON document.
ODD = st.one_of(st.none(), st.booleans(), st.integers(-2, 3), st.sampled_from(
    [10**12, 2**63, -2**70, 1.5, float("nan"), float("inf"), "", "x", "../../etc", "F32", [],
     {}, [1], [0, 0], [-1, 5], {"path": "x"}, HOOK]))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    acts = harvest_tiny(d, rows=200)
    ck = SAE(SAEConfig(16, 32, k=4, decoder="linear")).save(d / "ck")
    assert cli_main(["train", "--acts", str(acts), "--out", str(d / "run"), *TRAIN,
                     "--decoders", "linear", "--steps", "2"]) == 0
    return d


def _paths(doc, prefix=()):
    """Every (path, value) inside a JSON document, containers included."""
    yield prefix, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


def _mutate(doc, data) -> object:
    """One hostile edit of a JSON document: replace a value, delete a key or add junk."""
    paths = [p for p, _ in _paths(doc) if p]
    path = data.draw(st.sampled_from(paths), label="path")
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    what = data.draw(st.sampled_from(["replace", "delete", "junk"]), label="edit")
    if what == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif what == "junk" and isinstance(parent, dict):
        parent[data.draw(st.sampled_from(["__metadata__", "zzz", HOOK]))] = data.draw(ODD)
    else:
        parent[path[-1]] = data.draw(ODD, label="value")
    return doc


def _clear(e: BaseException, *names) -> None:
    assert isinstance(e, CLEAR), f"{type(e).__name__}: {e}"
    assert any(str(n) in str(e) for n in names), f"message names no file: {e}"


def _fresh(base: Path, what: str) -> Path:
    tmp = Path(tempfile.mkdtemp(dir=base))
    return Path(shutil.copytree(base / what, tmp / what))


def _read_store(acts: Path) -> None:
    from polysae.data.store import ActivationStore

    s = ActivationStore(acts, HOOK, batch_size=32, split="all", seed=0)
    for _ in s.batches(0):
        pass
    s.tokens()


@SETTINGS
@given(data=st.data())
def test_fuzz_manifest(base, data):
    acts = _fresh(base, "acts")
    m = json.loads((acts / "manifest.json").read_text())
    (acts / "manifest.json").write_text(json.dumps(_mutate(m, data)))
    try:
        _read_store(acts)
    except Exception as e:  # noqa: BLE001 - what the test is about
        _clear(e, acts)
    finally:
        shutil.rmtree(acts.parent)


@SETTINGS
@given(data=st.data())
def test_fuzz_shard_header(base, data):
    acts = _fresh(base, "acts")
    p = acts / HOOK / "shard_00001.safetensors"
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    how = data.draw(st.sampled_from(["json", "byte", "length", "cut"]), label="how")
    if how == "json":
        header = _mutate(json.loads(raw[8:8 + n]), data)
        text = json.dumps(header).encode()
        raw = struct.pack("<Q", len(text)) + text + raw[8 + n:]
    elif how == "byte":
        i = data.draw(st.integers(0, 8 + n - 1), label="at")
        raw = raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1:]
    elif how == "length":
        raw = struct.pack("<Q", data.draw(st.sampled_from([0, 1, n - 1, n + 1, 2**40,
                                                           2**64 - 1]))) + raw[8:]
    else:
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="cut")]
    p.write_bytes(raw)
    try:
        _read_store(acts)
    except Exception as e:  # noqa: BLE001
        _clear(e, acts)
    finally:
        shutil.rmtree(acts.parent)


@SETTINGS
@given(data=st.data())
def test_fuzz_checkpoint_config(base, data):
    import polysae

    ck = _fresh(base, "ck")
    doc = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps(_mutate(doc, data)))
    try:
        polysae.load(ck)
    except Exception as e:  # noqa: BLE001
        _clear(e, ck)
    finally:
        shutil.rmtree(ck.parent)


@settings(SETTINGS, max_examples=25)
@given(data=st.data())
def test_fuzz_run_file(base, data, capsys):
    run = _fresh(base, "run")
    doc = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(_mutate(doc, data)))
    try:
        code = cli_main(["train", "--out", str(run), "--resume", "--no-progress"])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    shutil.rmtree(run.parent)
    assert code in (0, 1, 2), err
    assert "Traceback" not in err
    if code:  # names the run folder, or the data folder it points at
        assert "error:" in err and (str(run) in err or str(base / "acts") in err), err
