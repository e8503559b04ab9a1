"""Pairwise latent interactions: polysae's own definitions (the paper gives no code,
docs/method.md#interaction-analyses).

For held-out tokens with sparse codes z:

- **co-occurrence** N_ij = number of tokens with z_i > 0 and z_j > 0 (i < j), counted exactly from
  the active sets (no dense F x F matrix: only co-active pairs are stored);
- **interaction strength** (PolySAE only) = |lambda2| * ||B_ij||_2, B_ij = C2 (u_i[:R2] * u_j[:R2])
  the implicit pairwise atom (with separate U, the symmetrised (B_ij + B_ji)/2);
- **code covariance** Cov(z_i, z_j) over all held-out tokens (the paper's vanilla-SAE statistic);
- **Pearson r** over pairs with N_ij > 0 between strength (poly) or covariance (any SAE) and N_ij,
  on raw and on log counts. The paper reports r = 0.06 (PolySAE strength) vs 0.82 (vanilla cov).

Latents with more than ``max_active`` active values in a row (ReLU SAEs) keep their top
``max_active`` values for counting, which bounds the pairs per token.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor


class PairStats(NamedTuple):
    """Every co-active pair seen in the held-out tokens."""

    i: Tensor
    """[P] int64 first latent (i < j)."""
    j: Tensor
    """[P] int64 second latent."""
    count: Tensor
    """[P] int64 tokens where both are active (N_ij)."""
    cov: Tensor
    """[P] float64 Cov(z_i, z_j) over all tokens."""
    n_tokens: int


class Pair(NamedTuple):
    i: int
    j: int
    strength: float
    """|lambda2| * ||B_ij|| (nan for a linear decoder)."""
    count: int
    """Co-occurrence count N_ij over the held-out tokens."""


def _batches(source: Any, max_tokens: int | None = None) -> Iterator[Tensor]:
    """Activation batches [B, d] from a tensor, an iterable or a store, cut at ``max_tokens``."""
    if isinstance(source, Tensor):
        source = torch.split(source.reshape(-1, source.shape[-1]), 4096)
    seen = 0
    for b in source:
        if max_tokens is not None:
            if seen >= max_tokens:
                return
            b = b[: max_tokens - seen]
        seen += b.shape[0]
        yield b


def cooccurrence(sae: Any, source: Any, *, max_tokens: int | None = None,
                 max_active: int = 64) -> PairStats:
    """Count co-active pairs and accumulate E[z_i z_j] over activation batches [B, d_in]
    (``source``: a tensor, an iterable of batches, or an ActivationStore)."""
    F = sae.cfg.d_sae
    keys_acc = torch.empty(0, dtype=torch.int64)
    cnt_acc = torch.empty(0, dtype=torch.int64)
    prod_acc = torch.empty(0, dtype=torch.float64)
    zsum = torch.zeros(F, dtype=torch.float64)
    n = 0
    with torch.inference_mode():
        for b in _batches(source, max_tokens):
            c = sae.encode_sparse(b.to(sae.W_enc.device, sae.W_enc.dtype))
            vals, idx = c.values.float().cpu(), c.indices.cpu()
            if vals.shape[1] > max_active:
                vals, pos = vals.topk(max_active, dim=1)
                idx = idx.gather(1, pos)
            zsum.index_add_(0, idx.reshape(-1), vals.reshape(-1).double())
            a, bb = torch.triu_indices(vals.shape[1], vals.shape[1], offset=1)
            ok = (vals[:, a] > 0) & (vals[:, bb] > 0)
            ia, ib = idx[:, a][ok], idx[:, bb][ok]
            prod = (vals[:, a] * vals[:, bb])[ok].double()
            key = torch.minimum(ia, ib) * F + torch.maximum(ia, ib)
            keys_acc = torch.cat([keys_acc, key])
            cnt_acc = torch.cat([cnt_acc, torch.ones_like(key)])
            prod_acc = torch.cat([prod_acc, prod])
            # Merge duplicates now so memory stays proportional to distinct pairs.
            keys_acc, inv = torch.unique(keys_acc, return_inverse=True)
            cnt_acc = torch.zeros(len(keys_acc), dtype=torch.int64).index_add_(0, inv, cnt_acc)
            prod_acc = torch.zeros(len(keys_acc), dtype=torch.float64).index_add_(0, inv, prod_acc)
            n += b.shape[0]
    if n == 0:
        raise ValueError("cooccurrence: no activations were given")
    i, j = keys_acc // F, keys_acc % F
    mean = zsum / n
    cov = prod_acc / n - mean[i] * mean[j]
    return PairStats(i, j, cnt_acc, cov, n)


def pair_strength(sae: Any, i: Tensor, j: Tensor, *, chunk: int = 65536) -> Tensor:
    """|lambda2| * ||B_ij|| for index vectors -> [P] float64 (ValueError for a linear decoder)."""
    dec = sae.decoder
    if getattr(dec, "kind", "") != "poly" or getattr(dec, "C2", None) is None:
        raise ValueError("interaction strength needs a polynomial decoder of order >= 2")
    lam = float(dec.lambda2.detach().abs())
    separate = getattr(dec, "U2", None) is not None
    out = torch.empty(len(i), dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, len(i), chunk):
            a, b = i[s:s + chunk], j[s:s + chunk]
            B = dec.pair_atoms(a, b)
            if separate:
                B = 0.5 * (B + dec.pair_atoms(b, a))
            out[s:s + chunk] = lam * B.double().norm(dim=-1).cpu()
    return out


@torch.no_grad()
def interaction_atoms(sae: Any, i: Tensor, j: Tensor) -> Tensor:
    """[P, D] the output direction of each pair: lambda2 * B_ij, symmetrised to
    lambda2 * (B_ij + B_ji) / 2 with a separate U2 (so it is the atom whose norm
    :func:`pair_strength` reports). ValueError for a decoder without pairwise atoms."""
    dec = sae.decoder
    lam = float(dec.lambda2.detach())
    atoms = lam * dec.pair_atoms(i, j)
    if getattr(dec, "U2", None) is not None:
        atoms = 0.5 * (atoms + lam * dec.pair_atoms(j, i))
    return atoms


class PairCandidates(NamedTuple):
    """Candidate latent pairs (i < j) with their interaction strength, strongest first."""

    i: Tensor
    """[P] int64 first latent."""
    j: Tensor
    """[P] int64 second latent."""
    strength: Tensor
    """[P] float |lambda2| * ||B_ij||."""


@torch.no_grad()
def pair_candidates(sae: Any, n: int, block: int = 2048) -> PairCandidates:
    """The ``n`` pairs i < j with the largest |lambda2| * ||B_ij|| over all d_sae^2 / 2 pairs,
    strongest first (B_ij = C2 (u_i[:R2] * u_j[:R2]); with a separate U2 the symmetrised
    (B_ij + B_ji) / 2, as :func:`pair_strength` defines it). Empty for a decoder without pairwise
    atoms (linear, or order 1) and for ``n <= 0``.

    Built on the decoder's factors (``decoder.pair_factors()``), never the F x F x D atoms:
    ||B_ij||^2 = sum_ab G_ab u_ia u_ib v_ja v_jb with G = C2^T C2, i.e. p_i^T diag(g) p'_j with
    p_i = vec(u_i u_i^T): one GEMM per ``block`` x ``block`` latents. With a shared U (the
    paper's mode) p is symmetric, so only a <= b is kept (off-diagonal weight 2)."""
    dec = sae.decoder
    empty = PairCandidates(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                           torch.zeros(0))
    if n <= 0:
        return empty
    try:
        fac = dec.pair_factors()
    except (AttributeError, ValueError):  # no pairwise atoms
        return empty
    r2 = fac.C2.shape[1]
    U = fac.u.detach().float().cpu()
    U2 = fac.v.detach().float().cpu()
    G = (fac.C2.T @ fac.C2).detach().float().cpu()
    if fac.shared:
        a, b = torch.triu_indices(r2, r2)
        g = G[a, b] * torch.where(a == b, 1.0, 2.0)

        def right(rows: Tensor) -> Tensor:
            M = U[rows]
            return M[:, a] * M[:, b]

        def left(rows: Tensor) -> Tensor:
            return right(rows) * g
    else:
        # separate U2: the pair's output direction is the symmetrised (B_ij + B_ji) / 2. With
        # a = U[:, :R2], b = U2[:, :R2]:
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


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def correlations(stats: PairStats, strength: Tensor | None = None, min_count: int = 1
                 ) -> dict[str, Any]:
    """Pearson r of strength (if given) and of code covariance with N_ij and log N_ij, over
    pairs with N_ij >= ``min_count``."""
    keep = stats.count >= min_count
    cnt = stats.count[keep].double().numpy()
    out: dict[str, Any] = {"n_pairs": int(keep.sum()), "n_tokens": stats.n_tokens,
                           "min_count": min_count,
                           "r_cov_count": _pearson(stats.cov[keep].numpy(), cnt),
                           "r_cov_logcount": _pearson(stats.cov[keep].numpy(), np.log(cnt))}
    if strength is not None:
        s = strength[keep].numpy()
        out["r_strength_count"] = _pearson(s, cnt)
        out["r_strength_logcount"] = _pearson(s, np.log(cnt))
    return out


def top_pairs(sae: Any, codes_source: Any, n: int = 20, *, min_count: int = 2,
              max_tokens: int | None = None, stats: PairStats | None = None) -> list[Pair]:
    """The ``n`` co-active pairs (N_ij >= ``min_count``) with the largest interaction strength
    |lambda2| * ||B_ij|| (a linear decoder: the largest co-occurrence counts, strength nan).

    ``codes_source`` holds held-out activations [.., d_in] (tensor, iterable of batches or an
    ActivationStore); pass ``stats`` to reuse a :func:`cooccurrence` result.
    """
    st = stats if stats is not None else cooccurrence(sae, codes_source, max_tokens=max_tokens)
    keep = st.count >= min_count
    i, j, cnt = st.i[keep], st.j[keep], st.count[keep]
    try:
        strength = pair_strength(sae, i, j)
        order = torch.argsort(strength, descending=True, stable=True)
    except ValueError:
        strength = torch.full((len(i),), float("nan"), dtype=torch.float64)
        order = torch.argsort(cnt, descending=True, stable=True)
    order = order[:n]
    return [Pair(int(i[o]), int(j[o]), float(strength[o]), int(cnt[o])) for o in order]


def top_pair_rows(sae: Any, source: Any, pairs: Sequence[Pair], n: int = 5, *,
                  max_tokens: int | None = None) -> list[list[tuple[int, float]]]:
    """For each pair, the ``n`` held-out rows (global row numbers in ``source`` order) with the
    largest z_i * z_j, as (row, z_i * z_j) best first."""
    if not pairs:
        return []
    pi = torch.tensor([p.i for p in pairs])
    pj = torch.tensor([p.j for p in pairs])
    best_v = torch.full((len(pairs), 0), 0.0)
    best_r = torch.zeros((len(pairs), 0), dtype=torch.int64)
    row0 = 0
    with torch.inference_mode():
        for b in _batches(source, max_tokens):
            z = sae.encode(b.to(sae.W_enc.device, sae.W_enc.dtype)).float().cpu()
            prod = (z[:, pi] * z[:, pj]).T                        # [P, B]
            rows = torch.arange(row0, row0 + b.shape[0]).expand_as(prod)
            v = torch.cat([best_v, prod], 1)
            r = torch.cat([best_r, rows], 1)
            k = min(n, v.shape[1])
            best_v, pos = v.topk(k, dim=1)
            best_r = r.gather(1, pos)
            row0 += b.shape[0]
    return [[(int(r), float(v)) for r, v in zip(best_r[p], best_v[p]) if v > 0]
            for p in range(len(pairs))]


def render_context(token_ids: Tensor, doc_ids: Tensor, row: int,
                   to_string: Callable[[Tensor], str], window: int = 12) -> str:
    """The ``window`` tokens up to and including ``row`` from the same document, with the token
    at ``row`` bracketed: ``... the oil [pipeline]``."""
    lo = max(0, row - window)
    same = doc_ids[lo:row + 1] == doc_ids[row]
    first = lo + int(torch.nonzero(same)[0]) if same.any() else row
    before = to_string(token_ids[first:row]) if row > first else ""
    return f"{before}[{to_string(token_ids[row:row + 1])}]"
