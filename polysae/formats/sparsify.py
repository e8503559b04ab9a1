"""EleutherAI sparsify: ``cfg.json`` + ``sae.safetensors`` with ``encoder.weight`` [F, D],
``encoder.bias``, ``W_dec`` [F, D], ``b_dec``; TopK on ReLU'd pre-activations. Folders are named
after the Hugging Face module they hook (``layers.N``, ``layers.N.mlp``...)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polysae.config import SAEConfig
from polysae.fileio import atomic_write_text
from polysae.formats.files import dtype_name, need, read_json, read_safetensors, write_weights
from polysae.formats.roundtrip import restore_polysae_fields
from polysae.sae import SAE

SPARSIFY_CFG_KEYS = ("activation", "expansion_factor", "normalize_decoder", "num_latents", "k",
                     "multi_topk", "skip_connection", "transcode", "d_in")
"""The keys of a sparsify ``cfg.json``: ``SparseCoderConfig``'s fields plus ``d_in``."""


def read_sparsify(d: Path) -> tuple[SAEConfig, dict[str, Tensor], dict[str, Any]]:
    """(config, tensors, provenance) of a sparsify folder (a linear TopK SAE); skip connections,
    transcoders, signed and non-TopK activations are refused."""
    cfg_path, w_path = d / "cfg.json", d / "sae.safetensors"
    cfg = read_json(cfg_path)
    for flag in ("skip_connection", "transcode"):
        if cfg.get(flag):
            raise ValueError(f"{cfg_path}: {flag}=true is not supported (polysae reads plain "
                             "SAEs: x_hat = topk(relu(enc(x - b_dec))) @ W_dec + b_dec)")
    if cfg.get("signed"):
        raise ValueError(f"{cfg_path}: signed=true (signed TopK activations) is not supported")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{cfg_path}: activation={cfg['activation']!r} is not supported "
                         "(only 'topk')")
    t = read_safetensors(w_path)
    if "encoder.weight" not in t:
        raise ValueError(f"{w_path}: tensor 'encoder.weight' is missing (has {sorted(t)})")
    F, D = t["encoder.weight"].shape
    if cfg.get("d_in") is not None and int(cfg["d_in"]) != D:
        raise ValueError(f"{cfg_path}: d_in={cfg['d_in']} but encoder.weight is {(F, D)}")
    try:
        k = int(cfg["k"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: needs an integer field 'k' ({e})") from e
    W_enc = t["encoder.weight"]
    out = {"W_enc": W_enc.T.contiguous(), "b_enc": need(t, "encoder.bias", (F,), w_path),
           "W_dec": need(t, "W_dec", (F, D), w_path), "b_dec": need(t, "b_dec", (D,), w_path)}
    # sparsify encodes topk(relu(pre)); polysae encodes relu(topk(pre)): the same set of nonzero
    # values (ties at zero aside, which decode to the same output).
    if cfg.get("num_latents") and int(cfg["num_latents"]) != F:
        raise ValueError(f"{cfg_path}: num_latents={cfg['num_latents']} but encoder.weight is "
                         f"{(F, D)}")
    if not 1 <= k <= F:
        raise ValueError(f"{cfg_path}: k={k} must be between 1 and the {F} latents")
    sae_cfg = SAEConfig(d_in=D, d_sae=F, k=k, sparsifier="topk", decoder="linear",
                        dtype=dtype_name(W_enc), apply_b_dec_to_input=True)
    sae_cfg = restore_polysae_fields(cfg, sae_cfg)
    # polysae's writer records provenance under "polysae_metadata" (sparsify ignores extra keys)
    own = cfg.get("polysae_metadata") if isinstance(cfg.get("polysae_metadata"), dict) else {}
    meta = {"model": own.get("model"), "hook": own.get("hook") or sparsify_hook(d.name),
            "context_size": own.get("context_size"), "dataset": own.get("dataset"),
            "source_cfg": cfg}
    if cfg.get("polysae_linearised"):
        meta["linearised_from"] = "poly"
    return sae_cfg, out, meta


def sparsify_hook(folder_name: str) -> str | None:
    """The transformer-lens hook of a sparsify folder name, or None. sparsify names a folder
    after the HF module it hooks: layers.N (the block's output = blocks.N.hook_resid_post),
    layers.N.mlp, layers.N.attention; the inverse of :func:`sparsify_hookpoint`."""
    m = re.fullmatch(r"(?:gpt_neox\.|model\.)?layers\.(\d+)(\.mlp|\.attention|\.self_attn)?",
                     folder_name)
    if m is None:
        return None
    tail = {None: "hook_resid_post", ".mlp": "hook_mlp_out", ".attention": "hook_attn_out",
            ".self_attn": "hook_attn_out"}[m.group(2)]
    return f"blocks.{m.group(1)}.{tail}"


def sparsify_hookpoint(hook: str | None) -> str | None:
    """The sparsify folder name (hookpoint) of a transformer-lens hook, the inverse of the
    reader's mapping: ``blocks.N.hook_resid_post`` -> ``layers.N``, ``hook_mlp_out`` ->
    ``layers.N.mlp``, ``hook_attn_out`` -> ``layers.N.self_attn``; None for other hooks."""
    m = re.fullmatch(r"blocks\.(\d+)\.(hook_resid_post|hook_mlp_out|hook_attn_out)", hook or "")
    if m is None:
        return None
    tail = {"hook_resid_post": "", "hook_mlp_out": ".mlp", "hook_attn_out": ".self_attn"}
    return f"layers.{m.group(1)}{tail[m.group(2)]}"


def write_sparsify(sae: SAE, directory: str | os.PathLike,
                   metadata: dict[str, Any] | None = None, *, linearise: bool = False) -> Path:
    """Write ``cfg.json`` + ``sae.safetensors`` exactly as EleutherAI sparsify's
    ``SparseCoder.save_to_disk`` does, so ``sparsify.Sae.load_from_disk(directory)`` loads it
    (strictly: the tensors are ``encoder.weight`` [F, D], ``encoder.bias`` [F], ``W_dec`` [F, D]
    and ``b_dec`` [D], nothing else).

    Only a TopK SAE with a linear decoder maps exactly onto sparsify's forward pass
    ``topk(relu(encoder(x - b_dec))) @ W_dec + b_dec`` (polysae's ``relu(topk(pre))`` keeps the
    same nonzero values). ``apply_b_dec_to_input=False`` is folded into the encoder bias
    (``b_enc + b_dec @ W_enc``), which is exact. A poly decoder is refused unless ``linearise``
    is set: then ``W_dec`` holds the linear atoms ``U C1^T`` alone, the pairwise and triple
    terms are dropped, and ``cfg.json`` says so (``polysae_linearised: true``).

    Extra keys ``polysae_config`` / ``polysae_metadata`` / ``polysae_version`` ride along in
    ``cfg.json`` (sparsify drops unknown fields) so polysae reads provenance back."""
    cfg = sae.cfg
    if cfg.sparsifier != "topk":
        raise ValueError(
            f"cannot export a {cfg.sparsifier} SAE as sparsify: sparsify only runs TopK (top k "
            "of relu(pre) per token, a fixed k), which gives different codes than "
            f"{cfg.sparsifier}; export it with --format saelens instead")
    if cfg.decoder != "linear" and not linearise:
        raise ValueError(
            "cannot export a poly-decoder SAE as sparsify: sparsify's decoder is linear "
            "(x_hat = codes @ W_dec + b_dec) and has no place for PolySAE's pairwise/triple "
            "terms; export --format polysae-ref, or pass --linearise to write the linear atoms "
            "U C1^T alone (an approximation, marked in cfg.json)")
    D, F = cfg.d_in, cfg.d_sae
    with torch.no_grad():
        t = sae.tensors()
        W_enc, b_enc, b_dec = t["W_enc"], t["b_enc"], t["b_dec"]
        if not cfg.apply_b_dec_to_input:
            # polysae: x @ W_enc + b_enc; sparsify: (x - b_dec) @ W_enc + b'
            b_enc = (b_enc.double() + b_dec.double() @ W_enc.double()).to(b_enc.dtype)
        W_dec = sae.linear_atoms().detach().to(W_enc.dtype)
        norms = W_dec.double().norm(dim=1)
    tensors = {"encoder.weight": W_enc.T, "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    from polysae.version import __version__

    meta = metadata or {}
    doc: dict[str, Any] = {
        "activation": "topk", "expansion_factor": max(1, F // D),
        # sparsify renormalises W_dec rows after each training step when this is true: claim it
        # only when the rows already are unit norm, so fine-tuning the export changes nothing
        "normalize_decoder": bool(((norms - 1).abs() < 1e-4).all()),
        "num_latents": F, "k": cfg.k, "multi_topk": False, "skip_connection": False,
        "transcode": False, "d_in": D,
        "polysae_version": __version__, "polysae_config": cfg.to_dict(),
        "polysae_metadata": {k: meta.get(k) for k in ("model", "hook", "context_size",
                                                      "dataset", "source_format")},
    }
    if cfg.decoder != "linear":
        doc["polysae_linearised"] = True
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_weights(d, "sae.safetensors", tensors, "pt")
    atomic_write_text(d / "cfg.json", json.dumps(doc, indent=2))
    return d


__all__ = ["SPARSIFY_CFG_KEYS", "read_sparsify", "sparsify_hook", "sparsify_hookpoint",
           "write_sparsify"]
