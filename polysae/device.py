"""Which device a run uses when none is named: one rule for every command and config.

Every config's ``device`` field means the same: ``None`` (the default) is the device of the model
the caller passed in, if any, else ``cuda`` when a GPU is visible, else ``cpu``; anything else
(``cpu``, ``cuda``, ``cuda:1``, ``mps``) is used as given.
"""

from __future__ import annotations

from typing import Any


def resolve_device(device: str | None, model: Any = None) -> str:
    """``device`` itself; for ``None``: the device of ``model``'s parameters when a model (a
    module, or a ``LoadedModel`` holding one) is given, else ``"cuda"`` when available, else
    ``"cpu"``."""
    if device:
        return str(device)
    module = getattr(model, "model", model)
    params = getattr(module, "parameters", None)
    if callable(params):
        first = next(iter(params()), None)
        if first is not None:
            return str(first.device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


__all__ = ["resolve_device"]
