"""Exact 1-D Wasserstein-1 distances, batched over latents, and the paper's separation metric.

The paper (method.md §3.3) calls ``scipy.stats.wasserstein_distance`` once per latent. Here every
latent is done at once in torch:

- equal sample sizes (the balanced probe sets): W1 = mean |sort(u) - sort(v)|, one sort per side;
- unequal sizes: W1 = integral |F_u(t) - F_v(t)| dt, evaluated exactly on the merged sorted support
  (one sort carrying +1/nu, -1/nv weights whose running sum is F_u - F_v), which is what scipy
  integrates.

Sorting is exact in the input dtype; differences and sums run in float64, so results match scipy
to ~1e-12 relative.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


def wasserstein_1d(u: Tensor, v: Tensor, *, chunk: int = 4096) -> Tensor:
    """W1 between the columns of ``u`` [Nu, F] and ``v`` [Nv, F] -> [F] float64.

    Column f of ``u`` and of ``v`` are two empirical samples (uniform weights); the result
    equals ``scipy.stats.wasserstein_distance(u[:, f], v[:, f])`` for every f. Latents are
    processed ``chunk`` at a time to bound memory.
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
    for s in range(0, n_lat, chunk):
        # Latent-major rows so each sort runs over contiguous memory (much faster than dim=0).
        out[s:s + chunk] = _w1_block(u[:, s:s + chunk].T, v[:, s:s + chunk].T)
    return out


def _sorted(x: Tensor) -> Tensor:
    """Sort rows ascending. On CPU numpy's SIMD sort is ~15x faster than torch.sort for short rows
    (measured: 6.7 ms vs 111 ms for 16k rows of 250 on 2 cores)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.sort(x.contiguous().numpy(), axis=1))
    return x.sort(dim=1).values


def _w1_block(u: Tensor, v: Tensor) -> Tensor:
    """u [F, Nu], v [F, Nv] -> [F] float64."""
    nu, nv = u.shape[1], v.shape[1]
    if nu == nv:
        # Quantile functions are step functions on the same 1/n grid: W1 = mean |u_(k) - v_(k)|.
        # Sorting in the input dtype is exact; the differences are taken in float64.
        us, vs = _sorted(u), _sorted(v)
        if us.device.type == "cpu":
            d = np.subtract(us.numpy(), vs.numpy(), dtype=np.float64)  # one pass, no f64 copies
            np.abs(d, out=d)
            return torch.from_numpy(d.mean(axis=1))
        return (us.to(torch.float64) - vs.to(torch.float64)).abs().mean(dim=1)
    # General case: W1 = integral |F_u - F_v| dt. Sort the merged sample once, remembering which
    # side each value came from; the running sum of +1/nu (from u) and -1/nv (from v) is F_u - F_v
    # just right of each point, constant until the next. Order among ties is irrelevant (zero gaps).
    if u.device.type == "cpu" and u.dtype != torch.float64:
        vals, from_v = _merged_sort_cpu(u.float(), v.float())
    else:
        vals, order = torch.cat([u, v], dim=1).sort(dim=1)
        from_v = order >= nu
    f64 = dict(dtype=torch.float64, device=vals.device)
    step = torch.where(from_v, torch.tensor(-1.0 / nv, **f64), torch.tensor(1.0 / nu, **f64))
    diff_cdf = step.cumsum(dim=1)[:, :-1]
    vals = vals.to(torch.float64)
    return (diff_cdf.abs() * (vals[:, 1:] - vals[:, :-1])).sum(dim=1)


def _merged_sort_cpu(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Merged sort of float32 rows with a side flag, via one SIMD np.sort of int64 keys.

    np.argsort has no SIMD path (5x slower than np.sort), so each value becomes an order-preserving
    int32 (flip the magnitude bits of negatives), shifted left one bit with the side in bit 0.
    """
    a = np.concatenate([u.contiguous().numpy(), v.contiguous().numpy()], axis=1)
    bits = a.view(np.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = ordered.astype(np.int64) << 1
    key[:, u.shape[1]:] |= 1
    key.sort(axis=1)
    side = (key & 1).astype(bool)
    back = (key >> 1).astype(np.int32)
    back ^= (back >> 31) & 0x7FFFFFFF
    return torch.from_numpy(back.view(np.float32)), torch.from_numpy(side)


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
