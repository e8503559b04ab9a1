"""Exact 1-D Wasserstein-1 distances, batched over latents, and the paper's separation metric.

The paper (method.md §3.3) calls ``scipy.stats.wasserstein_distance`` once per latent. Here every
latent is done at once in torch:

- W1 = integral_0^1 |Q_u(p) - Q_v(p)| dp over the empirical quantile functions (equal to scipy's
  integral of |F_u - F_v|). Sort each side once; both quantile functions are step functions
  whose breakpoints depend only on the sample sizes, so one shared index/weight grid turns W1
  into a gather and a weighted sum of |differences| for all latents at once. Equal sizes (the
  balanced probe sets) reduce to mean |sort(u) - sort(v)|.

Sorting is exact in the input dtype; differences and sums run in float64, so results match scipy
to ~1e-12 relative. On CPU, sorting uses numpy's SIMD sort (much faster than torch.sort for short
rows).
"""

from __future__ import annotations

from typing import NamedTuple

import math

import numpy as np
import torch
from torch import Tensor


def wasserstein_1d(u: Tensor, v: Tensor, *, chunk: int = 2048, use_numpy: bool | None = None
                   ) -> Tensor:
    """W1 between the columns of ``u`` [Nu, F] and ``v`` [Nv, F] -> [F] float64.

    Column f of ``u`` and of ``v`` are two empirical samples (uniform weights); the result
    equals ``scipy.stats.wasserstein_distance(u[:, f], v[:, f])`` for every f. Latents are
    processed ``chunk`` at a time to bound memory (in parallel threads on CPU). ``use_numpy``:
    sort with numpy (default on CPU) or with torch (default elsewhere, e.g. CUDA).
    """
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
    n_lat = u.shape[1]
    out = torch.empty(n_lat, dtype=torch.float64, device=u.device)
    starts = list(range(0, n_lat, chunk))
    # Latent-major rows (one transposing copy) so each sort runs over contiguous memory.
    if u.dtype not in (torch.float32, torch.float64):
        u, v = u.float(), v.float()   # exact for float16/bfloat16 inputs
    elif v.dtype != u.dtype:
        v = v.to(u.dtype)
    # numpy's SIMD sort on CPU; torch.sort elsewhere (``use_numpy=False`` forces the torch path).
    np_path = u.device.type == "cpu" if use_numpy is None else use_numpy
    ut, vt = u.T.contiguous(), v.T.contiguous()

    def one(s: int) -> None:
        out[s:s + chunk] = _w1_block(ut[s:s + chunk], vt[s:s + chunk], np_path)

    if u.device.type == "cpu" and len(starts) > 1 and torch.get_num_threads() > 1:
        # numpy's sort/take/ufuncs release the GIL: chunks run in parallel on the torch threads.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(torch.get_num_threads(), len(starts))) as ex:
            list(ex.map(one, starts))
    else:
        for s in starts:
            one(s)
    return out


def _sorted(x: Tensor, np_path: bool) -> Tensor:
    """Sort rows ascending. On CPU numpy's SIMD sort is ~15x faster than torch.sort for short rows
    (measured: 6.7 ms vs 111 ms for 16k rows of 250 on 2 cores)."""
    if np_path:
        return torch.from_numpy(np.sort(x.contiguous().numpy(), axis=1))
    return x.sort(dim=1).values


def _quantile_grid(nu: int, nv: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merged breakpoints of the two empirical quantile functions, as indices and weights.

    W1 = integral_0^1 |Q_u(p) - Q_v(p)| dp, and Q_u is constant on ((k-1)/nu, k/nu]. On each
    interval between consecutive breakpoints {k/nu} U {k/nv} both quantile functions are constant,
    so W1 = sum_m w_m |u_(iu_m) - v_(iv_m)| with w_m the interval length. The grid depends only on
    (nu, nv), not on the data, so it is shared by every latent. Exact integer arithmetic over the
    common denominator lcm(nu, nv).
    """
    L = math.lcm(nu, nv)
    pts = np.union1d(np.arange(1, nu + 1, dtype=np.int64) * (L // nu),
                     np.arange(1, nv + 1, dtype=np.int64) * (L // nv))
    w = np.diff(pts, prepend=0).astype(np.float64) / L
    iu = -(-pts // (L // nu)) - 1          # ceil(p * nu) - 1
    iv = -(-pts // (L // nv)) - 1
    return iu, iv, w


def _w1_block(u: Tensor, v: Tensor, np_path: bool) -> Tensor:
    """u [F, Nu], v [F, Nv] -> [F] float64."""
    nu, nv = u.shape[1], v.shape[1]
    us, vs = _sorted(u, np_path), _sorted(v, np_path)
    if nu != nv:
        iu, iv, w = _quantile_grid(nu, nv)
    else:
        iu = iv = None
        w = np.full(nu, 1.0 / nu)
    if np_path:
        a, b = us.numpy(), vs.numpy()
        if iu is not None:
            a, b = np.take(a, iu, axis=1), np.take(b, iv, axis=1)  # 4x faster than a[:, iu]
        d = np.subtract(a, b, dtype=np.float64)   # exact for float32 inputs
        np.abs(d, out=d)
        # Equal sizes: a plain row mean (measured faster than the matrix-vector product).
        return torch.from_numpy(d.mean(axis=1) if iu is None else d @ w)
    if iu is not None:
        us = us[:, torch.from_numpy(iu).to(us.device)]
        vs = vs[:, torch.from_numpy(iv).to(vs.device)]
    d = (us.to(torch.float64) - vs.to(torch.float64)).abs()
    return d @ torch.from_numpy(w).to(d.device)


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
    negative texts of one one-vs-rest task on the train split.
    """
    w = wasserstein_1d(pos, neg)
    both = torch.cat([pos, neg], dim=0).to(torch.float64)
    std = both.std(dim=0, unbiased=False)
    # W1 is scale-equivariant: W1(u/s, v/s) = W1(u, v)/s, so no second pass is needed.
    w_std = torch.where(std > 0, w / std.clamp_min(1e-300), torch.zeros_like(w))
    norm = both.norm(dim=1).mean()
    w_l2 = (w.mean() / norm) if norm > 0 else torch.zeros((), dtype=torch.float64)
    return Separation(float(w.mean()), float(w_std.mean()), float(w_l2))
