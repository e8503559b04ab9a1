"""The files of a checkpoint folder, shared by every layout's reader and writer: JSON configs,
safetensors weights (read with their shapes checked, written atomically) and dtype names."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from polysae.config import DTYPES
from polysae.fileio import atomic_write_with, fsync_dir


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


def describe(d: Path) -> str:
    """What checkpoint folder ``d`` holds, in a few words for a message: its config's shape
    fields (and the model/hook it records), else its file names."""
    for name in ("config.json", "cfg.json"):
        if (d / name).is_file():
            try:
                doc = read_json(d / name)
            except ValueError:
                return f"an unreadable {name}"
            cfg = doc["config"] if isinstance(doc.get("config"), dict) else doc
            meta = doc["metadata"] if isinstance(doc.get("metadata"), dict) else cfg
            keys = ("architecture", "decoder", "sparsifier", "d_in", "d_sae", "k", "model",
                    "model_name", "hook", "hook_name")
            shown = [f"{k} {v}" for k in keys
                     if isinstance(v := cfg.get(k, meta.get(k)), (str, int, float))]
            return f"a checkpoint ({', '.join(shown) or name})"
    return f"other files ({', '.join(sorted(p.name for p in d.iterdir())[:6])})"


def same_content(a: Path, b: Path) -> bool:
    """Whether files ``a`` and ``b`` hold the same artefact: JSON compared parsed (a recorded
    ``weights_sha256`` aside: it follows the weights file, compared itself), safetensors by
    parsed header and data bytes (safetensors writes metadata keys in no fixed order), anything
    else byte for byte."""
    import filecmp
    import struct

    if not (a.is_file() and b.is_file()):
        return False
    try:
        if a.suffix == ".json":
            x, y = (json.loads(p.read_text()) for p in (a, b))
            for doc in (x, y):
                if isinstance(doc, dict):
                    doc.pop("weights_sha256", None)
            return x == y
        if a.suffix == ".safetensors":
            parts = []
            for p in (a, b):
                raw = p.read_bytes()
                n = struct.unpack("<Q", raw[:8])[0]
                parts.append((json.loads(raw[8:8 + n]), raw[8 + n:]))
            return parts[0] == parts[1]
    except (OSError, ValueError, struct.error):
        return False
    return filecmp.cmp(a, b, shallow=False)


def export_beside(d: Path, write: Callable[[Path], Any]) -> Path:
    """Run ``write(tmp)`` into a fresh sibling of the non-empty folder ``d``, then move its files
    into ``d`` (data files first, JSON configs last) unless one of them would replace a
    different file already there: then ``FileExistsError`` saying what ``d`` holds, and ``d`` is
    left as it was. Identical files are left in place."""
    tmp = d.parent / f".{d.name}.export-tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        rels = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        changed = [r for r in rels if (d / r).exists() and not same_content(tmp / r, d / r)]
        if changed:
            raise FileExistsError(f"export: {d} already holds {describe(d)}; this export differs "
                                  f"({', '.join(changed)}); pass --overwrite (overwrite=True) to "
                                  "replace it, or choose another folder")
        for r in sorted(rels, key=lambda r: r.endswith(".json")):
            if not (d / r).exists():
                (d / r).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / r, d / r)
        fsync_dir(d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d


__all__ = ["read_json", "read_safetensors", "need", "dtype_name", "write_weights", "describe",
           "export_beside"]
