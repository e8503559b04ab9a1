"""Zero-ablation of a set of latents seen through linear probes: :class:`Ablator`.

SAEBench's rule (TPP, SCR) replaces every token's activation by
``x' = decode(z with the latents S zeroed) + (x - decode(z))`` and reads the result through
probes ``W`` [D, C]. Only ``W^T x'`` is ever needed, so for the decoders polysae knows the output
is projected onto the probes first:

- linear: ``W^T x' = W^T x - sum_{i in S} z_i (W_dec W)[i]``;
- poly: with ``a = zU`` (``b = zU2``, ``c = zU3``) and ``G_k = C_k^T W``,
  ``W^T (x_hat - b_dec) = a G1 + l2 (a*b)[:R2] G2 + l3 (a*b*c)[:R3] G3``; zeroing ``S`` subtracts
  ``z_S U[S]`` from ``a`` (and likewise from ``b``, ``c``), so
  ``W^T x' = W^T x + f(a - da, ...) - f(a, ...)``.

That is the same quantity as decoding [N, D] activations for every ablation (checked against a
dense decode in the tests and against SAEBench's own code), at a cost of ``O(N |S| R)`` per
ablation instead of ``O(N K D)``. Any other decoder goes the literal way through
``sae.decode_sparse``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class Ablator:
    """Probe readings ``W^T x'`` [N, C] of tokens ``x`` [N, D] after zeroing latent sets."""

    def __init__(self, sae: Any, x: Tensor, W: Tensor):
        from polysae.evaluation.contributions import NotSplittable, decoder_kind

        f64 = torch.float64
        self.sae = sae
        self.W = W.to(f64)
        with torch.no_grad():
            sp = sae.encode_sparse(x)
        self.vals, self.idx = sp.values.cpu().to(f64), sp.indices.cpu()
        self.clean = x.to(f64) @ self.W                                   # [N, C]: W^T x
        try:
            self.kind = decoder_kind(sae)
        except NotSplittable:
            self.kind = "other"
        dec = sae.decoder
        if self.kind == "linear":
            self.G = dec.W_dec.detach().cpu().to(f64) @ self.W                 # [F, C]
        elif self.kind == "poly":
            U = dec.U.detach().cpu().to(f64)
            self.us = [U] + [None if getattr(dec, n, None) is None
                             else getattr(dec, n).detach().cpu().to(f64) for n in ("U2", "U3")]
            self.Gs = [getattr(dec, f"C{k}").detach().cpu().to(f64).T @ self.W
                       if getattr(dec, f"C{k}", None) is not None else None for k in (1, 2, 3)]
            self.lams = [None] + [None if getattr(dec, n, None) is None
                                  else float(getattr(dec, n).detach())
                                  for n in ("lambda2", "lambda3")]
            self.state = [self._gather(u) if u is not None else None for u in self.us]
            self.base = self._f(self.state)
        else:
            with torch.no_grad():
                self.err = x.to(f64) - sae.decode_sparse(sp.values, sp.indices).cpu().to(f64)

    def _gather(self, u: Tensor) -> Tensor:
        """``z u`` [N, R] for every token from the sparse codes, one active slot at a time (a
        loop over the K slots, never over latents; no [N, K, R] temporary)."""
        out = torch.zeros(len(self.vals), u.shape[1], dtype=u.dtype)
        for k in range(self.vals.shape[1]):
            out += self.vals[:, k, None] * u[self.idx[:, k]]
        return out

    def _f(self, state: list[Tensor | None]) -> Tensor:
        """``W^T (x_hat - b_dec)`` [N, C] of a polynomial decoder from ``a`` (``b``, ``c``)."""
        a = state[0]
        b = a if state[1] is None else state[1]
        c = a if state[2] is None else state[2]
        out = a @ self.Gs[0]
        if self.Gs[1] is not None:
            r = self.Gs[1].shape[0]
            out = out + self.lams[1] * ((a[:, :r] * b[:, :r]) @ self.Gs[1])
        if self.Gs[2] is not None:
            r = self.Gs[2].shape[0]
            out = out + self.lams[2] * ((a[:, :r] * b[:, :r] * c[:, :r]) @ self.Gs[2])
        return out

    def readings(self, S: Tensor) -> Tensor:
        """[N, C] ``W^T x'`` with the latents ``S`` zeroed on every token."""
        F = self.sae.cfg.d_sae
        S = torch.as_tensor(S, dtype=torch.long).reshape(-1)
        if S.numel() == 0:
            return self.clean.clone()
        pos = torch.full((F,), -1, dtype=torch.long)
        pos[S] = torch.arange(len(S))
        p = pos[self.idx]
        hit = (p >= 0) & (self.vals != 0)
        if self.kind == "linear":
            lost = (self.vals * hit)[..., None] * self.G[self.idx]           # [N, K, C]
            return self.clean - lost.sum(1)
        if self.kind == "poly":   # only the tokens where a zeroed latent was active change
            touched = torch.nonzero(hit.any(1))[:, 0]
            local = torch.full((len(self.vals),), -1, dtype=torch.long)
            local[touched] = torch.arange(len(touched))
            rows, ks = torch.nonzero(hit, as_tuple=True)
            zS = torch.zeros(len(touched), len(S), dtype=torch.float64)
            zS.index_put_((local[rows], p[rows, ks]), self.vals[rows, ks], accumulate=True)
            state = [None if st is None else st[touched] - zS @ u[S]
                     for st, u in zip(self.state, self.us)]
            out = self.clean.clone()
            out[touched] += self._f(state) - self.base[touched]
            return out
        with torch.no_grad():
            keep = (~hit).to(self.vals.dtype)
            home = self.sae.W_enc
            x_new = self.sae.decode_sparse((self.vals * keep).to(home.dtype), self.idx).cpu()
        return (x_new.to(torch.float64) + self.err) @ self.W


__all__ = ["Ablator"]
