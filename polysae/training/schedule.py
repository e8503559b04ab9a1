"""Learning-rate schedules as pure functions of the step (no scheduler object to checkpoint).

``lr_at(step, ...)`` gives the rate used by optimiser step ``step`` (0-based). Keeping it a pure
function makes resume exact by construction: a resumed run recomputes the same rate from the
restored step counter, so there is no LR-scheduler state that could drift or be forgotten.

Schedules (the paper's recipe uses ``constant`` with no warm-up, the SAELens default):

- ``constant``: linear warm-up from 0 over ``warmup`` steps, then ``lr``;
- ``cosine``: warm-up, then cosine from ``lr`` down to ``lr * min_ratio`` at ``total`` steps;
- ``linear``: warm-up, constant, then a linear ramp to ``lr * min_ratio`` over the last
  ``decay_steps`` steps (all steps after warm-up when ``decay_steps`` is None).
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "linear")


def lr_at(step: int, lr: float, schedule: str = "constant", *, warmup: int = 0,
          total: int | None = None, min_ratio: float = 0.0, decay_steps: int | None = None
          ) -> float:
    """Learning rate for 0-based ``step``. ``total`` (number of steps) is needed for decays."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if total is None or total <= 0:
        raise ValueError(f"schedule {schedule!r} needs the total number of steps (set "
                         "TrainConfig.tokens or TrainConfig.steps)")
    floor = lr * min_ratio
    if schedule == "cosine":
        span = max(1, total - warmup)
        t = min(1.0, (step - warmup) / span)
        return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    span = (total - warmup) if decay_steps is None else decay_steps
    span = max(1, span)
    start = total - span
    if step < start:
        return lr
    t = min(1.0, (step - start) / span)
    return lr + (floor - lr) * t


__all__ = ["lr_at", "SCHEDULES"]
