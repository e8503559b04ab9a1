"""Per-latent contributions through the whole decoder: the exact Shapley split of ``x_hat - b_dec``
between the active latents of a token (docs/method.md, "Per-latent contributions").

A PolySAE's output is a polynomial in the codes, ``x_hat - b = y1 + l2 y2 + l3 y3``, so a latent's
"direction" depends on which other latents are active. Splitting each monomial equally between the
distinct latents it involves (the Shapley value of the game ``v(S) = decode(z_S) - b``, where every
monomial is a unanimity game on its support) gives contributions ``c_i(x)`` that

- add up exactly: ``sum_i c_i(x) = x_hat - b_dec`` (efficiency);
- are zero for an inactive latent, and ``z_i W_dec[i]`` for a linear decoder;
- factor as ``c_i(x) = z_i d_i(x)``: :func:`unit_directions` gives ``d_i(x)`` without dividing by
  ``z_i``, so a linear decoder's ``d_i`` is bit for bit its row ``W_dec[i]``.

With ``a = z U``, ``b = z U2`` and ``c = z U3`` (``U2 = U3 = U`` for the shared ``U``) and latent
``i``'s rows ``u, v, w``, per rank ``r``:

- linear: ``d1 = u C1^T`` (the linear atom);
- quadratic: ``(u_r b_r + v_r a_r) / 2`` (``u_r a_r`` with a shared ``U``: the pair ``z_i z_j``'s
  term is split in halves, the self term ``z_i^2`` is the latent's own);
- cubic: ``T/3 + P2/6 + 2 S/3`` per unit ``z_i``, where ``S`` is the self monomial, ``P2`` the
  monomials shared with exactly one other latent and ``T`` all monomials involving ``i`` (formulas
  in :func:`_cubic_unit`; a triple ``z_i z_j z_k`` is split in thirds, ``z_i^2 z_j`` in halves).

Everything is vectorised over tokens and active latents ([N, K] sparse codes); nothing loops over
``d_sae``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class NotSplittable(ValueError):
    """The SAE's decoder has no known per-latent split (not a linear or polynomial decoder)."""


def decoder_kind(sae: Any) -> str:
    """``linear`` or ``poly`` for the decoders the split knows; :class:`NotSplittable` otherwise."""
    dec = getattr(sae, "decoder", None)
    kind = getattr(dec, "kind", None)
    if kind == "linear" and isinstance(getattr(dec, "W_dec", None), Tensor):
        return "linear"
    if kind == "poly" and all(isinstance(getattr(dec, n, None), Tensor) for n in ("U", "C1")):
        return "poly"
    raise NotSplittable(
        f"the decoder of this SAE ({type(dec).__name__}, kind {kind!r}) has no per-latent "
        "contribution split: polysae splits linear (W_dec) and polynomial (U, C1..C3) decoders "
        "only")


def _factors(dec: Any, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """U, U2, U3 in ``dtype`` (U2 = U3 = U with a shared U)."""
    U = dec.U.detach().to(dtype)
    U2 = U if dec.U2 is None else dec.U2.detach().to(dtype)
    U3 = U if getattr(dec, "U3", None) is None else dec.U3.detach().to(dtype)
    return U, U2, U3


def _quad_unit(z: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """[N, K, R] per-unit quadratic share: ``(u_r b_r + v_r a_r) / 2`` with ``a = sum z u``,
    ``b = sum z v`` over the row's active latents."""
    a = (z[..., None] * u).sum(1, keepdim=True)
    b = (z[..., None] * v).sum(1, keepdim=True)
    return 0.5 * (u * b + v * a)


def _cubic_unit(z: Tensor, u: Tensor, v: Tensor, w: Tensor) -> Tensor:
    """[N, K, R] per-unit cubic share (Shapley split of ``sum_r a_r b_r c_r``).

    With ``p = z u, q = z v, s = z w`` per latent and ``A, B, C`` their sums over the row:
    ``T = pBC + qAC + sAB - pqC - psB - qsA + pqs`` (all monomials involving the latent),
    ``S = pqs`` (its own cube), ``P2 = pq(C-s) + ps(B-q) + qs(A-p) + p(QS-qs) + q(PS-ps) +
    s(PQ-pq)`` (monomials with exactly one other latent; ``PQ = sum p q`` etc.). Each of ``T``,
    ``S``, ``P2`` has the factor ``z``; the share ``T/3 + P2/6 + 2S/3`` is returned per unit
    ``z`` (divided symbolically, never numerically)."""
    zz = z[..., None]
    p, q, s = zz * u, zz * v, zz * w
    A, B, C = (t.sum(1, keepdim=True) for t in (p, q, s))
    PQ, PS, QS = ((x * y).sum(1, keepdim=True) for x, y in ((p, q), (p, s), (q, s)))
    T = u * B * C + v * A * C + w * A * B - zz * (u * v * C + u * w * B + v * w * A) \
        + zz * zz * u * v * w
    S = zz * zz * u * v * w
    P2 = (zz * u * v * (C - s) + zz * u * w * (B - q) + zz * v * w * (A - p)
          + u * (QS - q * s) + v * (PS - p * s) + w * (PQ - p * q))
    return T / 3 + P2 / 6 + 2 * S / 3


def _cubic_unit_shared(z: Tensor, u: Tensor) -> Tensor:
    """:func:`_cubic_unit` with ``u = v = w`` (one shared ``U``), simplified: with ``p = z u``,
    ``A = sum p`` and ``Q = sum p^2`` over the row, the share per unit ``z`` is
    ``u (A^2 - p A / 2 + Q / 2)`` (summing ``p`` times it over the row gives ``A^3``)."""
    p = z[..., None] * u
    A = p.sum(1, keepdim=True)
    Q = (p * p).sum(1, keepdim=True)
    return u * (A * A - 0.5 * p * A + 0.5 * Q)


def _poly_parts(sae: Any, values: Tensor, indices: Tensor, dtype: torch.dtype):
    """(z, linear atom rows [N,K,D] or None, quadratic unit share [N,K,R2] or None, cubic unit
    share [N,K,R3] or None) of a polynomial decoder."""
    dec = sae.decoder
    z = values.to(dtype)
    U, U2, U3 = _factors(dec, dtype)
    q2 = q3 = None
    if getattr(dec, "C2", None) is not None:
        r2 = dec.C2.shape[1]
        q2 = _quad_unit(z, U[indices, :r2], U2[indices, :r2])
    if getattr(dec, "C3", None) is not None:
        r3 = dec.C3.shape[1]
        u = U[indices, :r3]
        if U2 is U and U3 is U:
            q3 = _cubic_unit_shared(z, u)
        else:
            q3 = _cubic_unit(z, u, U2[indices, :r3], U3[indices, :r3])
    return z, U, q2, q3


def unit_directions(sae: Any, values: Tensor, indices: Tensor,
                    dtype: torch.dtype = torch.float64) -> Tensor:
    """[N, K, D] ``d_i(x)`` with ``c_i(x) = z_i d_i(x)`` for the active latents ``indices`` [N, K]
    with codes ``values`` [N, K] (padding entries with value 0 are harmless: they add nothing to
    the sums). A linear decoder gives ``W_dec[indices]`` exactly."""
    kind = decoder_kind(sae)
    dec = sae.decoder
    idx = indices.to(dec.U.device if kind == "poly" else dec.W_dec.device, torch.long)
    if kind == "linear":
        return dec.W_dec.detach().to(dtype)[idx]
    with torch.no_grad():
        z, U, q2, q3 = _poly_parts(sae, values.to(idx.device), idx, dtype)
        out = U[idx] @ dec.C1.to(dtype).T
        if q2 is not None:
            out = out + dec.lambda2.to(dtype) * (q2 @ dec.C2.to(dtype).T)
        if q3 is not None:
            out = out + dec.lambda3.to(dtype) * (q3 @ dec.C3.to(dtype).T)
    return out


def contributions(sae: Any, values: Tensor, indices: Tensor,
                  dtype: torch.dtype = torch.float64) -> Tensor:
    """[N, K, D] Shapley contributions ``c_i(x) = z_i d_i(x)``; they sum over K to
    ``x_hat - b_dec``."""
    d = unit_directions(sae, values, indices, dtype)
    return values.to(d.device, dtype)[..., None] * d


def probe_responses(sae: Any, values: Tensor, indices: Tensor, W: Tensor,
                    dtype: torch.dtype = torch.float64) -> Tensor:
    """[N, K, P] ``W^T c_i(x)`` for probe directions ``W`` [D, P] without building the [N, K, D]
    contributions: the output maps are projected onto ``W`` first (``C_k^T W``)."""
    kind = decoder_kind(sae)
    dec = sae.decoder
    with torch.no_grad():
        if kind == "linear":
            G = dec.W_dec.detach().to(dtype) @ W.to(dec.W_dec.device, dtype)  # [F, P]
            idx = indices.to(G.device, torch.long)
            return values.to(G.device, dtype)[..., None] * G[idx]
        idx = indices.to(dec.U.device, torch.long)
        Wd = W.to(dec.U.device, dtype)
        z, U, q2, q3 = _poly_parts(sae, values.to(idx.device), idx, dtype)
        out = (U @ (dec.C1.to(dtype).T @ Wd))[idx]   # [F, P] first: no [N, K, R1] gather
        if q2 is not None:
            out = out + dec.lambda2.to(dtype) * (q2 @ (dec.C2.to(dtype).T @ Wd))
        if q3 is not None:
            out = out + dec.lambda3.to(dtype) * (q3 @ (dec.C3.to(dtype).T @ Wd))
    return z[..., None] * out


def linear_directions(sae: Any) -> Tensor:
    """[F, D] the raw linear atoms SAEBench reads as ``W_dec`` (``sae.linear_atoms()``, the view
    of :class:`polysae.evaluation.saebench.SAEBenchSAE`)."""
    with torch.no_grad():
        return sae.linear_atoms().detach()


__all__ = ["NotSplittable", "contributions", "decoder_kind", "linear_directions",
           "probe_responses", "unit_directions"]
