"""Neuronpedia export: feature dashboards as ``batch-N.json`` files in the layout SAEDashboard's
Neuronpedia runner writes (``NeuronpediaDashboardBatch``), which Neuronpedia's converter
(``convert-saedashboard-to-neuronpedia-export.py``) turns into its import files, plus PolySAE's
interaction pairs in ``interactions.json`` (an addition of ours) and, on request, the request
bodies of the Neuronpedia client's feature upload in ``upload/`` (docs/exports.md describes
every field).

Each ``batch-N.json`` is ``{"model_id", "layer", "sae_set", "sae_id_suffix", "features"}``; a
feature holds exactly the keys of SAEDashboard's ``NeuronpediaDashboardFeature`` (``FEATURE_KEYS``):
``feature_index``, ``frac_nonzero`` (density over the counted tokens), the activation histogram
(``freq_hist_data_bar_values`` / ``_heights``: 50 linear bins over the feature's own [min, max] of
its nonzero activations, empty for a dead feature, as SAEDashboard's ``HistogramData`` makes it),
the logit effects of its linear atom through the unembedding (``pos_str`` / ``pos_values``,
``neg_str`` / ``neg_values`` and a histogram of all its logits), the three largest signed entries of
the atom in the neuron basis (``neuron_alignment_*``, as SAEDashboard), ``n_prompts_total`` /
``n_tokens_in_prompt`` / ``dataset``, ``vector`` (always ``[]``: a PolySAE feature does not steer
along one direction, so no steering vector is claimed), and ``activations``: its top-activating
token windows, each ``{"bin_min", "bin_max", "bin_contains", "tokens", "values",
"qualifying_token_index"}`` (the top-activations group: ``bin_min`` = ``bin_contains`` = -1,
``bin_max`` = the feature's max activation; ``qualifying_token_index`` = the position of the
selected token in ``tokens``). No ``maxValue``: the converter takes the window's maximum and its
index from ``values``. Fields SAEDashboard fills from analyses polysae does not run (correlated
neurons / features, attention head weights) are present and empty.

The tokenizer's special tokens (BOS, EOS, PAD) are masked by default
(``NeuronpediaConfig.include_special``): their activations count as zero everywhere (top
activations, density, histograms, pairs, and the values shown in windows).

The statistics come from the feature browser's one streaming pass
(:func:`polysae.browser.stats.stream_stats`, summarised by
:func:`~polysae.browser.stats.feature_summary`), after a first encoder pass that finds each
feature's activation range (the histogram's bins); interaction pairs are the ``n_pairs`` co-active
pairs with the largest |lambda2| * ||B_ij|| (:func:`polysae.evaluation.interactions.top_pairs`,
counted exactly by :func:`polysae.evaluation.interactions.cooccurrence` in one more pass), and
their contexts are collected in the same pass as the features'. The folder is written under a
temporary name and renamed into place. The per-feature figures are in
:mod:`polysae.formats.neuronpedia_stats`, the upload bodies in
:mod:`polysae.formats.neuronpedia_upload` (both re-exported here).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from polysae.browser.site import check_target, residual_space
from polysae.browser.stats import (
    StatsConfig,
    check_counts,
    config_record,
    feature_summary,
    stream_stats,
)
from polysae.evaluation.interactions import (
    PairCandidates,
    cooccurrence,
    interaction_atoms,
    top_pairs,
)
from polysae.fileio import atomic_write_text, replace_folder
from polysae.formats.neuronpedia_stats import (
    LogitEffects,
    TokenWindows,
    activation_histogram,
    activation_range,
    count_prompts,
    hook_layer,
    kept_batches,
    logit_effects,
    round_list,
    special_token_ids,
)
from polysae.formats.neuronpedia_upload import (
    UPLOAD_MAX_FEATURES,
    UPLOAD_MAX_LOGITS,
    UPLOAD_MAX_TOKENS,
    UploadPlan,
    read_batches,
    source_id,
    upload_plan,
    write_upload,
)

log = logging.getLogger(__name__)

SETTINGS_FILE = "polysae-neuronpedia.json"
"""polysae's record of the export (never ``run_settings.json``: SAEDashboard's runner writes its
own settings under that name)."""
LEGACY_SETTINGS_FILES = ("run_settings.json",)
"""Where exports before 0.3 kept that record (recognised, by its ``generator``, when replacing an
old export)."""
INTERACTIONS_FILE = "interactions.json"
UPLOAD_DIR = "upload"
"""Sub-folder of the upload request bodies (``NeuronpediaConfig.upload``)."""
GENERATOR = "polysae-neuronpedia"

BATCH_KEYS = ("model_id", "layer", "sae_set", "sae_id_suffix", "features")
"""Keys of every batch file (SAEDashboard's ``NeuronpediaDashboardBatch``)."""

FEATURE_KEYS = (
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values",
    "neuron_alignment_l1", "correlated_neurons_indices", "correlated_neurons_l1",
    "correlated_neurons_pearson", "correlated_features_indices", "correlated_features_l1",
    "correlated_features_pearson", "neg_str", "neg_values", "pos_str", "pos_values",
    "frac_nonzero", "freq_hist_data_bar_values", "freq_hist_data_bar_heights",
    "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "n_prompts_total",
    "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations", "vector")
"""Keys of every feature in a batch file: those of SAEDashboard's ``NeuronpediaDashboardFeature``,
in its ``to_dict`` order."""

ACTIVATION_KEYS = ("bin_min", "bin_max", "bin_contains", "tokens", "values",
                   "qualifying_token_index")
"""Keys of every entry of a feature's ``activations`` (SAEDashboard's
``NeuronpediaDashboardActivation`` without its optional ``dfa_*`` keys)."""


def _neuronpedia_stats() -> StatsConfig:
    # wider windows than the browser's 8 / 4; SAEDashboard's 50 histogram bins
    return StatsConfig(left=16, right=8, hist_bins=50)


@dataclass
class NeuronpediaConfig:
    """What the export holds: its own settings, and the per-feature statistics in ``stats``."""

    features_per_batch: int = 128
    """Features per ``batch-N.json`` file."""
    logit_hist_bins: int = 32
    """Bins of the histogram of a feature's logit effects over the whole vocabulary."""
    n_alignment: int = 3
    """Largest entries of each linear atom listed as ``neuron_alignment_*``."""
    n_pairs: int = 100
    """Interaction pairs exported (PolySAE only; 0 = no ``interactions.json``)."""
    min_pair_count: int = 2
    """Tokens on which both latents must fire for a pair to qualify."""
    sae_set: str | None = None
    """Neuronpedia SAE set name written in every batch (default ``polysae-<decoder>``)."""
    decimals: int = 3
    """Decimals kept for values in the JSON (SAEDashboard rounds to 3)."""
    sae_id_suffix: str | None = None
    """``sae_id_suffix`` of every batch: Neuronpedia's converter names the source
    ``<layer>-<set>__<suffix>`` (none: ``<layer>-<set>``)."""
    include_special: bool = False
    """Count the tokenizer's special tokens (BOS, EOS, PAD) like any other token; by default
    they are masked: left out of the top activations, density and histograms, and shown as 0
    in the windows."""
    upload: bool = False
    """Also write upload/: the request bodies of the Neuronpedia client's feature upload
    (FeatureRequest.upload_batch), at most 128 features each, dead features skipped and listed."""
    stats: StatsConfig = field(default_factory=_neuronpedia_stats)
    """Top activations, token windows (16 tokens before the peak, 8 after), histogram (hist_bins
    linear bins over each feature's own range; hist_lo / hist_hi are the browser's and unused
    here), logit tokens and chunking of the pass."""

    RECORD_KEYS = ("features_per_batch", "n_contexts", "left", "right", "n_logit_tokens",
                   "logit_hist_bins", "hist_bins", "hist_lo", "hist_hi", "n_alignment",
                   "n_pairs", "min_pair_count", "n_pair_contexts", "chunk_rows", "sae_set",
                   "decimals", "sae_id_suffix", "include_special", "upload")
    """Key order of the flat ``config`` record in ``polysae-neuronpedia.json`` (:meth:`record`)."""

    def __post_init__(self) -> None:
        check_counts(self, at_least_one=("features_per_batch", "logit_hist_bins",
                                         "min_pair_count"),
                     at_least_zero=("n_alignment", "n_pairs", "decimals"))

    def record(self) -> dict[str, Any]:
        """The settings as the export's flat ``config`` record (stats settings inline)."""
        return config_record(self, self.RECORD_KEYS)


class NeuronpediaExport(NamedTuple):
    """What :func:`export_neuronpedia` wrote."""

    out: Path
    """The export folder."""
    n_batches: int
    """``batch-N.json`` files (N = 0 .. n_batches - 1)."""
    n_features: int
    """Features exported (all of the SAE's latents)."""
    n_pairs: int
    """Pairs in ``interactions.json`` (0 when there is none)."""
    n_rows: int
    """Activation rows (tokens) the statistics were computed over."""
    n_masked: int = 0
    """Rows of special tokens among them, masked (0 with ``include_special``)."""
    n_dead: int = 0
    """Features that never fired on a counted token (no activations, empty histogram)."""
    n_upload: int = 0
    """Upload request bodies written to ``upload/`` (0 without ``NeuronpediaConfig.upload``)."""


def export_record(out: Path) -> tuple[dict, Path] | None:
    """The settings record of the polysae Neuronpedia export in folder ``out`` (parsed) and its
    file (``polysae-neuronpedia.json``, or an old export's ``run_settings.json``), or None."""
    for name in (SETTINGS_FILE, *LEGACY_SETTINGS_FILES):
        try:
            doc = json.loads((out / name).read_text())
            if doc.get("generator") == GENERATOR:
                return doc, out / name
        except (OSError, ValueError, AttributeError):
            pass
    return None


def check_export_target(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse (``ValueError``) an output folder ``out`` that is a file, non-empty and not an
    earlier export, or an earlier export (saying whose and when) unless ``overwrite``."""
    check_target(Path(out), "neuronpedia", "a polysae Neuronpedia export", export_record,
                 overwrite)


def _write_json(path: Path, doc: Any) -> None:
    # dumps, not dump: the C encoder (dump is pure Python)
    atomic_write_text(path, json.dumps(doc, ensure_ascii=False, allow_nan=False,
                                       separators=(",", ":")))


# -- the export -------------------------------------------------------------------------------
@torch.no_grad()
def export_neuronpedia_from_rows(
        sae, read_rows: Callable[[int, int], Tensor], n_rows: int, out_dir: str | os.PathLike, *,
        token_ids: Tensor, tokenizer: Any, W_U: Tensor, doc_ids: Tensor | None = None,
        positions: Tensor | None = None, config: NeuronpediaConfig | None = None,
        meta: dict | None = None, progress: bool = False,
        overwrite: bool = False) -> NeuronpediaExport:
    """Write the export from a row reader ``read_rows(start, stop) -> [rows, d_in]`` (in order).

    ``token_ids`` / ``doc_ids`` / ``positions`` [n_rows] align with the rows; ``tokenizer``
    (``.decode(list[int]) -> str``) gives the token text; ``W_U`` [d_in, vocab] the logit
    effects. ``meta`` may name ``model``, ``hook``, ``dataset`` and ``ctx`` (tokens per prompt).
    Rows holding the tokenizer's special tokens are masked unless ``config.include_special``.
    An earlier export in ``out_dir`` is replaced only with ``overwrite``; a non-empty folder that
    is not an export never (:func:`check_export_target`)."""
    cfg = config or NeuronpediaConfig()
    meta = dict(meta or {})
    out = Path(out_dir)
    if n_rows < 1:
        raise ValueError(f"neuronpedia: no activation rows to export (n_rows={n_rows})")
    if tokenizer is None:
        raise ValueError("neuronpedia: a tokenizer is needed for the token text of the top "
                         "activations (pass the model, or --model)")
    if W_U is None:
        raise ValueError("neuronpedia: the model's unembedding W_U is needed for the logit "
                         "effects (pos_str/neg_str)")
    if W_U.ndim != 2 or W_U.shape[0] != sae.cfg.d_in:
        raise ValueError(f"neuronpedia: W_U has shape {tuple(W_U.shape)}, expected [d_in="
                         f"{sae.cfg.d_in}, vocab]")
    for name, t in (("token_ids", token_ids), ("doc_ids", doc_ids), ("positions", positions)):
        if t is not None and tuple(t.shape) != (n_rows,):
            raise ValueError(f"neuronpedia: {name} has shape {tuple(t.shape)}, expected "
                             f"({n_rows},)")
    check_export_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    F_ = sae.cfg.d_sae
    sc = cfg.stats
    nd = cfg.decimals
    special = [] if cfg.include_special else special_token_ids(tokenizer)
    skip = None
    n_masked = 0
    if special:
        skip = torch.isin(token_ids.long().cpu(), torch.tensor(special, dtype=torch.long))
        n_masked = int(skip.sum())
        if n_masked == 0:
            skip = None
    n_counted = n_rows - n_masked
    if n_counted < 1:
        raise ValueError(f"neuronpedia: all {n_rows} exported tokens are special tokens "
                         f"{special} (masked); pass include_special (--include-special) to count "
                         "them")
    was_training = sae.training
    sae.eval()
    dev = sae.W_enc.device
    try:
        # pass 1: each feature's activation range (the linear bins of its histogram)
        h_lo, h_hi = activation_range(sae, kept_batches(
            lambda a, b: read_rows(a, b).float(), n_rows, sc.chunk_rows, skip))
        # pass 1b (PolySAE): exact co-occurrence of every co-active pair -> the strongest pairs
        pairs = None
        top: list = []
        dec = sae.decoder
        poly = getattr(dec, "kind", "") == "poly" and getattr(dec, "C2", None) is not None
        if poly and cfg.n_pairs > 0:
            # large batches: cooccurrence merges its pair table once per batch
            size = max(sc.chunk_rows, 4096)
            st_pairs = cooccurrence(sae, (x.to(dev) for x in kept_batches(
                read_rows, n_rows, size, skip)))
            top = top_pairs(sae, None, cfg.n_pairs, min_count=cfg.min_pair_count,
                            stats=st_pairs)
            if top:
                pairs = PairCandidates(torch.tensor([p.i for p in top]),
                                       torch.tensor([p.j for p in top]),
                                       torch.tensor([p.strength for p in top]))
        # pass 2: per-feature statistics and top windows (and the pairs' windows)
        st = stream_stats(sae, lambda a, b: read_rows(a, b).float(), n_rows, pairs, sc,
                          progress=progress, skip=skip,
                          hist_range=(h_lo.clamp_max(torch.finfo(torch.float32).max),
                                      h_hi.clamp_min(0.0)))
    finally:
        sae.train(was_training)
    windows = TokenWindows(token_ids.long(), None if doc_ids is None else doc_ids.long(),
                           None if positions is None else positions.long(), tokenizer, sc.left,
                           sc.right)
    atoms = sae.linear_atoms().detach().float().cpu()  # [F, D]
    eff = logit_effects(atoms, W_U, sc.n_logit_tokens, cfg.logit_hist_bins)
    n_al = min(cfg.n_alignment, atoms.shape[1])
    # as SAEDashboard: the largest signed entries (not magnitudes), |value| over the L1 norm
    al_v, al_i = atoms.topk(n_al, dim=1)
    al_l1 = al_v.abs() / atoms.abs().sum(1, keepdim=True).clamp_min(1e-12)
    summary = feature_summary(st)
    density = st.count.double() / n_counted
    n_prompts = count_prompts(positions, n_rows)
    n_dead = int((st.count == 0).sum())
    ctx_len = meta.get("ctx")
    dataset = str(meta.get("dataset") or "")
    model_id = str(meta.get("model") or "")
    layer = hook_layer(meta.get("hook"))
    sae_set = cfg.sae_set or f"polysae-{sae.cfg.decoder}"
    vocab_piece = windows.text.piece

    def strs(ids: Tensor) -> list[str]:
        return [vocab_piece(int(t)) for t in ids.tolist()]

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    batches: list[dict] = []
    try:
        n_batches = 0
        for b0 in range(0, F_, cfg.features_per_batch):
            b1 = min(F_, b0 + cfg.features_per_batch)
            ents = windows.entries(st.top_row[b0:b1], st.top_val[b0:b1])
            feats = []
            for f in range(b0, b1):
                mx = float(summary.max[f])
                acts = []
                for t, (toks, keep, peak) in enumerate(ents[f - b0]):
                    vals = st.top_ctx[f, t, keep].clamp_min(0)
                    acts.append({"bin_min": -1, "bin_max": round(mx, nd), "bin_contains": -1,
                                 "tokens": toks, "values": round_list(vals, nd),
                                 "qualifying_token_index": peak})
                hv, hh = activation_histogram(st.hist[f], float(h_lo[f]), float(h_hi[f]), nd)
                feats.append({
                    "feature_index": f,
                    "neuron_alignment_indices": al_i[f].tolist(),
                    "neuron_alignment_values": round_list(al_v[f], nd),
                    "neuron_alignment_l1": round_list(al_l1[f], nd),
                    "correlated_neurons_indices": [], "correlated_neurons_l1": [],
                    "correlated_neurons_pearson": [], "correlated_features_indices": [],
                    "correlated_features_l1": [], "correlated_features_pearson": [],
                    "neg_str": strs(eff.down_ids[f]),
                    "neg_values": round_list(eff.down_vals[f], nd),
                    "pos_str": strs(eff.up_ids[f]), "pos_values": round_list(eff.up_vals[f], nd),
                    "frac_nonzero": float(density[f]),
                    "freq_hist_data_bar_values": hv,
                    "freq_hist_data_bar_heights": hh,
                    "logits_hist_data_bar_heights": eff.hist_heights[f].long().tolist(),
                    "logits_hist_data_bar_values": round_list(eff.hist_values[f], nd),
                    "n_prompts_total": n_prompts,
                    "n_tokens_in_prompt": int(ctx_len) if ctx_len else 0,
                    "dataset": dataset, "decoder_weights_dist": [], "activations": acts,
                    # no steering vector: a PolySAE feature's effect is not one direction
                    "vector": [],
                })
            batch = {"model_id": model_id, "layer": layer if layer is not None else 0,
                     "sae_set": sae_set, "sae_id_suffix": cfg.sae_id_suffix, "features": feats}
            _write_json(tmp / f"batch-{n_batches}.json", batch)
            if cfg.upload:
                batches.append(batch)
            n_batches += 1
        n_pairs = 0
        if pairs is not None:
            n_pairs = _write_interactions(tmp / INTERACTIONS_FILE, sae, top, st, windows, W_U,
                                          cfg, model_id, layer, sae_set, strs, n_counted)
        settings = {"generator": GENERATOR, "format_version": 1, "model_id": model_id,
                    "layer": layer, "sae_set": sae_set, "hook": meta.get("hook"),
                    "d_sae": F_, "d_in": sae.cfg.d_in, "decoder": sae.cfg.decoder,
                    "sparsifier": sae.cfg.sparsifier, "n_rows": st.n_rows,
                    "n_prompts_total": n_prompts, "n_tokens_in_prompt": ctx_len,
                    "dataset": dataset, "n_batches": n_batches,
                    "features_per_batch": cfg.features_per_batch,
                    "sae_id_suffix": cfg.sae_id_suffix,
                    "source_id": source_id(layer, sae_set, cfg.sae_id_suffix),
                    "special_tokens_masked": {str(i): vocab_piece(i) for i in special},
                    "n_rows_masked": n_masked, "n_rows_counted": n_counted,
                    "n_dead": n_dead,
                    "interactions": INTERACTIONS_FILE if n_pairs else None,
                    "upload": UPLOAD_DIR if cfg.upload else None,
                    "config": cfg.record(), "meta": meta}
        n_upload = 0
        if cfg.upload:
            n_upload = write_upload(upload_plan(batches), tmp / UPLOAD_DIR)
        _write_json(tmp / SETTINGS_FILE, settings)
        check_export_target(out, overwrite)  # again: something may have appeared meanwhile
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return NeuronpediaExport(out, n_batches, F_, n_pairs, st.n_rows, n_masked, n_dead, n_upload)


def _write_interactions(path: Path, sae, top: list, st, windows: TokenWindows, W_U: Tensor,
                        cfg: NeuronpediaConfig, model_id: str, layer: int | None, sae_set: str,
                        strs: Callable[[Tensor], list[str]], n_counted: int) -> int:
    """``interactions.json``: the strongest co-active pairs with counts, windows and the logit
    effects of their pairwise atom lambda2 * B_ij (symmetrised with a separate U2)."""
    nd = cfg.decimals
    dec = sae.decoder
    ii = torch.tensor([p.i for p in top])
    jj = torch.tensor([p.j for p in top])
    lam = float(dec.lambda2.detach())
    atoms = interaction_atoms(sae, ii, jj)
    eff = logit_effects(atoms.float().cpu(), W_U, cfg.stats.n_logit_tokens, cfg.logit_hist_bins)
    ents = windows.entries(st.pair_row, st.pair_val)
    rows = []
    for p, pair in enumerate(top):
        acts = []
        for t, (toks, keep, peak) in enumerate(ents[p]):
            va = st.pair_ctx[p, t, 0, keep].clamp_min(0)
            vb = st.pair_ctx[p, t, 1, keep].clamp_min(0)
            acts.append({"tokens": toks, "values_a": round_list(va, nd),
                         "values_b": round_list(vb, nd),
                         "values": round_list(va * vb, nd),
                         "maxValue": round(float(st.pair_val[p, t]), nd),
                         "maxValueTokenIndex": peak})
        rows.append({"feature_a": pair.i, "feature_b": pair.j,
                     "strength": round(pair.strength, 6), "cooccurrence": pair.count,
                     "frac_cooccurrence": pair.count / n_counted,
                     "pos_str": strs(eff.up_ids[p]), "pos_values": round_list(eff.up_vals[p], nd),
                     "neg_str": strs(eff.down_ids[p]),
                     "neg_values": round_list(eff.down_vals[p], nd),
                     "activations": acts})
    doc = {"format": "polysae-interactions", "format_version": 1, "model_id": model_id,
           "layer": layer, "sae_set": sae_set, "lambda2": lam, "n_tokens": n_counted,
           "min_count": cfg.min_pair_count,
           "definition": "pairs (feature_a < feature_b) that fire together on at least "
                         "min_count tokens, ranked by strength = |lambda2| * ||B_ab||_2, B_ab = "
                         "C2 (u_a[:R2] * u_b[:R2]) the pairwise decoder atom; cooccurrence = "
                         "tokens where both fire; activations = the windows with the largest "
                         "z_a * z_b (values = z_a * z_b per token); pos/neg = the tokens "
                         "lambda2 * B_ab promotes / suppresses through W_U",
           "pairs": rows}
    _write_json(path, doc)
    return len(rows)


def export_neuronpedia(sae, store, out_dir: str | os.PathLike, model=None, tokenizer=None, *,
                       config: NeuronpediaConfig | None = None, meta: dict | None = None,
                       progress: bool = False, overwrite: bool = False) -> NeuronpediaExport:
    """The export over an :class:`~polysae.data.store.ActivationStore` (unshuffled, e.g. the
    held-out split); ``model`` (a HookedTransformer) supplies ``W_U`` and the tokenizer; an
    earlier export in ``out_dir`` is replaced only with ``overwrite``."""
    if model is not None and tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)
    W_U = getattr(model, "W_U", None) if model is not None else None
    hook = getattr(store, "hook", None)
    if store.d_in != sae.cfg.d_in:
        raise ValueError(f"neuronpedia: store {getattr(store, 'path', '')} holds d_in="
                         f"{store.d_in} activations but the SAE expects d_in={sae.cfg.d_in}")
    if W_U is not None and not residual_space(hook):
        raise ValueError(f"neuronpedia: hook {hook} is not in the residual stream, so logit "
                         "effects through W_U mean nothing there; export a residual-stream SAE")
    try:
        info = store.tokens()
    except (AttributeError, FileNotFoundError, KeyError) as e:
        raise ValueError(f"neuronpedia: the store {getattr(store, 'path', '')} has no token ids "
                         f"({e}); the export needs them for the token contexts") from e
    m = {"hook": hook, "dataset": store.manifest.get("dataset"), "ctx": store.manifest.get("ctx"),
         "model": store.manifest.get("model")}
    m.update({k: v for k, v in (meta or {}).items() if v is not None})
    return export_neuronpedia_from_rows(
        sae, lambda a, b: store.read_rows(a, b), int(store.n_rows), out_dir,
        token_ids=info.token_ids, doc_ids=info.doc_ids, positions=info.positions,
        tokenizer=tokenizer, W_U=W_U, config=config, meta=m, progress=progress,
        overwrite=overwrite)


__all__ = ["NeuronpediaConfig", "NeuronpediaExport", "LogitEffects", "UploadPlan", "BATCH_KEYS",
           "FEATURE_KEYS", "ACTIVATION_KEYS", "SETTINGS_FILE", "INTERACTIONS_FILE", "UPLOAD_DIR",
           "UPLOAD_MAX_FEATURES", "UPLOAD_MAX_LOGITS", "UPLOAD_MAX_TOKENS", "TokenWindows",
           "export_neuronpedia", "export_neuronpedia_from_rows", "logit_effects",
           "count_prompts", "hook_layer", "special_token_ids", "source_id", "activation_range",
           "activation_histogram", "upload_plan", "read_batches", "write_upload",
           "check_export_target", "export_record"]
