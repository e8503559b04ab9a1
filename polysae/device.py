"""Which device a run uses when none is named: one rule for every command and config.

Every config's ``device`` field means the same: ``None`` (the default) is ``cuda`` when a GPU is
visible, else ``cpu``; anything else (``cpu``, ``cuda``, ``cuda:1``, ``mps``) is used as given.
"""

from __future__ import annotations


def resolve_device(device: str | None) -> str:
    """``device`` itself, or ``"cuda"`` / ``"cpu"`` for ``None`` (cuda when available)."""
    if device:
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


__all__ = ["resolve_device"]
