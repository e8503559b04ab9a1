"""``polysae.load(source)``: one entry point for every place a dictionary can come from.

Today: a local folder in polysae's own format (``config.json`` + ``sae.safetensors``). The interop
and download work extends the detection here (SAELens, reference-PolySAE, sparsify layouts; registry
names, ``hf://`` and http(s) sources).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from polysae.sae import SAE, load_checkpoint


def load(source: str | os.PathLike, device: torch.device | str | None = None) -> SAE:
    """Load an SAE from ``source`` (a checkpoint folder). Raises with the file named on error."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"polysae.load: {source} is not a checkpoint folder")
    sae, _ = load_checkpoint(path, device=device)
    return sae
