"""Writing the feature browser's static site: ``index.html`` + ``app.js`` + ``style.css`` (from
``polysae/browser_assets``) and ``data/*.js``, from one :func:`~polysae.browser.stats.stream_stats`
pass (see :mod:`polysae.browser` for the layout and why the data files are ``.js``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from polysae.browser.links import report_entries, saebench_plots, select_report
from polysae.browser.stats import (
    StatsConfig,
    check_counts,
    config_record,
    feature_summary,
    stream_stats,
)
from polysae.browser.text import TokenText, context_windows, peak_strings
from polysae.evaluation.interactions import interaction_atoms, pair_candidates
from polysae.fileio import atomic_write_text, replace_folder

log = logging.getLogger(__name__)

SITE_MARKER = "polysae-site.json"
"""The file that marks a folder as a polysae site: a rebuild replaces only folders holding it."""
ASSETS = ("index.html", "app.js", "style.css")
"""The viewer's static files, copied from ``polysae/browser_assets``."""


@dataclass
class BrowseConfig:
    """What the site shows: its own settings, and the per-latent statistics in ``stats``."""

    n_pairs: int = 200
    """Pairs shown: the strongest |lambda2|*||B_ij|| among co-active candidates."""
    pair_candidates: int = 2000
    """Pairs scored during the pass (the strongest, chosen before it); the scatter plots them."""
    shard_size: int = 256
    """Latents per data file (the page loads only the shard it shows)."""
    title: str = "polysae feature browser"
    """Page title."""
    stats: StatsConfig = field(default_factory=StatsConfig)
    """Top contexts, windows, histogram, logit tokens and chunking of the one pass."""

    RECORD_KEYS = ("n_contexts", "left", "right", "n_pairs", "pair_candidates",
                   "n_pair_contexts", "n_logit_tokens", "hist_bins", "hist_lo", "hist_hi",
                   "chunk_rows", "shard_size", "title")
    """Key order of the flat ``config`` record in ``data/summary.js`` (:meth:`record`)."""

    def __post_init__(self) -> None:
        check_counts(self, at_least_one=("shard_size",),
                     at_least_zero=("n_pairs", "pair_candidates"))

    def record(self) -> dict[str, Any]:
        """The settings as the site's flat ``config`` record (stats settings inline)."""
        return config_record(self, self.RECORD_KEYS)


def _js(key: str, payload: Any) -> str:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return f'(window.POLYSAE=window.POLYSAE||{{}})["{key}"]={body};\n'


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _r(x: Tensor, nd: int = 4) -> list:
    """Round for compact JSON (finite values only)."""
    x = torch.nan_to_num(x.double(), nan=0.0, posinf=0.0, neginf=0.0)
    return (torch.round(x * 10 ** nd) / 10 ** nd).tolist()


def logit_tops(directions: Tensor, W_U: Tensor, n: int, block: int = 512) -> tuple[Tensor, ...]:
    """Top-n promoted / suppressed token ids and logits of each direction [M, D] through W_U
    [D, vocab]: ``(up_ids [M, n], up_logits, down_ids [M, n], down_logits)``, computed in blocks
    of ``block`` directions."""
    W_U = W_U.detach().float().cpu()
    ups, upv, dns, dnv = [], [], [], []
    n = min(n, W_U.shape[1])
    for s in range(0, directions.shape[0], block):
        lg = directions[s:s + block].detach().float().cpu() @ W_U
        v, i = lg.topk(n, dim=1)
        ups.append(i)
        upv.append(v)
        v, i = lg.topk(n, dim=1, largest=False)
        dns.append(i)
        dnv.append(v)
    return torch.cat(ups), torch.cat(upv), torch.cat(dns), torch.cat(dnv)


def build_site_from_rows(sae, read_rows: Callable[[int, int], Tensor], n_rows: int,
                         out_dir: str | os.PathLike, *, token_ids: Tensor | None = None,
                         doc_ids: Tensor | None = None, tokenizer=None, W_U: Tensor | None = None,
                         report: dict | None = None, config: BrowseConfig | None = None,
                         meta: dict | None = None, progress: bool = False,
                         timings: dict | None = None, positions: Tensor | None = None,
                         overwrite: bool = False) -> Path:
    """Build the site from a row reader (see :mod:`polysae.browser`). Returns ``out_dir``.

    ``token_ids`` / ``doc_ids`` [n_rows] int64 align with the rows (contexts stay inside one
    document); ``positions`` [n_rows] (position in the forward context) keeps them inside one
    forward context; ``tokenizer`` (``.decode(list[int]) -> str``) turns them into text; ``W_U``
    [d_in, vocab] gives the promoted / suppressed tokens. The site is written to a temporary
    folder beside ``out_dir`` and renamed into place at the end; an earlier site there is replaced
    only with ``overwrite``, a non-empty folder that is not a site never
    (:func:`check_site_target`). ``timings``, when given, receives the seconds spent in each stage
    (pairs, pass, logits, write)."""
    cfg = config or BrowseConfig()
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + now - clock[0]
        clock[0] = now

    out = Path(out_dir)
    if n_rows < 1:
        raise ValueError(f"browser: no activation rows to browse (n_rows={n_rows})")
    for name, t in (("token_ids", token_ids), ("doc_ids", doc_ids), ("positions", positions)):
        if t is not None and t.shape != (n_rows,):
            raise ValueError(f"browser: {name} has shape {tuple(t.shape)}, expected ({n_rows},)")
    if W_U is not None and W_U.shape[0] != sae.cfg.d_in:
        raise ValueError(f"browser: W_U has shape {tuple(W_U.shape)}, expected [d_in="
                         f"{sae.cfg.d_in}, vocab]")
    check_site_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    F_ = sae.cfg.d_sae
    pairs = pair_candidates(sae, cfg.pair_candidates) if cfg.n_pairs > 0 else None
    lap("pairs")
    sc = cfg.stats
    st = stream_stats(sae, read_rows, n_rows, pairs, sc, progress=progress)
    lap("pass")
    text = TokenText(tokenizer) if tokenizer is not None and token_ids is not None else None
    vocab: dict[int, str] = {}
    L, R = sc.left, sc.right

    def note(ids) -> None:
        if text is not None:
            for t in ids:
                if t >= 0 and t not in vocab:
                    vocab[t] = text.piece(t)

    # promoted / suppressed tokens of each linear atom
    logit = None
    if W_U is not None and sc.n_logit_tokens > 0:
        with torch.no_grad():
            logit = logit_tops(sae.decoder_directions(), W_U, sc.n_logit_tokens)
    lap("logits")
    density, mean, mx = feature_summary(st)

    # pairs: strongest co-active candidates
    pair_out: dict[str, Any] = {"i": [], "j": [], "s": [], "co": [], "scatter": None}
    sel = torch.zeros(0, dtype=torch.int64)
    if pairs is not None and pairs.i.numel():
        active = (st.pair_co > 0).nonzero().flatten()
        sel = active[:cfg.n_pairs]  # candidates are strongest-first already
        pair_out["scatter"] = {"s": _r(pairs.strength, 5), "co": st.pair_co.tolist(),
                               "i": pairs.i.tolist(), "j": pairs.j.tolist()}
    report_name = None
    if report:
        report, report_name = select_report(report, sae)
    report_rows, report_cols = report_entries(report, F_)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for a in ASSETS:
            src = resources.files("polysae").joinpath("browser_assets", a).read_text("utf-8")
            if a == "index.html":
                src = src.replace("{{TITLE}}", _html_escape(cfg.title))
            _write(tmp / a, src)
        # latent shards
        n_shards = (F_ + cfg.shard_size - 1) // cfg.shard_size
        fires: list[list[str]] = []
        for sh in range(n_shards):
            a, b = sh * cfg.shard_size, min(F_, (sh + 1) * cfg.shard_size)
            toks, ok, ov = context_windows(st.top_row[a:b], token_ids, doc_ids, L, R, text,
                                           positions)
            note(torch.unique(toks).tolist())
            m = torch.isfinite(st.top_val[a:b])
            if token_ids is not None:
                fires += peak_strings(toks, m, ov, L, vocab if text is not None else None)
            peak = st.top_val[a:b].clamp(min=0).nan_to_num(0, 0, 0)
            lmax = mx[a:b].clamp_min(1e-12)[:, None, None]
            q = torch.round(st.top_ctx[a:b].clamp(min=0) / lmax * 100).clamp(0, 100).long()
            q = torch.where(ok, q, torch.zeros_like(q))
            shard = {"lo": a, "hi": b, "T": sc.n_contexts, "W": sc.window, "left": L,
                     "n": m.sum(1).tolist(), "val": _r(peak), "row": st.top_row[a:b].tolist(),
                     "tok": toks.tolist(), "q": q.tolist(),
                     "ov": {str(k): v for k, v in ov.items()},
                     "hist": st.hist[a:b].tolist()}
            _write(tmp / "data" / f"latents_{sh:04d}.js", _js(f"latents_{sh:04d}", shard))
        # pairs
        if sel.numel():
            ii, jj = pairs.i[sel], pairs.j[sel]
            toks, ok, ov = context_windows(st.pair_row[sel], token_ids, doc_ids, L, R, text,
                                           positions)
            note(torch.unique(toks).tolist())
            pm = torch.stack([mx[ii], mx[jj]], 1).clamp_min(1e-12)[:, None, :, None]
            q = torch.round(st.pair_ctx[sel].clamp(min=0) / pm * 100).clamp(0, 100).long()
            q = q * ok[:, :, None, :]
            pair_out.update(i=ii.tolist(), j=jj.tolist(), s=_r(pairs.strength[sel], 5),
                            co=st.pair_co[sel].tolist(), T=sc.n_pair_contexts,
                            W=sc.window, left=L,
                            val=_r(st.pair_val[sel].clamp(min=0).nan_to_num(0, 0, 0)),
                            row=st.pair_row[sel].tolist(), tok=toks.tolist(), q=q.tolist(),
                            ov={str(k): v for k, v in ov.items()})
            if W_U is not None and sc.n_logit_tokens > 0:
                atoms = interaction_atoms(sae, ii, jj)
                u, uv, d, dv = logit_tops(atoms, W_U, sc.n_logit_tokens)
                note(u.flatten().tolist())
                note(d.flatten().tolist())
                pair_out.update(up=u.tolist(), upv=_r(uv, 3), down=d.tolist(), downv=_r(dv, 3))
        _write(tmp / "data" / "pairs.js", _js("pairs", pair_out))
        summary: dict[str, Any] = {
            "title": cfg.title, "d_sae": F_, "d_in": sae.cfg.d_in, "n_rows": st.n_rows,
            "decoder": sae.cfg.decoder, "sparsifier": sae.cfg.sparsifier,
            "lambda2": float(sae.decoder.lambda2.detach()) if getattr(sae.decoder, "lambda2", None)
            is not None else None,
            "shard_size": cfg.shard_size, "n_shards": n_shards,
            "hist": {"lo": sc.hist_lo, "hi": sc.hist_hi, "bins": sc.hist_bins},
            "density": _r(density, 7), "mean": _r(mean), "max": _r(mx),
            "has_text": text is not None, "meta": meta or {},
            "config": cfg.record(), "report": report_rows, "columns": report_cols,
            "report_sae": report_name, "saebench": saebench_plots(report),
        }
        if token_ids is not None:
            summary["fires"] = fires
        if logit is not None:
            u, uv, d, dv = logit
            note(u.flatten().tolist())
            note(d.flatten().tolist())
            summary.update(up=u.tolist(), upv=_r(uv, 3), down=d.tolist(), downv=_r(dv, 3))
        _write(tmp / "data" / "summary.js", _js("summary", summary))
        _write(tmp / "data" / "vocab.js", _js("vocab", {str(k): v for k, v in vocab.items()}))
        _write(tmp / SITE_MARKER, json.dumps({"format": 1, "d_sae": F_, "n_rows": st.n_rows,
                                              "meta": meta or {}}, indent=1))
        check_site_target(out, overwrite)  # again: something may have appeared meanwhile
        replace_folder(tmp, out)
        lap("write")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _html_escape(s: str) -> str:
    return (s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def describe_output(kind: str, doc: dict, record: Path) -> str:
    """An earlier viewer output in a few words for a message: ``kind`` (``"a polysae site"``), the
    SAE its record file ``record`` (parsed: ``doc``) names (``meta.sae`` or ``meta.source``), its
    width, model and hook where recorded, and when the record was written (its mtime)."""
    meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
    sae = meta.get("sae") or meta.get("source")
    shown = [f"{k} {v}" for k, v in (("d_sae", doc.get("d_sae")),
                                     ("model", meta.get("model") or doc.get("model_id")),
                                     ("hook", meta.get("hook")))
             if isinstance(v, (str, int)) and v != ""]
    try:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.stat().st_mtime))
    except OSError:
        when = "at an unknown time"
    details = f" ({', '.join(shown)})" if shown else ""
    return f"{kind} of {f'SAE {sae}' if sae else 'an unnamed SAE'}{details}, written {when}"


def check_target(out: Path, tag: str, kind: str,
                 read_record: Callable[[Path], tuple[dict, Path] | None],
                 overwrite: bool = False) -> None:
    """Refuse (``ValueError``, prefixed ``tag:``) to write a viewer's output folder ``out`` when it
    is a file, a non-empty folder that is not an earlier output of this viewer
    (``read_record(out)`` gives that output's parsed record and its file, or None), or such an
    earlier output, saying what it is (:func:`describe_output`), unless ``overwrite``. A foreign
    folder is refused even with ``overwrite``: the output replaces the folder as a whole. Nothing
    is created."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{tag}: output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        earlier = read_record(out)
        if earlier is None:
            raise ValueError(f"{tag}: output folder {out} is not empty and is not {kind}; "
                             "refusing to overwrite it")
        if not overwrite:
            raise ValueError(f"{tag}: output folder {out} already holds "
                             f"{describe_output(kind, *earlier)}; pass --overwrite "
                             "(overwrite=True) to replace it, or choose another folder")


def site_record(out: Path) -> tuple[dict, Path] | None:
    """The marker of the polysae site in folder ``out`` (parsed, ``{}`` when unreadable) and its
    path, or None when ``out`` holds no site."""
    marker = out / SITE_MARKER
    if not marker.is_file():
        return None
    try:
        doc = json.loads(marker.read_text())
    except (OSError, ValueError):
        doc = {}
    return (doc if isinstance(doc, dict) else {}), marker


def check_site_target(out: str | os.PathLike, overwrite: bool = False) -> None:
    """:func:`check_target` for a site: ``out`` may be absent, empty, or an earlier polysae site
    with ``overwrite`` (``polysae browse`` checks every SAE's folder before building any)."""
    check_target(Path(out), "browser", "a polysae site", site_record, overwrite)


def build_site_from_arrays(sae, acts: Tensor, out_dir: str | os.PathLike, *,
                           token_ids: Tensor | None = None, doc_ids: Tensor | None = None,
                           tokenizer=None, W_U: Tensor | None = None, report: dict | None = None,
                           config: BrowseConfig | None = None, meta: dict | None = None,
                           positions: Tensor | None = None, overwrite: bool = False) -> Path:
    """:func:`build_site_from_rows` over an in-memory [N, d_in] tensor."""
    if acts.ndim != 2 or acts.shape[1] != sae.cfg.d_in:
        raise ValueError(f"browser: acts has shape {tuple(acts.shape)}, expected [N, d_in="
                         f"{sae.cfg.d_in}]")
    return build_site_from_rows(sae, lambda a, b: acts[a:b], acts.shape[0], out_dir,
                                token_ids=token_ids, doc_ids=doc_ids, tokenizer=tokenizer,
                                W_U=W_U, report=report, config=config, meta=meta,
                                positions=positions, overwrite=overwrite)


def residual_space(hook: str | None) -> bool:
    """Whether a hook's activations live in the residual stream, where ``x @ W_U`` means
    "tokens promoted" (attention z / MLP hidden / q, k, v do not, even when widths match)."""
    if hook is None:
        return True
    last = hook.split(".")[-1]
    return "resid" in last or last in ("hook_mlp_out", "hook_attn_out", "hook_embed")


def build_site(sae, store, out_dir: str | os.PathLike, model=None, tokenizer=None, *,
               report: dict | str | os.PathLike | None = None,
               config: BrowseConfig | None = None, meta: dict | None = None,
               progress: bool = False, timings: dict | None = None,
               overwrite: bool = False) -> Path:
    """Build the browser for ``sae`` over an :class:`~polysae.data.store.ActivationStore` (use the
    held-out split, ``split="val"``). ``model`` (a HookedTransformer or anything with ``W_U`` and
    ``tokenizer``) supplies the unembedding and the tokenizer; ``tokenizer`` overrides it.
    ``report`` is an eval report dict or the path of its JSON file. An earlier site in ``out_dir``
    is replaced only with ``overwrite`` (:func:`check_site_target`). Returns ``out_dir``."""
    if model is not None and tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)
    W_U = getattr(model, "W_U", None) if model is not None else None
    hook = getattr(store, "hook", None)
    if W_U is not None and not residual_space(hook):
        log.info("browser: hook %s is not in the residual stream; promoted tokens through W_U "
                 "are left out", hook)
        W_U = None
    if W_U is not None and W_U.shape[0] != sae.cfg.d_in:
        log.warning("browser: the model's W_U is [%d, %d] but the SAE reads d_in=%d (not the "
                    "residual stream?); promoted tokens are left out", *W_U.shape, sae.cfg.d_in)
        W_U = None
    if store.d_in != sae.cfg.d_in:
        raise ValueError(f"browser: store {getattr(store, 'path', '')} holds d_in={store.d_in} "
                         f"activations but the SAE expects d_in={sae.cfg.d_in}")
    token_ids = doc_ids = positions = None
    try:
        info = store.tokens()
        token_ids, doc_ids = info.token_ids.long(), info.doc_ids.long()
        positions = info.positions.long()
    except (AttributeError, FileNotFoundError, KeyError) as e:
        log.warning("browser: the store has no token ids (%s); contexts show positions only", e)
    if isinstance(report, (str, os.PathLike)):
        p = Path(report)
        try:
            report = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"browser: cannot read eval report {p} ({e})") from e
    m = {"acts": str(getattr(store, "path", "")), "hook": getattr(store, "hook", None)}
    m.update(meta or {})
    return build_site_from_rows(
        sae, lambda a, b: store.read_rows(a, b).float(), int(store.n_rows), out_dir,
        token_ids=token_ids, doc_ids=doc_ids, tokenizer=tokenizer, W_U=W_U, report=report,
        config=config, meta=m, progress=progress, timings=timings, positions=positions,
        overwrite=overwrite)
