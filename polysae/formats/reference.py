"""The reference PolySAE code's layout (``polysae-ref``, a SAELens fork): the SAELens layout with
``architecture`` poly_topk / poly_batchtopk / poly_jumprelu / poly_matryoshka, fields
``poly_rank`` / ``poly_ranks`` / ``poly_order`` / ``shared_u``, tensors ``U_shared`` (shared) or
``U1``/``U2``/``U3`` (separate), ``C1``..``C3``, ``lambda2``, ``lambda3`` and an unused ``W_dec``.
In shared mode the reference also stores zero placeholder buffers ``U1``..``U3`` (and zero ``C_k``,
``lambda_k`` above ``poly_order``); they are ignored on read and written on export."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polysae.config import SAEConfig
from polysae.fileio import atomic_write_text
from polysae.formats.files import dtype_name, need, write_weights
from polysae.formats.roundtrip import restore_polysae_fields
from polysae.formats.saelens import (
    REFERENCE_ARCHS,
    batchtopk_threshold,
    export_sparsifier,
    jumprelu_threshold,
    provenance,
    read_saelens_layout,
    saelens_cfg_base,
)
from polysae.sae import SAE


def read_reference(d: Path) -> tuple[SAEConfig, dict[str, Tensor], dict[str, Any]]:
    """(config, tensors, provenance) of a reference PolySAE folder (poly decoder); the shared-mode
    placeholders and unused ``W_dec`` are ignored."""
    cfg, cfg_path, w_path, arch, k, t, D, F = read_saelens_layout(d, REFERENCE_ARCHS)
    if cfg.get("poly_ranks") is not None:
        ranks = tuple(int(r) for r in cfg["poly_ranks"])
    else:  # the reference's get_poly_ranks(): one rank for all orders, d_in when unset
        r = int(cfg["poly_rank"]) if cfg.get("poly_rank") is not None else D
        ranks = (r, r, r)
    if len(ranks) != 3:
        raise ValueError(f"{cfg_path}: poly_ranks must hold three integers, got {ranks}")
    order = int(cfg.get("poly_order", 3))
    shared = bool(cfg.get("shared_u", False))  # the reference's default is separate U
    if cfg.get("rescale_acts_by_decoder_norm") and arch != "poly_jumprelu":
        raise ValueError(f"{cfg_path}: rescale_acts_by_decoder_norm=true is not supported (every "
                         "paper run passes --no_rescale_by_decoder_norm)")
    r1, r2, r3 = ranks
    out = {"W_enc": need(t, "W_enc", (D, F), w_path), "b_enc": need(t, "b_enc", (F,), w_path),
           "b_dec": need(t, "b_dec", (D,), w_path), "C1": need(t, "C1", (D, r1), w_path)}
    if shared:
        out["U"] = need(t, "U_shared", (F, r1), w_path)
    else:
        out["U"] = need(t, "U1", (F, r1), w_path)
        if order >= 2:
            out["U2"] = need(t, "U2", (F, r2), w_path)
        if order >= 3:
            out["U3"] = need(t, "U3", (F, r3), w_path)
    if order >= 2:
        out["C2"] = need(t, "C2", (D, r2), w_path)
        out["lambda2"] = need(t, "lambda2", (), w_path)
    if order >= 3:
        out["C3"] = need(t, "C3", (D, r3), w_path)
        out["lambda3"] = need(t, "lambda3", (), w_path)
    sparsifier = {"poly_topk": "topk", "poly_batchtopk": "batchtopk",
                  "poly_jumprelu": "jumprelu", "poly_matryoshka": "matryoshka"}[arch]
    if sparsifier in ("topk", "batchtopk", "matryoshka") and k is None:
        raise ValueError(f"{cfg_path}: architecture {arch!r} needs a field 'k'")
    extra: dict[str, Any] = {}
    if sparsifier == "jumprelu":
        out["threshold"] = jumprelu_threshold(t, F, w_path)
    elif sparsifier in ("batchtopk", "matryoshka"):
        out["threshold"] = batchtopk_threshold(t, F, w_path)
        if sparsifier == "matryoshka" and cfg.get("matryoshka_widths"):
            extra["matryoshka_widths"] = tuple(int(w) for w in cfg["matryoshka_widths"])
    try:
        sae_cfg = SAEConfig(d_in=D, d_sae=F, k=k if k is not None else min(64, F),
                            sparsifier=sparsifier, decoder="poly", ranks=ranks, order=order,
                            shared_u=shared, dtype=dtype_name(out["W_enc"]),
                            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                            lambda2_init=float(cfg.get("lambda2_init", -0.5)),
                            lambda3_init=float(cfg.get("lambda3_init", 0.5)), **extra)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    return restore_polysae_fields(cfg, sae_cfg), out, provenance(cfg)


def write_reference(sae: SAE, directory: str | os.PathLike,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write the reference PolySAE layout for a poly SAE, loadable by the reference code's
    strict ``load_state_dict``: every buffer it registers is present, including the zero
    placeholders of shared mode and of orders above ``poly_order``, and ``W_dec`` holds the
    unit-norm linear atoms (what the reference writes there for SAEBench)."""
    cfg = sae.cfg
    if cfg.decoder != "poly":
        raise ValueError("the reference PolySAE format needs a poly decoder; export a linear SAE "
                         "with --format saelens")
    if cfg.sparsifier == "relu":
        raise ValueError("the reference PolySAE code has no ReLU+L1 poly architecture; export "
                         "--format polysae instead")
    arch, extra = export_sparsifier(sae)
    arch = "poly_" + arch
    D, F = cfg.d_in, cfg.d_sae
    r1, r2, r3 = cfg.ranks
    t = sae.tensors()
    z = torch.zeros
    dt = t["W_enc"].dtype
    tensors = {"W_enc": t["W_enc"], "b_enc": t["b_enc"], "b_dec": t["b_dec"], "C1": t["C1"],
               "W_dec": sae.decoder_directions().detach(),
               "C2": t.get("C2", z(D, r2, dtype=dt)), "C3": t.get("C3", z(D, r3, dtype=dt)),
               "lambda2": t.get("lambda2", z((), dtype=dt)),
               "lambda3": t.get("lambda3", z((), dtype=dt)), **extra}
    if cfg.shared_u:
        tensors.update(U_shared=t["U"], U1=z(F, r1, dtype=dt), U2=z(F, r2, dtype=dt),
                       U3=z(F, r3, dtype=dt))
    else:
        tensors.update(U1=t["U"], U2=t.get("U2", z(F, r2, dtype=dt)),
                       U3=t.get("U3", z(F, r3, dtype=dt)))
    doc = saelens_cfg_base(sae, metadata or {})
    doc.update(architecture=arch, poly_rank=r1, poly_ranks=[r1, r2, r3], poly_order=cfg.order,
               shared_u=cfg.shared_u, lambda2_init=cfg.lambda2_init,
               lambda3_init=cfg.lambda3_init, rescale_acts_by_decoder_norm=False)
    if arch == "poly_topk":
        doc["k"] = cfg.k
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_weights(d, "sae_weights.safetensors", tensors, "polysae-ref")
    atomic_write_text(d / "cfg.json", json.dumps(doc, indent=2))
    return d


__all__ = ["read_reference", "write_reference"]
