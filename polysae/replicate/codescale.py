"""How big an SAE's codes are, and how much of its reconstruction each polynomial order carries.

Why this exists: W1 separation between class-conditional code distributions is scale-equivariant
(W1(c·u, c·v) = c·W1(u, v)), and an SAE's code scale is not identified by the reconstruction: a
vanilla SAE can trade a factor between ``z_i`` and ``||W_dec_i||``, and a PolySAE between ``z`` and
``C1`` (U is orthonormal, but ``C`` is free). So a raw W1 ratio between two SAEs mixes
"separates classes better" with "happens to have larger codes". These statistics measure the
second part, so a W1 ratio can be read against the code-scale ratio:

- ``code_l2``: mean over tokens of ``||z||_2``;
- ``active_mean``: mean of the nonzero code values;
- ``atom_norm``: median over latents that fired of the linear atom norm ``||A_i||`` (vanilla:
  ``||W_dec_i||``; PolySAE: ``||C1 u_i||``), the output size of a unit code;
- ``contribution``: ``active_mean * atom_norm``, the typical size of one active latent's linear
  output — comparable across SAEs, unlike either factor alone;
- ``share_linear`` / ``share_higher``: ``E||y_lin||^2 / E||x_hat - b_dec||^2`` and the same for
  ``lambda2 y2 + lambda3 y3`` (they need not sum to 1: the cross term can be negative);
- ``fvu`` and ``fvu_linear_only``: fraction of variance unexplained with the full decoder and
  with the higher-order terms dropped (their difference is what the interaction terms buy).
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple

import torch
from torch import Tensor


class CodeScale(NamedTuple):
    """Code-scale and term-share statistics of one SAE on held-out activations."""

    n_tokens: int
    """Tokens measured."""
    code_l2: float
    """Mean over tokens of the code's L2 norm."""
    active_mean: float
    """Mean of the nonzero code values."""
    atom_norm: float
    """Median over latents that fired of the linear atom's L2 norm."""
    contribution: float
    """``active_mean * atom_norm``: the typical linear output size of one active latent."""
    share_linear: float
    """``E||linear term||^2 / E||x_hat - b_dec||^2``."""
    share_higher: float
    """``E||lambda2 y2 + lambda3 y3||^2 / E||x_hat - b_dec||^2`` (0 for a linear decoder)."""
    fvu: float
    """``E||x - x_hat||^2 / E||x - mean(x)||^2`` with the full decoder."""
    fvu_linear_only: float
    """The same with the higher-order terms dropped (``x_hat = b_dec + linear term``)."""


@torch.no_grad()
def code_scale(sae: Any, batches: Iterable[Tensor]) -> CodeScale:
    """Stream held-out activation batches [B, d_in] through ``sae`` (accumulated in float64)."""
    F = sae.cfg.d_sae
    dev = sae.W_enc.device
    fired = torch.zeros(F, dtype=torch.bool, device=dev)
    n = 0
    l2 = act_sum = 0.0
    act_n = 0
    e_lin = e_hi = e_all = 0.0
    se = se_lin = 0.0
    sx = None
    sxx = 0.0
    for b in batches:
        x = b.to(dev, sae.W_enc.dtype).reshape(-1, sae.cfg.d_in)
        z = sae.encode(x)
        terms = sae.decoder.decode_terms(z)
        zd = z.double()
        l2 += float(zd.norm(dim=1).sum())
        nz = z != 0
        act_sum += float(zd[nz].sum())
        act_n += int(nz.sum())
        fired |= nz.any(0)
        lin, hi = terms.linear.double(), (terms.quadratic + terms.cubic).double()
        e_lin += float(lin.pow(2).sum())
        e_hi += float(hi.pow(2).sum())
        e_all += float((lin + hi).pow(2).sum())
        xd, bd = x.double(), sae.b_dec.double()
        se += float((xd - bd - lin - hi).pow(2).sum())
        se_lin += float((xd - bd - lin).pow(2).sum())
        sx = xd.sum(0) if sx is None else sx + xd.sum(0)
        sxx += float(xd.pow(2).sum())
        n += x.shape[0]
    if n == 0:
        raise ValueError("code_scale: no activations given")
    assert sx is not None
    total_var = sxx - float(sx.pow(2).sum()) / n
    norms = sae.decoder.linear_atoms().detach().double().norm(dim=1)
    atom = float(norms[fired].median()) if bool(fired.any()) else float("nan")
    active = act_sum / act_n if act_n else float("nan")
    denom = e_all if e_all > 0 else float("nan")
    return CodeScale(n, l2 / n, active, atom, active * atom, e_lin / denom, e_hi / denom,
                     se / total_var, se_lin / total_var)


__all__ = ["CodeScale", "code_scale"]
