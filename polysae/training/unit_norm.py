"""Unit-norm decoder rows during training (``SAEConfig.unit_norm_decoder``, linear decoders).

sparsify's and SAEBench's convention, the same two operations in the same places:

- before the optimiser step (and before gradient clipping, so the clipped norm is the norm of
  the gradient that is applied): from the gradient ``g`` of every row ``w`` of ``W_dec`` remove
  its component along the row, ``g <- g - (g . w_hat) w_hat`` with ``w_hat = w / ||w||`` (for a
  unit row, ``g - (g . w) w``): a first-order step then leaves the row's norm unchanged;
- after the step: divide every row by its norm (Adam's moment-scaled update is not exactly
  tangent, so the norm drifts by second-order terms and is put back exactly).

Both are no-ops for an SAE without ``unit_norm_decoder``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from polysae.sae import SAE

EPS = 1e-12
"""Floor of a row norm in the division (an all-zero row stays zero)."""


def unit_norm_rows(sae: SAE) -> Tensor | None:
    """The ``W_dec`` [F, D] parameter kept at unit row norm, or None when ``sae`` has no such
    constraint."""
    return sae.decoder.W_dec if sae.cfg.unit_norm_decoder else None


@torch.no_grad()
def remove_parallel_grad_(W: Tensor) -> None:
    """In place: ``W.grad[i] -= (W.grad[i] . w_hat_i) w_hat_i`` for every row ``i`` (no-op when
    ``W`` has no gradient)."""
    if W.grad is None:
        return
    w_hat = W / W.norm(dim=-1, keepdim=True).clamp_min(EPS)
    g = W.grad
    g.sub_((g * w_hat).sum(-1, keepdim=True) * w_hat)


@torch.no_grad()
def normalize_rows_(W: Tensor) -> None:
    """In place: every row of ``W`` divided by its L2 norm."""
    W.div_(W.norm(dim=-1, keepdim=True).clamp_min(EPS))


def before_step(sae: SAE) -> None:
    """The trainer's hook between ``backward`` and gradient clipping."""
    W = unit_norm_rows(sae)
    if W is not None:
        remove_parallel_grad_(W)


def after_step(sae: SAE) -> None:
    """The trainer's hook right after the optimiser step."""
    W = unit_norm_rows(sae)
    if W is not None:
        normalize_rows_(W)


__all__ = ["unit_norm_rows", "remove_parallel_grad_", "normalize_rows_", "before_step",
           "after_step"]
