"""Co-occurrence counts, covariance and interaction strength against dense references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polysae import SAE, SAEConfig
from polysae.interactions import (cooccurrence, correlations, pair_strength, render_context,
                                  top_pair_rows, top_pairs)


def _sae(decoder, order=2, **kw):
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=10, d_sae=30, k=5, decoder=decoder, order=order, ranks=(10, 6, 6), **kw)
    sae = SAE(cfg).eval()
    if decoder == "poly":
        with torch.no_grad():
            sae.decoder.lambda2.fill_(-0.7)
    return sae


def test_cooccurrence_matches_dense(gen):
    sae = _sae("linear")
    x = torch.randn(500, 10, generator=gen)
    st = cooccurrence(sae, [x[:200], x[200:]])   # merging across batches
    with torch.no_grad():
        z = sae.encode(x).double()
    a = (z > 0).double()
    dense_cnt = torch.triu(a.T @ a, diagonal=1)
    assert int(dense_cnt.sum()) == int(st.count.sum())
    assert torch.equal(dense_cnt[st.i, st.j].long(), st.count)
    assert bool((st.i < st.j).all()) and len(st.i) == int((dense_cnt > 0).sum())
    cov = (z.T @ z) / 500 - torch.outer(z.mean(0), z.mean(0))
    torch.testing.assert_close(st.cov, cov[st.i, st.j])
    r = correlations(st)
    keep = st.count >= 1
    assert r["r_cov_count"] == pytest.approx(np.corrcoef(st.cov[keep], st.count[keep])[0, 1])


@pytest.mark.parametrize("shared_u", [True, False])
def test_strength_is_half_the_decoded_cross_term(gen, shared_u):
    sae = _sae("poly", order=2, shared_u=shared_u)
    F = sae.cfg.d_sae
    i = torch.tensor([0, 3, 7, 11])
    j = torch.tensor([1, 9, 20, 29])
    s = pair_strength(sae, i, j)
    with torch.no_grad():
        e = torch.eye(F)
        cross = (sae.decode(e[i] + e[j], path="dense") - sae.decode(e[i], path="dense")
                 - sae.decode(e[j], path="dense") + sae.decode(torch.zeros(1, F), path="dense"))
    # Order-2 decoder: the cross term of z_i = z_j = 1 is 2 * lambda2 * B_ij (sym. for separate U).
    torch.testing.assert_close(s, cross.double().norm(dim=-1) / 2, rtol=1e-5, atol=1e-7)


def test_correlations_raw_and_log_counts(gen):
    """All four Pearson r's against scipy.stats.pearsonr on the pairs with N_ij >= min_count."""
    from scipy.stats import pearsonr

    sae = _sae("poly")
    x = torch.randn(600, 10, generator=gen)
    st = cooccurrence(sae, x)
    strength = pair_strength(sae, st.i, st.j)
    for min_count in (1, 3):
        r = correlations(st, strength, min_count=min_count)
        keep = (st.count >= min_count).numpy()
        cnt = st.count.numpy()[keep].astype(float)
        cov, s = st.cov.numpy()[keep], strength.numpy()[keep]
        assert r["n_pairs"] == int(keep.sum()) > 10 and r["min_count"] == min_count
        assert r["r_cov_count"] == pytest.approx(pearsonr(cov, cnt)[0], abs=1e-12)
        assert r["r_cov_logcount"] == pytest.approx(pearsonr(cov, np.log(cnt))[0], abs=1e-12)
        assert r["r_strength_count"] == pytest.approx(pearsonr(s, cnt)[0], abs=1e-12)
        assert r["r_strength_logcount"] == pytest.approx(pearsonr(s, np.log(cnt))[0],
                                                         abs=1e-12)
    # Log counts are a different statistic from raw counts.
    assert r["r_cov_logcount"] != pytest.approx(r["r_cov_count"])
    assert "r_strength_count" not in correlations(st)   # linear decoders: covariance only


def test_top_pairs_and_rows(gen):
    sae = _sae("poly")
    x = torch.randn(400, 10, generator=gen)
    pairs = top_pairs(sae, x, n=5, min_count=3)
    st = cooccurrence(sae, x)
    keep = st.count >= 3
    ref = pair_strength(sae, st.i[keep], st.j[keep]).sort(descending=True).values[:5]
    assert [p.strength for p in pairs] == pytest.approx(ref.tolist())
    assert all(p.count >= 3 for p in pairs)
    rows = top_pair_rows(sae, [x[:150], x[150:]], pairs, n=3)
    with torch.no_grad():
        z = sae.encode(x)
    for p, rr in zip(pairs, rows):
        prod = z[:, p.i] * z[:, p.j]
        assert [r for r, _ in rr] == prod.topk(3).indices.tolist()
    lin = top_pairs(_sae("linear"), x, n=3)
    assert np.isnan(lin[0].strength) and lin[0].count >= lin[-1].count


def test_render_context():
    toks = torch.arange(10)
    docs = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    s = render_context(toks, docs, 5, lambda t: "".join(f"<{int(v)}>" for v in t), window=4)
    assert s == "<3><4>[<5>]"


def test_max_tokens_cuts_the_stream(gen):
    sae = _sae("poly")
    x = torch.randn(300, 10, generator=gen)
    a = cooccurrence(sae, [x[:120], x[120:]], max_tokens=200)
    b = cooccurrence(sae, x[:200])
    assert a.n_tokens == 200 and torch.equal(a.count, b.count) and torch.equal(a.i, b.i)
