"""Checkpoint formats other tools use: detection, converters into polysae, writers out of it.

Layouts read (``detect_format`` looks only at file names and ``cfg.json``'s keys):

- ``polysae``: ``config.json`` + ``sae.safetensors`` (polysae's own;
  :func:`polysae.sae.load_checkpoint`).
- ``saelens``: ``cfg.json`` + ``sae_weights.safetensors`` with ``architecture`` in standard / topk /
  batchtopk / jumprelu (SAELens 3-6, old top-level ``hook_name`` or new ``metadata`` block).
  Tensors ``W_enc`` [D, F], ``b_enc`` [F], ``W_dec`` [F, D], ``b_dec`` [D], ``threshold`` [F]
  (jumprelu), ``topk_threshold`` scalar (batchtopk training checkpoints).
- ``polysae-ref``: the reference PolySAE code (a SAELens fork): the SAELens layout with
  ``architecture`` poly_topk / poly_batchtopk / poly_jumprelu / poly_matryoshka, fields
  ``poly_rank`` / ``poly_ranks`` / ``poly_order`` / ``shared_u``, tensors ``U_shared`` (shared) or
  ``U1``/``U2``/``U3`` (separate), ``C1``..``C3``, ``lambda2``, ``lambda3`` and an unused ``W_dec``.
  In shared mode the reference also stores zero placeholder buffers ``U1``..``U3`` (and zero
  ``C_k``, ``lambda_k`` above ``poly_order``); they are ignored here.
- ``sparsify``: EleutherAI sparsify, ``cfg.json`` + ``sae.safetensors`` with ``encoder.weight``
  [F, D], ``encoder.bias``, ``W_dec`` [F, D], ``b_dec``; TopK on ReLU'd pre-activations.
- ``gemmascope``: Gemma Scope ``params.npz`` (``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``,
  ``threshold``), JumpReLU, no input-side ``b_dec`` subtraction; read with ``allow_pickle=False``.

Writers: :func:`write_saelens` (linear decoders), :func:`write_reference` (poly decoders) and
:func:`write_sparsify` (linear TopK SAEs, the layout ``sparsify.Sae.load_from_disk`` reads), all
atomic (weights first via temp name + fsync + rename, the config last), so an interrupted export
never leaves a folder a tool would take for complete. A folder holding another layout's checkpoint
is refused rather than mixed with a second one.

Every import maps the source's equations onto an *exactly* equivalent polysae config: e.g. SAELens
JumpReLU ``relu(pre) * (pre > t)`` equals polysae's ``pre * (pre > max(t, 0))``, so thresholds are
clamped at 0 on import. Features polysae cannot express exactly (activation normalisation computed
at run time, decoder-norm rescaling in an unfolded training checkpoint, sparsify skip connections or
transcoders, gated SAEs) raise a ``ValueError`` naming the file and field instead of loading
something subtly different.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from polysae.config import DTYPES, SAEConfig
from polysae.sae import SAE, _fsync_and_hash, atomic_write_text, load_checkpoint

FORMATS = ("polysae", "saelens", "polysae-ref", "sparsify", "gemmascope")
"""Every layout :func:`read_checkpoint` understands."""

EXPORT_FORMATS = ("saelens", "polysae-ref", "sparsify", "polysae")
"""Checkpoint layouts :func:`export` writes (``polysae export`` also writes ``neuronpedia``
feature batches, :mod:`polysae.neuronpedia`)."""

SPARSIFY_CFG_KEYS = ("activation", "expansion_factor", "normalize_decoder", "num_latents", "k",
                     "multi_topk", "skip_connection", "transcode", "d_in")
"""The keys of a sparsify ``cfg.json``: ``SparseCoderConfig``'s fields plus ``d_in``."""

SAELENS_ARCHS = ("standard", "topk", "batchtopk", "jumprelu")
REFERENCE_ARCHS = ("poly_topk", "poly_batchtopk", "poly_jumprelu", "poly_matryoshka")

# file names per layout: (config file, weights file)
LAYOUT_FILES = {
    "polysae": ("config.json", "sae.safetensors"),
    "saelens": ("cfg.json", "sae_weights.safetensors"),
    "polysae-ref": ("cfg.json", "sae_weights.safetensors"),
    "sparsify": ("cfg.json", "sae.safetensors"),
    "gemmascope": (None, "params.npz"),
}


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


# -- detection --------------------------------------------------------------------------------
def detect_format(folder: str | os.PathLike) -> str:
    """Name the layout of ``folder`` (one of :data:`FORMATS`); ValueError lists what was found."""
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a folder")
    names = {p.name for p in d.iterdir()}
    if {"config.json", "sae.safetensors"} <= names:
        return "polysae"
    if "cfg.json" in names and "sae_weights.safetensors" in names:
        arch = str(_read_json(d / "cfg.json").get("architecture", "standard"))
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
    reader = {"saelens": _from_saelens, "polysae-ref": _from_reference,
              "sparsify": _from_sparsify, "gemmascope": _from_gemmascope}[fmt]
    cfg, tensors, meta = reader(d)
    sae = SAE(cfg, device="meta").to_empty(device=device or "cpu")
    sae.load_tensors(tensors, source=str(d))
    sae.eval()
    meta["format"] = fmt
    return ImportedSAE(sae, meta, fmt)


# -- helpers ----------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read safetensors ({e})") from e


def _need(tensors: dict[str, Tensor], name: str, shape: tuple[int, ...], src: Path) -> Tensor:
    if name not in tensors:
        raise ValueError(f"{src}: tensor {name!r} is missing (has {sorted(tensors)})")
    t = tensors[name]
    if tuple(t.shape) != shape:
        raise ValueError(f"{src}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
    return t


def _dtype_name(t: Tensor) -> str:
    for name, dt in DTYPES.items():
        if dt == t.dtype:
            return name
    return "float32"


def _field(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    """First of ``names`` found at the top level or in the SAELens-6 ``metadata`` block."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
        if meta.get(n) is not None:
            return meta[n]
    return default


def _provenance(cfg: dict[str, Any]) -> dict[str, Any]:
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


# -- SAELens ----------------------------------------------------------------------------------
class _SAELensLayout(NamedTuple):
    cfg: dict[str, Any]
    cfg_path: Path
    w_path: Path
    arch: str
    k: int | None
    tensors: dict[str, Tensor]
    D: int
    F: int


def _read_saelens_layout(d: Path, archs: tuple[str, ...]) -> _SAELensLayout:
    """cfg.json + sae_weights.safetensors, shared by SAELens and the reference (its fork)."""
    cfg_path, w_path = d / "cfg.json", d / "sae_weights.safetensors"
    cfg = _read_json(cfg_path)
    _check_saelens_common(cfg, cfg_path)
    arch, k = _saelens_arch(cfg)
    if arch not in archs:
        raise ValueError(f"{cfg_path}: architecture {arch!r} is not supported here (reads "
                         f"{archs}; SAELens: {SAELENS_ARCHS}, reference PolySAE: "
                         f"{REFERENCE_ARCHS})")
    t = _read_safetensors(w_path)
    D, F = _dims(cfg, t, cfg_path, w_path)
    return _SAELensLayout(cfg, cfg_path, w_path, arch, k, t, D, F)


def _from_saelens(d: Path) -> tuple[SAEConfig, dict[str, Tensor], dict[str, Any]]:
    cfg, cfg_path, w_path, arch, k, t, D, F = _read_saelens_layout(d, SAELENS_ARCHS)
    W_enc = _need(t, "W_enc", (D, F), w_path)
    W_dec = _need(t, "W_dec", (F, D), w_path)
    b_enc = _need(t, "b_enc", (F,), w_path)
    b_dec = _need(t, "b_dec", (D,), w_path)
    if "scaling_factor" in t:  # SAELens <4 "finetuning scaling": x_hat = (z * s) @ W_dec + b_dec
        W_dec = W_dec * _need(t, "scaling_factor", (F,), w_path)[:, None]
    if cfg.get("rescale_acts_by_decoder_norm") and arch in ("topk", "batchtopk"):
        raise ValueError(f"{cfg_path}: rescale_acts_by_decoder_norm=true (an unfolded training "
                         "checkpoint) is not supported; save the inference SAE instead")
    dt = _dtype_name(W_enc)
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
        out["threshold"] = _jumprelu_threshold(t, F, w_path)
    else:  # batchtopk
        if k is None:
            raise ValueError(f"{cfg_path}: architecture 'batchtopk' needs a field 'k'")
        sae_cfg = SAEConfig(k=k, sparsifier="batchtopk", **common)
        out["threshold"] = _batchtopk_threshold(t, F, w_path)
    sae_cfg = _restore_polysae_fields(cfg, sae_cfg)
    return sae_cfg, out, _provenance(cfg)


def _jumprelu_threshold(t: dict[str, Tensor], F: int, src: Path) -> Tensor:
    if "threshold" in t:
        thr = _need(t, "threshold", (F,), src)
    elif "log_threshold" in t:  # SAELens JumpReLU training checkpoints
        thr = _need(t, "log_threshold", (F,), src).exp()
    else:
        raise ValueError(f"{src}: a JumpReLU SAE needs a tensor 'threshold' [d_sae]")
    # relu(pre) * (pre > t) == pre * (pre > max(t, 0)) for every t, so clamping is exact.
    return thr.clamp_min(0)


def _batchtopk_threshold(t: dict[str, Tensor], F: int, src: Path) -> Tensor:
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


def _restore_polysae_fields(cfg: dict[str, Any], sae_cfg: SAEConfig) -> SAEConfig:
    """Folders written by :func:`export` carry polysae's own config under ``polysae_config``;
    training-only fields (sparsifier name, Matryoshka widths, inits) come back from it when the
    shapes agree. Nothing that changes the forward pass is taken from it."""
    own = cfg.get("polysae_config")
    if not isinstance(own, dict):
        return sae_cfg
    try:
        ref = SAEConfig.from_dict(own)
    except (TypeError, ValueError):
        return sae_cfg
    if (ref.d_in, ref.d_sae, ref.decoder) != (sae_cfg.d_in, sae_cfg.d_sae, sae_cfg.decoder):
        return sae_cfg
    keep = {"lambda2_init", "lambda3_init", "jumprelu_threshold_init", "jumprelu_bandwidth",
            "l0_coefficient", "l1_coefficient", "aux_k", "aux_coefficient",
            "batchtopk_threshold_momentum", "check_finite"}
    changes = {k: getattr(ref, k) for k in keep}
    # BatchTopK/Matryoshka export as JumpReLU with the EMA threshold: identical in eval mode, so
    # the training sparsifier can come back (with its k) without changing any output.
    if sae_cfg.sparsifier == "jumprelu" and ref.sparsifier in ("batchtopk", "matryoshka") \
            and ref.batchtopk_inference == "threshold":
        changes.update(sparsifier=ref.sparsifier, k=ref.k,
                       matryoshka_widths=ref.matryoshka_widths)
    return sae_cfg.replace(**changes)


# -- reference PolySAE ------------------------------------------------------------------------
def _from_reference(d: Path) -> tuple[SAEConfig, dict[str, Tensor], dict[str, Any]]:
    cfg, cfg_path, w_path, arch, k, t, D, F = _read_saelens_layout(d, REFERENCE_ARCHS)
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
    out = {"W_enc": _need(t, "W_enc", (D, F), w_path), "b_enc": _need(t, "b_enc", (F,), w_path),
           "b_dec": _need(t, "b_dec", (D,), w_path), "C1": _need(t, "C1", (D, r1), w_path)}
    if shared:
        out["U"] = _need(t, "U_shared", (F, r1), w_path)
    else:
        out["U"] = _need(t, "U1", (F, r1), w_path)
        if order >= 2:
            out["U2"] = _need(t, "U2", (F, r2), w_path)
        if order >= 3:
            out["U3"] = _need(t, "U3", (F, r3), w_path)
    if order >= 2:
        out["C2"] = _need(t, "C2", (D, r2), w_path)
        out["lambda2"] = _need(t, "lambda2", (), w_path)
    if order >= 3:
        out["C3"] = _need(t, "C3", (D, r3), w_path)
        out["lambda3"] = _need(t, "lambda3", (), w_path)
    sparsifier = {"poly_topk": "topk", "poly_batchtopk": "batchtopk",
                  "poly_jumprelu": "jumprelu", "poly_matryoshka": "matryoshka"}[arch]
    if sparsifier in ("topk", "batchtopk", "matryoshka") and k is None:
        raise ValueError(f"{cfg_path}: architecture {arch!r} needs a field 'k'")
    extra: dict[str, Any] = {}
    if sparsifier == "jumprelu":
        out["threshold"] = _jumprelu_threshold(t, F, w_path)
    elif sparsifier in ("batchtopk", "matryoshka"):
        out["threshold"] = _batchtopk_threshold(t, F, w_path)
        if sparsifier == "matryoshka" and cfg.get("matryoshka_widths"):
            extra["matryoshka_widths"] = tuple(int(w) for w in cfg["matryoshka_widths"])
    try:
        sae_cfg = SAEConfig(d_in=D, d_sae=F, k=k if k is not None else min(64, F),
                            sparsifier=sparsifier, decoder="poly", ranks=ranks, order=order,
                            shared_u=shared, dtype=_dtype_name(out["W_enc"]),
                            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                            lambda2_init=float(cfg.get("lambda2_init", -0.5)),
                            lambda3_init=float(cfg.get("lambda3_init", 0.5)), **extra)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    return _restore_polysae_fields(cfg, sae_cfg), out, _provenance(cfg)


# -- sparsify ---------------------------------------------------------------------------------
def _from_sparsify(d: Path) -> tuple[SAEConfig, dict[str, Tensor], dict[str, Any]]:
    cfg_path, w_path = d / "cfg.json", d / "sae.safetensors"
    cfg = _read_json(cfg_path)
    for flag in ("skip_connection", "transcode"):
        if cfg.get(flag):
            raise ValueError(f"{cfg_path}: {flag}=true is not supported (polysae reads plain "
                             "SAEs: x_hat = topk(relu(enc(x - b_dec))) @ W_dec + b_dec)")
    if cfg.get("signed"):
        raise ValueError(f"{cfg_path}: signed=true (signed TopK activations) is not supported")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{cfg_path}: activation={cfg['activation']!r} is not supported "
                         "(only 'topk')")
    t = _read_safetensors(w_path)
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
    out = {"W_enc": W_enc.T.contiguous(), "b_enc": _need(t, "encoder.bias", (F,), w_path),
           "W_dec": _need(t, "W_dec", (F, D), w_path), "b_dec": _need(t, "b_dec", (D,), w_path)}
    # sparsify encodes topk(relu(pre)); polysae encodes relu(topk(pre)): the same set of nonzero
    # values (ties at zero aside, which decode to the same output).
    if cfg.get("num_latents") and int(cfg["num_latents"]) != F:
        raise ValueError(f"{cfg_path}: num_latents={cfg['num_latents']} but encoder.weight is "
                         f"{(F, D)}")
    if not 1 <= k <= F:
        raise ValueError(f"{cfg_path}: k={k} must be between 1 and the {F} latents")
    sae_cfg = SAEConfig(d_in=D, d_sae=F, k=k, sparsifier="topk", decoder="linear",
                        dtype=_dtype_name(W_enc), apply_b_dec_to_input=True)
    sae_cfg = _restore_polysae_fields(cfg, sae_cfg)
    # polysae's writer records provenance under "polysae_metadata" (sparsify ignores extra keys)
    own = cfg.get("polysae_metadata") if isinstance(cfg.get("polysae_metadata"), dict) else {}
    meta = {"model": own.get("model"), "hook": own.get("hook") or _sparsify_hook(d.name),
            "context_size": own.get("context_size"), "dataset": own.get("dataset"),
            "source_cfg": cfg}
    if cfg.get("polysae_linearised"):
        meta["linearised_from"] = "poly"
    return sae_cfg, out, meta


def _sparsify_hook(folder_name: str) -> str | None:
    """sparsify names a folder after the HF module it hooks: layers.N (the block's output =
    blocks.N.hook_resid_post), layers.N.mlp, layers.N.attention."""
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


# -- Gemma Scope ------------------------------------------------------------------------------
def _from_gemmascope(d: Path) -> tuple[SAEConfig, dict[str, Tensor], dict[str, Any]]:
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
    out = {"W_enc": arrays["W_enc"], "b_enc": _need(arrays, "b_enc", (F,), path),
           "W_dec": _need(arrays, "W_dec", (F, D), path),
           "b_dec": _need(arrays, "b_dec", (D,), path),
           "threshold": _need(arrays, "threshold", (F,), path).clamp_min(0)}
    out = {k: v.float() for k, v in out.items()}
    # Gemma Scope's JumpReLU encodes x @ W_enc + b_enc with no b_dec subtraction.
    sae_cfg = SAEConfig(d_in=D, d_sae=F, k=min(64, F), sparsifier="jumprelu", decoder="linear",
                        apply_b_dec_to_input=False)
    # the release name says which site: gemma-scope-2b-pt-res/layer_12/... -> resid_post
    m = re.search(r"gemma-scope-[^/]*-res/(?:[^/]+/)*?layer_(\d+)/", d.resolve().as_posix() + "/")
    hook = f"blocks.{m.group(1)}.hook_resid_post" if m else None
    return sae_cfg, out, {"model": None, "hook": hook, "source_cfg": {}}


# -- writers ----------------------------------------------------------------------------------
def _write_weights(d: Path, name: str, tensors: dict[str, Tensor], fmt: str) -> None:
    from safetensors.torch import save_file

    tmp = d / f".{name}.tmp{os.getpid()}"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"format": fmt})
    _fsync_and_hash(tmp)
    os.replace(tmp, d / name)


def _saelens_cfg_base(sae: SAE, metadata: dict[str, Any]) -> dict[str, Any]:
    cfg = sae.cfg
    from polysae import __version__

    return {
        "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"model_name": metadata.get("model"), "hook_name": metadata.get("hook"),
                     "hook_head_index": None, "context_size": metadata.get("context_size"),
                     "prepend_bos": metadata.get("prepend_bos", True),
                     "dataset_path": metadata.get("dataset"),
                     "sae_lens_training_version": None},
        "polysae_version": __version__,
        "polysae_config": cfg.to_dict(),
    }


def _export_sparsifier(sae: SAE) -> tuple[str, dict[str, Tensor]]:
    """The SAELens name of the eval-mode sparsifier and its extra tensors."""
    cfg = sae.cfg
    if cfg.sparsifier == "topk":
        return "topk", {}
    if cfg.sparsifier == "relu":
        return "standard", {}
    thr = sae.threshold.detach().float().clamp_min(0)
    if cfg.sparsifier in ("batchtopk", "matryoshka"):
        if cfg.batchtopk_inference == "batch" or not bool(sae.threshold[0] > 0):
            raise ValueError(
                f"cannot export a {cfg.sparsifier} SAE whose eval mode is batch-level top-k "
                "(no learned threshold yet, or batchtopk_inference='batch'): no per-token format "
                "reproduces it; train it (the threshold is an EMA) or set batchtopk_inference="
                "'threshold'")
    # SAELens (and the reference) save BatchTopK/Matryoshka as JumpReLU with the EMA threshold.
    return "jumprelu", {"threshold": thr}


def write_saelens(sae: SAE, directory: str | os.PathLike,
                  metadata: dict[str, Any] | None = None) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens 6 layout) for a linear SAE."""
    if sae.cfg.decoder != "linear":
        raise ValueError("the SAELens format has no polynomial decoder; export a poly SAE with "
                         "--format polysae-ref (the reference PolySAE layout)")
    arch, extra = _export_sparsifier(sae)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    t = sae.tensors()
    tensors = {"W_enc": t["W_enc"], "b_enc": t["b_enc"], "W_dec": t["W_dec"],
               "b_dec": t["b_dec"], **extra}
    cfg = _saelens_cfg_base(sae, metadata or {})
    cfg["architecture"] = arch
    if arch == "topk":
        cfg["k"] = sae.cfg.k
        cfg["rescale_acts_by_decoder_norm"] = False
    _write_weights(d, "sae_weights.safetensors", tensors, "saelens")
    atomic_write_text(d / "cfg.json", json.dumps(cfg, indent=2))
    return d


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
    arch, extra = _export_sparsifier(sae)
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
    doc = _saelens_cfg_base(sae, metadata or {})
    doc.update(architecture=arch, poly_rank=r1, poly_ranks=[r1, r2, r3], poly_order=cfg.order,
               shared_u=cfg.shared_u, lambda2_init=cfg.lambda2_init,
               lambda3_init=cfg.lambda3_init, rescale_acts_by_decoder_norm=False)
    if arch == "poly_topk":
        doc["k"] = cfg.k
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _write_weights(d, "sae_weights.safetensors", tensors, "polysae-ref")
    atomic_write_text(d / "cfg.json", json.dumps(doc, indent=2))
    return d


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
    from polysae import __version__

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
    _write_weights(d, "sae.safetensors", tensors, "pt")
    atomic_write_text(d / "cfg.json", json.dumps(doc, indent=2))
    return d


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
           metadata: dict[str, Any] | None = None, *, linearise: bool = False) -> Path:
    """Write ``sae`` to ``directory`` in ``format`` (one of :data:`EXPORT_FORMATS`);
    ``linearise`` applies to ``sparsify`` only (see :func:`write_sparsify`)."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; expected one of {EXPORT_FORMATS}")
    if linearise and format != "sparsify":
        raise ValueError("linearise applies to the sparsify format only")
    _check_target(Path(directory), format)
    if format == "saelens":
        return write_saelens(sae, directory, metadata)
    if format == "polysae-ref":
        return write_reference(sae, directory, metadata)
    if format == "sparsify":
        return write_sparsify(sae, directory, metadata, linearise=linearise)
    return sae.save(directory, metadata=metadata)


__all__ = ["FORMATS", "EXPORT_FORMATS", "LAYOUT_FILES", "SPARSIFY_CFG_KEYS", "ImportedSAE",
           "detect_format", "read_checkpoint", "write_saelens", "write_reference",
           "write_sparsify", "sparsify_hookpoint", "export"]
