"""The training configuration, :class:`TrainConfig` (its fields are the ``polysae train`` flags)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from polysae.config import check_values, known_fields
from polysae.training.schedule import SCHEDULES

LOGGERS = ("wandb", "tensorboard")
"""Optional metric loggers (``TrainConfig.log_to``)."""


@dataclass
class TrainConfig:
    """How to train (identical for every SAE of a run). Defaults: the paper's recipe."""

    lr: float = 3e-4
    """Adam learning rate (peak rate when a schedule is used)."""

    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""

    eps: float = 1e-8
    """Adam epsilon."""

    schedule: str = dataclasses.field(default="constant", metadata={"choices": SCHEDULES})
    """``constant``, ``cosine`` (warm-up then cosine decay) or ``linear`` (warm-up, then linear
    decay over the last ``decay_steps`` steps). The paper used ``constant`` with no warm-up."""

    warmup_steps: int = 0
    """Linear warm-up from 0 over this many steps."""

    decay_steps: int | None = None
    """``linear`` schedule: length of the final decay ramp (None: every step after warm-up)."""

    min_lr_ratio: float = 0.0
    """Final learning rate of a decaying schedule, as a fraction of ``lr``."""

    tokens: int | None = None
    """Stop after this many activation rows (global, over all ranks); rounded up to whole steps."""

    steps: int | None = None
    """Stop after this many optimiser steps (overrides ``tokens``). With neither set the trainer
    makes one pass over the data."""

    grad_clip: float = 1.0
    """Global L2-norm gradient clipping per SAE (0 disables)."""

    retract_every: int = 1
    """Orthogonality retraction of U every this many steps (1 = every step, the paper; 0 = never).
    Larger cadences are cheaper but change the method (docs/method.md). With a cadence > 1 the
    weights saved in ``sae.safetensors`` are a retracted copy (the trainer state keeps the raw
    ones, so resume is exact) and ``fit()`` retracts once more at its end."""

    retract_fast: bool = True
    """One CholeskyQR pass checked with probe vectors (falling back to CholeskyQR2, then
    Householder QR) instead of plain Householder QR; the same Q (docs/method.md)."""

    dead_window: int = 1000
    """A latent that has not fired in this many steps counts as dead and feeds AuxK."""

    normalize: bool = False
    """Estimate a scalar activation scale once and train on ``x / s``; folded into the weights at
    save, so a saved SAE still takes raw activations. Off in every paper run."""

    norm_batches: int = 16
    """Batches used to estimate the activation scale."""

    bf16: bool = False
    """Run the SAE forward/backward under bfloat16 autocast (parameters and Adam stay float32)."""

    seed: int = 42
    """Seeds torch before the SAEs' state is set up; saved RNG state makes resume exact."""

    checkpoint_every: int = 1000
    """Write every SAE's checkpoint every this many steps (0: only at the end)."""

    log_every: int = 10
    """Append a metrics.jsonl line every this many steps (and at the last step)."""

    progress: bool = True
    """Show a tqdm progress bar (rank 0 only)."""

    log_to: tuple[str, ...] = dataclasses.field(default=(), metadata={"choices": LOGGERS})
    """Extra loggers: ``wandb`` and/or ``tensorboard``; each is skipped with a warning when its
    package is not installed (never required)."""

    wandb_project: str = "polysae"
    """wandb project name when ``wandb`` is in ``log_to``."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"TrainConfig.{name}: {why}")

        check_values("TrainConfig", dataclasses.asdict(self))  # NaN/inf, runaway integers
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", f"must be a positive number, got {self.lr!r}")
        if not self.eps >= 0:
            raise bad("eps", f"must be >= 0, got {self.eps!r}")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad("betas", f"must be two numbers in [0, 1), got {self.betas!r}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("warmup_steps", "retract_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)!r}")
        for name in ("dead_window", "log_every", "norm_batches"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)!r}")
        for name in ("tokens", "steps", "decay_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise bad(name, f"must be a positive integer or None, got {v!r}")
        if self.grad_clip < 0:
            raise bad("grad_clip", f"must be >= 0, got {self.grad_clip!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise bad("min_lr_ratio", f"must lie in [0, 1], got {self.min_lr_ratio!r}")
        self.log_to = tuple(self.log_to)
        for name in self.log_to:
            if name not in LOGGERS:
                raise bad("log_to", f"unknown logger {name!r} ({', '.join(LOGGERS)})")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"], d["log_to"] = list(self.betas), list(self.log_to)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from a dict, dropping keys this version does not know (forward compatibility)."""
        return cls(**known_fields(cls, d))
