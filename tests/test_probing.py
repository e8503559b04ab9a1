"""Probing F1: planted separable latents give F1 ~ 1, noise gives chance; splits and pooling."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from polysae.evaluation.probing import (
    PooledText,
    aggregate,
    make_split,
    make_tasks,
    pool_texts,
    probe_dataset,
    top_k_mean_diff,
)
from polysae.evaluation.wasserstein import wasserstein_1d


def _data(gen, n_per=60, classes=("a", "b", "c"), F=50, planted=True):
    labels = [c for c in classes for _ in range(n_per)]
    x = torch.rand(len(labels), F, generator=gen) * 0.1
    if planted:
        for ci, c in enumerate(classes):
            rows = [i for i, lab in enumerate(labels) if lab == c]
            x[rows, 7 + ci] += 1.0  # latent 7+ci fires only for class c
    return x, labels


def test_split_and_balanced_tasks():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 8
    sp = make_split(labels, n_train=20, n_test=5, seed=0)
    assert not set(sp.train) & set(sp.test)
    tr = Counter(labels[i] for i in sp.train)
    assert tr["a"] == 20 and tr["b"] == 20 and tr["c"] == 6   # 80/20 for the small class
    assert sp == make_split(labels, 20, 5, seed=0) != make_split(labels, 20, 5, seed=1)
    for t in make_tasks(labels, sp):
        assert t.train_y.sum() * 2 == len(t.train_y)           # balanced
        negs = Counter(labels[i] for i in t.train_idx[t.train_y == 0])
        assert t.label not in negs and sum(negs.values()) == t.train_y.sum()
        if t.label == "c":  # 6 negatives drawn evenly from a and b
            assert negs == {"a": 3, "b": 3}


def test_top_k_mean_diff_matches_bruteforce(gen):
    x = torch.randn(40, 12, generator=gen).numpy()
    y = np.array([1] * 20 + [0] * 20)
    ref = sorted(range(12), key=lambda f: -abs(x[y == 1, f].mean() - x[y == 0, f].mean()))[:3]
    assert list(top_k_mean_diff(x, y, 3)) == ref


def test_planted_latents_f1_one(gen):
    x, labels = _data(gen)
    sp = make_split(labels, 40, 20, seed=0)
    r = probe_dataset(x, labels, sp, ks=(1, 2))
    assert r["f1"]["1"] > 0.97 and r["f1"]["2"] > 0.97
    assert set(r["per_class"]) == {"a", "b", "c"}
    # W1 per class equals the batched W1 mean over latents on the train task (independent call).
    t = make_tasks(labels, sp)[0]
    ref = wasserstein_1d(x[t.train_idx[t.train_y == 1]], x[t.train_idx[t.train_y == 0]]).mean()
    assert abs(r["per_class"]["a"]["w1"] - float(ref)) < 1e-9
    assert r["w1"] == pytest.approx(np.median([v["w1"] for v in r["per_class"].values()]))


def test_noise_f1_near_chance(gen):
    x, labels = _data(gen, n_per=150, planted=False)
    sp = make_split(labels, 100, 50, seed=0)
    r = probe_dataset(x, labels, sp, ks=(1, 5))
    # Balanced binary tasks: chance F1 is ~0.5 (predicting one class gives 0 or 0.67).
    assert 0.2 < r["f1"]["5"] < 0.75 and 0.2 < r["f1"]["1"] < 0.75
    agg = aggregate({"noise": r, "noise2": r}, ks=(1, 5))
    assert agg["f1"]["1"] == pytest.approx(r["f1"]["1"]) and agg["w1"] == pytest.approx(r["w1"])


def test_pool_texts_mean_of_codes(gen):
    acts = [torch.randn(n, 4, generator=gen) for n in (3, 1, 5)]
    pooled = PooledText(acts, 9)
    enc = lambda a: torch.relu(a @ torch.ones(4, 6))  # noqa: E731
    got = pool_texts(pooled, enc, batch_tokens=2)   # chunks straddle text boundaries
    ref = torch.stack([enc(a).mean(0) for a in acts])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pool_texts(pooled), torch.stack([a.mean(0) for a in acts]))


def test_aggregate_mean_f1_median_w1():
    """F1: mean over datasets of the per-dataset macro F1; W1 (all three forms): median of the
    per-dataset class medians (values chosen so that mean != median)."""
    vals = {"a": (0.9, 1.0), "b": (0.6, 2.0), "c": (0.3, 9.0)}
    ds = {n: {"f1": {"1": f, "5": f / 2}, "w1": w, "w1_std": 10 * w, "w1_l2": w / 10}
          for n, (f, w) in vals.items()}
    agg = aggregate(ds, ks=(1, 5))
    f1s = [f for f, _ in vals.values()]
    w1s = [w for _, w in vals.values()]
    assert agg["f1"] == {"1": pytest.approx(np.mean(f1s)), "5": pytest.approx(np.mean(f1s) / 2)}
    assert agg["w1"] == pytest.approx(np.median(w1s)) != pytest.approx(np.mean(w1s))
    assert agg["w1_std"] == pytest.approx(10 * np.median(w1s))
    assert agg["w1_l2"] == pytest.approx(np.median(w1s) / 10)


def test_dataset_f1_is_macro_over_classes_and_w1_median(gen):
    """probe_dataset's F1 per k is the unweighted mean of the per-class binary F1s, and each
    per-class F1 equals a direct sklearn fit on that class's balanced task."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    x, labels = _data(gen, n_per=40, classes=("a", "b", "c", "d"))
    x[:, 7:11] += torch.rand(len(labels), 4, generator=gen) * 1.5   # partly separable
    sp = make_split(labels, 25, 15, seed=0)
    r = probe_dataset(x, labels, sp, ks=(1, 2))
    xn = x.double().numpy()
    for t in make_tasks(labels, sp):
        for k in (1, 2):
            cols = top_k_mean_diff(xn[t.train_idx], t.train_y, k)
            clf = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000)
            clf.fit(xn[t.train_idx][:, cols], t.train_y)
            ref = f1_score(t.test_y, clf.predict(xn[t.test_idx][:, cols]), average="binary")
            assert r["per_class"][t.label]["f1"][str(k)] == pytest.approx(ref)
    for k in ("1", "2"):
        assert r["f1"][k] == pytest.approx(np.mean([c["f1"][k] for c in r["per_class"].values()]))
    assert r["w1_iqr"] == pytest.approx(
        np.percentile([c["w1"] for c in r["per_class"].values()], [25, 75]).tolist())
