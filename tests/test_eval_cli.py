"""`polysae eval` end to end on the bundled SmolLM2 with two tiny random SAEs (slow), plus the
evaluate() API on a tiny random HookedTransformer with synthetic data, and CLI errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from chartok import CharTok

from polysae import SAE, SAEConfig
from polysae.evaluation import EvalConfig, evaluate
from polysae.evaluation.report import write_report

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def tiny(make_tiny_hooked):
    return make_tiny_hooked(n_layers=1, d_model=16, d_vocab=64, n_ctx=64, seed=0)


def test_evaluate_api_on_tiny_model(tiny, tmp_path, capsys):
    torch.manual_seed(0)
    saes = {"vanilla": SAE(SAEConfig(d_in=16, d_sae=32, k=4, decoder="linear")),
            "poly": SAE(SAEConfig(d_in=16, d_sae=32, k=4, decoder="poly", ranks=(16, 4, 4)))}
    csv = tmp_path / "lab.csv"
    # Two classes made of different characters: separable from pooled activations.
    rows = ["text,label"] + [f"{'abc' * (3 + i % 4)},x" for i in range(24)] + \
        [f"{'xyz' * (3 + i % 4)},y" for i in range(24)]
    csv.write_text("\n".join(rows) + "\n")
    # Held-out activations come from a live "harvest" of a local text file.
    txt = tmp_path / "held.txt"
    txt.write_text("\n".join(f"line {i} of some held out text" for i in range(200)))
    cfg = EvalConfig(datasets=(str(csv),), probe_train_per_class=12, probe_test_per_class=6,
                     probe_ctx=16, ks=(1, 2), recon_tokens=300, live_dataset=str(txt),
                     live_ctx=16, ce_contexts=4, steering=False, progress=True, n_pairs=3)
    m = evaluate(saes, model=tiny, hook=HOOK, tokenizer=CharTok(), config=cfg, out=tmp_path / "ev")
    err = capsys.readouterr().err
    # Long stages show progress bars (tqdm on stderr).
    for bar in ("held-out activations", "CE/KL contexts", "probing texts"):
        assert bar in err and "it/s" in err, bar
    assert set(m["saes"]) == {"vanilla", "poly"}
    for s in m["saes"].values():
        rec = s["reconstruction"]
        assert rec["n_tokens"] == 300 and 0 < rec["l0"] <= 4
        assert -1e9 < rec["ce"]["ce_loss_recovered"] < 1e9
        assert set(s["probing"]["f1"]) == {"1", "2"}
    assert "r_strength_count" in m["saes"]["poly"]["interactions"]
    assert "r_strength_count" not in m["saes"]["vanilla"]["interactions"]
    # Raw activations of two disjoint character sets separate perfectly with 2 features.
    assert m["activations_baseline"]["probing"]["f1"]["2"] > 0.9
    on_disk = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert on_disk["saes"]["poly"]["reconstruction"]["fvu"] == pytest.approx(
        m["saes"]["poly"]["reconstruction"]["fvu"])
    md = (tmp_path / "ev" / "report.md").read_text()
    assert "| metric | vanilla | poly |" in md and "## Definitions" in md
    # TPP reads W_dec; neither SAE has unit-norm rows (vanilla: 0.1 at init), so both are flagged
    for n in ("vanilla", "poly"):
        assert not m["saes"][n]["decoder_norms"]["unit_norm"]
        if "skipped" not in m["saes"][n].get("tpp", {"skipped": "not run"}):
            assert any(w.startswith(f"{n}: tpp ran on W_dec rows that are not unit norm")
                       for w in m["warnings"]) and "## Warnings" in md
    for png in ("f1.png", "w1.png", "density.png", "interactions.png"):
        assert (tmp_path / "ev" / png).read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "ev").glob(".*tmp"))
    _check_documented_keys(on_disk)
    # Every metric row of the report's tables has a definition printed under "## Definitions".
    from polysae.evaluation.report import DEFINITIONS

    defs = md.split("## Definitions")[1]
    for section in ("## Reconstruction", "## Interactions"):
        body = md.split(section)[1].split("\n## ")[0]
        rows = [r.split("|")[1].strip() for r in body.splitlines()
                if r.startswith("| ") and not r.startswith(("| metric", "| i ", "|  |"))]
        rows = [r for r in rows if not r.isdigit()]   # top-pair rows start with a latent id
        assert len(rows) >= 5, section
        for r in rows:
            assert r in DEFINITIONS and f"- **{r}**:" in defs, (section, r)
    # The report rebuilds from metrics.json alone (no plots data needed).
    write_report(on_disk, tmp_path / "ev2")
    assert (tmp_path / "ev2" / "report.md").read_text().split("\n")[3:] == md.split("\n")[3:]


# Stable metrics.json keys (schema_version 1); docs/evaluation.md "The metrics.json schema"
# documents each of them.
TOP_KEYS = {"schema_version", "date", "polysae_version", "torch_version", "model", "backend",
            "hook",
            "device", "config", "saes", "held_out", "activations_baseline", "probing_sizes",
            "timings_s", "plots"}
OPTIONAL_TOP_KEYS = {"warnings",  # only when there is something to warn about
                     "absorption_setup", "tpp_setup"}  # only when those stages ran
RECON_KEYS = {"n_tokens", "mse_per_token", "mse_saebench", "saebench_batch_tokens", "fvu",
              "explained_variance", "l0", "dead_fraction", "dense_fraction", "dense_threshold",
              "density_histogram", "ce"}
CE_KEYS = {"ce_clean", "ce_sae", "ce_zero", "ce_loss_recovered", "kl_sae", "kl_zero",
           "kl_recovered", "n_tokens"}
INTER_KEYS = {"n_pairs", "n_tokens", "min_count", "r_cov_count", "r_cov_logcount", "definition",
              "top_pairs"}
PROBE_KEYS = {"f1", "w1", "w1_std", "w1_l2", "datasets"}
PROBE_DS_KEYS = {"f1", "w1", "w1_std", "w1_l2", "w1_iqr", "n_train", "n_test", "per_class"}


def _check_documented_keys(m):
    """Pin the key sets and check every fixed key name appears in the metrics.json block of
    docs/evaluation.md."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    block = page.split("## The `metrics.json` schema")[1].split("```")[1]
    documented = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", block))
    assert set(m) - OPTIONAL_TOP_KEYS == TOP_KEYS
    names = [n for n in m["saes"]]
    seen = set(TOP_KEYS)
    for n in names:
        s = m["saes"][n]
        rec, inter, probe = s["reconstruction"], s["interactions"], s["probing"]
        assert set(rec) == RECON_KEYS and set(rec["ce"]) == CE_KEYS
        assert set(rec["density_histogram"]) == {"log10_edges", "counts", "dead"}
        poly = s["info"]["decoder"] == "poly"
        assert set(inter) == INTER_KEYS | ({"r_strength_count", "r_strength_logcount"}
                                           if poly else set())
        assert set(probe) == PROBE_KEYS
        assert set(s["decoder_norms"]) == {"min", "max", "mean", "unit_norm", "warning"}
        for ds in probe["datasets"].values():
            assert set(ds) == PROBE_DS_KEYS
            for c in ds["per_class"].values():
                assert set(c) == {"f1", "w1", "w1_std", "w1_l2"}
        for p in inter["top_pairs"]:
            assert set(p) == {"i", "j", "strength", "count", "contexts"}
        seen |= set(s) | set(s["info"]) | set(rec) | set(rec["ce"]) | set(inter) | set(probe)
        seen |= set(rec["density_histogram"]) | PROBE_DS_KEYS | set(s["decoder_norms"])
    for ds in m["probing_sizes"].values():
        seen |= set(ds)
    seen |= set(m["held_out"]) | (set(m) & OPTIONAL_TOP_KEYS)
    seen |= _saebench_keys(m)
    assert seen - documented == set(), "undocumented metrics.json keys"


def _saebench_keys(m) -> set[str]:
    """Keys of the absorption and TPP blocks (tests/test_saebench_metrics.py checks values)."""
    seen: set[str] = set()
    if "tpp_setup" in m:
        seen |= set(m["tpp_setup"])
        for ds in m["tpp_setup"]["datasets"].values():
            seen |= set(ds)
    if "absorption_setup" in m:
        seen |= set(m["absorption_setup"])
    for s in m["saes"].values():
        for key in ("absorption", "tpp"):
            block = s.get(key, {})
            seen |= set(block)
            for v in ("linear", "full", "difference", "k_sparse"):
                seen |= set(block.get(v, {}))
            for v in ("linear", "full"):
                for r in block.get(v, {}).get("letters", {}).values():
                    seen |= set(r)
                for d in block.get(v, {}).get("datasets", {}).values():
                    seen |= set(d)
                    for c in d["classes"].values():
                        for r in c.values():
                            seen |= set(r)
    return seen


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "polysae", "eval", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def test_cli_errors(tmp_path):
    r = _cli("--sae", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--sae" in r.stderr and "missing" in r.stderr
    torch.manual_seed(0)
    SAE(SAEConfig(d_in=8, d_sae=16, k=2)).save(tmp_path / "ck")   # no model/hook metadata
    r = _cli("--sae", str(tmp_path / "ck"), "--out", str(tmp_path / "o"), "--ks", "0")
    assert r.returncode == 2 and "--ks" in r.stderr
    (tmp_path / "bad.jsonl").write_text('{"name": "a", "word_i": " x"}\n')
    r = _cli("--sae", str(tmp_path / "ck"), "--out", str(tmp_path / "o"),
             "--concepts", str(tmp_path / "bad.jsonl"))
    assert r.returncode == 2 and "--concepts" in r.stderr and "bad.jsonl: line 1" in r.stderr
    r = _cli("--sae", str(tmp_path / "ck"), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "hook" in r.stderr
    assert not (tmp_path / "o" / "metrics.json").exists()


@pytest.mark.slow
def test_cli_smollm2_end_to_end(tmp_path):
    torch.manual_seed(0)
    meta = {"model": "smollm2-135m", "hook": "blocks.3.hook_resid_post", "dataset": "bbc"}
    SAE(SAEConfig(d_in=576, d_sae=256, k=8, decoder="linear")).save(tmp_path / "run" / "vanilla",
                                                                    metadata=meta)
    SAE(SAEConfig(d_in=576, d_sae=256, k=8, decoder="poly")).save(tmp_path / "run2" / "poly",
                                                                  metadata=meta)
    r = _cli("--sae", str(tmp_path / "run2"), "--baseline", str(tmp_path / "run"),
             "--out", str(tmp_path / "ev"), "--datasets", "bbc", "--train-per-class", "6",
             "--test-per-class", "4", "--probe-ctx", "24", "--tokens", "512",
             "--ce-contexts", "2", "--pairs", "3", "--alphas", "1", "--no-progress",
             "--absorption-train-words", "64", "--absorption-test-words", "32",
             "--absorption-icl", "3", "--tpp-n-values", "2", "20")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert list(m["saes"]) == ["vanilla", "poly"] and m["model"] == "smollm2-135m"
    for s in m["saes"].values():
        ce = s["reconstruction"]["ce"]
        # An untrained SAE is no better than zero-ablation by much; clean CE on BBC is sane.
        assert 1.0 < ce["ce_clean"] < 6.0 and ce["ce_loss_recovered"] < 0.9
    st = m["steering"]
    assert st["summary"]["none"]["mean_log2_rank"] >= 0 and len(st["concepts"]) == 5
    assert all(len(c["saes"]["poly"]["ranks"][0]) == 1 for c in st["concepts"])
    assert "poly" in (tmp_path / "ev" / "report.md").read_text()
    # SAEBench absorption on SmolLM2's vocabulary and TPP on bbc, both variants, both SAEs
    assert m["absorption_setup"]["train_words"] == 64 and not m["absorption_setup"][
        "missing_letters"]
    for s in m["saes"].values():
        assert {"linear", "full", "difference"} <= set(s["absorption"])
        assert set(s["tpp"]["linear"]["total"]) == {"2", "20"}
    v = m["saes"]["vanilla"]
    assert v["absorption"]["linear"] == v["absorption"]["full"]
    assert v["tpp"]["difference"]["max_abs_total"] == 0


def test_evaluate_with_activation_store(tiny, tmp_path):
    """--acts: reconstruction runs on the store's held-out val split, rows in store order."""
    import numpy as np

    from polysae.data.harvesting import HarvestConfig, harvest
    from polysae.data.store import ActivationStore
    from polysae.evaluation.reconstruction import reconstruction_stats

    npy = tmp_path / "tok.npy"
    np.save(npy, np.random.default_rng(0).integers(3, 64, size=(40, 16)))
    harvest(HarvestConfig(model="tiny", hooks=[HOOK], dataset=str(npy), tokens=40 * 16, ctx=16,
                          out=str(tmp_path / "acts"), batch_size=8, shard_size=64,
                          dtype="float32", progress=False), model=tiny)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=4))
    cfg = EvalConfig(datasets=(), recon_tokens=50, steering=False, progress=False, n_pairs=2)
    import polysae

    # The package-level name is the function (the module is polysae.evaluation).
    m = polysae.evaluate({"poly": sae}, model=tiny, hook=HOOK, acts=str(tmp_path / "acts"),
                         config=cfg)
    assert m["held_out"]["source"].startswith("store:") and m["held_out"]["n_tokens"] == 50
    val = ActivationStore(tmp_path / "acts", HOOK, split="val").read_rows(0, 50)
    ref = reconstruction_stats(sae, [val])
    assert m["saes"]["poly"]["reconstruction"]["fvu"] == pytest.approx(ref.fvu)
    assert "ce" not in m["saes"]["poly"]["reconstruction"]   # no tokenizer: no CE text
    assert len(m["saes"]["poly"]["interactions"]["top_pairs"]) == 2


def test_evaluate_hf_dataset_columns_and_unlabelled_error(tiny, tmp_path, monkeypatch):
    """Probing on a Hugging Face dataset by name (load_dataset replaced by an in-memory dataset)
    with non-default text/label columns; an unlabelled file fails naming the file and flag."""
    import datasets

    texts = [("abc" * (3 + i % 4), 0) for i in range(20)] + [("xyz" * (3 + i % 4), 1)
                                                          for i in range(20)]
    ds = datasets.Dataset.from_dict(
        {"body": [t for t, _ in texts], "kind": [y for _, y in texts]},
        features=datasets.Features({"body": datasets.Value("string"),
                                    "kind": datasets.ClassLabel(names=["abc", "xyz"])}))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split=None: ds)
    txt = tmp_path / "held.txt"
    txt.write_text("\n".join(f"line {i} of some held out text" for i in range(100)))
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=4))
    cfg = EvalConfig(datasets=("someone/toy:train",), text_column="body", label_column="kind",
                     probe_train_per_class=10, probe_test_per_class=5, probe_ctx=16, ks=(1, 2),
                     recon_tokens=100, live_dataset=str(txt), live_ctx=16, ce_contexts=0,
                     interactions=False, steering=False, progress=False)
    m = evaluate({"v": sae}, model=tiny, hook=HOOK, tokenizer=CharTok(), config=cfg)
    sizes = m["probing_sizes"]["someone/toy:train"]
    assert sizes["classes"] == ["abc", "xyz"] and sizes["train_docs"] == 20
    assert m["activations_baseline"]["probing"]["f1"]["2"] > 0.9
    plain = tmp_path / "plain.csv"
    plain.write_text("text\n" + "\n".join(f"doc {i}" for i in range(30)) + "\n")
    cfg2 = EvalConfig(datasets=(str(plain),), recon_tokens=100, live_dataset=str(txt),
                      live_ctx=16, ce_contexts=0, interactions=False, steering=False,
                      progress=False)
    with pytest.raises(ValueError, match=r"plain\.csv.*two classes.*--label-column"):
        evaluate({"v": sae}, model=tiny, hook=HOOK, tokenizer=CharTok(), config=cfg2)


def test_held_out_text_comes_from_the_training_dataset_or_says_why_not(tiny, tmp_path):
    """Without --live-dataset, held-out text and CE contexts come from the dataset (and text
    column) the checkpoint records, here a parquet file; an unreadable one falls back to the
    bundled bbc corpus and metrics.json says so."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [f"parquet document {i} about q" for i in range(300)]}),
                   tmp_path / "train.parquet")
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=4))
    cfg = EvalConfig(datasets=(), recon_tokens=120, live_ctx=16, ce_contexts=2,
                     interactions=False, steering=False, progress=False)
    for dataset, want, fallback in ((str(tmp_path / "train.parquet"), None, None),
                                    (str(tmp_path / "gone.parquet"), "bbc", "gone.parquet")):
        ck = tmp_path / f"ck-{Path(dataset).stem}"
        sae.save(ck, metadata={"dataset": dataset, "text_column": "body", "hook": HOOK})
        m = evaluate(str(ck), model=tiny, hook=HOOK, tokenizer=CharTok(), config=cfg)
        text = m["held_out"]["text"]
        assert text["dataset"] == (want or dataset)
        assert m["held_out"]["source"].startswith(f"live:{want or dataset} ")
        if fallback is None:
            assert text["fallback"] is None
        else:
            assert fallback in text["fallback"] and "cannot be read" in text["fallback"]
    # the numbers are the parquet's: the same file passed explicitly (column renamed to the
    # default "text") gives identical reconstruction and CE numbers, bbc different ones
    pq.write_table(pa.table({"text": [f"parquet document {i} about q" for i in range(300)]}),
                   tmp_path / "explicit.parquet")
    ck = tmp_path / "ck-train"
    runs = {name: evaluate(str(ck), model=tiny, hook=HOOK, tokenizer=CharTok(),
                           config=dataclasses.replace(cfg, live_dataset=ds))
            for name, ds in (("recorded", None), ("explicit", str(tmp_path / "explicit.parquet")),
                             ("bbc", "bbc"))}
    rec = {n: r["saes"]["sae"]["reconstruction"] for n, r in runs.items()}
    assert rec["recorded"]["fvu"] == rec["explicit"]["fvu"] != rec["bbc"]["fvu"]
    assert rec["recorded"]["ce"]["ce_clean"] == rec["explicit"]["ce"]["ce_clean"]
