"""Targeted probe perturbation (TPP; SAEBench ``evals/scr_and_tpp`` with ``perform_scr=False``) on
the labelled probing sets, in two variants that differ only in how latents are *chosen*
(docs/method.md, "SAEBench metrics"):

For every class ``c`` a linear probe is trained on mean-pooled model activations (one-vs-rest,
balanced). Each latent gets a score for ``c`` on the training texts of ``c``'s task:

- ``linear`` (SAEBench): ``max(0, mean_pos z_i - mean_neg z_i) * (w_c . W_dec[i])`` with the raw
  linear atoms as ``W_dec``;
- ``full``: ``(mean_pos r_i - mean_neg r_i) * [mean_pos z_i > mean_neg z_i]`` with
  ``r_i = w_c . c_i(x)`` the probe's response to latent ``i``'s contribution through the whole
  decoder, averaged over each text's tokens like the codes. For a linear decoder
  ``r_i = z_i (w_c . W_dec[i])`` and the two scores are the same number.

The top ``N`` latents by score (non-zero scores only) are zero-ablated on every test text the
SAEBench way, ``x' = decode(z with them zeroed) + (x - decode(z))`` per token, then mean-pooled;
each class's probe is re-scored on its own test task. ``intended`` = the drop of ``c``'s probe,
``unintended`` = the mean drop of the other classes' probes, ``total = intended - unintended``;
each is averaged over classes, then over datasets. Ablation is the SAE's own decoder in both
variants; only the selection differs.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

N_VALUES = (2, 5, 10, 20, 50, 100, 500)
"""SAEBench's numbers of ablated latents."""
VARIANTS = ("linear", "full")


class Task(NamedTuple):
    """A balanced one-vs-rest task: positive and negative document indices."""

    pos: np.ndarray
    neg: np.ndarray

    @property
    def docs(self) -> np.ndarray:
        return np.concatenate([self.pos, self.neg])

    @property
    def y(self) -> Tensor:
        return torch.cat([torch.ones(len(self.pos)), torch.zeros(len(self.neg))]).long()


class Setup(NamedTuple):
    """What every SAE shares on one dataset: tokens, tasks, probes and clean accuracies."""

    classes: list[str]
    x: Tensor
    """[n_tok, D] float32 activations of every kept token of every document."""
    doc: Tensor
    """[n_tok] document of each token."""
    lengths: Tensor
    """[n_docs] tokens per document."""
    train: dict[str, Task]
    test: dict[str, Task]
    probes: dict[str, tuple[Tensor, float]]
    """class -> (weight [D], bias)."""
    clean: dict[str, float]
    """class -> probe accuracy on its test task with the model's own activations."""


def balanced_task(labels: Sequence[str], docs: Sequence[int], cls: str,
                  gen: torch.Generator) -> Task:
    """SAEBench ``prepare_probe_data``: every document of ``cls`` is positive; ``ceil(n_pos /
    n_other_classes)`` random documents from each other class, shuffled and cut to ``n_pos``,
    are negative. The draw is made once (seeded) and reused for every evaluation."""
    docs = list(docs)
    pos = [d for d in docs if labels[d] == cls]
    others = sorted({labels[d] for d in docs} - {cls})
    per = math.ceil(len(pos) / max(1, len(others)))
    neg: list[int] = []
    for o in others:
        mine = [d for d in docs if labels[d] == o]
        neg += [mine[i] for i in torch.randperm(len(mine), generator=gen)[:per].tolist()]
    neg = [neg[i] for i in torch.randperm(len(neg), generator=gen)[:len(pos)].tolist()]
    return Task(np.asarray(pos, dtype=np.int64), np.asarray(neg, dtype=np.int64))


def pooled(x: Tensor, doc: Tensor, lengths: Tensor) -> Tensor:
    """[n_docs, D] mean over each document's tokens (float64)."""
    out = torch.zeros(len(lengths), x.shape[1], dtype=torch.float64)
    out.index_add_(0, doc, x.to(torch.float64))
    return out / lengths.to(torch.float64).clamp_min(1)[:, None]


def make_setup(acts: Sequence[Tensor], labels: Sequence[str], train_docs: Sequence[int],
               test_docs: Sequence[int], seed: int = 0) -> Setup:
    """Tasks, probes (SAEBench's recipe: :func:`~polysae.evaluation.saebench_probes.
    train_binary_probe`) and clean accuracies from per-document token activations ``acts``."""
    from polysae.evaluation.saebench_probes import accuracy, train_binary_probe

    classes = sorted({labels[d] for d in train_docs} & {labels[d] for d in test_docs})
    if len(classes) < 2:
        raise ValueError(f"TPP needs at least two classes with documents in both splits, found "
                         f"{len(classes)} ({', '.join(classes) or 'none'})")
    lengths = torch.tensor([a.shape[0] for a in acts])
    x = torch.cat([a.float() for a in acts])
    doc = torch.repeat_interleave(torch.arange(len(acts)), lengths)
    gen = torch.Generator().manual_seed(seed)
    keep_train = [d for d in train_docs if labels[d] in classes]
    keep_test = [d for d in test_docs if labels[d] in classes]
    train = {c: balanced_task(labels, keep_train, c, gen) for c in classes}
    test = {c: balanced_task(labels, keep_test, c, gen) for c in classes}
    xp = pooled(x, doc, lengths).float()
    probes, clean = {}, {}
    for i, c in enumerate(classes):
        tr, te = train[c], test[c]
        p = train_binary_probe(xp[tr.docs], tr.y, xp[te.docs], te.y, seed=seed + 1 + i)
        probes[c] = (p.weight, p.bias)
        clean[c] = accuracy(xp[te.docs], te.y, p.weight, p.bias)
    return Setup(classes, x, doc, lengths, train, test, probes, clean)


def _token_weights(setup: Setup, tasks: dict[str, Task], rows: Tensor) -> Tensor:
    """[len(rows), C]: each token's weight in ``mean_pos - mean_neg`` of per-document means."""
    W = torch.zeros(len(setup.lengths), len(setup.classes), dtype=torch.float64)
    for j, c in enumerate(setup.classes):
        t = tasks[c]
        if len(t.pos):
            W[torch.as_tensor(t.pos), j] += 1.0 / len(t.pos)
        if len(t.neg):
            W[torch.as_tensor(t.neg), j] -= 1.0 / len(t.neg)
    W = W / setup.lengths.to(torch.float64).clamp_min(1)[:, None]
    return W[setup.doc[rows]]


def scores(sae: Any, setup: Setup, variants: Sequence[str] = VARIANTS,
           chunk: int = 4096) -> dict[str, Tensor]:
    """Per variant, [F, C] latent scores for every class (see the module docstring)."""
    from polysae.evaluation.contributions import linear_directions, probe_responses

    docs = np.unique(np.concatenate([setup.train[c].docs for c in setup.classes]))
    rows = torch.nonzero(torch.isin(setup.doc, torch.as_tensor(docs)))[:, 0]
    Wp = torch.stack([setup.probes[c][0] for c in setup.classes], 1).to(torch.float64)  # [D, C]
    F, C = sae.cfg.d_sae, len(setup.classes)
    dz = torch.zeros(F, C, dtype=torch.float64)
    dr = torch.zeros(F, C, dtype=torch.float64) if "full" in variants else None
    with torch.no_grad():
        for s in range(0, len(rows), chunk):
            r = rows[s:s + chunk]
            sp = sae.encode_sparse(setup.x[r])
            v, i = sp.values.cpu().to(torch.float64), sp.indices.cpu()
            om = _token_weights(setup, setup.train, r)                           # [n, C]
            flat = i.reshape(-1)
            dz.index_add_(0, flat, (v[..., None] * om[:, None, :]).reshape(-1, C))
            if dr is not None:
                resp = probe_responses(sae, v, i, Wp).cpu()                      # [n, K, C]
                dr.index_add_(0, flat, (resp * om[:, None, :]).reshape(-1, C))
        out = {}
        if "linear" in variants:
            A = linear_directions(sae).to("cpu", torch.float64)
            out["linear"] = dz.clamp(min=0) * (A @ Wp)
        if dr is not None:
            out["full"] = dr * (dz > 0)
    return out


def select_top_n(effects: Tensor, n: int) -> Tensor:
    """SAEBench ``select_top_n_features``: indices of the ``min(n, #non-zero)`` largest scores
    among the non-zero ones (``torch.topk`` of the scores; empty when all are zero)."""
    k = min(n, int((effects != 0).sum()))
    if k == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.topk(effects, k).indices


def ablated_accuracies(setup: Setup, ablator: Any, ablate: Tensor, rows: Tensor) -> dict:
    """Accuracy of every class's probe on its test task after zero-ablating ``ablate`` on the
    test tokens ``rows`` (SAEBench's ``decode(z ablated) + (x - x_hat)``, mean-pooled per
    document), read through the probes by ``ablator``
    (:class:`polysae.evaluation.ablation.Ablator` of those tokens and the stacked probes)."""
    from polysae.evaluation.saebench_probes import accuracy

    r = ablator.readings(ablate)                                       # [n, C]: w_c . x'
    xp = torch.zeros(len(setup.lengths), r.shape[1], dtype=torch.float64)
    xp.index_add_(0, setup.doc[rows], r)
    xp = xp / setup.lengths.to(torch.float64).clamp_min(1)[:, None]
    one = torch.ones(1, dtype=torch.float64)
    return {c: accuracy(xp[setup.test[c].docs, j:j + 1], setup.test[c].y, one,
                        setup.probes[c][1]) for j, c in enumerate(setup.classes)}


def check_ablatable(sae: Any, x: Tensor) -> None:
    """Raise ValueError (with the reason) unless the SAE can encode ``x``, zero a latent and
    decode the result to finite activations of the right shape."""
    try:
        with torch.no_grad():
            sp = sae.encode_sparse(x[:2])
            v = sp.values.clone()
            v[:, :1] = 0
            out = sae.decode_sparse(v, sp.indices)
    except Exception as e:  # noqa: BLE001 - any failure means the rule cannot be applied
        raise ValueError(f"the SAE cannot be ablated (encode -> zero a latent -> decode failed: "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if tuple(out.shape) != tuple(x[:2].shape):
        raise ValueError(f"the SAE cannot be ablated: decoding ablated codes gave shape "
                         f"{tuple(out.shape)} for input {tuple(x[:2].shape)}")
    if not torch.isfinite(out).all():
        raise ValueError("the SAE cannot be ablated: decoding ablated codes gave NaN/inf")


def tpp_eval(sae: Any, setup: Setup, n_values: Sequence[int] = N_VALUES,
             variants: Sequence[str] = VARIANTS) -> dict[str, Any]:
    """TPP of one SAE on one dataset: per variant, per class and ``N`` the intended, unintended
    and total accuracy drops (and their means over classes); ``N`` above ``d_sae`` is skipped."""
    from polysae.evaluation.contributions import NotSplittable

    check_ablatable(sae, setup.x)
    F = sae.cfg.d_sae
    ns = [n for n in n_values if n <= F]
    skipped_n = {str(n): f"N={n} > d_sae={F}" for n in n_values if n > F}
    out: dict[str, Any] = {}
    try:
        sc = scores(sae, setup, variants)
    except NotSplittable as e:
        sc = scores(sae, setup, [v for v in variants if v != "full"])
        out["full"] = {"skipped": str(e)}
    from polysae.evaluation.ablation import Ablator

    test_docs = np.unique(np.concatenate([setup.test[c].docs for c in setup.classes]))
    rows = torch.nonzero(torch.isin(setup.doc, torch.as_tensor(test_docs)))[:, 0]
    Wp = torch.stack([setup.probes[c][0] for c in setup.classes], 1)
    ablator = Ablator(sae, setup.x[rows], Wp)
    for variant, eff in sc.items():
        per: dict[str, Any] = {}
        selected: dict[str, dict[str, list[int]]] = {}
        for j, c in enumerate(setup.classes):
            per[c], selected[c] = {}, {}
            for n in ns:
                ab = select_top_n(eff[:, j], n)
                acc = ablated_accuracies(setup, ablator, ab, rows)
                intended = setup.clean[c] - acc[c]
                others = [setup.clean[o] - acc[o] for o in setup.classes if o != c]
                unintended = float(np.mean(others))
                per[c][str(n)] = {"intended": intended, "unintended": unintended,
                                  "total": intended - unintended, "n_ablated": int(len(ab))}
                selected[c][str(n)] = sorted(ab.tolist())
        means = {key: {str(n): float(np.mean([per[c][str(n)][key] for c in setup.classes]))
                       for n in ns} for key in ("total", "intended", "unintended")}
        out[variant] = {**means, "classes": per, "selected": selected}
    if skipped_n:
        out["skipped_n"] = skipped_n
    return out


__all__ = ["N_VALUES", "Setup", "Task", "VARIANTS", "ablated_accuracies", "balanced_task",
           "check_ablatable", "make_setup", "pooled", "scores", "select_top_n", "tpp_eval"]
