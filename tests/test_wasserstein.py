"""Batched W1 against scipy.stats.wasserstein_distance and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from polysae.evaluation.wasserstein import _w1, separation, wasserstein_1d


@pytest.mark.parametrize("use_numpy", [None, False])
@pytest.mark.parametrize("nu,nv", [(50, 50), (37, 81), (1, 5)])
def test_matches_scipy(gen, nu, nv, use_numpy):
    u = torch.randn(nu, 40, generator=gen) * torch.rand(40, generator=gen) * 3
    v = torch.randn(nv, 40, generator=gen) + torch.rand(40, generator=gen)
    # Sparse-code-like columns: many exact zeros and ties.
    u[:, :10] = torch.relu(u[:, :10] - 1)
    v[:, :10] = torch.relu(v[:, :10] - 1)
    u[:, 10] = 0
    v[:, 10] = 0
    got = wasserstein_1d(u, v, chunk=7, use_numpy=use_numpy).numpy()   # False: the GPU path
    ref = np.array([wasserstein_distance(u[:, f].double().numpy(), v[:, f].double().numpy())
                    for f in range(40)])
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-6)
    assert got[10] == 0


def _scipy_cols(u: torch.Tensor, v: torch.Tensor) -> np.ndarray:
    un, vn = u.double().numpy(), v.double().numpy()
    return np.array([wasserstein_distance(un[:, f], vn[:, f]) for f in range(un.shape[1])])


def _mixed_codes(gen: torch.Generator, n: int, f: int, shift: float) -> torch.Tensor:
    """Columns of every kind the CPU path treats differently, in groups of 8 so that ``chunk=8``
    gives blocks of one kind: sparse non-negative codes at several densities (cut to their
    non-zeros), signed sparse columns (negatives and positives around a run of zeros, also cut),
    dense columns (sorted whole), constant/all-zero columns and heavy ties."""
    x = torch.randn(n, f, generator=gen) + shift
    dens = torch.rand(f, generator=gen)
    keep = torch.rand(n, f, generator=gen) < dens * 0.3
    x = torch.where(keep, x.abs(), torch.zeros(()))                            # 0..15, 40..
    x[:, 0] = 0
    x[:, 16:24] = torch.where(torch.rand(n, 8, generator=gen) < 0.15,
                              torch.randn(n, 8, generator=gen), torch.zeros(()))  # signed
    x[:, 24:32] = torch.randn(n, 8, generator=gen) + shift                     # dense
    x[:, 32] = 2.5
    x[:, 33:40] = torch.randint(0, 3, (n, 7), generator=gen).float()           # heavy ties
    return x


@pytest.mark.parametrize("nu,nv", [(250, 250), (257, 257), (1000, 1000), (300, 701),
                                   (999, 1000), (64, 700), (256, 256), (512, 1024)])
def test_cpu_sub_row_cut_paths_match_scipy(gen, nu, nv):
    """n > 256 splits each latent into zero-padded sub-rows; sparse blocks are cut to their
    non-zeros, dense ones sorted whole; unequal sizes go through the restricted quantile grid."""
    u = _mixed_codes(gen, nu, 45, 0.0)
    v = _mixed_codes(gen, nv, 45, 0.3)
    ref = _scipy_cols(u, v)
    for chunk in (8, 16, None):   # blocks of one kind only, then kinds mixed in one block
        got = wasserstein_1d(u, v, chunk=chunk).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
    assert got[0] == 0 and got[32] == 0


def test_cpu_wide_sparse_blocks_and_threads(gen):
    """Many blocks split over threads; the per-block cut hint carries between blocks of very
    different density (sparse, then dense, then sparse again)."""
    u = torch.relu(torch.randn(600, 700, generator=gen) - 1.2)
    v = torch.relu(torch.randn(600, 700, generator=gen) - 1.0)
    u[:, 300:400] = torch.randn(600, 100, generator=gen)
    torch.set_num_threads(2)
    got = wasserstein_1d(u, v, chunk=64).numpy()
    np.testing.assert_allclose(got, _scipy_cols(u, v), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(wasserstein_1d(u.double(), v.double(), chunk=64).numpy(), got,
                               rtol=1e-12, atol=0)


def test_latent_major_input_same_result(gen):
    """A latent-major matrix passed as its transpose (columns contiguous) takes the copy path."""
    ut = torch.relu(torch.randn(70, 300, generator=gen) - 1)
    vt = torch.relu(torch.randn(70, 300, generator=gen) - 0.8)
    u, v = ut.T, vt.T                        # [300, 70] views, stride (1, 300)
    ref = _scipy_cols(u.contiguous(), v.contiguous())
    np.testing.assert_allclose(wasserstein_1d(u, v).numpy(), ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(wasserstein_1d(u, vt[:, :250].T).numpy(),
                               _scipy_cols(u.contiguous(), vt[:, :250].T.contiguous()),
                               rtol=1e-9, atol=1e-12)


def test_shift_and_scale_closed_forms(gen):
    u = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    shift = torch.linspace(-3, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(wasserstein_1d(u, u + shift), shift.abs())
    # Two point masses: W1(delta_a, delta_b) = |a - b|; Bernoulli(p) vs Bernoulli(q) = |p - q|.
    w = wasserstein_1d(torch.full((3, 1), 2.0), torch.full((5, 1), -1.5))
    assert abs(float(w) - 3.5) < 1e-12
    a = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    b = torch.tensor([[1.0], [1.0], [1.0], [0.0], [0.0], [0.0]])
    assert abs(float(wasserstein_1d(a, b)) - 0.25) < 1e-12


def test_separation_normalised_forms(gen):
    pos = torch.randn(30, 5, generator=gen, dtype=torch.float64) + 1
    neg = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    s = separation(pos, neg)
    s10 = separation(10 * pos, 10 * neg)
    assert abs(s10.w1 - 10 * s.w1) < 1e-9
    # Both normalised variants are invariant to a global rescaling of the codes.
    assert abs(s10.w1_std - s.w1_std) < 1e-9 and abs(s10.w1_l2 - s.w1_l2) < 1e-12
    both = torch.cat([pos, neg]).double()
    ref = np.mean([wasserstein_distance(pos[:, f].numpy(), neg[:, f].numpy())
                   / both[:, f].std(unbiased=False).item() for f in range(5)])
    assert abs(s.w1_std - ref) < 1e-6
    # A dead latent counts as 0 in the mean (paper: averaged over all latents).
    z = separation(torch.cat([pos, torch.zeros_like(pos)], 1),
                   torch.cat([neg, torch.zeros_like(neg)], 1))
    assert abs(z.w1 - s.w1 / 2) < 1e-9 and abs(z.w1_std - s.w1_std / 2) < 1e-9


@pytest.mark.parametrize("use_numpy", [None, False])
@pytest.mark.parametrize("nu,nv", [(300, 300), (300, 701), (40, 40)])
def test_moments_from_the_sorted_samples(gen, nu, nv, use_numpy):
    """The sums and sums of squares that separation() reads off W1's cuts equal numpy's, for
    cut, grouped and whole latents alike."""
    u = _mixed_codes(gen, nu, 45, 0.0)
    v = _mixed_codes(gen, nv, 45, 0.3)
    w, mom = _w1(u, v, 16, use_numpy, moments=True)
    np.testing.assert_allclose(w.numpy(), _scipy_cols(u, v), rtol=1e-9, atol=1e-12)
    ud, vd = u.double().numpy(), v.double().numpy()
    ref = np.stack([ud.sum(0), (ud ** 2).sum(0), vd.sum(0), (vd ** 2).sum(0)])
    np.testing.assert_allclose(mom.numpy(), ref, rtol=1e-12, atol=1e-9)


def test_separation_float32_sparse_vs_numpy_scipy(gen):
    """Sub-row, cut and whole paths at float32: W1/std against scipy and numpy's float64 std of
    the pooled samples; the L2 form against numpy's row norms."""
    pos = _mixed_codes(gen, 400, 45, 0.2)
    neg = _mixed_codes(gen, 380, 45, 0.0)
    s = separation(pos, neg)
    w = _scipy_cols(pos, neg)
    both = np.concatenate([pos.double().numpy(), neg.double().numpy()])
    std = both.std(axis=0)
    ref_std = np.where(std > 0, w / np.where(std > 0, std, 1), 0).mean()
    assert abs(s.w1 - w.mean()) < 1e-12
    assert abs(s.w1_std - ref_std) < 1e-9 * max(1.0, ref_std)
    ref_l2 = w.mean() / np.linalg.norm(both, axis=1).mean()
    assert abs(s.w1_l2 - ref_l2) < 1e-6 * ref_l2     # row norms accumulate in float32


def test_half_precision_inputs(gen):
    u = torch.randn(20, 6, generator=gen).bfloat16()
    v = torch.randn(30, 6, generator=gen).half()
    ref = [wasserstein_distance(u[:, f].double().numpy(), v[:, f].double().numpy())
           for f in range(6)]
    np.testing.assert_allclose(wasserstein_1d(u, v).numpy(), ref, rtol=1e-9)


def test_bad_shapes():
    with pytest.raises(ValueError, match="same F"):
        wasserstein_1d(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="empty"):
        wasserstein_1d(torch.zeros(0, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="chunk"):
        wasserstein_1d(torch.zeros(3, 2), torch.zeros(3, 2), chunk=0)
