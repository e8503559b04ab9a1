"""Which layout a folder holds, and the dispatch over layouts: :func:`read_checkpoint` (any layout
in :data:`FORMATS`) and :func:`export` (any of :data:`EXPORT_FORMATS`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from polysae.formats.files import export_beside, read_json
from polysae.formats.gemmascope import read_gemmascope
from polysae.formats.reference import read_reference, write_reference
from polysae.formats.saelens import read_saelens, write_saelens
from polysae.formats.sparsify import read_sparsify, write_sparsify
from polysae.sae import SAE, load_checkpoint
from polysae.validate import check_finite_tensors

FORMATS = ("polysae", "saelens", "polysae-ref", "sparsify", "gemmascope")
"""Every layout :func:`read_checkpoint` understands."""

EXPORT_FORMATS = ("saelens", "polysae-ref", "sparsify", "polysae")
"""Checkpoint layouts :func:`export` writes (``polysae export`` also writes ``neuronpedia``
feature batches, :mod:`polysae.formats.neuronpedia`)."""


LAYOUT_FILES = {
    "polysae": ("config.json", "sae.safetensors"),
    "saelens": ("cfg.json", "sae_weights.safetensors"),
    "polysae-ref": ("cfg.json", "sae_weights.safetensors"),
    "sparsify": ("cfg.json", "sae.safetensors"),
    "gemmascope": (None, "params.npz"),
}
"""File names per layout: (config file, weights file)."""


class ImportedSAE(NamedTuple):
    """What :func:`read_checkpoint` returns."""

    sae: SAE
    """The model in eval mode."""
    metadata: dict[str, Any]
    """Provenance the source recorded: ``model``, ``hook``, ``format`` and, where known,
    ``context_size``, ``dataset``, ``prepend_bos`` and the source's own config under
    ``source_cfg``."""
    format: str
    """The detected layout (one of :data:`FORMATS`)."""


def detect_format(folder: str | os.PathLike) -> str:
    """Name the layout of ``folder`` (one of :data:`FORMATS`); ValueError lists what was found."""
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a folder")
    names = {p.name for p in d.iterdir()}
    if {"config.json", "sae.safetensors"} <= names:
        return "polysae"
    if "cfg.json" in names and "sae_weights.safetensors" in names:
        arch = str(read_json(d / "cfg.json").get("architecture", "standard"))
        return "polysae-ref" if arch.startswith("poly") else "saelens"
    if "cfg.json" in names and "sae.safetensors" in names:
        return "sparsify"
    if "params.npz" in names:
        return "gemmascope"
    inner = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and ({"config.json", "cfg.json", "params.npz"} & {q.name for q in p.iterdir()}))
    if inner:  # e.g. a `polysae train` run folder holding RUN/poly and RUN/vanilla
        raise ValueError(f"{d} holds several checkpoints, not one: "
                         f"{', '.join(str(d / n) for n in inner[:8])}; pass one of them")
    raise ValueError(
        f"{d}: not a checkpoint folder polysae can read (found {sorted(names)[:12]}); expected "
        "config.json+sae.safetensors (polysae), cfg.json+sae_weights.safetensors (SAELens or "
        "reference PolySAE), cfg.json+sae.safetensors (sparsify) or params.npz (Gemma Scope)")


def read_checkpoint(folder: str | os.PathLike, device: torch.device | str | None = None,
                    format: str | None = None) -> ImportedSAE:
    """Load a checkpoint folder of any supported layout (detected unless ``format`` is given)."""
    d = Path(folder)
    fmt = format or detect_format(d)
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")
    if fmt == "polysae":
        sae, meta = load_checkpoint(d, device=device)
        return ImportedSAE(sae, {**meta, "format": "polysae"}, "polysae")
    reader = {"saelens": read_saelens, "polysae-ref": read_reference,
              "sparsify": read_sparsify, "gemmascope": read_gemmascope}[fmt]
    cfg, tensors, meta = reader(d)
    check_finite_tensors(tensors, d, "; a diverged SAE's weights are refused")
    sae = SAE(cfg, device="meta")
    sae.load_tensors(tensors, source=str(d))  # names and shapes vs the config, before allocating
    sae = sae.to_empty(device=device or "cpu")
    sae.load_tensors(tensors, source=str(d))
    sae.eval()
    meta["format"] = fmt
    return ImportedSAE(sae, meta, fmt)


def _check_target(d: Path, format: str) -> None:
    """Refuse to write ``format`` into a folder that already holds another layout's checkpoint
    (the two would be mixed, and detection would pick one of them)."""
    if not d.exists():
        return
    if not d.is_dir():
        raise ValueError(f"export: output {d} exists and is not a folder")
    try:
        have = detect_format(d)
    except ValueError:
        return
    same = {"saelens": {"saelens", "polysae-ref"}, "polysae-ref": {"saelens", "polysae-ref"}}
    if have != format and have not in same.get(format, set()):
        raise ValueError(f"export: {d} already holds a {have} checkpoint; write the {format} "
                         "export to another folder")


def export(sae: SAE, directory: str | os.PathLike, format: str,
           metadata: dict[str, Any] | None = None, *, linearise: bool = False,
           overwrite: bool = False) -> Path:
    """Write ``sae`` to ``directory`` in ``format`` (one of :data:`EXPORT_FORMATS`); ``linearise``
    applies to ``sparsify`` only (see :func:`polysae.formats.sparsify.write_sparsify`).

    Never replaces a different artefact silently: when ``directory`` already holds files, the
    export is written beside it first and compared; files that would change are a
    ``FileExistsError`` describing what is there unless ``overwrite`` (an identical re-export
    passes). NaN/inf weights are refused before anything is written."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; expected one of {EXPORT_FORMATS}")
    if linearise and format != "sparsify":
        raise ValueError("linearise applies to the sparsify format only")
    d = Path(directory)
    check_finite_tensors(sae.tensors(), f"export to {d}", "; a diverged SAE is not exported")
    _check_target(d, format)
    if overwrite or not d.is_dir() or not any(d.iterdir()):
        return _write(sae, d, format, metadata, linearise)
    return export_beside(d, lambda tmp: _write(sae, tmp, format, metadata, linearise))


def _write(sae: SAE, d: Path, format: str, metadata: dict[str, Any] | None,
           linearise: bool) -> Path:
    if format == "saelens":
        return write_saelens(sae, d, metadata)
    if format == "polysae-ref":
        return write_reference(sae, d, metadata)
    if format == "sparsify":
        return write_sparsify(sae, d, metadata, linearise=linearise)
    return sae.save(d, metadata=metadata, overwrite=True)  # the target was checked by export()


__all__ = ["FORMATS", "EXPORT_FORMATS", "LAYOUT_FILES", "ImportedSAE", "detect_format",
           "read_checkpoint", "export"]
