"""SAEBench's probe trainers, re-implemented with their hyperparameters and seeded locally (the
global torch RNG is never touched): the multi-class one-vs-rest probe behind feature absorption
(``sae_bench.evals.absorption.probing.train_multi_probe``), its L1 variant on SAE codes and the
k-sparse probes (``k_sparse_probing.train_k_sparse_probes``), and the binary probe behind TPP/SCR
(``sae_bench.evals.sparse_probing.probe_training.train_probe_gpu``).

Where SAEBench draws from the global RNG (``nn.Linear`` initialisation, ``DataLoader`` shuffling,
``torch.randperm``) these draw from a ``torch.Generator`` seeded by the caller, with the same
distributions; the numbers therefore differ from a run of SAEBench's own code by the randomness
of training, not by the procedure (docs/method.md, "SAEBench metrics").
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the small probe fits on one thread (torch and BLAS): their ops are tiny, and on a
    loaded machine with several threads each op waits on thread hand-offs (~50x slower on 2
    shared cores). The previous thread counts are restored."""
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(n)


def _linear(d: int, n_out: int, gen: torch.Generator, dtype: torch.dtype) -> nn.Linear:
    """``nn.Linear(d, n_out)`` with torch's default initialisation drawn from ``gen``."""
    lin = nn.Linear(d, n_out, dtype=dtype)
    bound = 1 / math.sqrt(d) if d > 0 else 0.0
    with torch.no_grad():
        lin.weight.uniform_(-bound, bound, generator=gen)
        lin.bias.uniform_(-bound, bound, generator=gen)
    return lin


def train_multi_probe(x: Tensor, y: Tensor, *, epochs: int = 50, lr: float = 1e-2,
                      end_lr: float = 1e-5, weight_decay: float = 1e-6, batch_size: int = 4096,
                      l1_decay: float = 0.0, seed: int = 0) -> tuple[Tensor, Tensor]:
    """One-vs-rest logistic probes for every column of the multi-hot ``y`` [N, P] at once:
    ``BCEWithLogits(pos_weight = n_neg / n_pos)``, Adam with exponential decay ``lr -> end_lr``
    over the epochs, shuffled minibatches, plus ``l1_decay * mean_p ||w_p||_1`` (SAEBench's
    ``train_multi_probe`` / ``train_sparse_multi_probe``). Returns (weights [P, D], biases [P]).
    A column without positives gets ``pos_weight`` 1 (SAEBench would divide by zero)."""
    with one_thread():
        return _multi(x.float(), y.float(), epochs, lr, end_lr, weight_decay, batch_size,
                      l1_decay, seed)


def _multi(x, y, epochs, lr, end_lr, weight_decay, batch_size, l1_decay, seed):
    gen = torch.Generator().manual_seed(seed)
    probe = _linear(x.shape[1], y.shape[1], gen, torch.float32)
    n_pos = y.sum(0)
    pos_weight = torch.where(n_pos > 0, (len(y) - n_pos) / n_pos.clamp_min(1),
                             torch.ones_like(n_pos))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    gamma = math.exp(math.log(end_lr / lr) / epochs)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for s in range(0, len(x), batch_size):
                b = order[s:s + batch_size]
                opt.zero_grad()
                loss = loss_fn(probe(x[b]), y[b])
                if l1_decay:
                    loss = loss + l1_decay * probe.weight.abs().sum(-1).mean()
                loss.backward()
                opt.step()
            sched.step()
    return probe.weight.detach().clone(), probe.bias.detach().clone()


class KSparseProbe(NamedTuple):
    """A logistic probe on ``k`` latents (SAEBench ``KSparseProbe``)."""

    feature_ids: np.ndarray
    """[k] latent ids (the L1 probe's k largest weights for the class, largest first)."""
    weight: np.ndarray
    """[k] sklearn coefficients."""
    bias: float
    """sklearn intercept."""


def k_sparse_probes(codes: Tensor, labels: np.ndarray, n_classes: int, ks: range, *,
                    l1_decay: float = 0.01, epochs: int = 50, batch_size: int = 4096,
                    seed: int = 0) -> dict[int, dict[int, KSparseProbe]]:
    """SAEBench ``train_k_sparse_probes``: an L1-regularised multi-probe on the codes picks, per
    class, the latents with the k largest weights (``topk``, not ``|w|``: only latents that
    predict the class); a ``LogisticRegression(max_iter=500, class_weight="balanced")`` is fitted
    on them. Returns ``{k: {class: probe}}`` for classes with training positives."""
    from sklearn.linear_model import LogisticRegression

    y = torch.nn.functional.one_hot(torch.as_tensor(labels), n_classes)
    w, _ = train_multi_probe(codes, y, epochs=epochs, lr=0.01, end_lr=1e-5, weight_decay=1e-6,
                             batch_size=batch_size, l1_decay=l1_decay, seed=seed)
    xs = codes.float().numpy()
    out: dict[int, dict[int, KSparseProbe]] = {}
    present = sorted(set(int(v) for v in labels))
    with one_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on tiny or separable sets
        for k in ks:
            out[k] = {}
            for c in present:
                ids = w[c].topk(min(k, w.shape[1])).indices.numpy()
                lr = LogisticRegression(max_iter=500, class_weight="balanced").fit(
                    xs[:, ids], (labels == c).astype(np.int64))
                out[k][c] = KSparseProbe(ids, lr.coef_[0].astype(np.float32),
                                         float(lr.intercept_[0]))
    return out


class BinaryProbe(NamedTuple):
    """A linear probe ``x . weight + bias > 0`` (SAEBench ``Probe``)."""

    weight: Tensor
    """[D]."""
    bias: float
    """Intercept."""
    test_accuracy: float
    """Best test accuracy over the epochs (the epoch SAEBench keeps)."""


def accuracy(x: Tensor, y: Tensor, weight: Tensor, bias: float) -> float:
    """Share of rows where ``(x . weight + bias > 0) == y`` (SAEBench ``test_probe_gpu``)."""
    if len(y) == 0:
        return math.nan
    pred = ((x.to(weight.dtype) @ weight + bias) > 0).long()
    return float((pred == y.long()).double().mean())


def train_binary_probe(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, *,
                       epochs: int = 20, batch_size: int = 16, lr: float = 1e-3,
                       l1_penalty: float = 1e-3, seed: int = 0) -> BinaryProbe:
    """SAEBench ``train_probe_gpu`` as SCR/TPP call it: ``nn.Linear(D, 1)``, AdamW (its default
    weight decay 0.01), BCE-with-logits plus ``l1_penalty * ||w||_1``, shuffled minibatches of
    ``batch_size``; after every epoch the probe is scored on the test set and the epoch with the
    best test accuracy is kept (SAEBench's selection, on the test set)."""
    with one_thread():
        return _binary(x_train.float(), y_train, x_test, y_test, epochs, batch_size, lr,
                       l1_penalty, seed)


def _binary(x_train, y_train, x_test, y_test, epochs, batch_size, lr, l1_penalty, seed):
    gen = torch.Generator().manual_seed(seed)
    lin = _linear(x_train.shape[1], 1, gen, torch.float32)
    opt = torch.optim.AdamW(lin.parameters(), lr=lr)
    crit = nn.BCEWithLogitsLoss()
    best: BinaryProbe | None = None
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(x_train), generator=gen)
            for s in range(0, len(x_train), batch_size):
                b = order[s:s + batch_size]
                loss = crit(lin(x_train[b]).squeeze(-1), y_train[b].float())
                loss = loss + l1_penalty * lin.weight.abs().sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            w, bias = lin.weight.detach()[0].clone(), float(lin.bias.detach()[0])
            acc = accuracy(x_test.float(), y_test, w, bias)
            if best is None or acc > best.test_accuracy:
                best = BinaryProbe(w, bias, acc)
    assert best is not None
    return best


__all__ = ["BinaryProbe", "KSparseProbe", "accuracy", "k_sparse_probes", "train_binary_probe",
           "train_multi_probe"]
