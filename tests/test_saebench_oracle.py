"""The real SAEBench (0.6.0, peer venv ``sae-bench``) as the oracle of our ``linear`` absorption and
TPP: SAEBench's own inner functions run on our activations with a vanilla SAE wrapped by
:class:`polysae.evaluation.saebench.SAEBenchSAE`, and our ``linear`` variant must give the same
numbers (skipped, with the reason, where the peer venv cannot be built).

SAEBench's datasets and model downloads are out of reach offline, so the inputs are ours: synthetic
activations with planted first-letter and class directions (so that absorption and TPP are not
trivially zero), the same ground-truth / class probes on both sides, and, for absorption, a
stand-in model whose ``run_with_cache`` returns our activation of the prompt's word at position -6.
SAEBench's random negative draws (``prepare_probe_data``: a fresh unseeded ``torch.randperm`` at
every call) are replaced by our fixed draw on its side; its k-sparse probes (trained by its own
``train_k_sparse_probes``) are handed to ours. Everything else is SAEBench's code.

Tolerances: the only remaining difference is arithmetic (SAEBench float32, ours float64), so
discrete outcomes (selected latents, counts, split latents, accuracies) must be equal and continuous
ones (absorption fractions, TPP drops) equal within 1e-5 (float32 rounding of O(1) values through
a few dozen operations; an accuracy is a count, which SAEBench averages in float32: 2/3 becomes
0.66666669). The probe *training* recipes are compared separately with a looser bound
(mean F1 within 0.1 for the k-sparse probes, within 0.08 for the ground-truth probe averaged over
three seeds): there the two sides draw different random initialisations and minibatches, and on
12 words per letter one draw's ground-truth F1 moves by about +-0.1 (seeds 0-3: 0.71-0.91 on
both sides).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from peers import run_peer

from polysae import SAE, SAEConfig
from polysae.evaluation import absorption as ab
from polysae.evaluation import tpp
from polysae.evaluation.saebench_probes import KSparseProbe

ROOT = Path(__file__).resolve().parents[1]

# Makes ``import polysae`` work in the peer venv (the editable install maps polysae.kernels to
# kernels/; the repository root is appended, never prepended, so nothing in it shadows the peer's
# own packages).
PRELUDE = """
import importlib.util, json, sys
ROOT = sys.argv[1]
class _Kernels:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "polysae.kernels":
            return importlib.util.spec_from_file_location(
                name, ROOT + "/kernels/__init__.py", submodule_search_locations=[ROOT + "/kernels"])
        return None
sys.meta_path.insert(0, _Kernels)
sys.path.append(ROOT)
import warnings
warnings.simplefilter("ignore")
import torch
from polysae.sae import load_checkpoint
from polysae.evaluation.saebench import SAEBenchSAE
"""

HOOK = "blocks.3.hook_resid_post"


def _aligned_sae(dirs: torch.Tensor, F: int, k: int, seed: int) -> SAE:
    """A vanilla TopK SAE whose first latents point along ``dirs`` and the rest mix one of them
    with noise (candidate absorbers)."""
    g = torch.Generator().manual_seed(seed)
    n, D = dirs.shape
    W = torch.cat([dirs, 0.8 * dirs[torch.arange(F - n) % n] + torch.randn(F - n, D, generator=g)])
    W = W / W.norm(dim=1, keepdim=True)
    sae = SAE(SAEConfig(d_in=D, d_sae=F, k=k, decoder="linear", unit_norm_decoder=True))
    with torch.no_grad():
        sae.W_enc.copy_(W.T)
        sae.decoder.W_dec.copy_(W)
        sae.b_dec.zero_()
        sae.b_enc.fill_(-0.1)
    return sae


# -- absorption -----------------------------------------------------------------------------------

ABSORPTION = PRELUDE + """
import numpy as np, pandas as pd
from pathlib import Path
from sae_bench.evals.absorption.probing import LinearProbe, train_multi_probe
from sae_bench.evals.absorption import k_sparse_probing as ksp
from sae_bench.evals.absorption import feature_absorption as fa
from sae_bench.evals.absorption.feature_absorption_calculator import FeatureAbsorptionCalculator
from sae_bench.evals.absorption.prompting import first_letter_formatter
from sae_bench.evals.absorption.main import _aggregate_results_df
from sae_bench.evals.absorption.vocab import LETTERS

d = torch.load(sys.argv[2], weights_only=True)
sae, _ = load_checkpoint(sys.argv[3])
sae = SAEBenchSAE(sae.eval(), "synthetic", d["hook"])
D = d["x_train"].shape[1]
probe = LinearProbe(D, 26)
with torch.no_grad():
    probe.fc.weight.copy_(d["gt_w"]); probe.fc.bias.copy_(d["gt_b"])
train = list(zip(d["train_words"], d["y_train"]))
test = list(zip(d["test_words"], d["y_test"]))
torch.manual_seed(0)
kprobes = ksp.train_k_sparse_probes(sae, train, d["x_train"], ks=list(range(1, 11)))
raw = ksp.eval_probe_and_sae_k_sparse_raw_scores(sae, probe, kprobes, test, d["x_test"])
meta = ksp.sae_k_sparse_metadata(sae, probe, kprobes, "s", 3)
metrics = ksp.build_metrics_df(raw, meta, max_k_value=10)
ksp.add_feature_splits_to_metrics_df(metrics, max_k_value=10, f1_jump_threshold=0.03)
out_dir = Path(sys.argv[4])
raw.to_parquet(out_dir / ksp.get_sparse_probing_raw_results_filename("s", 3))
negs = fa.get_stats_and_likely_false_negative_tokens(metrics, "s", 3, out_dir)

word_act = {w: d["x_test"][i] for i, w in enumerate(d["test_words"])}
suffix = " has the first letter:"
class StandIn:  # our activation of each prompt's word at position -6
    tokenizer = object()
    def to_tokens(self, text):
        return torch.zeros(1, 6, dtype=torch.long)
    def run_with_cache(self, prompts, names_filter):
        acts = torch.zeros(len(prompts), 6, D)
        for i, p in enumerate(prompts):
            acts[i, 0] = word_act[p.split("\\n")[-1][: -len(suffix)]]
        return None, {names_filter[0]: acts}
calc = FeatureAbsorptionCalculator(
    model=StandIn(), icl_word_list=d["train_words"], max_icl_examples=10,
    base_template="{word} has the first letter:", answer_formatter=first_letter_formatter(),
    word_token_pos=-6, full_absorption_probe_cos_sim_threshold=fa.FULL_ABSORPTION_PROBE_COS_THRESHOLD,
    absorption_fraction_probe_cos_sim_threshold=fa.ABSORPTION_FRACTION_PROBE_COS_THRESHOLD,
    probe_projection_proportion_threshold=fa.ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD,
    absorption_fraction_max_absorbing_latents=fa.ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS)
df = fa.calculate_projection_and_cos_sims(calc, sae, probe, layer=3, likely_negs=negs)
agg = _aggregate_results_df(df)
letters = {}
for _, row in agg.iterrows():   # run_eval's aggregation (letters whose probe F1 > 0.6)
    f1p = metrics[metrics["letter"] == row["letter"]]["f1_probe"].item()
    letters[row["letter"]] = {
        "counted": bool(f1p > 0.6), "absorption_fraction": float(row["mean_absorption_fraction"]),
        "full_absorption_rate": float(row["full_absorption_rate"]),
        "num_full_absorption": int(row["num_full_absorption"]),
        "num_probe_true_positives": int(row["num_probe_true_positives"]),
        "num_split_features": int(row["num_split_feats"])}
per_k = {}
for _, r in metrics.iterrows():
    per_k[r["letter"]] = {"probe_f1": float(r["f1_probe"]),
                          "sparse_f1": {str(k): float(r[f"f1_sparse_sae_{k}"]) for k in range(1, 11)},
                          "split": [int(i) for i in r["split_feats"]]}
probes = {str(k): {str(c): {"ids": p.feature_ids.tolist(), "w": p.weight.tolist(), "b": float(p.bias)}
                   for c, p in v.items()} for k, v in kprobes.items()}
# SAEBench's own ground-truth probe recipe on the same data (train_linear_probe_for_task), over
# three seeds: on 12 words per letter one draw's F1 swings by +-0.1
from sklearn.metrics import f1_score
y1h = torch.nn.functional.one_hot(torch.tensor(d["y_train"]), 26)
gt_f1 = []
for seed in range(3):
    torch.manual_seed(seed)
    gt = train_multi_probe(d["x_train"], y1h, num_probes=26, batch_size=64, num_epochs=50,
                           lr=1e-2, weight_decay=1e-4, show_progress=False, device="cpu")
    with torch.no_grad():
        gts = gt(d["x_test"])
    gt_f1 += [float(f1_score(np.array(d["y_test"]) == i, (gts[:, i] > 0).numpy()))
              for i in range(26)]
json.dump({"letters": letters, "per_k": per_k, "probes": probes, "gt_f1": gt_f1},
          open(sys.argv[5], "w"))
"""


def _words(n_per: int, tag: str) -> list[str]:
    return [f" {c}{tag}{i}" for c in ab.LETTERS for i in range(n_per)]


def test_absorption_linear_matches_saebench(tmp_path):
    g = torch.Generator().manual_seed(0)
    D, F = 48, 64
    dirs = torch.randn(26, D, generator=g)
    def make(n_per):
        y = np.repeat(np.arange(26), n_per)
        return 3 * dirs[y] + torch.randn(len(y), D, generator=g), y
    (xtr, ytr), (xte, yte) = make(12), make(8)
    sae = _aligned_sae(dirs / dirs.norm(dim=1, keepdim=True), F, 6, seed=1)
    sae.save(tmp_path / "sae")
    gt = ab.ground_truth_probe(xtr, ytr, xte, yte, seed=0)
    torch.save({"x_train": xtr, "y_train": ytr.tolist(), "x_test": xte, "y_test": yte.tolist(),
                "train_words": _words(12, "t"), "test_words": _words(8, "e"), "hook": HOOK,
                "gt_w": gt.weight, "gt_b": gt.bias}, tmp_path / "in.pt")
    (tmp_path / "sb").mkdir()
    run_peer("sae-bench", ABSORPTION, ROOT, tmp_path / "in.pt", tmp_path / "sae", tmp_path / "sb",
             tmp_path / "out.json", timeout=900)
    theirs = json.loads((tmp_path / "out.json").read_text())
    probes = {int(k): {int(c): KSparseProbe(np.array(p["ids"]), np.array(p["w"], np.float32),
                                            p["b"]) for c, p in v.items()}
              for k, v in theirs["probes"].items()}
    ours = ab.absorption_eval(sae, gt, xtr, ytr, xte, yte, probes=probes, variants=("linear",))
    lin = ours["linear"]["letters"]
    compared = 0
    for c, t in theirs["letters"].items():
        o, k = lin[c], ours["k_sparse"]
        assert o["num_split_features"] == t["num_split_features"], c
        assert k["split_features"][c] == theirs["per_k"][c]["split"], c
        assert math.isclose(k["probe_f1"][c], theirs["per_k"][c]["probe_f1"], abs_tol=1e-9), c
        for kk, f1 in theirs["per_k"][c]["sparse_f1"].items():
            assert math.isclose(k["sparse_f1"][c][kk], f1, abs_tol=1e-9), (c, kk)
        if t["num_probe_true_positives"] == 0:
            continue
        assert o["num_full_absorption"] == t["num_full_absorption"], c
        assert math.isclose(o["absorption_fraction"], t["absorption_fraction"], abs_tol=1e-5), c
        assert math.isclose(o["full_absorption_rate"], t["full_absorption_rate"], abs_tol=1e-9)
        compared += 1
    # their per-letter rows are the letters with true positives; ours count the same ones
    assert {c for c, t in theirs["letters"].items() if t["counted"]} == {
        c for c, r in lin.items() if r["counted"]}
    assert compared >= 20
    assert any(t["absorption_fraction"] > 0 for t in theirs["letters"].values())
    # the probe-training recipes agree in quality (different random draws on each side)
    sb_k1 = np.mean([r["sparse_f1"]["1"] for r in theirs["per_k"].values()])
    ours_trained = ab.absorption_eval(sae, gt, xtr, ytr, xte, yte, variants=("linear",))
    assert abs(ours_trained["k_sparse"]["mean_sparse_f1"]["1"] - sb_k1) < 0.1
    ours_f1 = [v for s in range(3)
               for v in ab.ground_truth_probe(xtr, ytr, xte, yte, seed=s).f1.values()]
    assert abs(np.mean(ours_f1) - np.mean(theirs["gt_f1"])) < 0.08


# -- TPP ------------------------------------------------------------------------------------------

TPP = PRELUDE + """
import sae_bench.evals.scr_and_tpp.main as tpp_main
import sae_bench.evals.sparse_probing.probe_training as pt
import sae_bench.sae_bench_utils.activation_collection as ac

d = torch.load(sys.argv[2], weights_only=True)
sae, _ = load_checkpoint(sys.argv[3])
sae = SAEBenchSAE(sae.eval(), "synthetic", d["hook"])
classes = d["classes"]

def fixed_prepare_probe_data(all_activations, class_name, perform_scr=False):
    # prepare_probe_data with our fixed negative draw (SAEBench redraws with torch.randperm)
    pos = all_activations[class_name]
    split = "train" if len(pos) == d["n"]["train"][class_name] else "test"
    neg = torch.stack([all_activations[c][r] for c, r in d["neg"][split][class_name]])
    x = torch.cat([pos, neg])
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).int()
    return x, y
pt.prepare_probe_data = fixed_prepare_probe_data

probes = {}
for c in classes:
    p = pt.Probe(d["x_test"][c].shape[-1], torch.float32)
    with torch.no_grad():
        p.net.weight.copy_(d["w"][c][None]); p.net.bias.fill_(d["b"][c])
    probes[c] = p
effects = tpp_main.get_all_node_effects_for_one_sae(sae, probes, classes, False, d["x_train"], 125)
clean = tpp_main.get_probe_test_accuracy(
    probes, classes, ac.create_meaned_model_activations(d["x_test"]), 500, False)
acc = tpp_main.perform_feature_ablations(probes, sae, 125, d["x_test"], effects, d["n_values"],
                                         classes, 500, False)
overall, per_class = tpp_main.create_tpp_plotting_dict(acc, clean)
selected = {c: {str(n): sorted(torch.nonzero(tpp_main.select_top_n_features(effects[c], n, c))
                               [:, 0].tolist()) for n in d["n_values"]} for c in classes}
json.dump({"effects": {c: e.tolist() for c, e in effects.items()}, "clean": clean,
           "per_class": per_class, "overall": overall, "selected": selected},
          open(sys.argv[4], "w"))
"""


def test_tpp_linear_matches_saebench(tmp_path):
    g = torch.Generator().manual_seed(0)
    D, F, L = 32, 64, 6
    n_cls, n_train, n_test = 4, 10, 6
    centers = torch.randn(n_cls, D, generator=g)
    acts, labels, train_docs, test_docs = [], [], [], []
    for c in range(n_cls):
        for i in range(n_train + n_test):
            # every document has L tokens and none is all-zero: SAEBench's masking never applies
            acts.append(1.5 * centers[c] + torch.randn(L, D, generator=g))
            labels.append(f"c{c}")
            (train_docs if i < n_train else test_docs).append(len(acts) - 1)
    setup = tpp.make_setup(acts, labels, train_docs, test_docs, seed=0)
    sae = _aligned_sae(centers / centers.norm(dim=1, keepdim=True), F, 6, seed=2)
    sae.save(tmp_path / "sae")
    n_values = [2, 5, 10, 20, 50]
    ours = tpp.tpp_eval(sae, setup, n_values, variants=("linear",))
    # SAEBench's per-class tensors [docs, L, D] hold each class's documents in index order; the
    # fixed negative draw is passed as (class, row in that class's tensor)
    split_docs = {"train": train_docs, "test": test_docs}
    rows = {s: {c: [d for d in docs if labels[d] == c] for c in setup.classes}
            for s, docs in split_docs.items()}
    where = {s: {d: (labels[d], r[labels[d]].index(d)) for d in docs}
             for s, docs in split_docs.items() for r in [rows[s]]}
    tasks = {"train": setup.train, "test": setup.test}
    for s in tasks:
        for c, t in tasks[s].items():
            assert sorted(t.pos.tolist()) == rows[s][c]
    data = {"hook": HOOK, "classes": setup.classes, "n_values": n_values,
            "x_train": {c: torch.stack([acts[d] for d in rows["train"][c]]) for c in setup.classes},
            "x_test": {c: torch.stack([acts[d] for d in rows["test"][c]]) for c in setup.classes},
            "n": {s: {c: len(rows[s][c]) for c in setup.classes} for s in rows},
            "neg": {s: {c: [where[s][int(d)] for d in tasks[s][c].neg] for c in setup.classes}
                    for s in tasks},
            "w": {c: setup.probes[c][0] for c in setup.classes},
            "b": {c: setup.probes[c][1] for c in setup.classes}}
    torch.save(data, tmp_path / "in.pt")
    run_peer("sae-bench", TPP, ROOT, tmp_path / "in.pt", tmp_path / "sae", tmp_path / "out.json",
             timeout=900)
    theirs = json.loads((tmp_path / "out.json").read_text())
    sc = tpp.scores(sae, setup, ("linear",))["linear"]
    for j, c in enumerate(setup.classes):
        torch.testing.assert_close(sc[:, j].float(), torch.tensor(theirs["effects"][c]),
                                   rtol=1e-5, atol=1e-6)
        # an accuracy is a count over the test task: SAEBench's float32 mean of 2/3 is 0.66666669
        assert math.isclose(setup.clean[c], theirs["clean"][c], abs_tol=1e-6)
    lin = ours["linear"]
    totals = []
    for c in setup.classes:
        for n in map(str, n_values):
            assert lin["selected"][c][n] == theirs["selected"][c][n], (c, n)
            t = theirs["per_class"][c]
            o = lin["classes"][c][n]
            for key, sb in (("total", "total_metric"), ("intended", "intended_diff_only"),
                            ("unintended", "unintended_diff_only")):
                assert math.isclose(o[key], t[f"tpp_threshold_{n}_{sb}"], abs_tol=1e-5), (c, n)
            totals.append(o["total"])
    for n in map(str, n_values):
        assert math.isclose(lin["total"][n], theirs["overall"][f"tpp_threshold_{n}_total_metric"],
                            abs_tol=1e-5)
    assert max(totals) > 0.1   # the planted classes make ablation matter
