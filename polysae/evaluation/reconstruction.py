"""Reconstruction quality on held-out activations and loss recovered by splicing x_hat into the
model (SAEBench "core", docs/method.md#reconstruction-and-ce-recovered).

Definitions (all reported in ``metrics.json`` under ``reconstruction``):

- ``mse_per_token``: mean over tokens of ||x - x_hat||^2 (sum over the d_in dimensions). This is
  also the training loss's MSE.
- ``mse_saebench``: SAEBench core's ``mse``: each token's ||x - x_hat||^2 divided by the number of
  tokens in its evaluation batch (``saebench_batch_tokens``, 16 x 128 = 2048 there), averaged over
  tokens. Depends on that batch size; reported because the paper's MSE column most likely is it.
- ``fvu``: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the held-out set (mean over that set);
  ``explained_variance`` = 1 - fvu.
- ``l0``: mean number of nonzero latents per token.
- ``density``: per latent, the fraction of tokens on which it is nonzero; ``dead_fraction`` =
  share of latents with density 0, ``dense_fraction`` = share with density > ``dense_threshold``.
- CE / KL (``ce``): next-token cross-entropy of the clean model, with x_hat spliced in at the hook,
  and with the hook zero-ablated; ``ce_loss_recovered`` = (CE_zero - CE_sae)/(CE_zero - CE_clean);
  KL(clean || spliced) likewise, ``kl_recovered`` = (KL_zero - KL_sae)/KL_zero. Special-token
  positions keep their clean activation and are not scored as targets (SAEBench
  ``exclude_special_tokens_from_reconstruction``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class CELoss(NamedTuple):
    """Loss recovered by splicing, averaged over scored next-token positions."""

    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_loss_recovered: float
    """(CE_zero - CE_sae) / (CE_zero - CE_clean); 1 = as good as the clean model."""
    kl_sae: float
    kl_zero: float
    kl_recovered: float
    """(KL_zero - KL_sae) / KL_zero with KL(clean || spliced) per position."""
    n_tokens: int


def _special_mask(tokens: Tensor, special_ids: Iterable[int]) -> Tensor:
    ids = torch.tensor(sorted(set(int(i) for i in special_ids)), dtype=tokens.dtype,
                       device=tokens.device)
    return torch.isin(tokens, ids) if ids.numel() else torch.zeros_like(tokens, dtype=torch.bool)


def ce_recovered(model: Any, hook: str, tokens: Tensor,
                 reconstruct: Callable[[Tensor], Tensor], special_ids: Iterable[int] = (),
                 *, batch_size: int = 8) -> CELoss:
    """CE and KL loss recovered when the activation at ``hook`` is replaced by
    ``reconstruct(activation)`` (e.g. an SAE's forward), on any backend
    (:func:`polysae.data.models.as_backend`: a ``LoadedModel``, a HookedTransformer, ...).

    ``tokens`` [B, T]; ``reconstruct`` maps [N, d] -> [N, d]. Positions holding special tokens keep
    the clean activation and are not scored as targets.
    """
    return ce_recovered_many(model, hook, tokens, {"sae": reconstruct}, special_ids,
                             batch_size=batch_size)["sae"]


def ce_recovered_many(model: Any, hook: str, tokens: Tensor,
                      reconstructs: dict[str, Callable[[Tensor], Tensor]],
                      special_ids: Iterable[int] = (), *, batch_size: int = 8,
                      progress: Callable[[int], None] | None = None) -> dict[str, CELoss]:
    """:func:`ce_recovered` for several reconstructions sharing the clean and zero-ablated runs
    (on CPU each forward costs about the same whatever the batch, so sharing them matters).
    ``progress(n)`` is called after each batch with its number of contexts."""
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"ce_recovered: tokens must be [batch, pos>=2], got {tuple(tokens.shape)}")
    from polysae.data.models import as_backend

    be = as_backend(model)
    be.require_causal("CE/KL loss recovered", "evaluate a causal LM")
    dev = be.device
    names = list(reconstructs)
    tot = {k: 0.0 for k in ["clean", "zero", "kl_zero", *names, *(f"kl_{n}" for n in names)]}
    n = 0
    with torch.inference_mode():
        for s in range(0, tokens.shape[0], batch_size):
            tok = tokens[s:s + batch_size].to(dev)
            special = _special_mask(tok, special_ids)
            target_ok = ~special[:, 1:]

            def splice(act, fn):
                flat = act.reshape(-1, act.shape[-1])
                new = fn(flat.float()).to(act.dtype).reshape(act.shape)
                keep = special.reshape(*special.shape, *([1] * (act.ndim - 2)))
                return torch.where(keep, act, new)

            def run(fn):
                edits = None if fn is None else {hook: lambda a: splice(a, fn)}
                logits = be.logits(tok, edits)
                return F.log_softmax(logits[:, :-1].float(), dim=-1)

            tgt = tok[:, 1:, None]
            lp_clean = run(None)
            p_clean = lp_clean.exp()
            for key, fn in [("clean", None), ("zero", torch.zeros_like), *reconstructs.items()]:
                lp = lp_clean if fn is None else run(fn)
                nll = -lp.gather(-1, tgt).squeeze(-1)
                tot[key] += float(nll[target_ok].double().sum())
                if fn is not None:
                    kl = (p_clean * (lp_clean - lp)).sum(-1)
                    tot[f"kl_{key}"] += float(kl[target_ok].double().sum())
                del lp
            n += int(target_ok.sum())
            if progress is not None:
                progress(tok.shape[0])
    if n == 0:
        raise ValueError("ce_recovered: no scorable positions (all targets are special tokens)")
    m = {k: v / n for k, v in tot.items()}
    den = m["zero"] - m["clean"]
    out = {}
    for name in names:
        ce_rec = (m["zero"] - m[name]) / den if den != 0 else float("nan")
        kl_rec = ((m["kl_zero"] - m[f"kl_{name}"]) / m["kl_zero"] if m["kl_zero"] != 0
                  else float("nan"))
        out[name] = CELoss(m["clean"], m[name], m["zero"], ce_rec, m[f"kl_{name}"], m["kl_zero"],
                           kl_rec, n)
    return out


class ReconStats(NamedTuple):
    mse_per_token: float
    mse_saebench: float
    fvu: float
    explained_variance: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    density: Tensor
    """[F] float64 fraction of tokens each latent is active on."""
    n_tokens: int


def reconstruction_stats(sae: Any, batches: Iterable[Tensor], *, max_tokens: int | None = None,
                         saebench_batch_tokens: int = 2048, dense_threshold: float = 0.1
                         ) -> ReconStats:
    """Stream held-out activation batches [B, d_in] through ``sae`` and accumulate the metrics
    in float64 (see the module docstring for definitions)."""
    F_ = sae.cfg.d_sae
    dev = sae.W_enc.device
    active = torch.zeros(F_, dtype=torch.float64, device=dev)
    sx = None
    sxx = 0.0
    se = 0.0
    saeb = 0.0
    l0 = 0.0
    n = 0
    with torch.inference_mode():
        for b in batches:
            if max_tokens is not None and n >= max_tokens:
                break
            if max_tokens is not None:
                b = b[: max_tokens - n]
            x = b.to(dev, sae.W_enc.dtype).reshape(-1, sae.cfg.d_in)
            c = sae.encode_sparse(x)
            x_hat = sae.decode_sparse(c.values, c.indices)
            err = (x - x_hat).double().pow(2).sum(-1)
            se += float(err.sum())
            for s in range(0, err.shape[0], saebench_batch_tokens):
                part = err[s:s + saebench_batch_tokens]
                saeb += float(part.sum()) / part.shape[0]
            nz = c.values != 0
            l0 += float(nz.sum())
            active.index_add_(0, c.indices[nz], torch.ones(int(nz.sum()), dtype=torch.float64,
                                                           device=dev))
            xd = x.double()
            sx = xd.sum(0) if sx is None else sx + xd.sum(0)
            sxx += float(xd.pow(2).sum())
            n += x.shape[0]
    if n == 0:
        raise ValueError("reconstruction_stats: no held-out activations were given")
    total_var = sxx - float(sx.pow(2).sum()) / n
    fvu = se / total_var if total_var > 0 else float("nan")
    density = (active / n).cpu()
    return ReconStats(se / n, saeb / n, fvu, 1.0 - fvu, l0 / n,
                      float((density == 0).double().mean()),
                      float((density > dense_threshold).double().mean()), density, n)


def density_histogram(density: Tensor, bins: int = 40, lo: float = -7.0) -> dict[str, Any]:
    """Histogram of log10(density) over live latents (dead latents counted separately)."""
    live = density[density > 0].double()
    hi = 0.0
    counts = torch.histc(live.log10().clamp(lo, hi), bins=bins, min=lo, max=hi) if live.numel() \
        else torch.zeros(bins)
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    return {"log10_edges": edges, "counts": [int(c) for c in counts.tolist()],
            "dead": int((density == 0).sum())}


def stats_dict(st: ReconStats, ce: CELoss | None, saebench_batch_tokens: int,
               dense_threshold: float) -> dict[str, Any]:
    """JSON-ready reconstruction block (stable keys, documented in docs/evaluation.md, section
    "The ``metrics.json`` schema")."""
    out: dict[str, Any] = {
        "n_tokens": st.n_tokens, "mse_per_token": st.mse_per_token,
        "mse_saebench": st.mse_saebench, "saebench_batch_tokens": saebench_batch_tokens,
        "fvu": st.fvu, "explained_variance": st.explained_variance, "l0": st.l0,
        "dead_fraction": st.dead_fraction, "dense_fraction": st.dense_fraction,
        "dense_threshold": dense_threshold, "density_histogram": density_histogram(st.density)}
    if ce is not None:
        out["ce"] = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                     for k, v in ce._asdict().items()}
    return out
