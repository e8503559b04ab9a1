"""The orthogonality retraction of PolySAE's projection U (docs/method.md#orthogonality-retraction).

After every optimiser step U [F, R] is replaced by Q from its reduced QR factorisation with signs
fixed so that diag(R) > 0 (``qr_pos``). Because QR(Q) = Q for orthonormal Q the map is continuous
and flips no column. Guards from the reference code: skip when ||U||_F < 1e-6; add N(0, 1e-6)
jitter before the QR when ||U||_F < 1e-4.

``cholesky_qr_pos`` computes the same Q faster (two GEMM-bound passes of CholeskyQR, "CholeskyQR2";
R = L^T from a Cholesky factorisation already has a positive diagonal, so no sign fix is needed) and
falls back to Householder QR when the Gram matrix is not numerically positive definite or the
result is not orthonormal to working precision. U is orthonormal before each step and an Adam step
moves it little, so U^T U is well conditioned and CholeskyQR2 is accurate (Fukaya et al., 2014).
"""

from __future__ import annotations

import torch
from torch import Tensor


def qr_pos(A: Tensor) -> Tensor:
    """Q of the reduced QR of A [F, R] (F >= R) with diag(R) > 0; sign 0 counts as +1."""
    Q, R = torch.linalg.qr(A, mode="reduced")
    s = torch.sign(torch.diagonal(R))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return Q * s


def cholesky_qr_pos(A: Tensor, tol: float | None = None) -> Tensor:
    """Same Q as :func:`qr_pos` by CholeskyQR2, falling back to ``qr_pos`` when unsafe."""
    work = A if A.dtype in (torch.float32, torch.float64) else A.float()
    tol = tol if tol is not None else (1e-5 if work.dtype == torch.float32 else 1e-12)
    Q = work
    for _ in range(2):
        G = Q.T @ Q
        L, info = torch.linalg.cholesky_ex(G)
        if int(info) != 0:
            return qr_pos(A)
        # Q <- Q L^{-T}, i.e. solve X L^T = Q for X.
        Q = torch.linalg.solve_triangular(L, Q.T, upper=False).T
    eye = torch.eye(Q.shape[1], dtype=Q.dtype, device=Q.device)
    if not torch.isfinite(Q).all() or (Q.T @ Q - eye).abs().max() > tol * max(1, Q.shape[1]) ** 0.5:
        return qr_pos(A)
    return Q.to(A.dtype)


def orthogonality_error(U: Tensor) -> float:
    """max |U^T U - I| (the Frobenius norm is logged by the trainer; this is the strict check)."""
    U = U.detach()
    eye = torch.eye(U.shape[1], dtype=U.dtype, device=U.device)
    return float((U.T @ U - eye).abs().max())


def retract(U: Tensor, fast: bool = True) -> Tensor | None:
    """Retracted copy of U, or None when the guard says to skip (||U||_F < 1e-6)."""
    norm = float(torch.linalg.matrix_norm(U.detach().float()))
    if norm < 1e-6:
        return None
    A = U.detach()
    if norm < 1e-4:
        A = A + 1e-6 * torch.randn_like(A)
    return cholesky_qr_pos(A) if fast else qr_pos(A)


def separate_u_order(r1: int, r2: int, r3: int) -> list[tuple[int, int, int]]:
    """Column blocks (matrix id 0/1/2 = U/U2/U3, start, stop) in Gram-Schmidt order for separate-U.

    Equal ranks: [U | U2 | U3], i.e. Q1 = qr(U1), U2 orthogonal to Q1, U3 to both (exactly the
    reference code's scheme). Unequal ranks (R1 >= R2 >= R3): the shared prefixes first
    [U[:, :R3], U2[:, :R3], U3, U2[:, R3:], U[:, R3:]], so every block is orthogonal to all earlier
    ones. This is polysae's own fully orthogonal variant of the reference's "shared-prefix" scheme
    (which leaves the tail of U1 orthogonal only to U1); separate-U is not used in the paper.
    """
    if r1 == r2 == r3:
        return [(0, 0, r1), (1, 0, r2), (2, 0, r3)]
    blocks = [(0, 0, r3), (1, 0, r3), (2, 0, r3), (1, r3, r2), (0, r3, r1)]
    return [b for b in blocks if b[2] > b[1]]


def retract_separate(Us: list[Tensor], fast: bool = True) -> list[Tensor] | None:
    """Jointly retract [U, U2, U3] so that all columns are orthonormal (see
    ``separate_u_order``)."""
    r = [u.shape[1] for u in Us] + [0] * (3 - len(Us))
    order = separate_u_order(*r) if len(Us) == 3 else [(0, 0, r[0]), (1, 0, r[1])]
    cat = torch.cat([Us[m][:, a:b] for m, a, b in order], dim=1)
    Q = retract(cat, fast)
    if Q is None:
        return None
    outs = [torch.empty_like(u) for u in Us]
    col = 0
    for m, a, b in order:
        outs[m][:, a:b] = Q[:, col:col + b - a]
        col += b - a
    return outs
