"""Gemma Scope: ``params.npz`` (``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``),
JumpReLU, no input-side ``b_dec`` subtraction; read with ``allow_pickle=False``. Read only."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polysae.config import SAEConfig
from polysae.formats.files import need


def read_gemmascope(d: Path) -> tuple[SAEConfig, dict[str, Tensor], dict[str, Any]]:
    """(config, tensors, provenance) of a Gemma Scope folder; the hook comes from the release
    path (``gemma-scope-...-res/layer_N/`` -> ``blocks.N.hook_resid_post``)."""
    import numpy as np

    path = d / "params.npz"
    try:
        with np.load(path, allow_pickle=False) as z:  # never unpickle downloaded data
            arrays = {k: torch.from_numpy(np.ascontiguousarray(z[k])) for k in z.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read npz ({e})") from e
    if "W_enc" not in arrays:
        raise ValueError(f"{path}: array 'W_enc' is missing (has {sorted(arrays)})")
    D, F = arrays["W_enc"].shape
    out = {"W_enc": arrays["W_enc"], "b_enc": need(arrays, "b_enc", (F,), path),
           "W_dec": need(arrays, "W_dec", (F, D), path),
           "b_dec": need(arrays, "b_dec", (D,), path),
           "threshold": need(arrays, "threshold", (F,), path).clamp_min(0)}
    out = {k: v.float() for k, v in out.items()}
    # Gemma Scope's JumpReLU encodes x @ W_enc + b_enc with no b_dec subtraction.
    sae_cfg = SAEConfig(d_in=D, d_sae=F, k=min(64, F), sparsifier="jumprelu", decoder="linear",
                        apply_b_dec_to_input=False)
    # the release name says which site: gemma-scope-2b-pt-res/layer_12/... -> resid_post
    m = re.search(r"gemma-scope-[^/]*-res/(?:[^/]+/)*?layer_(\d+)/", d.resolve().as_posix() + "/")
    hook = f"blocks.{m.group(1)}.hook_resid_post" if m else None
    return sae_cfg, out, {"model": None, "hook": hook, "source_cfg": {}}


__all__ = ["read_gemmascope"]
