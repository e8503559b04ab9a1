"""Dataset sources of polysae.data.sources and polysae.data.chunking (and the labelled-corpus side
in polysae.data.corpora):
``hf:NAME[:config][@split]`` streamed through ``datasets`` from data it wrote itself
(``save_to_disk``) and from local data folders (with README configs), local ``.parquet`` /
``.jsonl`` / ``.csv`` / ``.txt`` files, and named errors for missing text columns, through the
API and through ``polysae harvest``. Nothing reaches a hub (``HF_HUB_OFFLINE`` is on)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from polysae.__main__ import main as cli_main
from polysae.data.chunking import build_chunks, iter_texts
from polysae.data.corpora import load_corpus
from polysae.data.sources import parse_hf_spec

TEXTS = [f"the cat sat on mat {i} " + "dog ran far " * (i % 4) for i in range(30)]
LABELS = [i % 3 for i in range(30)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """The same 30 documents as a save_to_disk Dataset, a DatasetDict, a data folder with two
    README-declared configs, and parquet / jsonl / csv / txt files."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("ds")
    feats = datasets.Features({"body": datasets.Value("string"),
                               "topic": datasets.ClassLabel(names=["sport", "tech", "arts"])})
    ds = datasets.Dataset.from_dict({"body": TEXTS, "topic": LABELS}, features=feats)
    ds.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(5))}).save_to_disk(
        str(root / "dict"))
    folder = root / "folder"
    for cfg, sl in (("en", slice(0, 10)), ("de", slice(10, 30))):
        for split, part in (("train", sl), ("test", slice(sl.start, sl.start + 3))):
            (folder / cfg).mkdir(parents=True, exist_ok=True)
            with open(folder / cfg / f"{split}.jsonl", "w") as f:
                for t in TEXTS[part]:
                    f.write(json.dumps({"text": t}) + "\n")
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: en\n  data_files:\n  - split: train\n    path: en/train.jsonl\n"
        "  - split: test\n    path: en/test.jsonl\n"
        "- config_name: de\n  data_files:\n  - split: train\n    path: de/train.jsonl\n"
        "  - split: test\n    path: de/test.jsonl\n---\n")
    pq_dir = root / "pq"
    pq_dir.mkdir()
    table = pa.table({"text": TEXTS, "label": [str(v) for v in LABELS]})
    pq.write_table(table.slice(0, 12), pq_dir / "part-0.parquet")
    pq.write_table(table.slice(12), pq_dir / "part-1.parquet")
    pq.write_table(table, root / "docs.parquet", row_group_size=7)  # several record batches
    with open(root / "docs.jsonl", "w") as f:
        for t, lab in zip(TEXTS, LABELS):
            f.write(json.dumps({"text": t, "label": str(lab)}) + "\n")
    with open(root / "docs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(zip(TEXTS, LABELS))
    (root / "docs.txt").write_text("\n".join(TEXTS) + "\n")
    return {"root": root, "saved": root / "saved", "dict": root / "dict", "folder": folder,
            "pq_dir": pq_dir, "parquet": root / "docs.parquet", "jsonl": root / "docs.jsonl",
            "csv": root / "docs.csv", "txt": root / "docs.txt"}


def test_parse_hf_spec():
    assert parse_hf_spec("hf:owner/name") == ("owner/name", None, "train")
    assert parse_hf_spec("hf:wikitext:wikitext-2-raw-v1@validation") == (
        "wikitext", "wikitext-2-raw-v1", "validation")
    assert parse_hf_spec("hf:owner/name@test") == ("owner/name", None, "test")
    assert parse_hf_spec("hf:/data/my.set/x:cfg", default_split="val") == (
        "/data/my.set/x", "cfg", "val")
    for bad in ("hf:", "hf:name:", "hf:name@", "hf::cfg"):
        with pytest.raises(ValueError, match=r"expected hf:NAME\[:config\]\[@split\]"):
            parse_hf_spec(bad)


def test_hf_saved_to_disk_streams(sources):
    assert list(iter_texts(f"hf:{sources['saved']}", text_column="body")) == TEXTS
    assert list(iter_texts(f"hf:{sources['saved']}", text_column="body", max_docs=4)) == \
        TEXTS[:4]
    assert list(iter_texts(f"hf:{sources['dict']}@test", text_column="body")) == TEXTS[:5]
    with pytest.raises(ValueError, match=r"no split 'validation' \(splits: \['test', 'train'\]\)"):
        list(iter_texts(f"hf:{sources['dict']}@validation", text_column="body"))
    with pytest.raises(ValueError, match=r"no text column 'text' \(columns: \['body', 'topic'\]"):
        list(iter_texts(f"hf:{sources['saved']}"))


def test_hf_local_folder_configs_and_splits(sources):
    f = sources["folder"]
    assert list(iter_texts(f"hf:{f}:de")) == TEXTS[10:30]
    assert list(iter_texts(f"hf:{f}:en@test")) == TEXTS[0:3]
    assert list(iter_texts(f"hf:{f}:de@test")) == TEXTS[10:13]
    assert list(iter_texts(f"hf:{sources['pq_dir']}")) == TEXTS
    with pytest.raises(ValueError, match="cannot stream local folder"):
        list(iter_texts(f"hf:{f}:fr"))


def test_local_parquet_file(sources):
    import pyarrow.parquet as pq

    ref = pq.read_table(sources["parquet"]).column("text").to_pylist()
    assert list(iter_texts(str(sources["parquet"]))) == ref == TEXTS
    assert list(iter_texts(str(sources["parquet"]), max_docs=9)) == TEXTS[:9]
    docs = load_corpus(str(sources["parquet"]))
    assert [d.text for d in docs] == [t.strip() for t in TEXTS]
    assert [d.label for d in docs] == [str(v) for v in LABELS]


@pytest.mark.parametrize("kind", ["saved", "parquet", "jsonl", "csv", "hf_folder"])
def test_missing_text_column_names_it(sources, kind):
    name = {"saved": f"hf:{sources['saved']}", "parquet": str(sources["parquet"]),
            "jsonl": str(sources["jsonl"]), "csv": str(sources["csv"]),
            "hf_folder": f"hf:{sources['pq_dir']}"}[kind]
    with pytest.raises(ValueError, match=r"no text column 'content' \(columns: .*(text|body)"):
        list(iter_texts(name, text_column="content"))


def test_every_source_gives_the_same_chunks(sources):
    """The same documents through every reader tokenize to the same contexts."""
    from test_harvest import word_tokenizer

    tok = word_tokenizer()
    ref = build_chunks(str(sources["txt"]), tok, ctx=8, n_chunks=40)
    assert ref.tokens.shape[0] > 10
    for name, col in ((f"hf:{sources['saved']}", "body"), (str(sources["parquet"]), None),
                      (str(sources["jsonl"]), None), (str(sources["csv"]), None),
                      (f"hf:{sources['pq_dir']}", None)):
        got = build_chunks(name, tok, ctx=8, n_chunks=40, text_column=col)
        assert torch.equal(got.tokens, ref.tokens), name
        assert torch.equal(got.doc_ids, ref.doc_ids), name


def test_corpus_from_hf_spec_maps_class_labels(sources):
    docs = load_corpus(f"hf:{sources['saved']}", text_column="body", label_column="topic")
    names = ["sport", "tech", "arts"]
    assert [d.label for d in docs] == [names[v] for v in LABELS]
    assert [d.text for d in docs] == [t.strip() for t in TEXTS]
    with pytest.raises(ValueError, match=r"no label column 'genre'"):
        load_corpus(f"hf:{sources['saved']}", text_column="body", label_column="genre")
    unlabelled = load_corpus(f"hf:{sources['pq_dir']}")
    assert {d.label for d in unlabelled} == {str(v) for v in LABELS}


def test_unreachable_hub_dataset_is_a_clear_offline_error():
    with pytest.raises(ValueError, match="cannot stream Hugging Face dataset 'nobody/nothing'"):
        list(iter_texts("hf:nobody/nothing"))
    with pytest.raises(ValueError, match="not a bundled corpus"):
        list(iter_texts("nobody/nothing"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_texts("missing.parquet"))


@pytest.fixture
def tiny_words(monkeypatch):
    """``polysae harvest --model tiny-words`` loads a tiny random model with a word tokenizer."""
    from test_harvest import word_tokenizer
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    import polysae.data.models as models

    tok = word_tokenizer()
    m = HookedTransformer(HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=16, d_head=8, n_heads=2, d_vocab=len(tok), act_fn="gelu",
        seed=0)).eval()
    m.tokenizer = tok
    real = models.load_model

    def load(name, device="cpu", dtype=torch.float32, backend="transformer_lens"):
        if name == "tiny-words":
            return models.LoadedModel(m, tok, name, "decoder")
        return real(name, device=device, dtype=dtype, backend=backend)

    monkeypatch.setattr(models, "load_model", load)
    return m


def test_cli_harvest_hf_dataset_and_missing_column(sources, tiny_words, tmp_path, capsys):
    out = tmp_path / "acts"
    assert cli_main(["harvest", "--model", "tiny-words", "--hooks", "blocks.0.hook_resid_post",
                     "--dataset", f"hf:{sources['saved']}", "--text-column", "body",
                     "--tokens", "64", "--ctx", "8", "--out", str(out), "--dtype", "float32",
                     "--no-progress"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["complete"] and man["dataset"] == f"hf:{sources['saved']}"
    assert man["n_rows"] == 64
    bad = tmp_path / "bad"
    assert cli_main(["harvest", "--model", "tiny-words", "--hooks", "blocks.0.hook_resid_post",
                     "--dataset", str(sources["parquet"]), "--text-column", "body",
                     "--tokens", "64", "--ctx", "8", "--out", str(bad), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "no text column 'body'" in err and "'text'" in err and "'label'" in err
    assert not (bad / "manifest.json").exists()
