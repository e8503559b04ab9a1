"""Exact 1-D Wasserstein-1 distances, batched over latents, and the paper's separation metric.

The paper's protocol (docs/method.md#wasserstein-separation) calls
``scipy.stats.wasserstein_distance`` once per latent. Here every latent is done at once:

- W1 = integral_0^1 |Q_u(p) - Q_v(p)| dp over the empirical quantile functions (equal to scipy's
  integral of |F_u - F_v|). Sort each side once; both quantile functions are step functions
  whose breakpoints depend only on the sample sizes, so one shared index/weight grid turns W1
  into a gather and a weighted sum of |differences| for all latents at once. Equal sizes (the
  balanced probe sets) reduce to sum |sort(u) - sort(v)| / n.

CPU path (numpy), built for pooled SAE codes, which are mostly exact zeros. Latents go in blocks
of 512, the blocks split over the torch threads (numpy releases the GIL in copies and sorts):

1. **Transpose.** Latents are columns of the row-major [N, F] input. A plain transposing copy walks
   each column with a stride of F floats, which for power-of-two F (16384) keeps landing in the
   same cache sets (measured 4-5x slower); a ufunc writing into the transposed view walks the
   source in memory order instead. A latent-major input (``X.T`` of a contiguous [F, N]) is
   copied row by row.
2. **Short-row sort.** numpy's SIMD sort sorts rows of up to 256 (and 512) values with sorting
   networks, ~3x faster per value than rows of 1000 (measured: 1.0-1.2 vs 3.3 ns per value).
   Each latent's N values are cut into S sub-rows of <= 256 (zero-padded) and sorted in place.
3. **Cut out the zeros.** In a sorted sub-row the negatives sit at the front and the positives at
   the back; the zeros between them need no sorting. Keeping the first ``kn`` and last ``kp``
   entries of every sub-row (the most negatives/positives any sub-row holds, found by a search
   over a few sorted columns) keeps every non-zero plus some zeros; one more sort of those few
   entries gives the sorted sample with a run of zeros cut out of its middle: entries
   ``0..A-1`` and ``N-L+A..N-1`` (``A = S*kn``, ``L = S*(kn+kp)``). The cut run is zero in the
   full sorted sample, so W1 needs only the kept entries: for equal sizes both sides are cut at
   the same place and W1 = sum |C_u - C_v| / N; otherwise the quantile grid is restricted to the
   breakpoints where either side is outside its cut run.
4. **Mixed densities.** A cut pays only while it keeps at most half of N. A block that one cut
   serves is cut at its densest latent. Otherwise (real codes: a few dense latents in every
   block) each latent is sized by the shortest of the cut lengths 32, 64, ... that holds it, the
   sizes are merged into groups by an estimated cost, and the latents no cut pays for (dense data,
   e.g. raw activations) are sorted whole.

Sorting is exact in the input dtype; differences and sums run in float64, so results match scipy
to ~1e-12 relative. The torch path (any device; the default off CPU) sorts whole rows with
``torch.sort``. Inputs must be finite (a NaN gives NaN for its latent, as scipy does).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

_SUB = 256
"""Longest sub-row sorted on CPU: numpy's SIMD sort uses sorting networks up to this length."""


def wasserstein_1d(u: Tensor, v: Tensor, *, chunk: int | None = None,
                   use_numpy: bool | None = None) -> Tensor:
    """W1 between the columns of ``u`` [Nu, F] and ``v`` [Nv, F] -> [F] float64.

    Column f of ``u`` and of ``v`` are two empirical samples (uniform weights); the result
    equals ``scipy.stats.wasserstein_distance(u[:, f], v[:, f])`` for every f. Latents are
    processed ``chunk`` at a time to bound memory (default on CPU: 512, fewer for n > 2048; 2048
    latents elsewhere), in parallel threads on CPU. ``use_numpy``: the numpy CPU algorithm
    (default on CPU) or torch.sort over whole rows (default elsewhere, e.g. CUDA). A latent-major
    input (``u = X.T`` with ``X`` [F, Nu] contiguous) skips the transposing copy.
    """
    return _w1(u, v, chunk, use_numpy, moments=False)[0]


def _w1(u: Tensor, v: Tensor, chunk: int | None, use_numpy: bool | None, moments: bool
        ) -> tuple[Tensor, Tensor | None]:
    """:func:`wasserstein_1d`, and with ``moments`` also [4, F] float64: the sum and the sum of
    squares of each column of u, then of v (read off the sorted samples on CPU, where every
    non-zero passes through once)."""
    if u.ndim == 1:
        u = u[:, None]
    if v.ndim == 1:
        v = v[:, None]
    if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[1]:
        raise ValueError(f"wasserstein_1d: expected u [Nu, F] and v [Nv, F] with the same F, got "
                         f"{tuple(u.shape)} and {tuple(v.shape)}")
    if u.shape[0] == 0 or v.shape[0] == 0:
        raise ValueError(f"wasserstein_1d: empty sample (u has {u.shape[0]} rows, v has "
                         f"{v.shape[0]})")
    if chunk is not None and chunk < 1:
        raise ValueError(f"wasserstein_1d: chunk must be >= 1, got {chunk}")
    if u.dtype not in (torch.float32, torch.float64):
        u, v = u.float(), v.float()   # exact for float16/bfloat16 inputs
    elif v.dtype != u.dtype:
        v = v.to(u.dtype)
    np_path = u.device.type == "cpu" if use_numpy is None else use_numpy
    n_lat = u.shape[1]
    if not np_path:
        chunk = chunk or 2048
        out = torch.empty(n_lat, dtype=torch.float64, device=u.device)
        ut, vt = u.T.contiguous(), v.T.contiguous()
        for s in range(0, n_lat, chunk):
            out[s:s + chunk] = _w1_rows_torch(ut[s:s + chunk], vt[s:s + chunk])
        if not moments:
            return out, None
        ud, vd = u.double(), v.double()
        return out, torch.stack([ud.sum(0), (ud * ud).sum(0), vd.sum(0), (vd * vd).sum(0)])
    un = u.detach().cpu().numpy()
    vn = v.detach().cpu().numpy()
    if chunk is None:
        # 512 latents (at most ~1M values of a side) per block: measured best at n = 250 and,
        # with mixed densities (fewer numpy calls per group), at n = 1000; within 5 % of the best
        # for uniform codes at n = 1000 (128).
        chunk = max(32, min(512, (1 << 20) // max(un.shape[0], vn.shape[0]) // 32 * 32))
    starts = list(range(0, n_lat, chunk))
    res = np.empty(n_lat, dtype=np.float64)
    mom = np.zeros((4, n_lat), dtype=np.float64) if moments else None
    threads = min(torch.get_num_threads(), len(starts))

    def run(part: list[int]) -> None:
        hint = [0, 0, 0, 0]   # the last block's most negatives/positives per sub-row, u then v
        for s in part:
            e = min(s + chunk, n_lat)
            res[s:e] = _w1_block_np(un, vn, s, e, hint, mom)

    if threads > 1:
        # numpy's copies and sorts release the GIL: contiguous runs of blocks go to the threads.
        from concurrent.futures import ThreadPoolExecutor

        per = -(-len(starts) // threads)
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(run, [starts[i:i + per] for i in range(0, len(starts), per)]))
    else:
        run(starts)
    return (torch.from_numpy(res).to(u.device),
            None if mom is None else torch.from_numpy(mom).to(u.device))


def _w1_rows_torch(us: Tensor, vs: Tensor) -> Tensor:
    """us [F, Nu], vs [F, Nv] (latent-major) -> [F] float64 with torch.sort (any device)."""
    nu, nv = us.shape[1], vs.shape[1]
    us, vs = us.sort(dim=1).values, vs.sort(dim=1).values
    if nu == nv:
        return (us.to(torch.float64) - vs.to(torch.float64)).abs().mean(dim=1)
    iu, iv, w = _quantile_grid(nu, nv)
    us = us[:, torch.tensor(iu, device=us.device)]
    vs = vs[:, torch.tensor(iv, device=vs.device)]
    d = (us.to(torch.float64) - vs.to(torch.float64)).abs()
    return d @ torch.tensor(w, device=d.device)


@functools.lru_cache(maxsize=32)
def _quantile_grid(nu: int, nv: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merged breakpoints of the two empirical quantile functions, as indices and weights.

    W1 = integral_0^1 |Q_u(p) - Q_v(p)| dp, and Q_u is constant on ((k-1)/nu, k/nu]. On each
    interval between consecutive breakpoints {k/nu} U {k/nv} both quantile functions are constant,
    so W1 = sum_m w_m |u_(iu_m) - v_(iv_m)| with w_m the interval length. The grid depends only on
    (nu, nv), not on the data, so it is shared by every latent. Exact integer arithmetic over the
    common denominator lcm(nu, nv). Cached; the arrays are read-only.
    """
    L = math.lcm(nu, nv)
    pts = np.union1d(np.arange(1, nu + 1, dtype=np.int64) * (L // nu),
                     np.arange(1, nv + 1, dtype=np.int64) * (L // nv))
    w = np.diff(pts, prepend=0).astype(np.float64) / L
    iu = -(-pts // (L // nu)) - 1          # ceil(p * nu) - 1
    iv = -(-pts // (L // nv)) - 1
    for a in (iu, iv, w):
        a.flags.writeable = False
    return iu, iv, w


class _Layout(NamedTuple):
    """How one sample of ``n`` values is cut into ``s`` sub-rows of ``m`` (zero-padded to s*m)."""

    n: int
    s: int
    m: int


def _layout(n: int) -> _Layout:
    s = -(-n // _SUB)
    return _Layout(n, s, -(-n // s))


class _Cut(NamedTuple):
    """Sorted samples with a run of zeros cut out: ``vals`` [G, F, L] holds the sorted entries
    0..a-1 and n-L+a..n-1 of each full sorted sample; the entries a..n-L+a-1 are all zero."""

    vals: np.ndarray
    a: int


def _latent_rows(xs: list[np.ndarray], s: int, e: int, width: int) -> np.ndarray:
    """[G, e-s, width]: latents s..e-1 of each x [n, F] as rows (zero past n).

    A latent-major input (x = X.T with X contiguous) is copied row by row. A row-major one is
    transposed by a ufunc writing into the transposed view: numpy then walks the source in
    memory order, where a plain transposing copy walks each column with a stride of F floats,
    which for power-of-two F keeps hitting the same cache sets (measured 4-5x slower at 16384)."""
    n = xs[0].shape[0]
    # Rows a multiple of 512 bytes apart would put the transposed writes into few cache sets too
    # (measured: n = 1024 cost 2.8x n = 1000 per value): such rows get 64 bytes of slack.
    pad = 64 // xs[0].itemsize if (width * xs[0].itemsize) % 512 == 0 else 0
    out = np.empty((len(xs), e - s, width + pad), dtype=xs[0].dtype)[:, :, :width]
    for g, x in enumerate(xs):
        if x.strides[0] == x.itemsize:
            out[g, :, :n] = x[:, s:e].T
        else:
            np.positive(x[:, s:e], out=out[g, :, :n].T)
    if width > n:
        out[:, :, n:] = 0
    return out


def _most(t: np.ndarray, positive: bool, guess: int, rows: np.ndarray | None = None) -> int:
    """The most negatives (or positives) held by any sorted sub-row of ``t`` [..., m].

    Negatives sit at the front of a sorted sub-row and positives at the back, so "every sub-row
    holds at most k" is a test on one column (column k >= 0, or column m-1-k <= 0, everywhere).
    Exponential search from ``guess`` (the previous block's answer), then bisection: a few
    strided column reads instead of a pass over the block. ``rows``: only these latents (a mask
    over axis 1 of ``t`` [G, F, S, m]) count."""
    m = t.shape[-1]

    def ok(k: int) -> bool:
        if k >= m:
            return True
        col = (t[..., m - 1 - k] <= 0) if positive else (t[..., k] >= 0)
        return bool((col if rows is None else col[:, rows]).all())

    hi = min(guess, m)            # search for the smallest ok k; lo = -1 stands for "not ok"
    step = 1
    if ok(hi):
        lo = hi - 1
        while lo >= 0 and ok(lo):
            hi, step = lo, 2 * step
            lo = hi - step
        lo = max(lo, -1)
    else:
        lo = hi
        hi = min(hi + 1, m)
        while not ok(hi):
            lo, step = hi, 2 * step
            hi = min(hi + step, m)
    while hi - lo > 1:            # not ok(lo), ok(hi)
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _subsorted(xs: list[np.ndarray], s: int, e: int, lay: _Layout) -> np.ndarray:
    """Latents s..e-1 of each x as sorted, zero-padded sub-rows [G, e-s, S, m]."""
    t = _latent_rows(xs, s, e, lay.s * lay.m).reshape(len(xs), e - s, lay.s, lay.m)
    t.sort(axis=3)
    return t


def _cut_sizes(n: int) -> list[int]:
    """Cut lengths tried for samples of size ``n``: 32, 64, ... (numpy's sorting networks come in
    powers of two), up to the first that reaches n/2 (a longer cut does not pay)."""
    sizes = [32]
    while sizes[-1] < n // 2:
        sizes.append(2 * sizes[-1])
    return sizes


def _needs(t: np.ndarray, lay: _Layout, kn: int, sizes: list[int]) -> tuple[np.ndarray, list[int]]:
    """Per latent of ``t`` [G, F, S, m], the first cut size (index into ``sizes``) that holds all
    of its positives, ``len(sizes)`` where none does; and the kp bound of each size."""
    g, f, sub, m = t.shape
    budget = lay.n // (2 * sub) - kn      # most kp for which S*(kn+kp) <= n/2
    bounds = [min(size // sub - kn, budget) for size in sizes]
    need = np.full(f, len(sizes))
    for j in range(len(sizes) - 1, -1, -1):   # fits are monotone in the size
        k = bounds[j]
        if k < 0:
            break
        fits = np.ones(f, bool) if k >= m else (t[..., m - 1 - k] <= 0).all(axis=(0, 2))
        need[fits] = j
    return need, bounds


def _cut(t: np.ndarray, rows: np.ndarray | None, kn: int, kp: int | None, bound: int = 0
         ) -> _Cut:
    """The latents ``rows`` (None: all) of ``t`` [G, F, S, m] with their zero runs cut out: the
    first kn and last kp entries of every sub-row, sorted together (see the module docstring).
    ``kp`` None: the most positives any of these sub-rows holds, searched from ``bound``."""
    g, f, sub, m = t.shape
    if kp is None:
        kp = _most(t, True, bound, rows=rows)
    sel = (slice(None), slice(None) if rows is None else np.flatnonzero(rows))
    c = np.concatenate([t[sel + (slice(None), slice(0, kn))],
                        t[sel + (slice(None), slice(m - kp, m))]], axis=3)
    c = c.reshape(g, c.shape[1], sub * (kn + kp))
    if sub > 1:   # one sub-row: the two slices are already in order
        c.sort(axis=2)
    return _Cut(c, sub * kn)


def _whole(x: np.ndarray, s: int, cols: np.ndarray | None, t: np.ndarray, lay: _Layout
           ) -> _Cut:
    """Latents s + cols (None: all of the block) of x [n, F], sorted whole: ``vals``
    [1, len(cols), n]. ``t``: x's
    sorted sub-rows [1, F, S, m]; with one sub-row they already are the answer, and without zero
    padding (or negatives, so the padding sorts first) a sort of their concatenation is."""
    if lay.s == 1:   # a view when serving the whole block
        return _Cut(t[:, :, 0, :] if cols is None else t[:, cols, 0, :], lay.n)
    if cols is None:
        cols = np.arange(t.shape[1])
    pad = lay.s * lay.m - lay.n
    sub = t[:, cols]
    if pad == 0 or bool((sub[..., 0] >= 0).all()):
        rows = sub.reshape(1, len(cols), lay.s * lay.m)
        rows.sort(axis=2)
        return _Cut(rows[..., pad:], lay.n)
    rows = _latent_rows([x[:, s + cols]], 0, len(cols), lay.n)
    rows.sort(axis=2)
    return _Cut(rows, lay.n)


def _sort_ns(length: int) -> float:
    """Rough cost (ns, one core) of sorting one row of ``length`` with numpy's SIMD sort:
    sorting networks for power-of-two sizes up to 512, quicksort above (measured, x86-64)."""
    if length <= 512:
        return 1.1 * max(32, 1 << max(length - 1, 0).bit_length())
    return 3.3 * length


_GROUP_NS = 40_000.0
"""Rough fixed cost (ns) of serving one more group of latents from a block (numpy call overhead)."""


def _groups(need: np.ndarray, widths: list[list[int]], n_whole: int) -> list[tuple[int, int]]:
    """Merge the cut sizes latents need into groups [lo, hi] (served at size hi) of least
    estimated cost: each group pays its rows x the sort cost of its widest cut (per side,
    ``widths[side][j]``) plus a fixed cost. Tiny dynamic programme over the sizes."""
    counts = np.bincount(need, minlength=n_whole + 1)[:n_whole]
    present = [j for j in range(n_whole) if counts[j]]
    best: list[tuple[float, list[tuple[int, int]]]] = [(0.0, [])]
    for i in range(len(present)):
        cand = []
        for k in range(i + 1):           # the last group is present[k..i]
            rows = int(counts[present[k]:present[i] + 1].sum())
            cost = _GROUP_NS + rows * sum(_sort_ns(w[present[i]]) for w in widths)
            cand.append((best[k][0] + cost, best[k][1] + [(present[k], present[i])]))
        best.append(min(cand, key=lambda c: c[0]))
    return best[-1][1]


def _w1_block_np(u: np.ndarray, v: np.ndarray, s: int, e: int, hint: list[int],
                 mom: np.ndarray | None = None) -> np.ndarray:
    """W1 of latents s..e-1 of u [Nu, F] and v [Nv, F] -> [e-s] float64.

    Latents of one block can differ in density by orders of magnitude. With one sub-row the block
    is cut at its densest latent's size, or served whole (free: the sort is done). With several,
    each latent is sized (:func:`_needs`), the sizes are merged into groups by estimated cost
    (:func:`_groups`), each group is cut at its own size, and latents no cut pays for are sorted
    whole. ``hint``: the previous block's [most negatives, most positives] per sub-row for u and
    v (see :func:`_most`), updated in place. ``mom``: where given, the per-latent sums and sums of
    squares of u and v [4, F] are written into its columns s..e-1."""
    lu, lv = _layout(u.shape[0]), _layout(v.shape[0])
    if lu == lv:
        # Same n: both sides in one array, cut at the same place so their entries stay aligned.
        t = _subsorted([u, v], s, e, lu)
        sides, tu, tv = [(t, lu)], t[:1], t[1:]
    else:
        tu, tv = _subsorted([u], s, e, lu), _subsorted([v], s, e, lv)
        sides = [(tu, lu), (tv, lv)]
    kns, kps = [], []
    for i, (t, lay) in enumerate(sides):
        hint[2 * i] = kn = _most(t, False, hint[2 * i])
        hint[2 * i + 1] = kp = _most(t, True, hint[2 * i + 1])
        kns.append(kn)
        kps.append(kp)
    everyone = np.arange(e - s)
    if all(2 * lay.s * (kn + kp) <= lay.n for (t, lay), kn, kp in zip(sides, kns, kps)):
        # One cut serves the block (measured: splitting a block that one cut serves into
        # narrower groups costs more in numpy calls and gathers than the shorter sorts save).
        cuts = [_cut(t, None, kn, kp) for (t, _), kn, kp in zip(sides, kns, kps)]
        return _w1_pair(cuts, lu, lv, mom, s + everyone)
    if all(lay.s == 1 for _, lay in sides):
        # Sorted already, so serving the whole block costs only a longer |difference| pass
        # (measured cheaper than splitting it, whose extra numpy calls also hold the GIL).
        return _w1_pair([_whole(u, s, None, tu, lu), _whole(v, s, None, tv, lv)], lu, lv,
                        mom, s + everyone)
    sizes = _cut_sizes(max(lu.n, lv.n))
    need = np.zeros(e - s, dtype=np.int64)
    bounds = []
    for (t, lay), kn in zip(sides, kns):
        nd, bd = _needs(t, lay, kn, sizes)
        np.maximum(need, nd, out=need)
        bounds.append(bd)
    widths = [[lay.s * (kn + max(b, 0)) for b in bd]
              for (t, lay), kn, bd in zip(sides, kns, bounds)]
    res = np.empty(e - s, dtype=np.float64)
    for lo, hi in _groups(need, widths, len(sizes)):
        rows = (need >= lo) & (need <= hi)
        sel = None if rows.all() else rows
        cuts = [_cut(t, sel, kn, None, bd[hi]) for (t, _), kn, bd in zip(sides, kns, bounds)]
        res[rows] = _w1_pair(cuts, lu, lv, mom, s + np.flatnonzero(rows))
    whole = need == len(sizes)
    if whole.any():
        cols = np.flatnonzero(whole)
        res[cols] = _w1_pair([_whole(u, s, cols, tu, lu), _whole(v, s, cols, tv, lv)], lu, lv,
                             mom, s + cols)
    return res


def _w1_pair(cuts: list[_Cut], lu: _Layout, lv: _Layout, mom: np.ndarray | None,
             cols: np.ndarray) -> np.ndarray:
    """W1 from the cut of a joint [u, v] array (equal sizes) or from one cut per side; with
    ``mom``, also the sums and sums of squares of latents ``cols`` (the cut keeps every non-zero
    exactly once)."""
    if len(cuts) == 1:
        c = cuts[0]
        cuts = [_Cut(c.vals[:1], c.a), _Cut(c.vals[1:], c.a)]
    if mom is not None:
        for i, c in enumerate(cuts):
            x = c.vals[0].astype(np.float64)
            mom[2 * i, cols] = x.sum(axis=1)
            mom[2 * i + 1, cols] = np.einsum("ij,ij->i", x, x)
    return _w1_cuts(cuts[0], lu.n, cuts[1], lv.n)


def _w1_cuts(cu: _Cut, nu: int, cv: _Cut, nv: int) -> np.ndarray:
    """W1 per latent from two cut samples (``vals`` [1, F, L]) -> [F] float64."""
    a, b = cu.vals[0], cv.vals[0]
    if nu == nv and cu.a == cv.a and a.shape == b.shape:
        d = np.subtract(a, b, dtype=np.float64)   # exact for float32 inputs
        np.abs(d, out=d)
        return d.sum(axis=1) / nu
    iu, iv, w = _quantile_grid(nu, nv)
    ju, zu = _cut_index(iu, nu, cu)
    jv, zv = _cut_index(iv, nv, cv)
    keep = ~(zu & zv)                  # both in their zero runs: |0 - 0| contributes nothing
    a = np.take(_with_zero(a), ju[keep], axis=1)
    b = np.take(_with_zero(b), jv[keep], axis=1)
    d = np.subtract(a, b, dtype=np.float64)
    np.abs(d, out=d)
    return d @ w[keep]


def _cut_index(i: np.ndarray, n: int, c: _Cut) -> tuple[np.ndarray, np.ndarray]:
    """Full-sample indices -> cut column indices (the cut run maps to the zero column appended by
    :func:`_with_zero`), and a mask of those in the cut run."""
    width = c.vals.shape[-1]
    cut = n - width
    zero = (i >= c.a) & (i < c.a + cut)
    j = np.where(i < c.a, i, i - cut)
    j[zero] = width
    return j, zero


def _with_zero(c: np.ndarray) -> np.ndarray:
    return np.concatenate([c, np.zeros((c.shape[0], 1), c.dtype)], axis=1)


class Separation(NamedTuple):
    """W1 separation of one binary task (positives vs negatives), averaged over all latents."""

    w1: float
    """Mean over latents of the raw W1 between positive and negative samples (paper's metric)."""
    w1_std: float
    """Mean over latents of W1 after dividing each latent by its standard deviation over the
    pooled positive+negative samples (latents with zero spread contribute 0). Scale-free."""
    w1_l2: float
    """Raw mean W1 divided by the mean L2 norm of the sample vectors: removes a global scale."""


def separation(pos: Tensor, neg: Tensor) -> Separation:
    """Paper's per-task W1 (all latents, dead ones included as 0) plus two scale-normalised forms.

    ``pos`` [Np, F], ``neg`` [Nn, F] are mean-pooled codes (or activations) of the positive and
    negative texts of one one-vs-rest task on the train split. The per-latent spread comes from
    sums accumulated in float64 while W1 sorts the samples (no float64 copy of the inputs).
    """
    if pos.ndim != 2 or neg.ndim != 2:
        raise ValueError(f"separation: expected pos [Np, F] and neg [Nn, F], got "
                         f"{tuple(pos.shape)} and {tuple(neg.shape)}")
    w, mom = _w1(pos, neg, None, None, moments=True)
    n = pos.shape[0] + neg.shape[0]
    mean = (mom[0] + mom[2]) / n
    var = ((mom[1] + mom[3]) / n - mean * mean).clamp_min(0)
    std = var.sqrt()
    # W1 is scale-equivariant: W1(u/s, v/s) = W1(u, v)/s, so no second pass is needed.
    w_std = torch.where(std > 0, w / std.clamp_min(1e-300), torch.zeros_like(w))
    # Row norms in the input dtype (torch's cascade sums; a float64 upcast of the inputs cost 15x
    # more): a normalising constant, exact to float32 rounding for float32 codes.
    norm = torch.cat([torch.linalg.vector_norm(pos, dim=1),
                      torch.linalg.vector_norm(neg, dim=1)]).double().mean()
    w_l2 = (w.mean() / norm) if norm > 0 else torch.zeros((), dtype=torch.float64)
    return Separation(float(w.mean()), float(w_std.mean()), float(w_l2))
