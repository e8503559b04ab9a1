"""Neuronpedia export: feature dashboards as ``batch-N.json`` files in the layout Neuronpedia's
importer reads (the one SAEDashboard's Neuronpedia runner writes), plus PolySAE's interaction
pairs in ``interactions.json``, an extension of ours (see docs/exports.md for both layouts).

Each ``batch-N.json`` is ``{"model_id", "layer", "sae_set", "features": [...]}``; a feature holds
``feature_index``, ``frac_nonzero`` (density over the exported tokens), the activation histogram
(``freq_hist_data_bar_values`` / ``_heights``, log-spaced bins of the nonzero activations), the
logit effects of its linear atom through the unembedding (``pos_str`` / ``pos_values``,
``neg_str`` / ``neg_values`` and a histogram of all its logits), the largest entries of the atom
in the neuron basis (``neuron_alignment_*``), ``n_prompts_total`` / ``n_tokens_in_prompt`` /
``dataset``, and ``activations``: its top-activating token windows, each ``{"tokens", "values",
"maxValue", "maxValueTokenIndex", "bin_min", "bin_max", "bin_contains"}`` (the top-activations
group: ``bin_min`` = ``bin_contains`` = -1, ``bin_max`` = the feature's max activation). Fields
SAEDashboard fills from analyses polysae does not run (correlated neurons / features, attention
head weights) are present and empty.

The statistics come from the feature browser's one streaming pass
(:func:`polysae.browser.stats.stream_stats`, summarised by
:func:`~polysae.browser.stats.feature_summary`); interaction pairs are the ``n_pairs`` co-active
pairs with the largest |lambda2| * ||B_ij|| (:func:`polysae.evaluation.interactions.top_pairs`,
counted exactly by :func:`polysae.evaluation.interactions.cooccurrence` in a first pass), and their
contexts are collected in the same pass as the features'. The folder is written under a temporary
name and renamed into place.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from polysae.browser.site import residual_space
from polysae.browser.stats import (
    StatsConfig,
    check_counts,
    config_record,
    feature_summary,
    hist_centres,
    stream_stats,
)
from polysae.browser.text import TokenText, context_windows
from polysae.evaluation.interactions import (
    PairCandidates,
    cooccurrence,
    interaction_atoms,
    top_pairs,
)
from polysae.fileio import atomic_write_text, replace_folder

log = logging.getLogger(__name__)

SETTINGS_FILE = "run_settings.json"
INTERACTIONS_FILE = "interactions.json"
GENERATOR = "polysae-neuronpedia"

FEATURE_KEYS = (
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values",
    "neuron_alignment_l1", "correlated_neurons_indices", "correlated_neurons_l1",
    "correlated_neurons_pearson", "correlated_features_indices", "correlated_features_l1",
    "correlated_features_pearson", "neg_str", "neg_values", "pos_str", "pos_values",
    "frac_nonzero", "freq_hist_data_bar_values", "freq_hist_data_bar_heights",
    "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "n_prompts_total",
    "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations")
"""Keys of every feature in a batch file, as Neuronpedia's dashboard format lists them."""

ACTIVATION_KEYS = ("bin_min", "bin_max", "bin_contains", "tokens", "values", "maxValue",
                   "maxValueTokenIndex")
"""Keys of every entry of a feature's ``activations``."""


def _neuronpedia_stats() -> StatsConfig:
    return StatsConfig(left=16, right=8)  # wider windows than the browser's 8 / 4


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
    stats: StatsConfig = field(default_factory=_neuronpedia_stats)
    """Top activations, token windows (16 tokens before the peak, 8 after), histogram, logit
    tokens and chunking of the one pass."""

    RECORD_KEYS = ("features_per_batch", "n_contexts", "left", "right", "n_logit_tokens",
                   "logit_hist_bins", "hist_bins", "hist_lo", "hist_hi", "n_alignment",
                   "n_pairs", "min_pair_count", "n_pair_contexts", "chunk_rows", "sae_set",
                   "decimals")
    """Key order of the flat ``config`` record in ``run_settings.json`` (:meth:`record`)."""

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


# -- helpers ----------------------------------------------------------------------------------
def hook_layer(hook: str | None) -> int | None:
    """Layer number of a transformer-lens hook name (``blocks.6.hook_resid_post`` -> 6)."""
    m = re.match(r"blocks\.(\d+)\.", hook or "")
    return int(m.group(1)) if m else None


def _round(x: Tensor, nd: int) -> list:
    """Values rounded to ``nd`` decimals for the JSON (non-finite -> 0). Plain Python: the lists
    are short, and per-call tensor overhead would dominate."""
    return [round(v, nd) if math.isfinite(v) else 0.0 for v in x.tolist()]


def count_prompts(positions: Tensor | None, n_rows: int) -> int:
    """Forward contexts among the rows: a new one starts wherever the context position does not
    advance by exactly one from the previous row."""
    if positions is None or positions.numel() == 0:
        return 0
    starts = torch.ones(positions.numel(), dtype=torch.bool)
    starts[1:] = positions[1:] != positions[:-1] + 1
    return int(starts.sum())


class LogitEffects(NamedTuple):
    """Per direction: the strongest promoted / suppressed tokens and a histogram of all logits."""

    up_ids: Tensor
    """[M, n] token ids with the largest logits, largest first."""
    up_vals: Tensor
    """[M, n] their logits."""
    down_ids: Tensor
    """[M, n] token ids with the smallest logits, smallest first."""
    down_vals: Tensor
    """[M, n] their logits."""
    hist_heights: Tensor
    """[M, B] counts of the vocabulary's logits per bin."""
    hist_values: Tensor
    """[M, B] bin centres (each row spans its own [min, max])."""


@torch.no_grad()
def logit_effects(directions: Tensor, W_U: Tensor, n: int, bins: int,
                  block: int = 256) -> LogitEffects:
    """Logits ``directions [M, D] @ W_U [D, vocab]`` of each direction, in blocks of rows."""
    W = W_U.detach().float().cpu()
    n = min(n, W.shape[1])
    out: list[list[Tensor]] = [[] for _ in range(6)]
    for s in range(0, directions.shape[0], block):
        lg = directions[s:s + block].detach().float().cpu() @ W
        uv, ui = lg.topk(n, dim=1)
        dv, di = lg.topk(n, dim=1, largest=False)
        lo, hi = lg.min(1, keepdim=True).values, lg.max(1, keepdim=True).values
        width = (hi - lo).clamp_min(1e-12) / bins
        b = ((lg - lo) / width).floor().clamp(0, bins - 1).long()
        heights = torch.zeros(lg.shape[0], bins).scatter_add_(1, b, torch.ones_like(lg))
        centres = lo + width * (torch.arange(bins) + 0.5)
        for lst, t in zip(out, (ui, uv, di, dv, heights, centres)):
            lst.append(t)
    return LogitEffects(*(torch.cat(t) for t in out))


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"neuronpedia: output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        ok = False
        try:
            ok = json.loads((out / SETTINGS_FILE).read_text()).get("generator") == GENERATOR
        except (OSError, ValueError, AttributeError):
            pass
        if not ok:
            raise ValueError(f"neuronpedia: output folder {out} is not empty and is not a polysae "
                             "Neuronpedia export; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, doc: Any) -> None:
    # dumps, not dump: the C encoder (dump is pure Python)
    atomic_write_text(path, json.dumps(doc, ensure_ascii=False, allow_nan=False,
                                       separators=(",", ":")))


class _Windows:
    """Token strings and per-token values of context windows, trimmed to their valid span."""

    def __init__(self, token_ids: Tensor, doc_ids: Tensor | None, positions: Tensor | None,
                 tokenizer: Any, left: int, right: int):
        self.token_ids, self.doc_ids, self.positions = token_ids, doc_ids, positions
        self.text = TokenText(tokenizer)
        self.left, self.right = left, right

    def get(self, rows: Tensor) -> tuple[Tensor, Tensor, list[list[str]]]:
        """rows [M] -> (ids [M, W], valid [M, W], pieces per window)."""
        ids, ok, ov = context_windows(rows, self.token_ids, self.doc_ids, self.left, self.right,
                                      self.text, self.positions)
        pieces = []
        for c, row in enumerate(ids.tolist()):
            p = ov.get(c)
            pieces.append(p if p is not None else
                          [self.text.piece(t) if t >= 0 else "" for t in row])
        return ids, ok, pieces

    def entries(self, rows: Tensor, vals: Tensor) -> list[list[tuple[list[str], list[int], int]]]:
        """For top rows [S, T] with values [S, T] (-inf / row -1 where a slot has fewer than T):
        per slot, best first, (tokens, kept window offsets, index of the peak token in them)."""
        S, T = rows.shape
        flat = rows.reshape(-1)
        live = (flat >= 0) & torch.isfinite(vals.reshape(-1))
        ids, ok, pieces = self.get(flat.clamp_min(0))
        out: list[list[tuple[list[str], list[int], int]]] = [[] for _ in range(S)]
        for n in range(flat.numel()):
            if not bool(live[n]):
                continue
            keep = ok[n].nonzero().flatten().tolist()
            toks = [pieces[n][w] for w in keep]
            out[n // T].append((toks, keep, keep.index(self.left)))
        return out


# -- the export -------------------------------------------------------------------------------
@torch.no_grad()
def export_neuronpedia_from_rows(
        sae, read_rows: Callable[[int, int], Tensor], n_rows: int, out_dir: str | os.PathLike, *,
        token_ids: Tensor, tokenizer: Any, W_U: Tensor, doc_ids: Tensor | None = None,
        positions: Tensor | None = None, config: NeuronpediaConfig | None = None,
        meta: dict | None = None, progress: bool = False) -> NeuronpediaExport:
    """Write the export from a row reader ``read_rows(start, stop) -> [rows, d_in]`` (in order).

    ``token_ids`` / ``doc_ids`` / ``positions`` [n_rows] align with the rows; ``tokenizer``
    (``.decode(list[int]) -> str``) gives the token text; ``W_U`` [d_in, vocab] the logit
    effects. ``meta`` may name ``model``, ``hook``, ``dataset`` and ``ctx`` (tokens per prompt)."""
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
    _check_out(out)
    F_ = sae.cfg.d_sae
    sc = cfg.stats
    nd = cfg.decimals
    was_training = sae.training
    sae.eval()
    dev = sae.W_enc.device

    # pass 1 (PolySAE): exact co-occurrence of every co-active pair -> the strongest pairs
    pairs = None
    top: list = []
    dec = sae.decoder
    poly = getattr(dec, "kind", "") == "poly" and getattr(dec, "C2", None) is not None
    if poly and cfg.n_pairs > 0:
        # large batches: cooccurrence merges its pair table once per batch
        size = max(sc.chunk_rows, 4096)
        st_pairs = cooccurrence(sae, (read_rows(s, min(n_rows, s + size)).to(dev)
                                      for s in range(0, n_rows, size)))
        top = top_pairs(sae, None, cfg.n_pairs, min_count=cfg.min_pair_count, stats=st_pairs)
        if top:
            pairs = PairCandidates(torch.tensor([p.i for p in top]),
                                   torch.tensor([p.j for p in top]),
                                   torch.tensor([p.strength for p in top]))
    # pass 2: per-feature statistics and top windows (and the pairs' windows)
    st = stream_stats(sae, lambda a, b: read_rows(a, b).float(), n_rows, pairs, sc,
                      progress=progress)
    sae.train(was_training)
    windows = _Windows(token_ids.long(), None if doc_ids is None else doc_ids.long(),
                       None if positions is None else positions.long(), tokenizer, sc.left,
                       sc.right)
    atoms = sae.linear_atoms().detach().float().cpu()  # [F, D]
    eff = logit_effects(atoms, W_U, sc.n_logit_tokens, cfg.logit_hist_bins)
    n_al = min(cfg.n_alignment, atoms.shape[1])
    al_v, al_i = atoms.abs().topk(n_al, dim=1)
    al_signed = atoms.gather(1, al_i)
    al_l1 = al_v / atoms.abs().sum(1, keepdim=True).clamp_min(1e-12)
    summary = feature_summary(st)
    density = summary.density
    centres = hist_centres(sc.hist_lo, sc.hist_hi, sc.hist_bins)
    n_prompts = count_prompts(positions, n_rows)
    ctx_len = meta.get("ctx")
    dataset = str(meta.get("dataset") or "")
    model_id = str(meta.get("model") or "")
    layer = hook_layer(meta.get("hook"))
    sae_set = cfg.sae_set or f"polysae-{sae.cfg.decoder}"
    vocab_piece = windows.text.piece

    def strs(ids: Tensor) -> list[str]:
        return [vocab_piece(int(t)) for t in ids.tolist()]

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
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
                                 "tokens": toks, "values": _round(vals, nd),
                                 "maxValue": round(float(st.top_val[f, t]), nd),
                                 "maxValueTokenIndex": peak})
                feats.append({
                    "feature_index": f,
                    "neuron_alignment_indices": al_i[f].tolist(),
                    "neuron_alignment_values": _round(al_signed[f], nd),
                    "neuron_alignment_l1": _round(al_l1[f], nd),
                    "correlated_neurons_indices": [], "correlated_neurons_l1": [],
                    "correlated_neurons_pearson": [], "correlated_features_indices": [],
                    "correlated_features_l1": [], "correlated_features_pearson": [],
                    "neg_str": strs(eff.down_ids[f]), "neg_values": _round(eff.down_vals[f], nd),
                    "pos_str": strs(eff.up_ids[f]), "pos_values": _round(eff.up_vals[f], nd),
                    "frac_nonzero": float(density[f]),
                    "freq_hist_data_bar_values": _round(centres, 6),
                    "freq_hist_data_bar_heights": st.hist[f].tolist(),
                    "logits_hist_data_bar_heights": eff.hist_heights[f].long().tolist(),
                    "logits_hist_data_bar_values": _round(eff.hist_values[f], nd),
                    "n_prompts_total": n_prompts,
                    "n_tokens_in_prompt": int(ctx_len) if ctx_len else 0,
                    "dataset": dataset, "decoder_weights_dist": [], "activations": acts,
                })
            batch = {"model_id": model_id, "layer": layer if layer is not None else 0,
                     "sae_set": sae_set, "features": feats}
            _write_json(tmp / f"batch-{n_batches}.json", batch)
            n_batches += 1
        n_pairs = 0
        if pairs is not None:
            n_pairs = _write_interactions(tmp / INTERACTIONS_FILE, sae, top, st, windows, W_U,
                                          cfg, model_id, layer, sae_set, strs)
        settings = {"generator": GENERATOR, "format_version": 1, "model_id": model_id,
                    "layer": layer, "sae_set": sae_set, "hook": meta.get("hook"),
                    "d_sae": F_, "d_in": sae.cfg.d_in, "decoder": sae.cfg.decoder,
                    "sparsifier": sae.cfg.sparsifier, "n_rows": st.n_rows,
                    "n_prompts_total": n_prompts, "n_tokens_in_prompt": ctx_len,
                    "dataset": dataset, "n_batches": n_batches,
                    "features_per_batch": cfg.features_per_batch,
                    "interactions": INTERACTIONS_FILE if n_pairs else None,
                    "config": cfg.record(), "meta": meta}
        _write_json(tmp / SETTINGS_FILE, settings)
        _check_out(out)  # again: something may have appeared there during the pass
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return NeuronpediaExport(out, n_batches, F_, n_pairs, st.n_rows)


def _write_interactions(path: Path, sae, top: list, st, windows: _Windows, W_U: Tensor,
                        cfg: NeuronpediaConfig, model_id: str, layer: int | None, sae_set: str,
                        strs: Callable[[Tensor], list[str]]) -> int:
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
            acts.append({"tokens": toks, "values_a": _round(va, nd), "values_b": _round(vb, nd),
                         "values": _round(va * vb, nd),
                         "maxValue": round(float(st.pair_val[p, t]), nd),
                         "maxValueTokenIndex": peak})
        rows.append({"feature_a": pair.i, "feature_b": pair.j,
                     "strength": round(pair.strength, 6), "cooccurrence": pair.count,
                     "frac_cooccurrence": pair.count / st.n_rows,
                     "pos_str": strs(eff.up_ids[p]), "pos_values": _round(eff.up_vals[p], nd),
                     "neg_str": strs(eff.down_ids[p]), "neg_values": _round(eff.down_vals[p], nd),
                     "activations": acts})
    doc = {"format": "polysae-interactions", "format_version": 1, "model_id": model_id,
           "layer": layer, "sae_set": sae_set, "lambda2": lam, "n_tokens": st.n_rows,
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
                       progress: bool = False) -> NeuronpediaExport:
    """The export over an :class:`~polysae.data.store.ActivationStore` (unshuffled, e.g. the
    held-out split); ``model`` (a HookedTransformer) supplies ``W_U`` and the tokenizer."""
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
        tokenizer=tokenizer, W_U=W_U, config=config, meta=m, progress=progress)


__all__ = ["NeuronpediaConfig", "NeuronpediaExport", "LogitEffects", "FEATURE_KEYS",
           "ACTIVATION_KEYS", "SETTINGS_FILE", "INTERACTIONS_FILE", "export_neuronpedia",
           "export_neuronpedia_from_rows", "logit_effects", "count_prompts", "hook_layer"]
