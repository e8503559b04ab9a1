"""The orthogonality retraction (docs/method.md) against torch.linalg.qr. CPU only."""

from __future__ import annotations

import pytest
import torch

from polysae import SAE, SAEConfig
from polysae.orthogonal import cholesky_qr_pos, orthogonality_error, qr_pos, retract


def _perturbed_orthonormal(F, R, eps, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(F, R, generator=g, dtype=dtype))
    return Q + eps * torch.randn(F, R, generator=g, dtype=dtype)


def test_qr_pos_has_positive_diagonal_and_reconstructs():
    A = _perturbed_orthonormal(50, 12, 0.3)
    Q = qr_pos(A)
    R = Q.T @ A  # upper triangular with a positive diagonal
    assert torch.allclose(torch.tril(R, -1), torch.zeros_like(R), atol=1e-12)
    assert (torch.diagonal(R) > 0).all()
    torch.testing.assert_close(Q @ R, A)
    assert orthogonality_error(Q) < 1e-12
    torch.testing.assert_close(qr_pos(Q), Q)  # a fixed point: no column flips


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("eps", [1e-3, 0.05, 0.5])
def test_fast_retraction_equals_qr(dtype, tol, eps):
    A = _perturbed_orthonormal(300, 40, eps, dtype=dtype)
    torch.testing.assert_close(cholesky_qr_pos(A), qr_pos(A), rtol=0, atol=tol)


def test_fast_retraction_falls_back_on_rank_deficiency():
    A = _perturbed_orthonormal(40, 6, 0.0)
    A[:, 5] = A[:, 4]  # Gram matrix singular: Cholesky fails, Householder QR takes over
    Q = cholesky_qr_pos(A)
    torch.testing.assert_close(Q, qr_pos(A))


def test_guards():
    assert retract(torch.zeros(10, 3)) is None  # ||U|| < 1e-6: skipped
    tiny = 1e-5 * _perturbed_orthonormal(10, 3, 0.1, dtype=torch.float32)
    torch.manual_seed(0)
    Q = retract(tiny)  # ||U|| < 1e-4: jitter then QR
    assert orthogonality_error(Q) < 1e-5


@pytest.mark.parametrize("shared,ranks", [(True, (16, 6, 4)), (False, (8, 8, 8)),
                                          (False, (12, 6, 3))])
@pytest.mark.parametrize("fast", [True, False])
def test_sae_retraction_makes_columns_orthonormal(shared, ranks, fast):
    sae = SAE(SAEConfig(d_in=16, d_sae=48, k=4, ranks=ranks, shared_u=shared, dtype="float64"))
    d = sae.decoder
    with torch.no_grad():
        for u in (d.U, d.U2, d.U3):
            if u is not None:
                u.add_(0.2 * torch.randn_like(u))
    sae.retract_(fast=fast)
    us = [u for u in (d.U, d.U2, d.U3) if u is not None]
    allcols = torch.cat(us, dim=1)  # separate mode: U, U2, U3 mutually orthogonal too
    assert orthogonality_error(allcols) < 1e-10
    if shared:
        before = d.U.detach().clone()
        sae.retract_(fast=fast)
        torch.testing.assert_close(d.U.detach(), before)  # idempotent on the manifold


def test_separate_equal_ranks_is_block_gram_schmidt():
    """Equal ranks: Q1 = qr(U1); U2 <- qr(U2 - Q1 Q1^T U2); U3 <- qr(U3 - Q1Q1^T U3 - Q2Q2^T U3)."""
    sae = SAE(SAEConfig(d_in=8, d_sae=40, k=4, ranks=(6, 6, 6), shared_u=False, dtype="float64"))
    d = sae.decoder
    with torch.no_grad():
        for u in (d.U, d.U2, d.U3):
            u.add_(0.3 * torch.randn_like(u))
    U1, U2, U3 = (u.detach().clone() for u in (d.U, d.U2, d.U3))
    Q1 = qr_pos(U1)
    Q2 = qr_pos(U2 - Q1 @ (Q1.T @ U2))
    Q3 = qr_pos(U3 - Q1 @ (Q1.T @ U3) - Q2 @ (Q2.T @ U3))
    sae.retract_(fast=False)
    for got, want in zip((d.U, d.U2, d.U3), (Q1, Q2, Q3)):
        torch.testing.assert_close(got.detach(), want, atol=1e-10, rtol=0)


# -- the one-pass CholeskyQR with a probe check ----------------------------------------------------
def _count_passes(monkeypatch):
    import polysae.orthogonal as orth
    calls = []
    real = orth._cholesky_qr_pass

    def counting(A):
        calls.append(1)
        return real(A)

    monkeypatch.setattr(orth, "_cholesky_qr_pass", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_pass_reaches_working_precision_after_a_small_step(monkeypatch, dtype):
    """U orthonormal + an Adam-sized move (1e-3 per entry): one CholeskyQR pass, no fallback, and
    the result orthonormal to working precision and equal to Householder QR's Q."""
    calls = _count_passes(monkeypatch)
    A = _perturbed_orthonormal(2000, 96, 1e-3, dtype=dtype)
    Q = cholesky_qr_pos(A)
    assert len(calls) == 1
    assert orthogonality_error(Q) < (2e-6 if dtype == torch.float32 else 1e-13)
    torch.testing.assert_close(Q, qr_pos(A), rtol=0, atol=2e-5 if dtype == torch.float32 else 1e-11)


def test_failed_probe_check_falls_back_to_cholesky_qr2_then_householder(monkeypatch):
    import polysae.orthogonal as orth
    calls = _count_passes(monkeypatch)
    A = _perturbed_orthonormal(300, 20, 1e-3, dtype=torch.float32)
    errs = iter([1.0, 0.0])  # first check fails: a second pass, which passes
    monkeypatch.setattr(orth, "probe_error", lambda Q: next(errs))
    cholesky_qr_pos(A)
    assert len(calls) == 2
    calls.clear()
    householder = []
    real_qr = orth.qr_pos
    monkeypatch.setattr(orth, "probe_error", lambda Q: float("nan"))  # never passes
    monkeypatch.setattr(orth, "qr_pos", lambda X: householder.append(1) or real_qr(X))
    Q = cholesky_qr_pos(A)
    assert len(calls) == 2 and householder == [1]
    torch.testing.assert_close(Q, real_qr(A))


def test_probe_error_estimates_the_orthogonality_error():
    from polysae.orthogonal import probe_error
    Q = _perturbed_orthonormal(500, 30, 0.0)
    assert probe_error(Q) < 1e-13
    bad = Q.clone()
    bad[:, 3] *= 1.01  # one column 1% too long: ||Q v||^2 - ||v||^2 = 0.0201 v_3^2
    assert 1e-6 < probe_error(bad) < 0.03
    assert probe_error(_perturbed_orthonormal(500, 30, 0.05)) > 1e-3
    bad[0, 0] = float("nan")
    assert not probe_error(bad) <= 1.0


def test_retraction_keeps_the_global_rng_and_matmul_precision():
    from polysae.orthogonal import ieee_fp32
    A = _perturbed_orthonormal(200, 12, 1e-2, dtype=torch.float32)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    retract(A)
    assert torch.equal(torch.get_rng_state(), state)
    m = torch.backends.mkldnn.matmul
    if hasattr(m, "fp32_precision"):
        before = m.fp32_precision
        with ieee_fp32("cpu"):
            assert m.fp32_precision == "ieee"
        assert m.fp32_precision == before
        assert torch.get_float32_matmul_precision() in ("highest", "high", "medium")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("shared,ranks", [(True, (16, 6, 4)), (False, (8, 8, 8))])
def test_half_precision_poly_saes_initialise_and_retract_in_fp32(dtype, fast, shared, ranks):
    """bf16/fp16 PolySAEs: U starts orthonormal and the retraction (CholeskyQR or Householder QR,
    computed in fp32) returns it in the parameter dtype, orthonormal to that dtype's precision."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=64, k=4, ranks=ranks, shared_u=shared, dtype=dtype))
    d = sae.decoder
    us = [u for u in (d.U, d.U2, d.U3) if u is not None]
    assert all(u.dtype == getattr(torch, dtype) for u in us)
    assert orthogonality_error(torch.cat(us, 1)) < 2e-2
    with torch.no_grad():
        for u in us:
            u.add_(0.05 * torch.randn_like(u))
    assert orthogonality_error(torch.cat(us, 1)) > 5e-2
    sae.retract_(fast=fast)
    assert all(u.dtype == getattr(torch, dtype) for u in us)
    assert orthogonality_error(torch.cat(us, 1)) < 2e-2
    assert d.orthogonality_error() < 5e-2


def test_logged_orthogonality_error_covers_u2_and_u3():
    sae = SAE(SAEConfig(d_in=16, d_sae=48, k=4, ranks=(8, 8, 8), shared_u=False,
                        dtype="float64"))
    d = sae.decoder
    assert d.orthogonality_error() < 1e-6
    with torch.no_grad():
        d.U3[:, 0] += d.U[:, 0]  # U3 no longer orthogonal to U: only the joint Gram sees it
    assert d.orthogonality_error() > 0.5
    assert orthogonality_error(d.U) < 1e-10


def test_load_warns_when_u_is_off_the_manifold(tmp_path):
    import warnings

    from polysae.sae import load_checkpoint
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=48, k=4, ranks=(16, 4, 4)))
    sae.save(tmp_path / "ok")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(tmp_path / "ok")
    with torch.no_grad():
        sae.decoder.U.add_(0.05 * torch.randn_like(sae.decoder.U))
    sae.save(tmp_path / "off")
    with pytest.warns(UserWarning, match="off the orthonormal constraint set"):
        load_checkpoint(tmp_path / "off")


def test_blocked_gram_equals_one_product():
    """From R = 256 the Gram matrix is three products of column halves, mirrored."""
    from polysae.orthogonal import gram
    A = torch.randn(900, 301, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    G = gram(A)
    torch.testing.assert_close(G, A.T @ A, rtol=1e-12, atol=1e-10)
    assert torch.equal(G[150:, :150], G[:150, 150:].T)  # the mirrored block
    Q = cholesky_qr_pos(_perturbed_orthonormal(900, 301, 1e-3, dtype=torch.float32))
    assert orthogonality_error(Q) < 2e-6
