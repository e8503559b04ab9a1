"""Streaming per-latent statistics over activation rows: the one pass the feature browser (and the
Neuronpedia export) makes over held-out activations.

One pass over the rows computes, per latent: firing count (density), sum of activations (mean),
a histogram over fixed log10 bins (the range is unknown before the pass, a log grid covers every
scale; a caller that knows each latent's range, like the Neuronpedia export, passes it and gets
linear bins over it instead), and a running top-T of (activation, row) with the activation of
that latent on the context window around each row. Per candidate pair
(:func:`polysae.evaluation.interactions.pair_candidates`) it counts co-activation and keeps a
running top-T of rows by z_i * z_j.

Running top-T (:class:`TopPool`): per chunk, candidates above the slot's current T-th value are
capped to T per slot (two stable sorts), padded to [U, T], concatenated with the pool rows of the
U touched slots and reduced with one ``topk`` over [U, 2T]; context windows are gathered only for
the new winners. After the first chunks almost every candidate fails the threshold test, so the
cost is dominated by the SAE encoder itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from polysae.evaluation.interactions import PairCandidates


@dataclass
class StatsConfig:
    """The per-latent statistics a viewer collects and shows: the settings of the one pass
    (:func:`stream_stats`) and of the logit step, shared by the feature browser
    (:attr:`polysae.browser.BrowseConfig.stats`) and the Neuronpedia export
    (:attr:`polysae.formats.neuronpedia.NeuronpediaConfig.stats`)."""

    n_contexts: int = 20
    """Top-activating contexts (token windows) kept per latent."""
    left: int = 8
    """Tokens of context shown before the activating (peak) token."""
    right: int = 4
    """Tokens of context shown after the activating token."""
    n_pair_contexts: int = 10
    """Contexts kept per interaction pair, ranked by z_i * z_j."""
    n_logit_tokens: int = 10
    """Tokens listed as promoted / suppressed through the unembedding, per latent and pair."""
    hist_bins: int = 48
    """Histogram bins over log10(activation) in [hist_lo, hist_hi]; values outside are clamped."""
    hist_lo: float = -3.0
    """log10 of the smallest histogram edge."""
    hist_hi: float = 3.0
    """log10 of the largest histogram edge."""
    chunk_rows: int = 512
    """Rows encoded per step: peak memory is about chunk_rows * d_sae * 4 bytes (pre-acts)."""

    def __post_init__(self) -> None:
        check_counts(self, at_least_one=("n_contexts", "n_pair_contexts", "chunk_rows",
                                         "hist_bins"),
                     at_least_zero=("left", "right", "n_logit_tokens"))
        if not self.hist_lo < self.hist_hi:
            raise ValueError(f"StatsConfig.hist_lo {self.hist_lo} must be < hist_hi "
                             f"{self.hist_hi}")

    @property
    def window(self) -> int:
        """Tokens per context window: left + 1 + right."""
        return self.left + 1 + self.right


def check_counts(cfg: Any, *, at_least_one: tuple[str, ...] = (),
                 at_least_zero: tuple[str, ...] = ()) -> None:
    """Validate integer fields of a config dataclass (for its ``__post_init__``): a
    ``ValueError`` ``Class.field must be >= n, got v`` names the first field out of range."""
    for names, low in ((at_least_one, 1), (at_least_zero, 0)):
        for f in names:
            if int(getattr(cfg, f)) < low:
                raise ValueError(f"{type(cfg).__name__}.{f} must be >= {low}, got "
                                 f"{getattr(cfg, f)}")


def config_record(cfg: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """A viewer config (with a nested ``stats``) as the flat ``config`` record its output files
    store: the stats settings inline, keys in the order ``keys`` (the on-disk order, which
    predates the nesting), any field not in ``keys`` after them."""
    flat = {k: v for k, v in asdict(cfg).items() if k != "stats"}
    flat.update(asdict(cfg.stats))
    return {**{k: flat[k] for k in keys if k in flat}, **flat}


class StreamStats(NamedTuple):
    """Everything the one pass over the rows collects."""

    n_rows: int
    """Rows seen."""
    count: Tensor
    """[F] int64 rows where the latent is active (> 0)."""
    act_sum: Tensor
    """[F] float64 sum of the latent's activations."""
    hist: Tensor
    """[F, bins] int64 histogram of log10(activation) over StatsConfig's grid (with
    ``hist_range``: of the activation over each latent's own linear bins)."""
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


class FeatureSummary(NamedTuple):
    """Per-latent figures derived from a :class:`StreamStats` (what the site's summary and the
    Neuronpedia dashboards show)."""

    density: Tensor
    """[F] float64 fraction of the rows on which the latent is active."""
    mean: Tensor
    """[F] float64 mean activation over the rows where it is active (0 if it never fired)."""
    max: Tensor
    """[F] its largest activation (0 if it never fired)."""


def feature_summary(st: StreamStats) -> FeatureSummary:
    """Density, mean active value and max activation of every latent from one pass's stats."""
    density = st.count.double() / st.n_rows
    mean = torch.where(st.count > 0, st.act_sum / st.count.clamp(min=1), torch.zeros(()))
    top = st.top_val[:, 0]
    mx = torch.where(torch.isfinite(top), top, torch.zeros(()))
    return FeatureSummary(density, mean, mx)


def hist_centres(lo: float, hi: float, bins: int) -> Tensor:
    """[bins] float64 activation at the centre (in log10) of each histogram bin of
    :attr:`StreamStats.hist`, whose edges are ``10 ** linspace(lo, hi, bins + 1)``."""
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    return 10 ** ((edges[:-1] + edges[1:]) / 2)


# -- running top-T ------------------------------------------------------------------------------
class TopPool:
    """Running top-T values per slot, with the row and a [C, W] context payload of each.

    ``v`` [S, T] values (descending, -inf in empty places), ``r`` [S, T] their rows (-1 empty),
    ``ctx`` [S, T, C, W] the payloads, ``thr`` [S] the value a candidate must beat."""

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


# -- the pass -----------------------------------------------------------------------------------
def linear_bins(v: Tensor, lo: Tensor, hi: Tensor, bins: int) -> Tensor:
    """Bin of each value ``v`` among ``bins`` equal bins over its own ``[lo, hi]`` (all three
    aligned, float32): ``torch.histc``'s rule (the bin of ``(v - lo) * bins / (hi - lo)``, the top
    edge in the last bin; a range with ``lo == hi`` widened to ``[lo - 1, hi + 1]``), with values
    outside the range clamped to the end bins."""
    same = hi <= lo
    lo = torch.where(same, lo - 1, lo)
    hi = torch.where(same, hi + 1, hi)
    return ((v - lo) * bins / (hi - lo)).floor().clamp(0, bins - 1).long()


@torch.no_grad()
def stream_stats(sae, read_rows: Callable[[int, int], Tensor], n_rows: int,
                 pairs: PairCandidates | None = None, config: StatsConfig | None = None,
                 progress: bool = False, *, skip: Tensor | None = None,
                 hist_range: tuple[Tensor, Tensor] | None = None) -> StreamStats:
    """One pass over rows ``read_rows(start, stop) -> [stop-start, d_in]`` (unshuffled, in order).

    Rows of the context windows that lie in neighbouring chunks are read and encoded again (an
    overlap of left + right rows per chunk), so windows never depend on chunk boundaries.

    ``skip`` [n_rows] bool marks rows whose codes count as all zero (special tokens, say): they
    add nothing to counts, sums, histograms, top activations or pair statistics, and show 0 in
    the context windows of other rows. ``hist_range`` = (lo [F], hi [F]) switches the histogram
    from the log10 grid to ``hist_bins`` linear bins over each latent's own [lo, hi]
    (:func:`linear_bins`); ``hist_lo`` / ``hist_hi`` are then unused."""
    cfg = config or StatsConfig()
    F_ = sae.cfg.d_sae
    L, R, W = cfg.left, cfg.right, cfg.window
    B = cfg.hist_bins
    was_training = sae.training
    sae.eval()
    pool = TopPool(F_, cfg.n_contexts, 1, W)
    count = torch.zeros(F_, dtype=torch.int64)
    act_sum = torch.zeros(F_, dtype=torch.float64)
    hist = torch.zeros(F_ * B, dtype=torch.int64)
    pi = pairs.i if pairs is not None else torch.zeros(0, dtype=torch.int64)
    pj = pairs.j if pairs is not None else torch.zeros(0, dtype=torch.int64)
    P = pi.numel()
    co = torch.zeros(P, dtype=torch.int64)
    ppool = TopPool(max(P, 1), cfg.n_pair_contexts, 2, W)
    offs = torch.arange(-L, R + 1)
    dev = sae.W_enc.device
    if skip is not None and tuple(skip.shape) != (n_rows,):
        raise ValueError(f"stream_stats: skip has shape {tuple(skip.shape)}, expected ({n_rows},)")
    if hist_range is not None:
        h_lo, h_hi = (t.detach().float().cpu().reshape(F_) for t in hist_range)
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
        if skip is not None:
            vals = vals.masked_fill(skip[ws:we, None].cpu(), 0.0)  # out of place: codes stay
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
        if hist_range is None:
            bins = ((torch.log10(v.double()) - cfg.hist_lo) / (cfg.hist_hi - cfg.hist_lo) * B)
            bins = bins.floor().clamp(0, B - 1).long()
        else:
            bins = linear_bins(v, h_lo[lat], h_hi[lat], B)
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
