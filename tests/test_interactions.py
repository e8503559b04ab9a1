"""Co-occurrence counts, covariance and interaction strength against dense references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polysae import SAE, SAEConfig
from polysae.evaluation.interactions import (
    cooccurrence,
    correlations,
    interaction_atoms,
    pair_candidates,
    pair_strength,
    render_context,
    top_pair_rows,
    top_pairs,
)


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


def _dense_pair_atoms(sae):
    """Every pair's output direction from the raw parameters U, U2, C2 (no decoder method):
    [F, F, D] lambda2 * B_ij with B_ij = C2 (U[i, :R2] * U'[j, :R2]), U' = U2 when separate,
    symmetrised (B_ij + B_ji) / 2 in that case."""
    dec = sae.decoder
    r2 = dec.C2.shape[1]
    U = dec.U.detach()[:, :r2].double()
    V = (dec.U if dec.U2 is None else dec.U2).detach()[:, :r2].double()
    C2 = dec.C2.detach().double()
    B = torch.einsum("ir,jr,dr->ijd", U, V, C2)
    if dec.U2 is not None:
        B = 0.5 * (B + B.transpose(0, 1))
    return float(dec.lambda2.detach()) * B


@pytest.mark.parametrize("shared_u", [True, False])
def test_pair_candidates_match_dense_formula(shared_u):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=12, d_sae=40, k=4, ranks=(12, 6, 6), shared_u=shared_u,
                        dtype="float64"))
    with torch.no_grad():
        sae.decoder.lambda2.fill_(-0.7)
    dense = _dense_pair_atoms(sae)                      # [F, F, D]
    i, j = torch.triu_indices(40, 40, 1)
    ref = dense[i, j].norm(dim=-1)                      # |lambda2| * ||B_ij||, all i < j
    pc = pair_candidates(sae, 25, block=16)             # several blocks, diagonal and off-diagonal
    v, o = ref.topk(25)
    torch.testing.assert_close(pc.strength.double(), v, rtol=1e-4, atol=1e-6)
    assert torch.equal(pc.i, i[o]) and torch.equal(pc.j, j[o])
    assert bool((pc.i < pc.j).all())
    # more candidates than pairs: every pair, strongest first
    pc_all = pair_candidates(sae, 10_000, block=7)
    assert pc_all.i.numel() == i.numel()
    torch.testing.assert_close(pc_all.strength.double(), ref.sort(descending=True).values,
                               rtol=1e-4, atol=1e-6)
    # the same atoms through the public helpers
    torch.testing.assert_close(interaction_atoms(sae, pc.i, pc.j).double(), dense[pc.i, pc.j])
    torch.testing.assert_close(pair_strength(sae, pc.i, pc.j), v, rtol=1e-4, atol=1e-6)


def test_pair_factors_are_the_pair_atoms_factors():
    for shared_u in (True, False):
        sae = _sae("poly", shared_u=shared_u)
        dec = sae.decoder
        fac = dec.pair_factors()
        assert fac.shared is shared_u and fac.u.shape == fac.v.shape == (30, 6)
        i, j = torch.tensor([0, 4, 9]), torch.tensor([2, 4, 29])
        with torch.no_grad():
            torch.testing.assert_close((fac.u[i] * fac.v[j]) @ fac.C2.T, dec.pair_atoms(i, j))
    with pytest.raises(ValueError, match="no pairwise atoms"):
        _sae("linear").decoder.pair_factors()
    order1 = SAE(SAEConfig(d_in=10, d_sae=30, k=5, order=1, ranks=(10, 6, 6)))
    with pytest.raises(ValueError, match="no pairwise atoms"):
        order1.decoder.pair_factors()
    assert pair_candidates(_sae("linear"), 10).i.numel() == 0
    assert pair_candidates(order1, 10).i.numel() == 0
    assert pair_candidates(_sae("poly"), 0).i.numel() == 0
