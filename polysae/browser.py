"""Feature browser: a static, self-contained HTML site of an SAE's latents and interactions.

``build_site(sae, store, out_dir, model=None, tokenizer=None)`` streams once over held-out
activations (an :class:`polysae.store.ActivationStore`) and writes ``out_dir/`` with
``index.html`` + ``app.js`` + ``style.css`` (from ``polysae/browser_assets``) and ``data/*.js``.
``build_site_from_arrays(sae, acts, out_dir, token_ids=..., doc_ids=...)`` does the same for
in-memory tensors; both go through :func:`build_site_from_rows`.

Why the data files are ``.js`` and not ``.json``: a browser refuses ``fetch()`` of ``file://``
URLs, but it runs ``<script src>`` from them, so wrapping each JSON payload in one assignment keeps
the site usable straight from disk (no server), while a CSP ``default-src 'self'`` meta tag stops
any request from leaving the machine.

One pass over the rows computes, per latent: firing count (density), sum of activations (mean),
a histogram over fixed log10 bins (the range is unknown before the pass, a log grid covers every
scale), and a running top-T of (activation, row) with the activation of that latent on the context
window around each row. Per candidate pair it counts co-activation and keeps a running top-T of
rows by z_i * z_j. Candidate pairs are chosen *before* the pass by interaction strength
|lambda2| * ||B_ij|| over all i < j (computed blockwise through a factorisation, never the F x F x D
tensor), and the site shows the strongest among those that are actually co-active.

Running top-T (``_TopPool``): per chunk, candidates above the slot's current T-th value are capped
to T per slot (two stable sorts), padded to [U, T], concatenated with the pool rows of the U
touched slots and reduced with one ``topk`` over [U, 2T]; context windows are gathered only for
the new winners. After the first chunks almost every candidate fails the threshold test, so the
cost is dominated by the SAE encoder itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SITE_MARKER = "polysae-site.json"
ASSETS = ("index.html", "app.js", "style.css")


@dataclass
class BrowseConfig:
    """What the site shows and how the pass is chunked."""

    n_contexts: int = 20
    """Top-activating contexts kept per latent."""
    left: int = 8
    """Tokens of context shown before the activating token."""
    right: int = 4
    """Tokens of context shown after the activating token."""
    n_pairs: int = 200
    """Pairs shown: the strongest |lambda2|*||B_ij|| among co-active candidates."""
    pair_candidates: int = 2000
    """Pairs scored during the pass (the strongest, chosen before it); the scatter plots them."""
    n_pair_contexts: int = 10
    """Contexts kept per pair, ranked by z_i * z_j."""
    n_logit_tokens: int = 10
    """Tokens listed as promoted / suppressed through the unembedding."""
    hist_bins: int = 48
    """Histogram bins over log10(activation) in [hist_lo, hist_hi]; values outside are clamped."""
    hist_lo: float = -3.0
    """log10 of the smallest histogram edge."""
    hist_hi: float = 3.0
    """log10 of the largest histogram edge."""
    chunk_rows: int = 512
    """Rows encoded per step: peak memory is about chunk_rows * d_sae * 4 bytes (pre-acts)."""
    shard_size: int = 256
    """Latents per data file (the page loads only the shard it shows)."""
    title: str = "polysae feature browser"
    """Page title."""

    def __post_init__(self) -> None:
        for f in ("n_contexts", "n_pair_contexts", "chunk_rows", "shard_size", "hist_bins"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"BrowseConfig.{f} must be >= 1, got {getattr(self, f)}")
        for f in ("left", "right", "n_pairs", "pair_candidates", "n_logit_tokens"):
            if int(getattr(self, f)) < 0:
                raise ValueError(f"BrowseConfig.{f} must be >= 0, got {getattr(self, f)}")
        if not self.hist_lo < self.hist_hi:
            raise ValueError(f"BrowseConfig: hist_lo {self.hist_lo} must be < hist_hi "
                             f"{self.hist_hi}")

    @property
    def window(self) -> int:
        return self.left + 1 + self.right


class PairCandidates(NamedTuple):
    """Candidate latent pairs (i < j) with their interaction strength, strongest first."""

    i: Tensor
    """[P] int64 first latent."""
    j: Tensor
    """[P] int64 second latent."""
    strength: Tensor
    """[P] float |lambda2| * ||B_ij||."""


class StreamStats(NamedTuple):
    """Everything the one pass over the rows collects."""

    n_rows: int
    """Rows seen."""
    count: Tensor
    """[F] int64 rows where the latent is active (> 0)."""
    act_sum: Tensor
    """[F] float64 sum of the latent's activations."""
    hist: Tensor
    """[F, bins] int64 histogram of log10(activation) over BrowseConfig's grid."""
    top_val: Tensor
    """[F, T] top activations, descending (-inf where fewer than T rows fired)."""
    top_row: Tensor
    """[F, T] int64 row of each (-1 when empty)."""
    top_ctx: Tensor
    """[F, T, W] the latent's activation on the window rows row-left .. row+right."""
    pair_co: Tensor
    """[P] int64 rows where both latents of candidate pair p are active."""
    pair_val: Tensor
    """[P, Tp] top z_i * z_j, descending."""
    pair_row: Tensor
    """[P, Tp] int64 rows of those."""
    pair_ctx: Tensor
    """[P, Tp, 2, W] activations of latent i and j on each window."""


# -- running top-T ------------------------------------------------------------------------------
class _TopPool:
    """Running top-T values per slot, with the row and a [C, W] context payload of each."""

    def __init__(self, n_slots: int, t: int, channels: int, width: int):
        self.t = t
        self.v = torch.full((n_slots, t), float("-inf"))
        self.r = torch.full((n_slots, t), -1, dtype=torch.int64)
        self.ctx = torch.zeros(n_slots, t, channels, width)
        self.thr = torch.full((n_slots,), float("-inf"))

    def offer(self, slot: Tensor, val: Tensor, row: Tensor,
              ctx_fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        """Merge candidates (slot [M], val [M], row [M]); ``ctx_fn(slots, rows) -> [n, C, W]`` is
        called only for candidates that enter the pool."""
        keep = val > self.thr[slot]
        if not bool(keep.any()):
            return
        slot, val, row = slot[keep], val[keep].float(), row[keep]
        o = torch.argsort(val, descending=True, stable=True)
        slot, val, row = slot[o], val[o], row[o]
        o = torch.argsort(slot, stable=True)
        slot, val, row = slot[o], val[o], row[o]
        uniq, inv, counts = torch.unique_consecutive(slot, return_inverse=True, return_counts=True)
        rank = torch.arange(slot.numel()) - (torch.cumsum(counts, 0) - counts)[inv]
        m = rank < self.t
        inv, rank, val, row = inv[m], rank[m], val[m], row[m]
        t = self.t
        cand_v = torch.full((uniq.numel(), t), float("-inf"))
        cand_r = torch.full((uniq.numel(), t), -1, dtype=torch.int64)
        cand_v[inv, rank] = val
        cand_r[inv, rank] = row
        all_v = torch.cat([self.v[uniq], cand_v], 1)
        all_r = torch.cat([self.r[uniq], cand_r], 1)
        top_v, pos = all_v.topk(t, dim=1)
        top_r = all_r.gather(1, pos)
        old = self.ctx[uniq]
        idx = pos.clamp(max=t - 1)[:, :, None, None].expand(-1, -1, *old.shape[2:])
        new_ctx = old.gather(1, idx)
        fresh = (pos >= t) & torch.isfinite(top_v)
        if bool(fresh.any()):
            uu, tt = fresh.nonzero(as_tuple=True)
            for s in range(0, uu.numel(), 8192):  # bounded memory for the [n, C, W, K] gather
                a, b = uu[s:s + 8192], tt[s:s + 8192]
                new_ctx[a, b] = ctx_fn(uniq[a], top_r[a, b]).float()
        self.v[uniq] = top_v
        self.r[uniq] = top_r
        self.ctx[uniq] = new_ctx
        self.thr[uniq] = top_v[:, -1]


# -- interaction strengths ----------------------------------------------------------------------
@torch.no_grad()
def pair_candidates(sae, n: int, block: int = 2048) -> PairCandidates:
    """The ``n`` pairs i < j with the largest |lambda2| * ||B_ij|| (B_ij = C2 (u_i[:R2] * u_j[:R2]);
    with a separate U2 the symmetrised (B_ij + B_ji) / 2, as polysae.interactions defines it).

    ||B_ij||^2 = sum_ab G_ab u_ia u_ib u'_ja u'_jb with G = C2^T C2, i.e. p_i^T diag(g) p'_j with
    p_i = vec(u_i u_i^T): one GEMM per block of latents instead of F^2 D-vectors. With a shared U
    (the paper's mode) p is symmetric, so only a <= b is kept (off-diagonal weight 2)."""
    dec = sae.decoder
    if getattr(dec, "C2", None) is None or n <= 0:
        e = torch.zeros(0, dtype=torch.int64)
        return PairCandidates(e, e, torch.zeros(0))
    r2 = dec.C2.shape[1]
    U = dec.U[:, :r2].detach().float().cpu()
    U2 = dec._u2()[:, :r2].detach().float().cpu()
    G = (dec.C2.T @ dec.C2).detach().float().cpu()
    shared = dec.U2 is None
    if shared:
        a, b = torch.triu_indices(r2, r2)
        g = G[a, b] * torch.where(a == b, 1.0, 2.0)

        def right(rows: Tensor) -> Tensor:
            M = U[rows]
            return M[:, a] * M[:, b]

        def left(rows: Tensor) -> Tensor:
            return right(rows) * g
    else:
        # separate U2: the pair's output direction is the symmetrised (B_ij + B_ji) / 2 (what
        # polysae.interactions.pair_strength reports). With a = U[:, :R2], b = U2[:, :R2]:
        # ||C2 (a_i*b_j + a_j*b_i) / 2||^2 = (P_a[i] g P_b[j] + P_b[i] g P_a[j]
        #                                    + 2 M[i] g M'[j]) / 4,
        # P_x[i] = vec(x_i x_i^T), M[i] = vec(a_i b_i^T), M'[j] = vec(b_j a_j^T).
        g = G.reshape(-1)

        def outer(x: Tensor, y: Tensor) -> Tensor:
            return (x[:, :, None] * y[:, None, :]).reshape(x.shape[0], -1)

        def left(rows: Tensor) -> Tensor:
            a, b = U[rows], U2[rows]
            return torch.cat([outer(a, a) * g, outer(b, b) * g, 2 * outer(a, b) * g], 1) / 4

        def right(rows: Tensor) -> Tensor:
            a, b = U[rows], U2[rows]
            return torch.cat([outer(b, b), outer(a, a), outer(b, a)], 1)
    F_ = U.shape[0]
    best_v = torch.zeros(0)
    best_i = torch.zeros(0, dtype=torch.int64)
    best_j = torch.zeros(0, dtype=torch.int64)
    for s in range(0, F_, block):
        e = min(F_, s + block)
        P = left(torch.arange(s, e))
        for t in range(s, F_, block):
            f = min(F_, t + block)
            S = P @ right(torch.arange(t, f)).T  # [bs, bt] squared norms
            ii = torch.arange(s, e)[:, None]
            jj = torch.arange(t, f)[None, :]
            S = S.masked_fill(jj <= ii, float("-inf"))
            k = min(n, S.numel())
            v, flat = S.flatten().topk(k)
            v_i = flat // (f - t) + s
            v_j = flat % (f - t) + t
            best_v = torch.cat([best_v, v])
            best_i = torch.cat([best_i, v_i])
            best_j = torch.cat([best_j, v_j])
            if best_v.numel() > n:
                v, o = best_v.topk(n)
                best_v, best_i, best_j = v, best_i[o], best_j[o]
    ok = torch.isfinite(best_v)
    best_v, best_i, best_j = best_v[ok], best_i[ok], best_j[ok]
    o = torch.argsort(best_v, descending=True, stable=True)
    lam = abs(float(dec.lambda2.detach()))
    return PairCandidates(best_i[o], best_j[o], lam * best_v[o].clamp_min(0).sqrt())


# -- the pass -----------------------------------------------------------------------------------
@torch.no_grad()
def stream_stats(sae, read_rows: Callable[[int, int], Tensor], n_rows: int,
                 pairs: PairCandidates | None = None, config: BrowseConfig | None = None,
                 progress: bool = False) -> StreamStats:
    """One pass over rows ``read_rows(start, stop) -> [stop-start, d_in]`` (unshuffled, in order).

    Rows of the context windows that lie in neighbouring chunks are read and encoded again (an
    overlap of left + right rows per chunk), so windows never depend on chunk boundaries."""
    cfg = config or BrowseConfig()
    F_ = sae.cfg.d_sae
    L, R, W = cfg.left, cfg.right, cfg.window
    B = cfg.hist_bins
    was_training = sae.training
    sae.eval()
    pool = _TopPool(F_, cfg.n_contexts, 1, W)
    count = torch.zeros(F_, dtype=torch.int64)
    act_sum = torch.zeros(F_, dtype=torch.float64)
    hist = torch.zeros(F_ * B, dtype=torch.int64)
    pi = pairs.i if pairs is not None else torch.zeros(0, dtype=torch.int64)
    pj = pairs.j if pairs is not None else torch.zeros(0, dtype=torch.int64)
    P = pi.numel()
    co = torch.zeros(P, dtype=torch.int64)
    ppool = _TopPool(max(P, 1), cfg.n_pair_contexts, 2, W)
    offs = torch.arange(-L, R + 1)
    dev = sae.W_enc.device
    it = range(0, n_rows, cfg.chunk_rows)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="browse", unit="chunk")
    for s in it:
        e = min(n_rows, s + cfg.chunk_rows)
        ws, we = max(0, s - L), min(n_rows, e + R)
        x = read_rows(ws, we)
        if x.ndim != 2 or x.shape[0] != we - ws or x.shape[1] != sae.cfg.d_in:
            raise ValueError(f"browser: read_rows({ws}, {we}) returned shape {tuple(x.shape)}, "
                             f"expected ({we - ws}, {sae.cfg.d_in})")
        codes = sae.encode_sparse(x.to(dev))
        vals = codes.values.detach().float().cpu()
        idx = codes.indices.detach().cpu()
        # Dense codes of the window, written over the pre-activation buffer the encoder already
        # allocated (no second [rows, d_sae] tensor): context activations and pair activations
        # become plain gathers instead of [n, W, K] index comparisons.
        z = codes.pre_acts.detach()
        if z.dtype != torch.float32 or z.device.type != "cpu":
            z = z.float().cpu()
        z.zero_().scatter_(1, idx, vals)
        del codes
        nw = vals.shape[0]

        def window_acts(lat: Tensor, rows: Tensor) -> Tensor:
            """lat [n, C], rows [n] global -> [n, C, W] activation of lat on rows+offs."""
            local = rows[:, None] - ws + offs  # [n, W]
            inside = (local >= 0) & (local < nw)
            local = local.clamp(0, nw - 1)
            return z[local[:, None, :], lat[:, :, None]] * inside[:, None]

        cv, ci = vals[s - ws:e - ws], idx[s - ws:e - ws]
        active = cv > 0
        rows = torch.arange(s, e)[:, None].expand_as(ci)
        lat, v, r = ci[active], cv[active], rows[active]
        count += torch.bincount(lat, minlength=F_)
        act_sum += torch.bincount(lat, weights=v.double(), minlength=F_)
        bins = ((torch.log10(v.double()) - cfg.hist_lo) / (cfg.hist_hi - cfg.hist_lo) * B)
        bins = bins.floor().clamp(0, B - 1).long()
        hist += torch.bincount(lat * B + bins, minlength=F_ * B)
        pool.offer(lat, v, r, lambda sl, rr: window_acts(sl[:, None], rr))
        if P:
            zc = z[s - ws:e - ws]
            a_i, a_j = zc[:, pi], zc[:, pj]  # [n, P]
            both = (a_i > 0) & (a_j > 0)
            co += both.sum(0)
            rr, pp = both.nonzero(as_tuple=True)
            if rr.numel():
                ppool.offer(pp, a_i[rr, pp] * a_j[rr, pp], rr + s,
                            lambda sl, rw: window_acts(torch.stack([pi[sl], pj[sl]], 1), rw))
    sae.train(was_training)
    return StreamStats(n_rows, count, act_sum, hist.view(F_, B), pool.v, pool.r, pool.ctx[:, :, 0],
                       co, ppool.v[:P], ppool.r[:P], ppool.ctx[:P])


# -- tokens -------------------------------------------------------------------------------------
class TokenText:
    """Display strings of tokens, correct when a character's bytes are split across tokens.

    A token decoded alone normally gives its text; one holding an incomplete UTF-8 sequence
    decodes to U+FFFD. For windows with such a token the pieces come from decoding growing spans:
    a token whose prefix still ends mid-character gets "" and the completed character appears on
    the token that finishes it, so the pieces concatenate to the window's true text."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[int, str] = {}
        self.span_all: bool | None = None
        """True when solo pieces do not concatenate to the decoded text (SentencePiece-style
        leading spaces, word-level tokenizers): then every window is span-decoded (slower)."""

    def check_concat(self, windows: list[list[int]]) -> bool:
        """Decide ``span_all`` from sample windows: do solo pieces join to the decoded span?"""
        if self.span_all is None:
            ok = True
            for ids in windows:
                ids = [t for t in ids if t >= 0]
                if ids and not any(self.broken(t) for t in ids):
                    if "".join(self.piece(t) for t in ids) != self._decode(ids):
                        ok = False
                        break
            self.span_all = not ok
            if self.span_all:
                log.info("browser: the tokenizer's single-token pieces do not concatenate to its "
                         "decoded text; span-decoding every context window")
        return bool(self.span_all)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def piece(self, t: int) -> str:
        s = self.cache.get(t)
        if s is None:
            s = self.cache[t] = self._decode([t])
        return s

    def broken(self, t: int) -> bool:
        return "\ufffd" in self.piece(t)

    def span_pieces(self, ids: list[int]) -> list[str]:
        """Pieces of a window of ids (-1 = masked, given "")."""
        out: list[str] = []
        run: list[int] = []
        done = ""
        for t in ids:
            if t < 0:
                out.append("")
                run, done = [], ""
                continue
            run.append(t)
            cur = self._decode(run)
            if cur.endswith("\ufffd"):  # incomplete character: wait for the next token
                out.append("")
                continue
            k = len(os.path.commonprefix([done, cur]))
            out.append(cur[k:])
            done = cur
        return out


# -- the site -----------------------------------------------------------------------------------
def _js(key: str, payload: Any) -> str:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return f'(window.POLYSAE=window.POLYSAE||{{}})["{key}"]={body};\n'


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _r(x: Tensor, nd: int = 4) -> list:
    """Round for compact JSON (finite values only)."""
    x = torch.nan_to_num(x.double(), nan=0.0, posinf=0.0, neginf=0.0)
    return (torch.round(x * 10 ** nd) / 10 ** nd).tolist()


def _logit_tops(directions: Tensor, W_U: Tensor, n: int, block: int = 512) -> tuple[Tensor, ...]:
    """Top-n promoted / suppressed token ids and logits of each direction [M, D] through W_U."""
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


def _select_report(report: dict, sae) -> tuple[dict, str | None]:
    """From a polysae eval report (``metrics.json``: ``{"saes": {name: {...}}, ...}``) keep the
    block of the SAE this site shows: the one whose ``info`` matches its decoder and width (the
    report compares several SAEs; only one is browsed here). Other reports pass through."""
    saes = report.get("saes") if isinstance(report, dict) else None
    if not isinstance(saes, dict):
        return report, None
    match = [n for n, b in saes.items() if isinstance(b, dict) and isinstance(b.get("info"), dict)
             and b["info"].get("decoder") == sae.cfg.decoder
             and b["info"].get("d_sae") == sae.cfg.d_sae and b["info"].get("d_in") == sae.cfg.d_in]
    if len(match) != 1:
        return report, None
    top = {k: v for k, v in report.items() if k != "saes" and isinstance(v, (int, float, dict))}
    top.pop("config", None)
    top.update({k: v for k, v in saes[match[0]].items() if k != "info"})
    return top, match[0]


_SKIP_KEYS = {"info", "config", "contexts", "definition", "path", "date"}


def _report_entries(report: dict | None, d_sae: int) -> tuple[list[dict], dict[str, list]]:
    """Eval report -> (metric rows with a link each, per-latent columns for the latents table).

    Convention: a metric whose value is a list of length d_sae becomes a sortable column and links
    to the table sorted by it; a dict holding a "latents" list of ids links to those latents; a
    dict with integer "i" and "j" (a listed pair) links to the pair page; any other numeric metric
    links to the latents table sorted by the column it is about (density for
    dead/dense/L0/sparsity metrics, the interaction table for pair metrics, else max activation).
    Text fields, configuration and rendered contexts are not metrics and are left out."""
    rows: list[dict] = []
    cols: dict[str, list] = {}
    if not report:
        return rows, cols

    def about(name: str) -> str:
        low = name.lower()
        if any(w in low for w in ("pair", "interaction", "lambda", "strength", "cooccur")):
            return "#pairs"
        if any(w in low for w in ("dead", "dense", "density", "l0", "sparsity", "fire")):
            return "#latents/sort=density"
        return "#latents/sort=max"

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            if isinstance(obj.get("latents"), list):
                ids = [int(i) for i in obj["latents"] if 0 <= int(i) < d_sae][:500]
                val = obj.get("value", obj.get("score", ""))
                rows.append({"name": prefix, "value": _fmt(val),
                             "link": "#ids/" + ",".join(map(str, ids))})
            if isinstance(obj.get("i"), int) and isinstance(obj.get("j"), int):
                i, j = sorted((obj["i"], obj["j"]))
                val = obj.get("strength", obj.get("count", ""))
                rows.append({"name": prefix, "value": _fmt(val), "link": f"#pair/{i}-{j}"})
                return
            for k, v in obj.items():
                if k != "latents" and k not in _SKIP_KEYS:
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, list) and obj and all(isinstance(v, (int, float)) and
                                                   not isinstance(v, bool) for v in obj):
            if len(obj) == d_sae:
                cols[prefix] = [v if isinstance(v, int) or math.isfinite(v) else None
                                for v in obj]
                rows.append({"name": prefix, "value": f"per-latent ({d_sae})",
                             "link": "#latents/sort=" + prefix})
            else:
                rows.append({"name": prefix, "value": f"[{len(obj)} values]",
                             "link": about(prefix)})
        elif isinstance(obj, list):
            for n, v in enumerate(obj):
                if isinstance(v, (dict, list)):
                    walk(f"{prefix}[{n}]", v)
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and prefix:
            rows.append({"name": prefix, "value": _fmt(obj), "link": about(prefix)})

    walk("", report)
    return rows, cols


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _contexts(rows: Tensor, token_ids: Tensor | None, doc_ids: Tensor | None, L: int, R: int,
              text: TokenText | None, positions: Tensor | None = None
              ) -> tuple[Tensor, Tensor, dict]:
    """rows [..., T] -> (window token ids [..., T, W] with -1 outside the row's document and
    forward context, valid mask, overrides {flat index: pieces} for windows holding a split
    character). With ``positions`` a window also stops where the context position does not
    advance by one per row (a new forward context, e.g. after a chunk's BOS), since tokens there
    were not seen by the model together with the peak token."""
    shape = rows.shape
    rows = rows.reshape(-1)
    offs = torch.arange(-L, R + 1)
    if token_ids is None:
        return (torch.full((*shape, L + R + 1), -1, dtype=torch.int64),
                torch.zeros((*shape, L + R + 1), dtype=torch.bool), {})
    n = token_ids.numel()
    w = rows[:, None] + offs
    ok = (rows[:, None] >= 0) & (w >= 0) & (w < n)
    wc = w.clamp(0, n - 1)
    if doc_ids is not None:
        ok &= doc_ids[wc] == doc_ids[rows.clamp(0, n - 1)][:, None]
    if positions is not None:
        ok &= (positions[wc] - positions[rows.clamp(0, n - 1)][:, None]) == offs
    toks = torch.where(ok, token_ids[wc], torch.full_like(wc, -1))
    ov: dict[int, list[str]] = {}
    if text is not None:
        uniq = torch.unique(toks[toks >= 0]).tolist()
        bad = {t for t in uniq if text.broken(t)}
        if text.check_concat(toks[:64].tolist()):
            for c in range(toks.shape[0]):
                if bool((toks[c] >= 0).any()):
                    ov[c] = text.span_pieces(toks[c].tolist())
        elif bad:
            bad_t = torch.tensor(sorted(bad))
            hit = torch.isin(toks, bad_t).any(1).nonzero().flatten().tolist()
            for c in hit:
                ov[c] = text.span_pieces(toks[c].tolist())
    return toks.view(*shape, -1), ok.view(*shape, -1), ov


def context_windows(rows: Tensor, token_ids: Tensor, doc_ids: Tensor | None, left: int,
                    right: int, text: TokenText | None = None, positions: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, dict]:
    """Token windows around ``rows`` as the site shows them (also used by
    :mod:`polysae.neuronpedia`): ``(ids [..., W], valid [..., W], overrides)``, ids -1 outside the
    row's document / forward context, ``overrides`` {flat window index: pieces} for windows whose
    pieces need span decoding (split characters; see :class:`TokenText`)."""
    return _contexts(rows, token_ids, doc_ids, left, right, text, positions)


def build_site_from_rows(sae, read_rows: Callable[[int, int], Tensor], n_rows: int,
                         out_dir: str | os.PathLike, *, token_ids: Tensor | None = None,
                         doc_ids: Tensor | None = None, tokenizer=None, W_U: Tensor | None = None,
                         report: dict | None = None, config: BrowseConfig | None = None,
                         meta: dict | None = None, progress: bool = False,
                         timings: dict | None = None, positions: Tensor | None = None) -> Path:
    """Build the site from a row reader; see the module docstring. Returns ``out_dir``.

    ``token_ids`` / ``doc_ids`` [n_rows] int64 align with the rows (contexts stay inside one
    document); ``positions`` [n_rows] (position in the forward context) keeps them inside one
    forward context; ``tokenizer`` (``.decode(list[int]) -> str``) turns them into text; ``W_U``
    [d_in, vocab] gives the promoted / suppressed tokens. The site is written to a temporary
    folder beside ``out_dir`` and renamed into place at the end. ``timings``, when given, receives
    the seconds spent in each stage (pairs, pass, logits, write)."""
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
    _check_out(out)
    F_ = sae.cfg.d_sae
    pairs = pair_candidates(sae, cfg.pair_candidates) if cfg.n_pairs > 0 else None
    lap("pairs")
    st = stream_stats(sae, read_rows, n_rows, pairs, cfg, progress=progress)
    lap("pass")
    text = TokenText(tokenizer) if tokenizer is not None and token_ids is not None else None
    vocab: dict[int, str] = {}
    L, R = cfg.left, cfg.right

    def note(ids) -> None:
        if text is not None:
            for t in ids:
                if t >= 0 and t not in vocab:
                    vocab[t] = text.piece(t)

    # promoted / suppressed tokens of each linear atom
    logit = None
    if W_U is not None and cfg.n_logit_tokens > 0:
        with torch.no_grad():
            logit = _logit_tops(sae.decoder_directions(), W_U, cfg.n_logit_tokens)
    lap("logits")
    density = st.count.double() / st.n_rows
    mean = torch.where(st.count > 0, st.act_sum / st.count.clamp(min=1), torch.zeros(()))
    mx = torch.where(torch.isfinite(st.top_val[:, 0]), st.top_val[:, 0], torch.zeros(()))

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
        report, report_name = _select_report(report, sae)
    report_rows, report_cols = _report_entries(report, F_)

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
            toks, ok, ov = _contexts(st.top_row[a:b], token_ids, doc_ids, L, R, text,
                                     positions)
            note(torch.unique(toks).tolist())
            m = torch.isfinite(st.top_val[a:b])
            if token_ids is not None:
                fires += _peak_strings(toks, m, ov, L, vocab if text is not None else None)
            peak = st.top_val[a:b].clamp(min=0).nan_to_num(0, 0, 0)
            lmax = mx[a:b].clamp_min(1e-12)[:, None, None]
            q = torch.round(st.top_ctx[a:b].clamp(min=0) / lmax * 100).clamp(0, 100).long()
            q = torch.where(ok, q, torch.zeros_like(q))
            shard = {"lo": a, "hi": b, "T": cfg.n_contexts, "W": cfg.window, "left": L,
                     "n": m.sum(1).tolist(), "val": _r(peak), "row": st.top_row[a:b].tolist(),
                     "tok": toks.tolist(), "q": q.tolist(),
                     "ov": {str(k): v for k, v in ov.items()},
                     "hist": st.hist[a:b].tolist()}
            _write(tmp / "data" / f"latents_{sh:04d}.js", _js(f"latents_{sh:04d}", shard))
        # pairs
        if sel.numel():
            ii, jj = pairs.i[sel], pairs.j[sel]
            toks, ok, ov = _contexts(st.pair_row[sel], token_ids, doc_ids, L, R, text,
                                     positions)
            note(torch.unique(toks).tolist())
            pm = torch.stack([mx[ii], mx[jj]], 1).clamp_min(1e-12)[:, None, :, None]
            q = torch.round(st.pair_ctx[sel].clamp(min=0) / pm * 100).clamp(0, 100).long()
            q = q * ok[:, :, None, :]
            pair_out.update(i=ii.tolist(), j=jj.tolist(), s=_r(pairs.strength[sel], 5),
                            co=st.pair_co[sel].tolist(), T=cfg.n_pair_contexts,
                            W=cfg.window, left=L,
                            val=_r(st.pair_val[sel].clamp(min=0).nan_to_num(0, 0, 0)),
                            row=st.pair_row[sel].tolist(), tok=toks.tolist(), q=q.tolist(),
                            ov={str(k): v for k, v in ov.items()})
            if W_U is not None and cfg.n_logit_tokens > 0:
                with torch.no_grad():
                    lam = float(sae.decoder.lambda2.detach())
                    atoms = lam * sae.decoder.pair_atoms(ii, jj)
                    if getattr(sae.decoder, "U2", None) is not None:  # symmetrised, as above
                        atoms = 0.5 * (atoms + lam * sae.decoder.pair_atoms(jj, ii))
                u, uv, d, dv = _logit_tops(atoms, W_U, cfg.n_logit_tokens)
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
            "hist": {"lo": cfg.hist_lo, "hi": cfg.hist_hi, "bins": cfg.hist_bins},
            "density": _r(density, 7), "mean": _r(mean), "max": _r(mx),
            "has_text": text is not None, "meta": meta or {},
            "config": asdict(cfg), "report": report_rows, "columns": report_cols,
            "report_sae": report_name,
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
        _swap_into_place(tmp, out)
        lap("write")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _peak_strings(toks: Tensor, valid: Tensor, ov: dict, left: int,
                  vocab: dict | None) -> list[list[str]]:
    """Per latent of a shard: the distinct texts of its peak tokens, most frequent first (at most
    5). The span-decoded piece is used where the window holds a split character, so a latent
    that fires on the byte completing "é" is listed as "é", not as U+FFFD."""
    out = []
    T = toks.shape[1]
    tl = toks[:, :, left].tolist()
    vl = valid.tolist()
    for r, (row, ok) in enumerate(zip(tl, vl)):
        seen: dict[str, int] = {}
        for t, (tok, good) in enumerate(zip(row, ok)):
            if not good or tok < 0:
                continue
            o = ov.get(r * T + t)
            txt = o[left] if o is not None else (vocab[tok] if vocab is not None else f"[{tok}]")
            seen[txt] = seen.get(txt, 0) + 1
        out.append([k for k, _ in sorted(seen.items(), key=lambda kv: -kv[1])][:5])
    return out


def _html_escape(s: str) -> str:
    return (s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"browser: output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / SITE_MARKER).is_file():
        raise ValueError(f"browser: output folder {out} is not empty and is not a polysae site; "
                         "refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``tmp`` folder; an old site is removed only afterwards."""
    _check_out(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_site_from_arrays(sae, acts: Tensor, out_dir: str | os.PathLike, *,
                           token_ids: Tensor | None = None, doc_ids: Tensor | None = None,
                           tokenizer=None, W_U: Tensor | None = None, report: dict | None = None,
                           config: BrowseConfig | None = None, meta: dict | None = None,
                           positions: Tensor | None = None) -> Path:
    """:func:`build_site_from_rows` over an in-memory [N, d_in] tensor."""
    if acts.ndim != 2 or acts.shape[1] != sae.cfg.d_in:
        raise ValueError(f"browser: acts has shape {tuple(acts.shape)}, expected [N, d_in="
                         f"{sae.cfg.d_in}]")
    return build_site_from_rows(sae, lambda a, b: acts[a:b], acts.shape[0], out_dir,
                                token_ids=token_ids, doc_ids=doc_ids, tokenizer=tokenizer,
                                W_U=W_U, report=report, config=config, meta=meta,
                                positions=positions)


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
               progress: bool = False, timings: dict | None = None) -> Path:
    """Build the browser for ``sae`` over an :class:`~polysae.store.ActivationStore` (use the
    held-out split, ``split="val"``). ``model`` (a HookedTransformer or anything with ``W_U`` and
    ``tokenizer``) supplies the unembedding and the tokenizer; ``tokenizer`` overrides it.
    ``report`` is an eval report dict or the path of its JSON file. Returns ``out_dir``."""
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
        config=config, meta=m, progress=progress, timings=timings, positions=positions)
