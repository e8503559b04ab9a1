"""k-sparse probing F1 and Wasserstein separation, following SAEBench sparse probing as modified by
the PolySAE paper (docs/method.md#sparse-probing-f1, #wasserstein-separation).

Pipeline per labelled dataset:

1. **Split** (:func:`make_split`): per class, ``n_train`` train and ``n_test`` test documents drawn
   with a fixed seed (SAEBench: 4000/1000 per class, seed 42; our defaults are smaller, see
   :class:`polysae.evaluation.EvalConfig`). A class with too few documents is split 80/20.
2. **Pooling** (:func:`pool_texts`): each text is truncated to ``ctx`` tokens after BOS; the model
   runs once; positions holding special tokens (BOS/PAD/EOS) are dropped; the SAE encodes every
   remaining token and codes are **mean-pooled over those tokens**. Raw hook activations are pooled
   the same way as the "model activations" baseline. Mean pooling of codes != codes of the mean,
   so per-token activations are kept and each SAE encodes them.
3. **Tasks**: one binary one-vs-rest task per class; negatives drawn evenly from the other classes
   until they match the positive count, separately on train and test (SAEBench
   ``prepare_probe_data``).
4. **k-sparse probe** (:func:`probe_f1`): rank features by ``|mean_pos - mean_neg|`` on the train
   set, keep the top k, fit sklearn ``LogisticRegression`` (L2, C=1, lbfgs, max_iter=1000) on those
   k only, report binary F1 on the test set.
5. **W1** (:func:`polysae.evaluation.wasserstein.separation`): on the train task, exact W1
   between positive and negative pooled values for *every* feature, averaged over features (dead
   ones count 0), plus two scale-normalised variants.
6. **Aggregation**: F1 macro over classes per dataset, then mean over datasets; W1 median over
   classes per dataset, then median over datasets.
"""

from __future__ import annotations

import random
import warnings
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from polysae.evaluation.wasserstein import separation


class Split(NamedTuple):
    """Document indices of the train and test parts of one dataset (class-stratified)."""

    train: list[int]
    test: list[int]


class Task(NamedTuple):
    """One balanced one-vs-rest task: indices into the pooled feature matrix, binary labels."""

    label: str
    train_idx: np.ndarray
    train_y: np.ndarray
    test_idx: np.ndarray
    test_y: np.ndarray


def make_split(labels: Sequence[str], n_train: int, n_test: int, seed: int = 0) -> Split:
    """Per class, ``n_train`` train and ``n_test`` test indices (seeded). A class with fewer
    than ``n_train + n_test`` documents is split 80/20 so both parts are non-empty."""
    rng = random.Random(seed)
    by: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by.setdefault(lab, []).append(i)
    train, test = [], []
    for lab in sorted(by):
        idx = by[lab][:]
        rng.shuffle(idx)
        if len(idx) < n_train + n_test:
            n_tr = max(1, int(round(0.8 * len(idx))))
            n_te = len(idx) - n_tr
        else:
            n_tr, n_te = n_train, n_test
        train += idx[:n_tr]
        test += idx[n_tr:n_tr + n_te]
    return Split(sorted(train), sorted(test))


def _balanced(idx: list[int], labels: Sequence[str], positive: str, rng: random.Random):
    pos = [i for i in idx if labels[i] == positive]
    others: dict[str, list[int]] = {}
    for i in idx:
        if labels[i] != positive:
            others.setdefault(labels[i], []).append(i)
    for v in others.values():
        rng.shuffle(v)
    # Round-robin over the other classes so negatives are spread evenly across them.
    neg: list[int] = []
    depth = 0
    while len(neg) < len(pos) and any(depth < len(v) for v in others.values()):
        for lab in sorted(others):
            if depth < len(others[lab]) and len(neg) < len(pos):
                neg.append(others[lab][depth])
        depth += 1
    x = np.array(pos + neg, dtype=np.int64)
    y = np.array([1] * len(pos) + [0] * len(neg), dtype=np.int64)
    return x, y


def make_tasks(labels: Sequence[str], split: Split, seed: int = 0) -> list[Task]:
    """One balanced one-vs-rest task per class present in the train split."""
    rng = random.Random(seed + 1)
    tasks = []
    for lab in sorted({labels[i] for i in split.train}):
        tr, ytr = _balanced(split.train, labels, lab, rng)
        te, yte = _balanced(split.test, labels, lab, rng)
        if ytr.min() == ytr.max() or len(yte) == 0:
            continue  # a single-class dataset has no negatives
        tasks.append(Task(lab, tr, ytr, te, yte))
    return tasks


def top_k_mean_diff(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k features with the largest |mean over positives - mean over negatives|."""
    diff = np.abs(x[y == 1].mean(axis=0) - x[y == 0].mean(axis=0))
    k = min(k, x.shape[1])
    # Stable tie-break on index keeps results deterministic when many features are dead (diff 0).
    return np.argsort(-diff, kind="stable")[:k]


def probe_f1(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
             k: int | None) -> float:
    """Binary test F1 of a logistic-regression probe on the top-k mean-difference features
    (``k=None``: all features)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    cols = np.arange(x_train.shape[1]) if k is None else top_k_mean_diff(x_train, y_train, k)
    clf = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on tiny/degenerate sets
        clf.fit(x_train[:, cols], y_train)
        pred = clf.predict(x_test[:, cols])
    return float(f1_score(y_test, pred, average="binary", zero_division=0))


def probe_dataset(features: Tensor | np.ndarray, labels: Sequence[str], split: Split,
                  ks: Sequence[int] = (1, 2, 5), seed: int = 0, wasserstein: bool = True
                  ) -> dict[str, Any]:
    """F1 per class and k, macro F1 per k, and W1 per class with its median, for one dataset.

    ``features`` [n_docs, F] are pooled codes (or activations) aligned with ``labels``.
    Returns a JSON-ready dict with keys ``f1`` ({k: macro F1}), ``per_class`` ({class: {"f1": {k:
    F1}, "w1", "w1_std", "w1_l2"}}), ``w1``/``w1_std``/``w1_l2`` (median over classes) and
    ``w1_iqr`` ([q25, q75] over classes), ``n_train``/``n_test`` (documents).
    """
    feats_t = torch.as_tensor(features)
    x = feats_t.double().numpy() if feats_t.dtype != torch.float64 else feats_t.numpy()
    tasks = make_tasks(labels, split, seed)
    if not tasks:
        raise ValueError("probing needs at least two classes with documents in both splits")
    per_class: dict[str, Any] = {}
    for t in tasks:
        row: dict[str, Any] = {"f1": {str(k): probe_f1(x[t.train_idx], t.train_y, x[t.test_idx],
                                                        t.test_y, k) for k in ks}}
        if wasserstein:
            pos = feats_t[torch.as_tensor(t.train_idx[t.train_y == 1])]
            neg = feats_t[torch.as_tensor(t.train_idx[t.train_y == 0])]
            s = separation(pos, neg)
            row.update(w1=s.w1, w1_std=s.w1_std, w1_l2=s.w1_l2)
        per_class[t.label] = row
    out: dict[str, Any] = {
        "f1": {str(k): float(np.mean([r["f1"][str(k)] for r in per_class.values()])) for k in ks},
        "per_class": per_class, "n_train": len(split.train), "n_test": len(split.test)}
    if wasserstein:
        for key in ("w1", "w1_std", "w1_l2"):
            vals = [r[key] for r in per_class.values()]
            out[key] = float(np.median(vals))
        out["w1_iqr"] = [float(q) for q in np.percentile([r["w1"] for r in per_class.values()],
                                                         [25, 75])]
    return out


def aggregate(datasets: dict[str, dict[str, Any]], ks: Sequence[int]) -> dict[str, Any]:
    """Across datasets: mean of macro F1 per k; median of the per-dataset W1 medians."""
    out: dict[str, Any] = {"f1": {
        str(k): float(np.mean([d["f1"][str(k)] for d in datasets.values()])) for k in ks}}
    for key in ("w1", "w1_std", "w1_l2"):
        vals = [d[key] for d in datasets.values() if key in d]
        if vals:
            out[key] = float(np.median(vals))
    return out


# -- pooling ------------------------------------------------------------------------------------

class PooledText(NamedTuple):
    """Per-text hook activations of the non-special tokens, for pooling under several SAEs."""

    acts: list[Tensor]
    """One [T_i, d_in] float tensor per text (special-token positions removed)."""
    n_tokens: int
    """Total tokens kept."""


def tokenize_texts(tokenizer: Any, texts: Sequence[str], ctx: int) -> list[Tensor]:
    """Each text -> 1-D int64 ids: BOS (if the tokenizer has one) + at most ``ctx - 1`` text tokens
    (SAEBench truncates texts to 128 tokens)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"][: ctx - (bos is not None)]
        if not ids:
            ids = tokenizer(" ", add_special_tokens=False)["input_ids"][:1]
        out.append(torch.tensor(([bos] if bos is not None else []) + list(ids), dtype=torch.long))
    return out


def collect_text_acts(model: Any, hook: str, token_lists: Sequence[Tensor],
                      special_ids: Iterable[int] = (), *, batch_size: int = 16,
                      pad_id: int = 0, progress: Callable[[int], None] | None = None
                      ) -> PooledText:
    """Run ``model`` (any backend, :func:`polysae.data.models.as_backend`) on each token list
    and keep the hook activations of the tokens that are not special (BOS/EOS/PAD: SAEBench zeroes
    and excludes them).

    Texts are right-padded within a batch; a causal model never lets padding influence earlier
    positions (an encoder gets an attention mask), and padded positions are dropped. Batches are
    sorted by length to limit padding.
    """
    from polysae.data.models import as_backend, capture

    model = as_backend(model)

    special = torch.tensor(sorted(set(int(i) for i in special_ids)), dtype=torch.long)
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    acts: list[Tensor | None] = [None] * len(token_lists)
    dev = model.device
    total = 0
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            T = max(len(token_lists[i]) for i in idx)
            toks = torch.full((len(idx), T), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            for r, i in enumerate(idx):
                toks[r, :len(token_lists[i])] = token_lists[i]
                mask[r, :len(token_lists[i])] = 1
            mask = None if model.causal else mask.to(dev)
            a = capture(model, toks.to(dev), [hook], attention_mask=mask)[hook].float().cpu()
            for r, i in enumerate(idx):
                t = token_lists[i]
                keep = (~torch.isin(t, special) if special.numel()
                        else torch.ones_like(t, dtype=torch.bool))
                if not keep.any():
                    keep[-1] = True  # a text of special tokens only: keep one position
                acts[i] = a[r, :len(t)][keep].clone()
                total += int(keep.sum())
            if progress is not None:
                progress(len(idx))
    return PooledText([a for a in acts if a is not None], total)


def sae_encoder(sae: Any) -> Callable[[Tensor], Tensor]:
    """``encode`` for :func:`pool_texts`: moves each chunk of (CPU) activations to the SAE's device
    and dtype and returns the codes there, so pooling runs where the SAE lives (a GPU) and only the
    pooled [n_texts, F] result comes back to the CPU."""
    p = sae.W_enc
    return lambda a: sae.encode(a.to(p.device, p.dtype))


def pool_texts(pooled: PooledText, encode: Callable[[Tensor], Tensor] | None = None,
               batch_tokens: int = 8192) -> Tensor:
    """Mean over each text's tokens of ``encode(acts)`` -> [n_texts, F] (``encode=None``: raw
    activations). Tokens of many texts are encoded together in chunks of ``batch_tokens``."""
    lens = torch.tensor([a.shape[0] for a in pooled.acts])
    flat = torch.cat(pooled.acts, dim=0)
    doc = torch.repeat_interleave(torch.arange(len(lens)), lens)
    out = None
    with torch.inference_mode():
        for s in range(0, flat.shape[0], batch_tokens):
            z = flat[s:s + batch_tokens]
            z = z if encode is None else encode(z)
            z = z.float()
            if out is None:
                out = torch.zeros(len(lens), z.shape[-1], dtype=torch.float64, device=z.device)
            out.index_add_(0, doc[s:s + batch_tokens].to(z.device), z.double())
    assert out is not None
    return (out / lens.to(out.device, torch.float64)[:, None]).float().cpu()
