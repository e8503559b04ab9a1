"""The files of a checkpoint folder, shared by every layout's reader and writer: JSON configs,
safetensors weights (read with their shapes checked, written atomically) and dtype names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from polysae.config import DTYPES
from polysae.fileio import atomic_write_with


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``ValueError`` naming the file if unreadable or not one."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file (``FileNotFoundError`` if absent, ``ValueError`` if
    unreadable)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read safetensors ({e})") from e


def need(tensors: dict[str, Tensor], name: str, shape: tuple[int, ...], src: Path) -> Tensor:
    """``tensors[name]``, checked to have ``shape``; ``ValueError`` naming ``src`` otherwise."""
    if name not in tensors:
        raise ValueError(f"{src}: tensor {name!r} is missing (has {sorted(tensors)})")
    t = tensors[name]
    if tuple(t.shape) != shape:
        raise ValueError(f"{src}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
    return t


def dtype_name(t: Tensor) -> str:
    """The :data:`polysae.config.DTYPES` name of ``t``'s dtype (``float32`` if none matches)."""
    for name, dt in DTYPES.items():
        if dt == t.dtype:
            return name
    return "float32"


def write_weights(d: Path, name: str, tensors: dict[str, Tensor], fmt: str) -> None:
    """Write ``tensors`` to ``d/name`` as safetensors (metadata ``format=fmt``) atomically: temp
    name, fsync, rename. Writers call it before their config file, which goes last."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_with(d / name, lambda tmp: save_file(tensors, str(tmp), metadata={"format": fmt}))


__all__ = ["read_json", "read_safetensors", "need", "dtype_name", "write_weights"]
