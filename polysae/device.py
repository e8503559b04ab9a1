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


def check_device(device: str) -> str:
    """``device`` if this machine has it; a ``ValueError`` saying why not otherwise (not a device
    name torch knows, no CUDA GPU, fewer GPUs than the index, no MPS). Used on every command's
    ``--device`` before anything is loaded."""
    import torch

    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {device!r} is not a device name (use cpu, cuda, cuda:N or "
                         "mps)") from None
    if dev.type == "cpu":
        return str(device)
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {device}: this machine has no usable CUDA GPU "
                             "(torch.cuda.is_available() is False); use --device cpu or leave "
                             "--device out")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {device}: this machine has {n} CUDA GPU(s), "
                             f"cuda:0..cuda:{n - 1}")
        return str(device)
    backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
    avail = getattr(backend, "is_available", None)
    if not (callable(avail) and avail()):
        raise ValueError(f"--device {device}: no {dev.type} device on this machine; use cpu"
                         + (" or cuda" if torch.cuda.is_available() else ""))
    return str(device)


__all__ = ["check_device", "resolve_device"]
