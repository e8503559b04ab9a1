"""SAELens: ``cfg.json`` + ``sae_weights.safetensors`` with ``architecture`` in standard / topk /
batchtopk / jumprelu (SAELens 3-6, old top-level ``hook_name`` or new ``metadata`` block).

Also the parts of that layout the reference PolySAE (a SAELens fork, :mod:`.reference`) shares:
reading the config and weights, thresholds, provenance, the exported config's common fields and
the sparsifier's exported name."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from polysae.config import SAEConfig
from polysae.fileio import atomic_write_text
from polysae.formats.files import dtype_name, need, read_json, read_safetensors, write_weights
from polysae.formats.roundtrip import restore_polysae_fields
from polysae.sae import SAE

SAELENS_ARCHS = ("standard", "topk", "batchtopk", "jumprelu")
"""SAELens ``architecture`` values :func:`read_saelens` reads."""
REFERENCE_ARCHS = ("poly_topk", "poly_batchtopk", "poly_jumprelu", "poly_matryoshka")
"""The reference PolySAE fork's ``architecture`` values (:mod:`polysae.formats.reference`)."""
SAELENS_LAYOUT_VERSION = "6.54.12"
"""The SAELens release whose ``cfg.json`` layout :func:`write_saelens` follows and which the tests
load its output with; written as ``metadata.sae_lens_version`` (where SAELens' own ``save_model``
puts it). SAELens >= 6 treats a config without that field as pre-6.0 and rebuilds ``metadata``
from top-level keys only, losing the nested block."""
UNIT_NORM_ATOL = 1e-5
"""Row-norm tolerance of "unit norm" (SAEBench's ``check_decoder_norms`` for fp32 weights)."""


def _field(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    """First of ``names`` found at the top level or in the SAELens-6 ``metadata`` block."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
        if meta.get(n) is not None:
            return meta[n]
    return default


def provenance(cfg: dict[str, Any]) -> dict[str, Any]:
    """The metadata a SAELens-style ``cfg.json`` records: model, hook, context size, dataset,
    ``prepend_bos`` and the config itself under ``source_cfg``."""
    # SAELens <1 wrote hook_point / hook_point_layer, 1-5 hook_name / hook_layer (top level),
    # 6 nests them under "metadata"
    return {"model": _field(cfg, "model_name"), "hook": _field(cfg, "hook_name", "hook_point"),
            "context_size": _field(cfg, "context_size"),
            "dataset": _field(cfg, "dataset_path"), "prepend_bos": _field(cfg, "prepend_bos"),
            "source_cfg": cfg}


def _check_saelens_common(cfg: dict[str, Any], src: Path) -> None:
    norm = _field(cfg, "normalize_activations", default="none")
    if norm not in ("none", None):
        # expected_average_only_in rescales inputs by a factor estimated at run time and not
        # stored in the folder, so no fixed set of weights reproduces it.
        raise ValueError(f"{src}: normalize_activations={norm!r} is not supported (only 'none'); "
                         "fold the scaling factor into the weights before exporting")
    head = _field(cfg, "hook_head_index", "hook_point_head_index")
    if head is not None:
        raise ValueError(f"{src}: hook_head_index={head} (per-head SAEs) is not supported")
    if _field(cfg, "reshape_activations", default="none") not in ("none", None):
        raise ValueError(f"{src}: reshape_activations={cfg['reshape_activations']!r} is not "
                         "supported")


def _dims(cfg: dict[str, Any], t: dict[str, Tensor], cfg_path: Path,
          w_path: Path) -> tuple[int, int]:
    """(d_in, d_sae) from the config, or from W_enc's shape when an old config omits them."""
    try:
        if cfg.get("d_in") is not None and cfg.get("d_sae") is not None:
            return int(cfg["d_in"]), int(cfg["d_sae"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: d_in and d_sae must be integers ({e})") from e
    if "W_enc" not in t or t["W_enc"].ndim != 2:
        raise ValueError(f"{cfg_path}: no d_in/d_sae and {w_path} has no 2-D W_enc")
    D, F = t["W_enc"].shape
    return int(D), int(F)


def _saelens_arch(cfg: dict[str, Any]) -> tuple[str, int | None]:
    """(architecture, k) with old SAELens conventions normalised (``activation_fn_str``)."""
    arch = str(cfg.get("architecture", "standard"))
    k = cfg.get("k")
    kw = cfg.get("activation_fn_kwargs") or {}
    if arch == "standard" and cfg.get("activation_fn_str", cfg.get("activation_fn")) == "topk":
        arch = "topk"  # SAELens <6 stored TopK SAEs (e.g. OpenAI's) as standard + topk activation
    if k is None:
        k = kw.get("k")
    return arch, (int(k) if k is not None else None)


class SAELensLayout(NamedTuple):
    """A SAELens-style folder as read by :func:`read_saelens_layout`, before conversion."""

    cfg: dict[str, Any]
    """The parsed ``cfg.json``."""
    cfg_path: Path
    """Path of ``cfg.json`` (for error messages)."""
    w_path: Path
    """Path of ``sae_weights.safetensors``."""
    arch: str
    """Normalised ``architecture`` (old ``standard`` + ``topk`` activation reads as ``topk``)."""
    k: int | None
    """``k`` where the config gives one."""
    tensors: dict[str, Tensor]
    """Every tensor of the weights file."""
    D: int
    """Input width ``d_in``."""
    F: int
    """Number of latents ``d_sae``."""


def read_saelens_layout(d: Path, archs: tuple[str, ...]) -> SAELensLayout:
    """cfg.json + sae_weights.safetensors, shared by SAELens and the reference (its fork);
    ``ValueError`` for an architecture outside ``archs`` or a setting polysae cannot reproduce."""
    cfg_path, w_path = d / "cfg.json", d / "sae_weights.safetensors"
    cfg = read_json(cfg_path)
    _check_saelens_common(cfg, cfg_path)
    arch, k = _saelens_arch(cfg)
    if arch not in archs:
        raise ValueError(f"{cfg_path}: architecture {arch!r} is not supported here (reads "
                         f"{archs}; SAELens: {SAELENS_ARCHS}, reference PolySAE: "
                         f"{REFERENCE_ARCHS})")
    t = read_safetensors(w_path)
    D, F = _dims(cfg, t, cfg_path, w_path)
    return SAELensLayout(cfg, cfg_path, w_path, arch, k, t, D, F)


def read_saelens(d: Path) -> tuple[SAEConfig, dict[str, Tensor], dict[str, Any]]:
    """(config, tensors, provenance) of a SAELens folder, mapped exactly onto polysae."""
    cfg, cfg_path, w_path, arch, k, t, D, F = read_saelens_layout(d, SAELENS_ARCHS)
    W_enc = need(t, "W_enc", (D, F), w_path)
    W_dec = need(t, "W_dec", (F, D), w_path)
    b_enc = need(t, "b_enc", (F,), w_path)
    b_dec = need(t, "b_dec", (D,), w_path)
    if "scaling_factor" in t:  # SAELens <4 "finetuning scaling": x_hat = (z * s) @ W_dec + b_dec
        W_dec = W_dec * need(t, "scaling_factor", (F,), w_path)[:, None]
    if cfg.get("rescale_acts_by_decoder_norm") and arch in ("topk", "batchtopk"):
        raise ValueError(f"{cfg_path}: rescale_acts_by_decoder_norm=true (an unfolded training "
                         "checkpoint) is not supported; save the inference SAE instead")
    dt = dtype_name(W_enc)
    common = dict(d_in=D, d_sae=F, decoder="linear", dtype=dt,
                  apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)))
    out = {"W_enc": W_enc, "b_enc": b_enc, "b_dec": b_dec, "W_dec": W_dec}
    if arch == "standard":
        sae_cfg = SAEConfig(k=min(64, F), sparsifier="relu", **common)
    elif arch == "topk":
        if k is None:
            raise ValueError(f"{cfg_path}: architecture 'topk' needs a field 'k'")
        sae_cfg = SAEConfig(k=k, sparsifier="topk", **common)
    elif arch == "jumprelu":
        sae_cfg = SAEConfig(k=min(64, F), sparsifier="jumprelu", **common)
        out["threshold"] = jumprelu_threshold(t, F, w_path)
    else:  # batchtopk
        if k is None:
            raise ValueError(f"{cfg_path}: architecture 'batchtopk' needs a field 'k'")
        sae_cfg = SAEConfig(k=k, sparsifier="batchtopk", **common)
        out["threshold"] = batchtopk_threshold(t, F, w_path)
    sae_cfg = restore_polysae_fields(cfg, sae_cfg)
    return sae_cfg, out, provenance(cfg)


def jumprelu_threshold(t: dict[str, Tensor], F: int, src: Path) -> Tensor:
    """A JumpReLU threshold [F] from ``threshold`` or ``log_threshold``, clamped at 0."""
    if "threshold" in t:
        thr = need(t, "threshold", (F,), src)
    elif "log_threshold" in t:  # SAELens JumpReLU training checkpoints
        thr = need(t, "log_threshold", (F,), src).exp()
    else:
        raise ValueError(f"{src}: a JumpReLU SAE needs a tensor 'threshold' [d_sae]")
    # relu(pre) * (pre > t) == pre * (pre > max(t, 0)) for every t, so clamping is exact.
    return thr.clamp_min(0)


def batchtopk_threshold(t: dict[str, Tensor], F: int, src: Path) -> Tensor:
    """A BatchTopK inference threshold [F] (float64) from ``threshold`` or ``topk_threshold``
    (scalar or per latent); zeros when none is stored."""
    for name in ("threshold", "topk_threshold"):
        if name in t:
            v = t[name].double()
            if v.numel() == 1:
                return v.reshape(()).expand(F).clone()
            if tuple(v.shape) == (F,):
                return v.clone()
            raise ValueError(f"{src}: {name!r} has shape {tuple(v.shape)}, expected () or ({F},)")
    # No threshold stored: polysae's BatchTopK then falls back to batch-level top-k in eval mode.
    return torch.zeros(F, dtype=torch.float64)


def hook_layer(hook: str | None) -> int | None:
    """The layer index in a hook name (``blocks.L.*`` / ``layers.L.*``), else None."""
    m = re.search(r"(?:blocks|layers)\.(\d+)\.", hook or "")
    return int(m.group(1)) if m else None


def saelens_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The SAELens-6 ``metadata`` block (model, hook and its layer, context size, BOS, dataset)
    from polysae's provenance keys (``model``, ``hook``, ``context_size``, ``prepend_bos``,
    ``dataset``); unknown values are None (``prepend_bos`` defaults to True, SAELens' default)."""
    bos = metadata.get("prepend_bos")
    return {"model_name": metadata.get("model"), "hook_name": metadata.get("hook"),
            "hook_layer": hook_layer(metadata.get("hook")), "hook_head_index": None,
            "context_size": metadata.get("context_size"),
            "prepend_bos": True if bos is None else bool(bos),
            "dataset_path": metadata.get("dataset"), "sae_lens_training_version": None}


class SAEBenchView(NamedTuple):
    """What SAEBench sees of a polysae SAE: exactly the model as it computes (docs/method.md,
    "What SAEBench sees"). Both :class:`polysae.evaluation.saebench.SAEBenchSAE` and
    :func:`write_saelens` are built from it."""

    W_enc: Tensor
    """[D, F] the encoder, as the SAE holds it."""
    b_enc: Tensor
    """[F]"""
    W_dec: Tensor
    """[F, D] the SAE's raw linear atoms (:meth:`SAE.linear_atoms`: ``W_dec``, or ``U C1^T`` for
    a PolySAE, whose ``decode`` adds the interaction terms this does not hold). Not normalised:
    unit rows only when the SAE was trained with ``unit_norm_decoder``."""
    b_dec: Tensor
    """[D]"""
    threshold: Tensor | None
    """[F] per-latent threshold of a ``jumprelu`` eval-mode encoder (clamped at 0), else None."""
    architecture: str
    """SAELens name of the eval-mode encoder: ``standard`` (ReLU), ``topk``, ``jumprelu``
    (JumpReLU, and BatchTopK/Matryoshka with their learned threshold) or ``batchtopk`` (batch-level
    top-k, which no per-token SAELens SAE reproduces); ``poly_`` prepended for a poly decoder."""
    k: int | None
    """``k`` of a ``topk`` encoder, else None."""
    metadata: dict[str, Any]
    """The SAELens-6 metadata block (:func:`saelens_metadata`)."""
    row_norms: Tensor
    """[F] L2 norm of every ``W_dec`` row (float32)."""

    @property
    def unit_norm(self) -> bool:
        """Whether every ``W_dec`` row has unit norm (within :data:`UNIT_NORM_ATOL`)."""
        return bool(((self.row_norms - 1).abs() <= UNIT_NORM_ATOL).all())

    @property
    def norm_note(self) -> str | None:
        """A one-line warning when the rows are not unit norm, else None."""
        if self.unit_norm:
            return None
        n = self.row_norms
        fix = ("a PolySAE's W_dec is only its linear term, whose rows the orthonormal U keeps "
               "from being normalised" if self.architecture.startswith("poly_") else
               "train with unit_norm_decoder (--unit-norm-decoder) for SAEBench's unit-norm "
               "convention")
        return (f"W_dec rows are the SAE's raw linear atoms, not unit norm (norms "
                f"{float(n.min()):.3g}-{float(n.max()):.3g}, mean {float(n.mean()):.3g}): SAEBench "
                f"metrics that read W_dec (absorption, SCR, TPP, RAVEL, decoder cosines) use them "
                f"as they are; {fix} (docs/method.md, \"What SAEBench sees\")")


@torch.no_grad()
def saebench_view(sae: SAE, metadata: dict[str, Any] | None = None) -> SAEBenchView:
    """The one definition of what SAEBench sees of ``sae`` (see :class:`SAEBenchView`); tensors
    are detached views of the SAE's own (clone before changing them)."""
    cfg = sae.cfg
    sp, thr, k = cfg.sparsifier, None, None
    if sp == "topk":
        arch, k = "topk", cfg.k
    elif sp == "relu":
        arch = "standard"
    elif sp == "jumprelu" or (cfg.batchtopk_inference == "threshold"
                              and bool(sae.threshold[0] > 0)):
        # SAELens (and the reference) save BatchTopK/Matryoshka as JumpReLU with the EMA threshold
        arch, thr = "jumprelu", sae.threshold.detach().float().clamp_min(0)
    else:  # batch-level top-k in eval mode (no threshold learned yet, or asked for)
        arch = "batchtopk"
    W_dec = sae.linear_atoms().detach()
    return SAEBenchView(sae.W_enc.detach(), sae.b_enc.detach(), W_dec, sae.b_dec.detach(), thr,
                        ("poly_" if cfg.decoder == "poly" else "") + arch, k,
                        saelens_metadata(metadata or {}), W_dec.float().norm(dim=-1))


def saelens_cfg_base(sae: SAE, metadata: dict[str, Any]) -> dict[str, Any]:
    """The ``cfg.json`` fields SAELens-6 and reference exports share (sizes, SAELens ``metadata``
    block, polysae's own config for the round trip); the writer adds ``architecture``."""
    cfg = sae.cfg
    from polysae.version import __version__

    return {
        "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": saelens_metadata(metadata),
        "polysae_version": __version__,
        "polysae_config": cfg.to_dict(),
    }


def export_sparsifier(sae: SAE) -> tuple[str, dict[str, Tensor]]:
    """The SAELens name of the eval-mode sparsifier and its extra tensors (from
    :func:`saebench_view`); ``ValueError`` for batch-level top-k."""
    v = saebench_view(sae)
    arch = v.architecture.removeprefix("poly_")
    if arch == "batchtopk":
        raise ValueError(
            f"cannot export a {sae.cfg.sparsifier} SAE whose eval mode is batch-level top-k "
            "(no learned threshold yet, or batchtopk_inference='batch'): no per-token format "
            "reproduces it; train it (the threshold is an EMA) or set batchtopk_inference="
            "'threshold'")
    return arch, ({} if v.threshold is None else {"threshold": v.threshold})


def write_saelens(sae: SAE, directory: str | os.PathLike,
                  metadata: dict[str, Any] | None = None) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens 6 layout) for a linear SAE: the
    tensors and metadata of :func:`saebench_view` (raw ``W_dec`` rows, as the SAE computes), with
    ``metadata.sae_lens_version`` so SAELens >= 6 reads it as a current config."""
    if sae.cfg.decoder != "linear":
        raise ValueError("the SAELens format has no polynomial decoder; export a poly SAE with "
                         "--format polysae-ref (the reference PolySAE layout)")
    arch, extra = export_sparsifier(sae)
    v = saebench_view(sae, metadata)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": v.W_enc, "b_enc": v.b_enc, "W_dec": v.W_dec, "b_dec": v.b_dec, **extra}
    tensors = {n: t.contiguous() for n, t in tensors.items()}
    cfg = saelens_cfg_base(sae, metadata or {})
    cfg["metadata"] = {**v.metadata, "sae_lens_version": SAELENS_LAYOUT_VERSION}
    cfg["architecture"] = arch
    if arch == "topk":
        cfg["k"] = sae.cfg.k
        cfg["rescale_acts_by_decoder_norm"] = False
    write_weights(d, "sae_weights.safetensors", tensors, "saelens")
    atomic_write_text(d / "cfg.json", json.dumps(cfg, indent=2))
    return d


__all__ = ["SAELENS_ARCHS", "REFERENCE_ARCHS", "SAELENS_LAYOUT_VERSION", "UNIT_NORM_ATOL",
           "SAELensLayout", "read_saelens_layout", "read_saelens", "provenance",
           "jumprelu_threshold", "batchtopk_threshold", "hook_layer", "saelens_metadata",
           "SAEBenchView", "saebench_view", "saelens_cfg_base", "export_sparsifier",
           "write_saelens"]
