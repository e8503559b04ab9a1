"""What training returns and raises: :class:`TrainResult`, :class:`StepMetrics`,
:class:`TrainingDiverged`."""

from __future__ import annotations

from typing import NamedTuple

from polysae.sae import SAE, LossOutput


class TrainingDiverged(ValueError):
    """A NaN/inf appeared in an input batch, a loss term or a gradient; names step and tensor.
    The checkpoint on disk is the last good one (nothing is written after the failure)."""


class TrainResult(NamedTuple):
    """What :func:`train` returns."""

    saes: dict[str, SAE]
    """Trained SAEs taking raw activations (normalisation folded in), in eval mode."""
    steps: int
    """Optimiser steps taken in total (including steps before a resume)."""
    tokens: int
    """Activation rows consumed in total (global over ranks)."""
    act_scale: float | None
    """The activation scale trained with (None without normalisation)."""


class StepMetrics(NamedTuple):
    """One SAE's numbers for one step (detached; the loss terms are 0-dim tensors)."""

    loss: LossOutput
    """The SAE's loss terms on this batch."""
    grad_norm: float
    """Global gradient norm before clipping."""
