"""The comparison protocol against independent references: paired intervals vs scipy; the paper's
W1 aggregation and the interaction r's vs direct numpy/scipy implementations of their formulas;
code-scale / term-share statistics vs dense decoder formulas; config flags and their help."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from polysae import SAE, SAEConfig
from polysae.replicate.codescale import code_scale
from polysae.replicate.paired import bootstrap_interval, paired_diff, summarize, t_interval


# -- paired statistics --------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 5, 12])
def test_paired_t_interval_and_p_match_scipy(n):
    rng = np.random.default_rng(n)
    a = rng.normal(0.7, 0.05, n)
    b = a + rng.normal(0.02, 0.03, n)
    d = paired_diff(a, b)
    ref = stats.ttest_rel(b, a)
    ci = ref.confidence_interval(0.95)
    assert (d.t_low, d.t_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert d.p_t == pytest.approx(ref.pvalue, rel=1e-10)
    assert d.mean == pytest.approx(np.mean(b - a)) and d.std == pytest.approx(np.std(b - a,
                                                                                     ddof=1))
    assert d.wins == int(np.sum(b > a)) and d.n == n
    assert d.a.mean == pytest.approx(a.mean()) and d.b.std == pytest.approx(b.std(ddof=1))
    lo, hi = t_interval(b - a, 0.9)
    ci90 = ref.confidence_interval(0.9)
    assert (lo, hi) == pytest.approx((ci90.low, ci90.high), rel=1e-10)


def test_bootstrap_interval_matches_scipy_percentile():
    rng = np.random.default_rng(1)
    d = rng.normal(0.1, 1.0, 40)
    lo, hi = bootstrap_interval(d, 0.95, n_boot=40_000, seed=0)
    ref = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=40_000,
                          method="percentile", random_state=1).confidence_interval
    se = d.std(ddof=1) / math.sqrt(d.size)
    # Two Monte Carlo estimates of the same quantiles: equal to a small fraction of the SE.
    assert lo == pytest.approx(ref.low, abs=0.05 * se)
    assert hi == pytest.approx(ref.high, abs=0.05 * se)
    # With 2 values the resampled means take 3 values: the interval spans them exactly.
    lo2, hi2 = bootstrap_interval(np.array([0.0, 1.0]), 0.95, n_boot=20_000)
    assert (lo2, hi2) == (0.0, 1.0)


def test_paired_diff_drops_missing_seeds_and_checks_inputs():
    d = paired_diff([0.5, None, 0.7, float("nan")], [0.6, 0.9, 0.75, 0.8])
    assert d.n == 2 and d.mean == pytest.approx(0.075)
    assert summarize([1.0, None, 3.0]) == (2, 2.0, pytest.approx(math.sqrt(2)))
    one = paired_diff([0.5], [0.6])
    assert one.n == 1 and math.isnan(one.t_low) and math.isnan(one.p_t)
    flat = paired_diff([0.5, 0.6], [0.6, 0.7])  # identical differences: zero-width interval
    assert flat.t_low == pytest.approx(0.1) and flat.t_high == pytest.approx(0.1)
    assert flat.excludes_zero and math.isnan(flat.p_t)
    with pytest.raises(ValueError, match="3 values for A but 2 for B"):
        paired_diff([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="confidence"):
        paired_diff([1, 2], [1, 2], confidence=95)


# -- the paper's W1 aggregation ------------------------------------------------------------------
def _w1_reference(feats: np.ndarray, labels: list[str], split, seed: int) -> float:
    """The paper's per-dataset W1 written directly: for each one-vs-rest task on the train split
    (balanced negatives), scipy's W1 per latent between positives and negatives, mean over all
    latents, then the median over classes."""
    from polysae.evaluation.probing import make_tasks

    per_class = []
    for t in make_tasks(labels, split, seed=seed):
        pos = feats[t.train_idx[t.train_y == 1]]
        neg = feats[t.train_idx[t.train_y == 0]]
        per_class.append(np.mean([stats.wasserstein_distance(pos[:, f], neg[:, f])
                                  for f in range(feats.shape[1])]))
    return float(np.median(per_class))


def test_w1_follows_the_papers_definition():
    from polysae.evaluation.probing import aggregate, make_split, probe_dataset

    rng = np.random.default_rng(0)
    per = {}
    refs = []
    for di, n_cls in enumerate((3, 4, 2)):
        labels = [f"c{i % n_cls}" for i in range(n_cls * 20)]
        F = 37
        # Sparse nonnegative pooled codes (most latents zero in most texts), class-shifted.
        z = rng.gamma(1.0, 1.0, size=(len(labels), F)) * (rng.random((len(labels), F)) < 0.3)
        z += np.array([[0.3 * (int(lab[1:]) == f % n_cls) for f in range(F)] for lab in labels])
        z[:, 5] = 0.0  # a dead latent counts as 0 in the mean over latents
        split = make_split(labels, 12, 6, seed=di)
        res = probe_dataset(torch.tensor(z, dtype=torch.float32), labels, split, ks=(1,),
                            seed=di)
        ref = _w1_reference(z.astype(np.float32).astype(np.float64), labels, split, di)
        assert res["w1"] == pytest.approx(ref, rel=1e-5)
        per[f"d{di}"] = res
        refs.append(ref)
    agg = aggregate(per, (1,))
    assert agg["w1"] == pytest.approx(float(np.median(refs)), rel=1e-5)  # median over datasets
    assert agg["f1"]["1"] == pytest.approx(np.mean([p["f1"]["1"] for p in per.values()]))


# -- the interaction r's -------------------------------------------------------------------------
def test_interaction_rs_follow_their_definitions():
    """r(strength, N), r(strength, log N), r(cov, N), r(cov, log N) from numpy formulas on the
    dense codes and the raw decoder parameters."""
    from polysae.evaluation import interactions as inter

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=12, d_sae=40, k=5, decoder="poly", ranks=(12, 6, 4))).eval()
    with torch.no_grad():
        sae.decoder.lambda2.fill_(-0.37)
    x = torch.randn(600, 12) * 2
    ps = inter.cooccurrence(sae, torch.split(x, 128))
    got = inter.correlations(ps, inter.pair_strength(sae, ps.i, ps.j))

    z = sae.encode(x).detach().double().numpy()
    act = (z > 0).astype(np.int64)
    N = act.T @ act
    iu, ju = np.triu_indices(z.shape[1], k=1)
    keep = N[iu, ju] >= 1
    iu, ju, cnt = iu[keep], ju[keep], N[iu, ju][keep].astype(float)
    U = sae.decoder.U.detach().double().numpy()
    C2 = sae.decoder.C2.detach().double().numpy()
    B = (U[iu, :6] * U[ju, :6]) @ C2.T
    strength = 0.37 * np.linalg.norm(B, axis=1)
    m = z.mean(0)
    cov = (z.T @ z / z.shape[0])[iu, ju] - m[iu] * m[ju]
    assert got["n_pairs"] == len(cnt)
    assert got["r_strength_count"] == pytest.approx(np.corrcoef(strength, cnt)[0, 1], abs=1e-6)
    assert got["r_strength_logcount"] == pytest.approx(
        np.corrcoef(strength, np.log(cnt))[0, 1], abs=1e-6)
    assert got["r_cov_count"] == pytest.approx(np.corrcoef(cov, cnt)[0, 1], abs=1e-6)
    assert got["r_cov_logcount"] == pytest.approx(np.corrcoef(cov, np.log(cnt))[0, 1], abs=1e-6)


# -- decode terms and code scale -----------------------------------------------------------------
@pytest.mark.parametrize("shared,order", [(True, 3), (False, 3), (True, 2), (True, 1)])
def test_decode_terms_sum_to_the_dense_decode(shared, order):
    torch.manual_seed(1)
    sae = SAE(SAEConfig(d_in=10, d_sae=33, k=4, decoder="poly", ranks=(10, 5, 3),
                        shared_u=shared, order=order))
    z = torch.relu(torch.randn(7, 33, dtype=torch.float64)).float()
    t = sae.decoder.decode_terms(z)
    ref = sae.decoder.decode_dense(z, sae.b_dec)
    torch.testing.assert_close(t.linear + t.quadratic + t.cubic + sae.b_dec, ref,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t.linear, z @ sae.decoder.linear_atoms(), atol=1e-5, rtol=1e-5)
    if order < 3:
        assert float(t.cubic.abs().max()) == 0.0
    if order < 2:
        assert float(t.quadratic.abs().max()) == 0.0


@pytest.mark.parametrize("decoder", ["linear", "poly"])
def test_code_scale_matches_dense_formulas(decoder):
    from polysae.evaluation.reconstruction import reconstruction_stats

    torch.manual_seed(2)
    sae = SAE(SAEConfig(d_in=12, d_sae=48, k=6, decoder=decoder, ranks=(12, 5, 5))).eval()
    sae.requires_grad_(False)
    x = torch.randn(500, 12, dtype=torch.float64).float() * 3 + 1
    cs = code_scale(sae, torch.split(x, 97))
    with torch.no_grad():
        z = sae.encode(x).double()
        xh = sae.decoder.decode_dense(z.float(), sae.b_dec).double()
        atoms = sae.decoder.linear_atoms().detach().double()
    lin = z @ atoms
    hi = xh - sae.b_dec.double() - lin
    fired = (z > 0).any(0)
    xd = x.double()
    tv = ((xd - xd.mean(0)) ** 2).sum()
    assert cs.n_tokens == 500
    assert cs.code_l2 == pytest.approx(float(z.norm(dim=1).mean()), rel=1e-6)
    assert cs.active_mean == pytest.approx(float(z[z > 0].mean()), rel=1e-6)
    assert cs.atom_norm == pytest.approx(float(atoms.norm(dim=1)[fired].median()), rel=1e-6)
    assert cs.contribution == pytest.approx(cs.active_mean * cs.atom_norm)
    e_all = float(((lin + hi) ** 2).sum())
    assert cs.share_linear == pytest.approx(float((lin ** 2).sum()) / e_all, rel=1e-4)
    assert cs.share_higher == pytest.approx(float((hi ** 2).sum()) / e_all, rel=1e-3, abs=1e-9)
    assert cs.fvu == pytest.approx(float(((xd - xh) ** 2).sum() / tv), rel=1e-4)
    assert cs.fvu_linear_only == pytest.approx(
        float(((xd - sae.b_dec.double() - lin) ** 2).sum() / tv), rel=1e-4)
    assert cs.fvu == pytest.approx(reconstruction_stats(sae, [x]).fvu, rel=1e-4)
    if decoder == "linear":
        assert cs.share_higher == 0.0 and cs.fvu == pytest.approx(cs.fvu_linear_only)


# -- config flags --------------------------------------------------------------------------------
def test_every_replicate_config_field_has_a_flag_with_help():
    import argparse
    import dataclasses

    from polysae.cli import replicate as cli
    from polysae.cli.flags import field_docs, flag_name
    from polysae.data.harvesting import HarvestConfig
    from polysae.evaluation import EvalConfig
    from polysae.replicate import ReplicateConfig
    from polysae.training import TrainConfig

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    flags = {s: a for a in p._actions for s in a.option_strings}
    groups = [(ReplicateConfig, "", ()), (TrainConfig, "train", cli.TRAIN_EXCLUDE),
              (EvalConfig, "eval", cli.EVAL_EXCLUDE), (HarvestConfig, "harvest",
                                                       cli.HARVEST_EXCLUDE),
              (SAEConfig, "sae", cli.SAE_EXCLUDE)]
    n = 0
    for cls, prefix, excl in groups:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in excl or f.name in ("sae", "harvest", "train", "eval"):
                continue
            name = flag_name(f.name, prefix)
            assert name in flags, name
            assert docs.get(f.name) and flags[name].help, name
            n += 1
    assert n > 80
