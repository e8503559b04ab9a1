"""Decoders behind one interface: ``LinearDecoder`` and ``PolyDecoder`` (docs/method.md).

Both take sparse codes (values, indices [N, K]) or dense codes [N, F] plus the SAE's ``b_dec`` and
return x_hat [N, D]. They expose ``retract_()`` (called after each optimiser step: the QR
retraction for the poly decoder, nothing for the linear one) and the analysis accessors
``linear_atoms`` / ``pair_atoms`` / ``triple_atoms`` / ``latent_atoms``. ``tensors()`` gives the
documented checkpoint names.

Shape letters: N rows, K active latents per row, F = d_sae, D = d_in, R1..R3 the ranks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from polysae import kernels
from polysae.config import SAEConfig
from polysae.kernels.reference import linear_decode_dense_ref, poly_decode_dense_ref
from polysae.orthogonal import check_on_manifold, gram_error, retract, retract_separate


class DecodeTerms(NamedTuple):
    """The decoder output split by polynomial order (bias excluded): ``x_hat = b_dec + linear +
    quadratic + cubic``. A linear decoder's higher terms are zero."""

    linear: Tensor
    """[N, D] the first-order term (``z @ W_dec``, or ``y1 = (z U) C1^T``)."""
    quadratic: Tensor
    """[N, D] ``lambda2 * y2``, the pairwise (and self-square) interaction term."""
    cubic: Tensor
    """[N, D] ``lambda3 * y3``."""


class PairFactors(NamedTuple):
    """The factors of a poly decoder's pairwise atoms: ``B_ij = C2 (u[i] * v[j])``, so
    ``y2 = sum_ij z_i z_j B_ij`` (see :meth:`PolyDecoder.pair_factors`)."""

    u: Tensor
    """[F, R2] ``U[:, :R2]``: the first factor of every latent."""
    v: Tensor
    """[F, R2] ``U2[:, :R2]`` with a separate U2, else ``U[:, :R2]`` (the same tensor as ``u``)."""
    C2: Tensor
    """[D, R2] the quadratic output map."""
    shared: bool
    """True when U is shared (``v`` is ``u``, so ``B_ij = B_ji``)."""


class LinearDecoder(nn.Module):
    """x_hat = b_dec + z @ W_dec, W_dec [F, D]. Initialised by the SAE (rows of norm 0.1)."""

    kind = "linear"

    def __init__(self, cfg: SAEConfig, device=None):
        super().__init__()
        self.cfg = cfg
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, device=device,
                                              dtype=cfg.torch_dtype))

    def decode_sparse(self, values: Tensor, indices: Tensor, bias: Tensor) -> Tensor:
        return kernels.linear_decode(values, indices, self.W_dec, bias)

    def decode_dense(self, codes: Tensor, bias: Tensor) -> Tensor:
        return linear_decode_dense_ref(codes, self.W_dec, bias)

    @torch.no_grad()
    def retract_(self, fast: bool = True) -> None:
        """Nothing to constrain (decoder norms are free, as in the paper's runs)."""

    @torch.no_grad()
    def scale_output_(self, s: float) -> None:
        """Multiply the decoder's output (without bias) by ``s``: ``W_dec -> s W_dec``."""
        self.W_dec.mul_(s)

    def decode_terms(self, codes: Tensor) -> DecodeTerms:
        """Dense codes [N, F] -> the output by order (only ``linear`` is nonzero)."""
        y1 = codes.to(self.W_dec.dtype) @ self.W_dec
        return DecodeTerms(y1, torch.zeros_like(y1), torch.zeros_like(y1))

    def linear_atoms(self) -> Tensor:
        return self.W_dec

    def latent_atoms(self) -> Tensor:
        return self.W_dec

    def pair_atoms(self, i: Tensor, j: Tensor) -> Tensor:
        raise ValueError("a linear decoder has no pairwise atoms (use decoder='poly')")

    def pair_factors(self) -> PairFactors:
        """Poly decoders only: a linear decoder has no pairwise atoms (ValueError)."""
        raise ValueError("a linear decoder has no pairwise atoms (use decoder='poly')")

    def triple_atoms(self, i: Tensor, j: Tensor, k: Tensor) -> Tensor:
        raise ValueError("a linear decoder has no triple atoms (use decoder='poly')")

    def tensors(self) -> dict[str, Tensor]:
        return {"W_dec": self.W_dec}


class PolyDecoder(nn.Module):
    """PolySAE decoder: x_hat = b_dec + h1 C1^T + l2 h2 C2^T + l3 h3 C3^T with h from z U.

    Shared U (paper): a = z U; h1 = a, h2 = a[:, :R2]^2, h3 = a[:, :R3]^3.
    Separate U: h2 = (z U)[:, :R2] * (z U2), h3 = (z U)[:, :R3] * (z U2)[:, :R3] * (z U3).
    Initialisation (docs/method.md): U orthogonal; C_k ~ kaiming_uniform (U(-sqrt(6/R_k),
    +sqrt(6/R_k))); lambda2 = -0.5, lambda3 = 0.5 (configurable).
    """

    kind = "poly"

    def __init__(self, cfg: SAEConfig, device=None):
        super().__init__()
        self.cfg = cfg
        r1, r2, r3 = cfg.ranks
        F, D, dt = cfg.d_sae, cfg.d_in, cfg.torch_dtype

        def p(*shape):
            return nn.Parameter(torch.empty(shape, device=device, dtype=dt))

        self.U = p(F, r1)
        self.C1 = p(D, r1)
        self.C2 = p(D, r2) if cfg.order >= 2 else None
        self.C3 = p(D, r3) if cfg.order >= 3 else None
        self.lambda2 = p() if cfg.order >= 2 else None
        self.lambda3 = p() if cfg.order >= 3 else None
        separate = not cfg.shared_u
        self.U2 = p(F, r2) if separate and cfg.order >= 2 else None
        self.U3 = p(F, r3) if separate and cfg.order >= 3 else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.cfg
        if self.U.is_meta:  # built only to receive a checkpoint's tensors
            return
        # fp16/bf16: initialised in fp32 (Householder QR has no half-precision kernel) and cast;
        # fp32 draws the same random numbers either way.
        low = self.U.dtype not in (torch.float32, torch.float64)
        us = [torch.empty_like(u, dtype=torch.float32) if low else u for u in self._us()]
        if self.U2 is None:
            nn.init.orthogonal_(us[0])
        else:  # start on the manifold of the joint retraction: all columns mutually orthonormal
            for u in us:
                nn.init.normal_(u)
            for u, q in zip(us, retract_separate(us, fast=False)):
                u.copy_(q)
        if low:
            for u, w in zip(self._us(), us):
                u.copy_(w)
        for C in (self.C1, self.C2, self.C3):
            if C is not None:
                nn.init.kaiming_uniform_(C)  # a=0, fan_in = R_k: bound sqrt(6 / R_k)
        if self.lambda2 is not None:
            self.lambda2.fill_(cfg.lambda2_init)
        if self.lambda3 is not None:
            self.lambda3.fill_(cfg.lambda3_init)

    def _us(self) -> list[Tensor]:
        return [u for u in (self.U, self.U2, self.U3) if u is not None]

    # -- decode -------------------------------------------------------------------------------
    def decode_sparse(self, values: Tensor, indices: Tensor, bias: Tensor) -> Tensor:
        return kernels.poly_decode(values, indices, self.U, self.C1, self.C2, self.C3,
                                   self.lambda2, self.lambda3, bias, self.U2, self.U3)

    def decode_dense(self, codes: Tensor, bias: Tensor) -> Tensor:
        return poly_decode_dense_ref(codes, self.U, self.C1, self.C2, self.C3, self.lambda2,
                                     self.lambda3, bias, self.U2, self.U3)

    def decode_terms(self, codes: Tensor) -> DecodeTerms:
        """Dense codes [N, F] -> the output by order, ``lambda``s included; their sum plus
        ``b_dec`` is :meth:`decode_dense`."""
        z = codes.to(self.U.dtype)
        a = z @ self.U
        y1 = a @ self.C1.T
        zero = torch.zeros_like(y1)
        y2 = y3 = zero
        if self.C2 is not None:
            r2 = self.C2.shape[1]
            b = a[:, :r2] if self.U2 is None else z @ self.U2
            y2 = self.lambda2 * ((a[:, :r2] * b[:, :r2]) @ self.C2.T)
        if self.C3 is not None:
            r3 = self.C3.shape[1]
            b = a if self.U2 is None else z @ self.U2
            c = a if self.U3 is None else z @ self.U3
            y3 = self.lambda3 * ((a[:, :r3] * b[:, :r3] * c[:, :r3]) @ self.C3.T)
        return DecodeTerms(y1, y2, y3)

    # -- constraint ---------------------------------------------------------------------------
    @torch.no_grad()
    def retract_(self, fast: bool = True) -> None:
        """Orthonormalise U (and U2, U3 jointly in separate mode); docs/method.md."""
        if self.U2 is None:
            Q = retract(self.U, fast)
            if Q is not None:
                self.U.copy_(Q)
            return
        us = self._us()
        qs = retract_separate(us, fast)
        if qs is not None:
            for u, q in zip(us, qs):
                u.copy_(q)

    def orthogonality_error(self) -> float:
        """||W^T W - I||_F over W = [U | U2 | U3] (every column the retraction keeps orthonormal;
        fp32 Gram with TF32 off): the trainer's logged ``orth_err``."""
        return gram_error(self._us())

    def check_on_manifold(self, where: str, tol: float = 1e-3) -> float:
        """Warn when U (U2, U3) is off the constraint set by more than ``tol`` (probe estimate);
        see :func:`polysae.orthogonal.check_on_manifold`."""
        return check_on_manifold(self._us(), where, tol)

    @torch.no_grad()
    def scale_output_(self, s: float) -> None:
        """Multiply the decoder's output (without bias) by ``s``. Each order's term is linear in
        its own ``C``, and ``U`` must stay orthonormal while the lambdas are shared by the
        orders, so the scale goes into ``C1, C2, C3``."""
        for C in (self.C1, self.C2, self.C3):
            if C is not None:
                C.mul_(s)

    # -- analysis -----------------------------------------------------------------------------
    def linear_atoms(self) -> Tensor:
        """[F, D]: row i is A_i = C1 u_i, the linear contribution of latent i (z_i = 1)."""
        return self.U @ self.C1.T

    def _u2(self) -> Tensor:
        return self.U if self.U2 is None else self.U2

    def pair_atoms(self, i: Tensor, j: Tensor) -> Tensor:
        """[P, D]: B_ij = C2 (u_i[:R2] * u'_j) for index vectors i, j [P] (u' = U2 rows when
        separate). y2 = sum_ij z_i z_j B_ij, so an off-diagonal pair adds 2 l2 z_i z_j B_ij."""
        if self.C2 is None:
            raise ValueError("order < 2: this decoder has no pairwise atoms")
        r2 = self.C2.shape[1]
        i, j = torch.as_tensor(i, device=self.U.device), torch.as_tensor(j, device=self.U.device)
        return (self.U[i, :r2] * self._u2()[j, :r2]) @ self.C2.T

    def pair_factors(self) -> PairFactors:
        """The factors of every pairwise atom at once, ``B_ij = C2 (u[i] * v[j])`` (views of the
        parameters, not copies): for computations over all pairs that must not build the
        F x F x D tensor of atoms (e.g. :func:`polysae.evaluation.interactions.pair_candidates`)."""
        if self.C2 is None:
            raise ValueError("order < 2: this decoder has no pairwise atoms")
        r2 = self.C2.shape[1]
        return PairFactors(self.U[:, :r2], self._u2()[:, :r2], self.C2, self.U2 is None)

    def triple_atoms(self, i: Tensor, j: Tensor, k: Tensor) -> Tensor:
        """[P, D]: Gamma_ijk = C3 (u_i[:R3] * u'_j[:R3] * u''_k[:R3])."""
        if self.C3 is None:
            raise ValueError("order < 3: this decoder has no triple atoms")
        r3 = self.C3.shape[1]
        dev = self.U.device
        i, j, k = (torch.as_tensor(t, device=dev) for t in (i, j, k))
        u3 = self.U if self.U3 is None else self.U3
        return (self.U[i, :r3] * self._u2()[j, :r3] * u3[k, :r3]) @ self.C3.T

    def latent_atoms(self) -> Tensor:
        """[F, D]: D_i = decode(e_i) - b_dec, latent i's full contribution at z_i = 1 (linear +
        self-interaction terms); the norm the reference uses for decoder-norm rescaling."""
        F = self.U.shape[0]
        out = []
        zero = torch.zeros(self.C1.shape[0], device=self.U.device, dtype=self.U.dtype)
        for s in range(0, F, 4096):
            idx = torch.arange(s, min(F, s + 4096), device=self.U.device)[:, None]
            out.append(self.decode_sparse(torch.ones_like(idx, dtype=self.U.dtype), idx, zero))
        return torch.cat(out)

    def tensors(self) -> dict[str, Tensor]:
        names = ("U", "C1", "C2", "C3", "lambda2", "lambda3", "U2", "U3")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def make_decoder(cfg: SAEConfig, device=None) -> nn.Module:
    return (PolyDecoder if cfg.decoder == "poly" else LinearDecoder)(cfg, device)
