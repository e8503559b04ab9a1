"""The orthogonality retraction of PolySAE's projection U (docs/method.md#orthogonality-retraction).

After every optimiser step U [F, R] is replaced by Q from its reduced QR factorisation with signs
fixed so that diag(R) > 0 (``qr_pos``). Because QR(Q) = Q for orthonormal Q the map is continuous
and flips no column. Guards from the reference code: skip when ||U||_F < 1e-6; add N(0, 1e-6)
jitter before the QR when ||U||_F < 1e-4.

``cholesky_qr_pos`` computes the same Q faster. U is orthonormal before each step and an Adam step
moves it little, so U^T U is well conditioned and ONE pass of CholeskyQR (``G = A^T A``,
``G = L L^T``, ``Q = A L^-T``: about 3 F R^2 flops, all GEMM-like) already reaches working-precision
orthonormality (its error grows as cond(A)^2 u; Fukaya et al., 2014). R = L^T from a Cholesky
factorisation has a positive diagonal, so no sign fix is needed. Instead of a full Gram of the
result (another 2 F R^2 flops) it is checked with a few fixed random probe vectors v:
``| ||Q v||^2 - ||v||^2 | <= tol`` (``probe_error``, one [F, R] x [R, 4] product). When the check or
the Cholesky factorisation fails, a second pass (CholeskyQR2) is tried, then Householder QR.

Precision: the Gram matrix is accumulated in fp32 (or fp64) with TF32 / reduced-precision fp32
matmuls switched off for the call (``ieee_fp32``); fp16/bf16 matrices are initialised and retracted
in fp32 and cast back (Householder QR and Cholesky have no half-precision kernels).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor

N_PROBES = 4
"""Probe vectors of the retraction's check."""

_PROBES: dict[tuple, Tensor] = {}


@contextlib.contextmanager
def ieee_fp32(device_type: str):
    """fp32 matmuls in full IEEE precision for the block (no TF32 on CUDA, no bf16/TF32 passes in
    oneDNN on CPU), whatever the global setting; restored afterwards."""
    backend = {"cuda": getattr(torch.backends.cuda, "matmul", None),
               "cpu": getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)}.get(
                   device_type)
    old = getattr(backend, "fp32_precision", None) if backend is not None else None
    if old is not None:  # torch >= 2.9: per-backend precision (reading it never raises)
        if old == "ieee":
            yield
            return
        backend.fp32_precision = "ieee"
        try:
            yield
        finally:
            backend.fp32_precision = old
        return
    if device_type != "cuda":  # older torch: only CUDA's TF32 flag exists
        yield
        return
    flag = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16 (no QR/Cholesky kernels there), else the dtype itself."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def qr_pos(A: Tensor) -> Tensor:
    """Q of the reduced QR of A [F, R] (F >= R) with diag(R) > 0; sign 0 counts as +1. Computed in
    fp32 for fp16/bf16 inputs and returned in A's dtype."""
    work = A.to(_work_dtype(A.dtype))
    Q, R = torch.linalg.qr(work, mode="reduced")
    s = torch.sign(torch.diagonal(R))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return (Q * s).to(A.dtype)


def _probes(R: int, like: Tensor) -> Tensor:
    """N_PROBES fixed unit Gaussian vectors [R, N_PROBES] (a private generator: the retraction
    never touches the global RNG, so a run's random stream does not depend on it)."""
    key = (R, like.device, like.dtype)
    V = _PROBES.get(key)
    if V is None:
        g = torch.Generator().manual_seed(20260126)
        V = torch.randn(R, N_PROBES, generator=g, dtype=torch.float64)
        V = (V / V.norm(dim=0)).to(like.device, like.dtype)
        _PROBES[key] = V
    return V


def probe_error(Q: Tensor) -> float:
    """max over the probe vectors v (unit, fixed) of | ||Q v||^2 - ||v||^2 |: an estimate of
    ||Q^T Q - I|| from one thin product (a NaN/inf in Q gives NaN/inf)."""
    V = _probes(Q.shape[1], Q)
    with ieee_fp32(Q.device.type):
        # A column-major Q (the triangular solve returns one) as the row-major Q^T: the skinny
        # product is then ~10x faster on CPU than with a transposed [F, R] operand.
        Y = (V.mT @ Q.mT).mT if Q.mT.is_contiguous() else Q @ V
    v2 = V.double().pow(2).sum(0)
    return float((Y.double().pow(2).sum(0) - v2).abs().max())


def gram(A: Tensor) -> Tensor:
    """A^T A [R, R] for A [F, R]. From R = 256 on, as three products of column halves (the
    symmetric block is mirrored, not computed): 3/4 of the flops of one GEMM (torch has no SYRK).
    Call under :func:`ieee_fp32`."""
    R = A.shape[1]
    if R < 256:
        return A.mT @ A
    h = R // 2
    A1, A2 = A[:, :h], A[:, h:]
    G = A.new_empty(R, R)
    G[:h, :h] = A1.mT @ A1
    G[:h, h:] = A1.mT @ A2
    G[h:, h:] = A2.mT @ A2
    G[h:, :h] = G[:h, h:].mT
    return G


def _cholesky_qr_pass(A: Tensor) -> Tensor | None:
    """One CholeskyQR pass A L^-T (A^T A = L L^T), or None when the Gram is not positive
    definite in working precision."""
    with ieee_fp32(A.device.type):
        G = gram(A)
        L, info = torch.linalg.cholesky_ex(G)
        if int(info) != 0:
            return None
        return torch.linalg.solve_triangular(L.mT, A, upper=True, left=False)


def cholesky_qr_pos(A: Tensor, tol: float | None = None) -> Tensor:
    """Same Q as :func:`qr_pos`: one CholeskyQR pass, a second when the probe check
    (``probe_error <= tol``) fails, Householder QR when that fails too."""
    work = A.to(_work_dtype(A.dtype))
    tol = tol if tol is not None else (1e-5 if work.dtype == torch.float32 else 1e-12)
    Q = work
    for _ in range(2):
        Q = _cholesky_qr_pass(Q)
        if Q is None:
            break
        if probe_error(Q) <= tol:  # False for NaN
            return Q.to(A.dtype)
    return qr_pos(work).to(A.dtype)


def orthogonality_error(U: Tensor) -> float:
    """max |U^T U - I|, computed in float64 (the strict check; tests and diagnostics)."""
    U = U.detach().double()
    eye = torch.eye(U.shape[1], dtype=U.dtype, device=U.device)
    return float((U.T @ U - eye).abs().max())


def gram_error(us: list[Tensor]) -> float:
    """||W^T W - I||_F of W = [U | U2 | U3] (all columns of the decoder's projections, which the
    joint retraction keeps mutually orthonormal), Gram in fp32 with TF32 off: the trainer's logged
    ``orth_err``."""
    W = torch.cat([u.detach().to(_work_dtype(u.dtype)) for u in us], dim=1)
    with ieee_fp32(W.device.type):
        G = W.mT @ W
    G.diagonal().sub_(1)
    return float(torch.linalg.matrix_norm(G))


def check_on_manifold(us: list[Tensor], where: str, tol: float = 1e-3) -> float:
    """Warn when [U | U2 | U3] is visibly off the constraint set (probe estimate of the
    orthogonality error above ``tol``, e.g. weights saved between retractions by an older
    polysae); returns the estimate."""
    W = torch.cat([u.detach().to(_work_dtype(u.dtype)) for u in us], dim=1)
    err = probe_error(W)
    if not err <= tol:
        warnings.warn(f"{where}: U is off the orthonormal constraint set (orthogonality error "
                      f"about {err:.2g} > {tol:g}); its linear/pair atoms are not those of a "
                      "retracted PolySAE. Call sae.retract_() to project it back.", stacklevel=3)
    return err


def retract(U: Tensor, fast: bool = True) -> Tensor | None:
    """Retracted copy of U (same dtype), or None when the guard says to skip (||U||_F < 1e-6).
    fp16/bf16 matrices are retracted in fp32 and cast back."""
    A = U.detach().to(_work_dtype(U.dtype))
    norm = float(torch.linalg.matrix_norm(A))
    if norm < 1e-6:
        return None
    if norm < 1e-4:
        A = A + 1e-6 * torch.randn_like(A)
    Q = cholesky_qr_pos(A) if fast else qr_pos(A)
    return Q.to(U.dtype)


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
