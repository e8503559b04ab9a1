"""`polysae replicate` end to end at toy size on a tiny random HookedTransformer: every cell of the
table equals a separate train + evaluate run with the same seed; summaries and paired intervals
equal numpy/scipy on the cells' numbers; a re-run skips every cell; bad flags fail clearly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from chartok import CharTok

from polysae import SAE, SAEConfig
from polysae.data.harvesting import HarvestConfig, harvest
from polysae.data.models import LoadedModel
from polysae.data.store import ActivationStore
from polysae.evaluation import EvalConfig, evaluate
from polysae.replicate import ReplicateConfig, replicate
from polysae.training import TrainConfig, Trainer

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def setup(make_tiny_hooked, tmp_path_factory):
    tiny = make_tiny_hooked(n_layers=1, d_model=16, d_vocab=64, n_ctx=32, seed=0)
    root = tmp_path_factory.mktemp("rep")
    npy = root / "tokens.npy"
    np.save(npy, np.random.default_rng(0).integers(3, 64, size=(160, 16)))
    acts = root / "acts"
    harvest(HarvestConfig(model="tiny", hooks=[HOOK], dataset=str(npy), tokens=160 * 16, ctx=16,
                          out=str(acts), dtype="float32", shard_size=256, progress=False),
            model=tiny)
    csv = root / "lab.csv"
    rows = ["text,label"] + [f"{'abc' * (2 + i % 4)}{i},x" for i in range(16)] + \
        [f"{'xyz' * (2 + i % 4)}{i},y" for i in range(16)] + \
        [f"{'mno' * (2 + i % 4)}{i},z" for i in range(16)]
    csv.write_text("\n".join(rows) + "\n")
    txt = root / "held.txt"
    txt.write_text("\n".join(f"line {i} of some held out text" for i in range(100)))
    ecfg = EvalConfig(datasets=(str(csv),), probe_train_per_class=8, probe_test_per_class=4,
                      probe_ctx=12, ks=(1, 2), recon_tokens=256, live_dataset=str(txt),
                      live_ctx=16, ce_contexts=2, steering=False, n_pairs=2, progress=False)
    tcfg = TrainConfig(lr=1e-3, normalize=True, dead_window=4, checkpoint_every=6, log_every=3)
    lm = LoadedModel(tiny, CharTok(), "tiny", "decoder")
    return tiny, lm, acts, ecfg, tcfg, root


def _cfg(setup, out, **kw):
    _, _, acts, ecfg, tcfg, _ = setup
    base = dict(out=str(out), acts=str(acts), sparsifiers=("topk", "batchtopk"), seeds=2,
                seed_base=3, batch_size=64, epochs=1.0,
                sae={"d_sae": 32, "k": 4, "ranks": (16, 4, 4)}, train=tcfg, eval=ecfg,
                progress=False)
    base.update(kw)
    return ReplicateConfig(**base)


def test_replicate_cells_equal_separate_runs(setup, tmp_path):
    _, lm, acts, ecfg, tcfg, _ = setup
    cfg = _cfg(setup, tmp_path / "rep")
    res = replicate(cfg, model=lm)
    t = res.table
    out = res.out
    for rel in ("replicate.json", "replicate.md", "paired_f1.png"):
        assert (out / rel).exists(), rel
    assert json.loads((out / "replicate.json").read_text()) == t
    assert [(c.sparsifier, c.seed) for c in res.cells] == [
        ("topk", 3), ("topk", 4), ("batchtopk", 3), ("batchtopk", 4)]

    # Each cell == an independent train + evaluate with the same seed (same init order, same
    # data order), through the public API.
    n_rows = ActivationStore(acts, HOOK, split="train").n_rows
    for si, (sp, seed) in enumerate([("topk", 3), ("batchtopk", 4)]):
        store = ActivationStore(acts, HOOK, batch_size=64, split="train", seed=seed)
        common = dict(d_in=16, d_sae=32, k=4, ranks=(16, 4, 4), sparsifier=sp)
        torch.manual_seed(seed)
        saes = {"vanilla": SAE(SAEConfig(decoder="linear", **common)),
                "poly": SAE(SAEConfig(decoder="poly", **common))}
        sep = tmp_path / f"sep{si}"
        tc = TrainConfig(**{**tcfg.to_dict(), "seed": seed, "progress": False,
                            "steps": n_rows // 64})
        Trainer(saes, tc, sep).fit(store)
        m = evaluate({n: str(sep / n) for n in saes}, model=lm, hook=HOOK, acts=str(acts),
                     config=ecfg)
        block = t["sparsifiers"][sp]["metrics"]
        idx = t["sparsifiers"][sp]["seeds"].index(seed)
        for dec in ("vanilla", "poly"):
            s = m["saes"][dec]
            want = {"f1_k1": s["probing"]["f1"]["1"], "f1_k2": s["probing"]["f1"]["2"],
                    "fvu": s["reconstruction"]["fvu"],
                    "mse_saebench": s["reconstruction"]["mse_saebench"],
                    "ce_recovered": s["reconstruction"]["ce"]["ce_loss_recovered"],
                    "dead_fraction": s["reconstruction"]["dead_fraction"],
                    "w1": s["probing"]["w1"], "w1_std": s["probing"]["w1_std"],
                    "r_cov_count": s["interactions"]["r_cov_count"]}
            for key, v in want.items():
                got = block[key]["values"][dec][idx]
                assert got == pytest.approx(v, rel=1e-6, abs=1e-9), (sp, seed, dec, key)

    # Summaries and paired differences vs numpy / scipy on the cell values.
    from scipy import stats

    for sp, block in t["sparsifiers"].items():
        for key in ("f1_k1", "fvu", "w1"):
            e = block["metrics"][key]
            a, b = np.array(e["values"]["vanilla"]), np.array(e["values"]["poly"])
            assert e["vanilla"]["mean"] == pytest.approx(a.mean())
            assert e["poly"]["std"] == pytest.approx(b.std(ddof=1), abs=1e-12)
            d = e["diff"]
            assert d["mean"] == pytest.approx((b - a).mean(), abs=1e-12)
            if np.std(b - a) > 0:
                ci = stats.ttest_rel(b, a).confidence_interval(0.95)
                assert (d["t_low"], d["t_high"]) == pytest.approx((ci.low, ci.high))
    md = (out / "replicate.md").read_text()
    assert "Δ poly − vanilla" in md and "W1 (paper)" in md and "Protocol" in md
    # the code-scale block is measured for every SAE
    assert t["sparsifiers"]["topk"]["metrics"]["share_higher"]["vanilla"]["mean"] == 0.0
    assert t["sparsifiers"]["topk"]["metrics"]["share_higher"]["poly"]["mean"] > 0.0

    # A re-run skips every cell and reproduces the table.
    again = replicate(cfg, model=lm)
    assert all(c.skipped for c in again.cells)
    strip = lambda d: {k: v for k, v in d.items() if k not in ("date", "seconds")}  # noqa: E731
    assert strip(again.table) == strip(t)


def test_replicate_resumes_an_interrupted_cell(setup, tmp_path, monkeypatch):
    """A crash in the second cell's evaluation: the re-run skips the first cell and finishes."""
    _, lm, *_ = setup
    cfg = _cfg(setup, tmp_path / "rep", sparsifiers=("topk",))
    import polysae.evaluation as ev

    real = ev.evaluate
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(ev, "evaluate", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        replicate(cfg, model=lm)
    assert not (tmp_path / "rep" / "replicate.json").exists()
    monkeypatch.setattr(ev, "evaluate", real)
    res = replicate(cfg, model=lm)
    assert [c.skipped for c in res.cells] == [True, False]


@pytest.mark.parametrize("kw, msg", [
    ({"seeds": 1}, "seeds must be >= 2"),
    ({"sparsifiers": ("topk", "gated")}, r"unknown \['gated'\]"),
    ({"sparsifiers": ("relu",)}, r"unknown \['relu'\]"),
    ({"sae": {"d_sae": 8, "k": 16}}, "k"),
    ({"sae": {"decoder": "linear"}}, "set per cell"),
    ({"epochs": 0}, "epochs must be > 0"),
])
def test_bad_config_is_named(setup, tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        _cfg(setup, tmp_path / "x", **kw)


def test_cli_errors(setup, tmp_path, capsys):
    from polysae.__main__ import main

    _, _, acts, *_ = setup
    assert main(["replicate", "--acts", str(acts), "--seeds", "1", "--out",
                 str(tmp_path / "a")]) != 0
    assert "seeds must be >= 2" in capsys.readouterr().err
    assert main(["replicate", "--acts", str(acts), "--sparsifiers", "topk", "bogus",
                 "--out", str(tmp_path / "b")]) != 0
    assert "bogus" in capsys.readouterr().err
    assert main(["replicate", "--acts", str(acts), "--hook", "blocks.7.hook_resid_post",
                 "--model", "smollm2-135m", "--no-eval.steering", "--out",
                 str(tmp_path / "c")]) != 0
    err = capsys.readouterr().err
    assert "blocks.7.hook_resid_post" in err and HOOK in err
    assert main(["replicate", "--acts", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "d")]) != 0
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "c" / "cells").exists()


def test_cli_flags_build_the_config():
    """Every nested flag lands in its config; defaults equal ReplicateConfig()'s."""
    from polysae.__main__ import build_parser
    from polysae.cli.replicate import build_config

    p = build_parser()
    cfg = build_config(p.parse_args(["replicate"]))
    d = ReplicateConfig()
    assert cfg == d
    cfg = build_config(p.parse_args([
        "replicate", "--sparsifiers", "topk", "matryoshka", "--seeds", "5", "--sae.d-sae", "64",
        "--sae.ranks", "16", "4", "4", "--train.lr", "0.01", "--eval.ks", "1", "3",
        "--harvest.tokens", "777", "--no-eval.steering", "--no-train.normalize"]))
    assert cfg.sparsifiers == ("topk", "matryoshka") and cfg.seeds == 5
    assert cfg.sae == {"d_sae": 64, "k": 32, "ranks": (16, 4, 4)}
    assert cfg.train.lr == 0.01 and cfg.train.normalize is False
    assert cfg.train.dead_window == d.train.dead_window
    assert cfg.eval.ks == (1, 3) and cfg.eval.steering is False
    assert cfg.harvest.tokens == 777
    assert not math.isnan(cfg.confidence)


def test_steering_over_seeds_from_summaries(tmp_path):
    """The steering block of replicate: per-seed numbers of each SAE/mode and the paired
    difference of PolySAE's modes against vanilla linear steering, from real summaries built by
    polysae.evaluation.steering.summarise on synthetic ranks."""
    from polysae.evaluation.steering import summarise
    from polysae.replicate.compare import steering_summary
    from polysae.replicate.config import CellResult

    rng = np.random.default_rng(0)
    roles = ["report", "select", "select", "report", "report"]
    scales = [0.5, 1.0]
    cells, want = [], {"poly:pair": [], "vanilla:linear": []}
    for seed in range(3):
        base = rng.integers(50, 500, size=(4, 5)).tolist()
        cases = {"vanilla": {"linear": rng.integers(1, 500, size=(4, 5, 2)).tolist()},
                 "poly": {m: rng.integers(1, 500, size=(4, 5, 2)).tolist()
                          for m in ("linear", "pair", "linear+pair")}}
        s = summarise(base, cases, roles, scales, scales, {"vanilla": "linear", "poly": "poly"})
        want["poly:pair"].append(s["saes"]["poly"]["pair"]["report_mean_log2_rank"])
        want["vanilla:linear"].append(s["saes"]["vanilla"]["linear"]["report_mean_log2_rank"])
        cells.append(CellResult("topk", seed, tmp_path, {"steering": {"summary": s}}, True))
    cfg = ReplicateConfig(sparsifiers=("topk",))
    st = steering_summary(cells, cfg)
    assert set(st) >= {"none", "vanilla:linear", "poly:linear", "poly:pair", "poly:linear+pair"}
    for key, vals in want.items():
        e = st[key]["report_mean_log2_rank"]
        assert e["values"] == pytest.approx(vals)
        assert e["mean"] == pytest.approx(np.mean(vals))
    d = st["poly_minus_vanilla_linear"]["pair"]
    diff = np.array(want["poly:pair"]) - np.array(want["vanilla:linear"])
    assert d["mean"] == pytest.approx(diff.mean())
    from scipy import stats

    ci = stats.ttest_rel(want["poly:pair"], want["vanilla:linear"]).confidence_interval()
    assert (d["t_low"], d["t_high"]) == pytest.approx((ci.low, ci.high))
    # a cell without steering: no steering block
    cells.append(CellResult("topk", 9, tmp_path, {}, True))
    assert steering_summary(cells, cfg) is None


def test_protocol_table_names_the_batchtopk_evaluation_the_run_used():
    """replicate.md says which BatchTopK evaluation its numbers come from (ours or the paper's)."""
    import copy
    import json
    from pathlib import Path

    from polysae.replicate.report import render_markdown

    table = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results"
                        / "replicate_cpu.json").read_text())
    row = [line for line in render_markdown(table).splitlines()
           if line.startswith("| BatchTopK/Matryoshka at eval")]
    assert len(row) == 1 and "learned threshold per token (this run)" in row[0]
    batch = copy.deepcopy(table)
    batch["config"]["sae"]["batchtopk_inference"] = "batch"
    row = [line for line in render_markdown(batch).splitlines()
           if line.startswith("| BatchTopK/Matryoshka at eval")]
    assert len(row) == 1 and "as the paper (this run)" in row[0]


def test_absorption_and_tpp_both_variants_with_paired_intervals(tmp_path):
    """replicate.json carries SAEBench absorption and TPP in both variants for each decoder, with
    the paired poly − vanilla interval equal to scipy's on the per-seed values; replicate.md
    shows them."""
    from scipy import stats

    from polysae.replicate.compare import compare
    from polysae.replicate.config import CellResult
    from polysae.replicate.report import render_markdown

    rng = np.random.default_rng(1)
    cells, vals = [], {}
    for seed in range(4):
        saes = {}
        for dec in ("vanilla", "poly"):
            a = {v: float(rng.uniform(0, 0.5)) for v in ("linear", "full")}
            t = {v: {n: float(rng.uniform(-0.1, 0.4)) for n in ("2", "20")}
                 for v in ("linear", "full")}
            saes[dec] = {"absorption": {v: {"mean_absorption_fraction": a[v],
                                            "mean_full_absorption_rate": a[v] / 2}
                                        for v in a},
                         "tpp": {v: {"total": t[v]} for v in t}}
            for v in a:
                vals.setdefault(("absorption", v, dec), []).append(a[v])
                vals.setdefault(("tpp_20", v, dec), []).append(t[v]["20"])
        cells.append(CellResult("topk", seed, tmp_path, {"saes": saes}, True))
    table = compare(cells, ReplicateConfig(sparsifiers=("topk",), seeds=4))
    assert table["tpp_n_values"] == ["2", "20"]
    block = table["sparsifiers"]["topk"]["metrics"]
    for key in ("absorption", "tpp_20"):
        for v in ("linear", "full"):
            e = block[f"{key}:{v}"]
            a, b = vals[(key, v, "vanilla")], vals[(key, v, "poly")]
            assert e["values"] == {"vanilla": pytest.approx(a), "poly": pytest.approx(b)}
            ci = stats.ttest_rel(b, a).confidence_interval(0.95)
            assert (e["diff"]["t_low"], e["diff"]["t_high"]) == pytest.approx((ci.low, ci.high))
    assert table["metrics"]["absorption:full"]["protocol"] == "polysae"
    assert table["metrics"]["tpp_2:linear"]["higher_is_better"] is True
    md = render_markdown(table)
    assert "SAEBench absorption and TPP" in md and "TPP@20 (full) †" in md
