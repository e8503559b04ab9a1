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
