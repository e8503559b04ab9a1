"""``polysae.load(source)``: one entry point for every place a dictionary can come from.

``source`` may be

- a local folder in any layout :mod:`polysae.formats` reads (polysae, SAELens, reference PolySAE,
  sparsify, Gemma Scope ``params.npz``), or a file inside such a folder;
- a registry name (``polysae list``), downloaded once into the cache (:mod:`polysae.cache`);
- ``hf://owner/repo/path/in/repo@revision`` (revision defaults to ``main``);
- an ``http(s)://`` URL of a checkpoint folder.

Remote sources go through the download cache, so with ``HF_HUB_OFFLINE=1`` they load from it.
A local path wins over a registry name of the same spelling.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from polysae.formats import ImportedSAE, read_checkpoint
from polysae.sae import SAE


def resolve(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder ``source`` names, downloading it first when it is remote."""
    from polysae.cache import download, is_remote
    from polysae.registry import REGISTRY

    s = os.fspath(source)
    if is_remote(s):
        return download(s, cache_dir=cache_dir)
    p = Path(s).expanduser()
    if p.exists():
        return p.parent if p.is_file() else p
    if s in REGISTRY:
        return download(s, cache_dir=cache_dir)
    raise FileNotFoundError(
        f"polysae.load: {s!r} is neither a checkpoint folder, a registry name (see "
        "`polysae list`), hf://owner/repo/path@revision nor an http(s) URL")


def load_with_metadata(source: str | os.PathLike, device: torch.device | str | None = None, *,
                       cache_dir: str | os.PathLike | None = None) -> ImportedSAE:
    """Like :func:`load`, also returning the provenance (model, hook, format) of the source."""
    from polysae.registry import REGISTRY

    folder = resolve(source, cache_dir)
    out = read_checkpoint(folder, device=device)
    entry = REGISTRY.get(os.fspath(source))
    if entry is not None and not Path(os.fspath(source)).exists():
        # the registry knows model and hook for formats that do not record them (Gemma Scope)
        meta = dict(out.metadata)
        meta["model"] = meta.get("model") or entry.model
        meta["hook"] = meta.get("hook") or entry.hook
        meta["registry_name"] = entry.name
        out = out._replace(metadata=meta)
    return out


def load(source: str | os.PathLike, device: torch.device | str | None = None, *,
         cache_dir: str | os.PathLike | None = None) -> SAE:
    """Load an SAE (eval mode) from ``source``; see the module docstring for what it may be."""
    return load_with_metadata(source, device, cache_dir=cache_dir).sae


__all__ = ["load", "load_with_metadata", "resolve"]
