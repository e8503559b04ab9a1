"""Training: :class:`TrainConfig`, :class:`Trainer` and :func:`train` (docs/training.md).

One :class:`Trainer` trains one or several SAEs from **one** activation stream: every batch is read
once and fed to each SAE in turn (a vanilla and a PolySAE with identical settings, or a sweep over
k or ranks), each with its own Adam optimiser, dead-latent counters, checkpoint folder and
``metrics.jsonl``. The per-SAE step follows the reference order exactly (docs/method.md):
``loss.backward()`` -> (all-reduce gradients across ranks) -> global-norm clipping at 1.0 -> Adam
step -> ``zero_grad`` -> retraction of U (every step by default) -> dead-latent counters.

Inputs: anything with ``batches(epoch=0, start=0)`` (``polysae.store.ActivationStore``,
:class:`TensorSource`), or any iterable of [B, d_in] tensors (a live model, a generator). Exact
resume needs a source that replays: ``batches(epoch, start)`` is called with the saved position;
a plain iterable is re-iterated and the first ``start`` batches skipped.

On-disk layout of a run (``out_dir``; a single SAE given as a bare ``SAE`` writes straight into
``out_dir``)::

    out_dir/run.json                      train config + SAE names (lets ``--resume`` rebuild)
    out_dir/<name>/sae.safetensors        latest checkpoint, loadable by polysae.load(); always
    out_dir/<name>/config.json            takes RAW activations (normalisation folded in)
    out_dir/<name>/trainer_state.pt       self-contained resume state, weights_only-loadable
    out_dir/<name>/trainer_state.prev.pt  the one before (kept so a kill between the renames of
                                          several SAEs still leaves a common step to resume)
    out_dir/<name>/metrics.jsonl          one JSON object per logged step

Activation normalisation (off by default, as in the paper): a scalar ``s`` with
``E||x/s||^2 = d_in`` is estimated once from the first batches; the SAE trains on ``x/s``. At save
:func:`fold_scale` rewrites the weights so the saved SAE maps raw ``x`` to ``s * x_hat_n(x/s)``
with identical codes (see its docstring for the derivation).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from polysae import distributed as pdist
from polysae.config import SAEConfig
from polysae.sae import SAE, LossOutput, atomic_write_text
from polysae.schedule import SCHEDULES, lr_at

log = logging.getLogger("polysae.train")

STATE_FILE = "trainer_state.pt"
PREV_STATE_FILE = "trainer_state.prev.pt"
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
STATE_FORMAT = 1


LOGGERS = ("wandb", "tensorboard")
"""Optional metric loggers (``TrainConfig.log_to``)."""


@dataclass
class TrainConfig:
    """How to train (identical for every SAE of a run). Defaults: the paper's recipe."""

    lr: float = 3e-4
    """Adam learning rate (peak rate when a schedule is used)."""

    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""

    eps: float = 1e-8
    """Adam epsilon."""

    schedule: str = dataclasses.field(default="constant", metadata={"choices": SCHEDULES})
    """``constant``, ``cosine`` (warm-up then cosine decay) or ``linear`` (warm-up, then linear
    decay over the last ``decay_steps`` steps). The paper used ``constant`` with no warm-up."""

    warmup_steps: int = 0
    """Linear warm-up from 0 over this many steps."""

    decay_steps: int | None = None
    """``linear`` schedule: length of the final decay ramp (None: every step after warm-up)."""

    min_lr_ratio: float = 0.0
    """Final learning rate of a decaying schedule, as a fraction of ``lr``."""

    tokens: int | None = None
    """Stop after this many activation rows (global, over all ranks); rounded up to whole steps."""

    steps: int | None = None
    """Stop after this many optimiser steps (overrides ``tokens``). With neither set the trainer
    makes one pass over the data."""

    grad_clip: float = 1.0
    """Global L2-norm gradient clipping per SAE (0 disables)."""

    retract_every: int = 1
    """Orthogonality retraction of U every this many steps (1 = every step, the paper; 0 = never).
    Larger cadences are cheaper but change the method (docs/method.md)."""

    retract_fast: bool = True
    """Use CholeskyQR2 (falls back to Householder QR) instead of plain Householder QR."""

    dead_window: int = 1000
    """A latent that has not fired in this many steps counts as dead and feeds AuxK."""

    normalize: bool = False
    """Estimate a scalar activation scale once and train on ``x / s``; folded into the weights at
    save, so a saved SAE still takes raw activations. Off in every paper run."""

    norm_batches: int = 16
    """Batches used to estimate the activation scale."""

    bf16: bool = False
    """Run the SAE forward/backward under bfloat16 autocast (parameters and Adam stay float32)."""

    seed: int = 42
    """Seeds torch before the SAEs' state is set up; saved RNG state makes resume exact."""

    checkpoint_every: int = 1000
    """Write every SAE's checkpoint every this many steps (0: only at the end)."""

    log_every: int = 10
    """Append a metrics.jsonl line every this many steps (and at the last step)."""

    progress: bool = True
    """Show a tqdm progress bar (rank 0 only)."""

    log_to: tuple[str, ...] = dataclasses.field(default=(), metadata={"choices": LOGGERS})
    """Extra loggers: ``wandb`` and/or ``tensorboard``; each is skipped with a warning when its
    package is not installed (never required)."""

    wandb_project: str = "polysae"
    """wandb project name when ``wandb`` is in ``log_to``."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"TrainConfig.{name}: {why}")

        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", f"must be a positive number, got {self.lr!r}")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad("betas", f"must be two numbers in [0, 1), got {self.betas!r}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("warmup_steps", "retract_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)!r}")
        for name in ("dead_window", "log_every", "norm_batches"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)!r}")
        for name in ("tokens", "steps", "decay_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise bad(name, f"must be a positive integer or None, got {v!r}")
        if self.grad_clip < 0:
            raise bad("grad_clip", f"must be >= 0, got {self.grad_clip!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise bad("min_lr_ratio", f"must lie in [0, 1], got {self.min_lr_ratio!r}")
        self.log_to = tuple(self.log_to)
        for name in self.log_to:
            if name not in LOGGERS:
                raise bad("log_to", f"unknown logger {name!r} ({', '.join(LOGGERS)})")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"], d["log_to"] = list(self.betas), list(self.log_to)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class TrainingDiverged(ValueError):
    """A NaN/inf appeared in an input batch, a loss term or a gradient; names step and tensor.
    The checkpoint on disk is the last good one (nothing is written after the failure)."""


class TrainResult(NamedTuple):
    """What :func:`train` returns."""

    saes: dict[str, SAE]
    """Trained SAEs taking raw activations (normalisation folded in), in eval mode."""
    steps: int
    """Optimiser steps taken in total (including steps before a resume)."""
    tokens: int
    """Activation rows consumed in total (global over ranks)."""
    act_scale: float | None
    """The activation scale trained with (None without normalisation)."""


class StepMetrics(NamedTuple):
    """One SAE's numbers for one step (detached; the loss terms are 0-dim tensors)."""

    loss: LossOutput
    """The SAE's loss terms on this batch."""
    grad_norm: float
    """Global gradient norm before clipping."""


# -- data sources ------------------------------------------------------------------------------
class TensorSource:
    """An in-memory [N, d_in] tensor served in shuffled batches, resumable and shardable.

    Global batch ``i`` of epoch ``e`` is rows ``perm_e[i*B:(i+1)*B]`` of a permutation seeded by
    ``(seed, e)``; rank ``r`` of ``W`` gets its ``r``-th contiguous slice of ``B/W`` rows, so the
    ranks' batches concatenated are exactly the 1-process batch (what the DDP test relies on).
    The incomplete last global batch of an epoch is dropped so every rank sees equal batches."""

    def __init__(self, data: Tensor, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if data.ndim != 2:
            raise ValueError(f"TensorSource: data must be [N, d_in], got shape {tuple(data.shape)}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"TensorSource: batch_size={batch_size} must be a positive multiple "
                             f"of world_size={world_size}")
        if batch_size > data.shape[0]:
            raise ValueError(f"TensorSource: batch_size={batch_size} exceeds the {data.shape[0]} "
                             "rows available")
        self.data, self.batch_size, self.seed, self.shuffle = data, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.d_in = data.shape[1]

    def __len__(self) -> int:
        return self.data.shape[0] // self.batch_size

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Tensor]:
        n = self.data.shape[0]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        per = self.batch_size // self.world_size
        for i in range(start, len(self)):
            lo = i * self.batch_size + self.rank * per
            yield self.data[perm[lo:lo + per]]

    def __iter__(self) -> Iterator[Tensor]:
        return self.batches(0, 0)


class _IterableSource:
    """Adapter for a plain iterable: re-iterated each epoch when it can be (a single-use
    iterator gives one epoch); ``start`` batches are skipped by reading them."""

    def __init__(self, it: Iterable[Tensor]):
        self.it = it
        self.once = iter(it) is it

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Tensor]:
        if self.once and epoch > 0:
            return iter(())
        return itertools.islice(iter(self.it), start, None)


def as_source(source: Any):
    """Anything with ``batches(epoch, start)`` is used as is; an iterable is wrapped."""
    if hasattr(source, "batches"):
        return source
    if isinstance(source, Tensor):
        raise TypeError("pass a tensor of activations as TensorSource(data, batch_size)")
    if isinstance(source, Iterable):
        return _IterableSource(source)
    raise TypeError(f"training data must be an iterable of [B, d_in] tensors or have "
                    f"batches(epoch, start); got {type(source).__name__}")


# -- normalisation fold --------------------------------------------------------------------------
@torch.no_grad()
def fold_scale(sae: SAE, s: float) -> SAE:
    """Rewrite ``sae`` (trained on ``x / s``) in place to take raw ``x``; returns it.

    Trained model: ``pre = (x/s - b_dec) W_enc + b_enc`` and ``x_hat_n = b_dec + dec(z)``. Wanted:
    the same codes ``z`` for raw ``x`` and ``x_hat(x) = s * x_hat_n(x/s)``.

    - Encoder: ``(x - s b_dec) (W_enc/s) + b_enc = (x/s - b_dec) W_enc + b_enc``, so ``W_enc/s``
      with ``b_dec -> s b_dec`` gives identical pre-activations (and codes, so every sparsifier's
      threshold is unchanged). Without ``apply_b_dec_to_input``, ``x (W_enc/s) = (x/s) W_enc``.
    - Decoder: ``s * (b_dec + dec(z)) = s b_dec + s dec(z)``. Linear: ``W_dec -> s W_dec``. Poly:
      ``dec(z) = h1 C1^T + l2 h2 C2^T + l3 h3 C3^T`` with ``h`` built from ``z U``; ``U`` must stay
      orthonormal and the lambdas are shared by all orders, so the scale goes into
      ``C1, C2, C3`` (each term is linear in its C).
    """
    s = float(s)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"fold_scale: scale must be positive and finite, got {s}")
    sae.W_enc.div_(s)
    sae.b_dec.mul_(s)
    dec = sae.decoder
    if sae.cfg.decoder == "linear":
        dec.W_dec.mul_(s)
    else:
        for C in (dec.C1, dec.C2, dec.C3):
            if C is not None:
                C.mul_(s)
    return sae


# -- the trainer ---------------------------------------------------------------------------------
class _Slot:
    """One SAE's training state."""

    def __init__(self, name: str, sae: SAE, cfg: TrainConfig, folder: Path | None):
        self.name, self.sae, self.folder = name, sae, folder
        self.params = [p for p in sae.parameters() if p.requires_grad]
        # Under torch.distributed: SAE.loss as the forward of a DDP module (it all-reduces the
        # gradients during backward and broadcasts rank 0's weights now); None in one process.
        self.ddp = pdist.wrap(sae) if pdist.world()[1] > 1 else None
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        self.since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.b_dec.device)
        self.metrics_file = None


class Trainer:
    """Trains one SAE or several from one stream. ``saes``: an ``SAE`` (checkpoint written into
    ``out_dir`` itself) or a mapping name -> SAE (one sub-folder per name). ``metadata`` goes
    into every saved config.json (e.g. ``{"model": ..., "hook": ..., "acts": ...}``).

    Distributed use: call :func:`polysae.distributed.init_from_env` first and give each rank its
    disjoint shard of the data; rank 0 writes checkpoints and logs, every rank resumes."""

    def __init__(self, saes: SAE | Mapping[str, SAE], cfg: TrainConfig | None = None,
                 out_dir: str | os.PathLike | None = None, *,
                 metadata: Mapping[str, Any] | None = None):
        self.cfg = cfg or TrainConfig()
        self.single = isinstance(saes, SAE)
        named = {"sae": saes} if self.single else dict(saes)
        if not named:
            raise ValueError("Trainer: no SAE to train")
        d_ins = {n: s.cfg.d_in for n, s in named.items()}
        if len(set(d_ins.values())) != 1:
            raise ValueError(f"Trainer: all SAEs of one stream must share d_in, got {d_ins}")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.metadata = dict(metadata or {})
        self.rank, self.world_size = pdist.world()
        self.slots: dict[str, _Slot] = {}
        for name, sae in named.items():
            if not isinstance(sae, SAE):
                raise TypeError(f"Trainer: {name!r} is a {type(sae).__name__}, not a polysae.SAE")
            folder = None
            if self.out_dir is not None:
                folder = self.out_dir if self.single else self.out_dir / name
            sae.train()
            self.slots[name] = _Slot(name, sae, self.cfg, folder)
        self.d_in = next(iter(d_ins.values()))
        self.step_count = 0
        self.tokens = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.total_steps: int | None = self.cfg.steps
        self.act_scale: float | None = None
        self._loggers: list[Any] = []
        self._t_last, self._tok_last = time.perf_counter(), 0

    # -- the step --------------------------------------------------------------------------------
    def lr(self) -> float:
        c = self.cfg
        return lr_at(self.step_count, c.lr, c.schedule, warmup=c.warmup_steps,
                     total=self.total_steps, min_ratio=c.min_lr_ratio, decay_steps=c.decay_steps)

    def step(self, x: Tensor) -> dict[str, StepMetrics]:
        """One optimiser step of every SAE on batch ``x`` [B, d_in] (raw activations)."""
        # decided over all ranks: every rank stops at the same step, none waits in a collective
        self._check_finite_all(x, "input activation batch")
        if self.act_scale is not None:
            x = x / self.act_scale
        lr = self.lr()
        with torch.no_grad():  # batch variance, the denominator of FVU (logged metric)
            self._batch_var = (x - x.mean(0)).float().pow(2).sum(-1).mean()
        out = {name: self._step_one(slot, x, lr) for name, slot in self.slots.items()}
        self.step_count += 1
        self.tokens += x.shape[0] * self.world_size
        return out

    def _step_one(self, s: _Slot, x: Tensor, lr: float) -> StepMetrics:
        cfg, sae = self.cfg, s.sae
        x = x.to(sae.b_dec.device, non_blocking=True)
        dead = s.since_fired > cfg.dead_window
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            lo = sae.loss(x, dead_mask=dead) if s.ddp is None else s.ddp(x, dead)
        terms = ("loss", "mse", "aux", "sparsity", "inner")
        finite = bool(torch.isfinite(torch.stack([getattr(lo, t).float() for t in terms])).all())
        if s.ddp is not None and pdist.any_rank(not finite) and finite:
            raise TrainingDiverged(f"step {self.step_count + 1}: {s.name}: NaN/inf loss on "
                                   "another rank (its log names the term); training stopped, "
                                   "the last checkpoint on disk is intact")
        if not finite:
            for term in terms:  # one device sync per step; name the culprit only on failure
                self._check_finite(getattr(lo, term), f"{s.name}: loss term {term!r}")
        lo.loss.backward()  # under DDP this also averages the gradients over ranks
        gnorm = torch.nn.utils.clip_grad_norm_(s.params, cfg.grad_clip or math.inf)
        if not torch.isfinite(gnorm):
            bad = [n for n, p in sae.named_parameters()
                   if p.grad is not None and not torch.isfinite(p.grad).all()]
            raise TrainingDiverged(f"step {self.step_count + 1}: {s.name}: non-finite gradient "
                                   f"of {bad}")
        for group in s.opt.param_groups:
            group["lr"] = lr
        s.opt.step()
        s.opt.zero_grad(set_to_none=True)
        if cfg.retract_every and (self.step_count + 1) % cfg.retract_every == 0:
            sae.retract_(fast=cfg.retract_fast)
        self._update_dead(s, lo)
        return StepMetrics(LossOutput(*(t.detach() for t in lo[:6]), lo.codes), float(gnorm))

    @torch.no_grad()
    def _update_dead(self, s: _Slot, lo: LossOutput) -> None:
        fired = torch.zeros(s.sae.cfg.d_sae, dtype=torch.int32, device=s.since_fired.device)
        c = lo.codes
        fired[c.indices[c.values > 0]] = 1
        pdist.all_reduce(fired, "max")
        s.since_fired = torch.where(fired.bool(), 0, s.since_fired + 1)
        if self.world_size > 1 and s.sae.cfg.sparsifier in ("batchtopk", "matryoshka"):
            # Each rank updates the BatchTopK EMA from its own shard; keep them equal.
            pdist.all_reduce(s.sae.threshold, "mean")

    def _check_finite_all(self, t: Tensor, what: str) -> None:
        """:meth:`_check_finite` decided jointly: raises on every rank when any rank's ``t``
        holds a NaN/inf (the rank that holds it names the index)."""
        ok = bool(torch.isfinite(t).all())
        if pdist.any_rank(not ok):
            self._check_finite(t, what)
            raise TrainingDiverged(f"step {self.step_count + 1}: NaN/inf in the {what} of another "
                                   "rank; training stopped, the last checkpoint on disk is intact")

    def _check_finite(self, t: Tensor, what: str) -> None:
        if not bool(torch.isfinite(t).all()):
            where = ""
            if t.ndim:
                where = f" (first at index {(~torch.isfinite(t)).nonzero()[0].tolist()})"
            raise TrainingDiverged(f"step {self.step_count + 1}: NaN/inf in {what} of shape "
                                   f"{tuple(t.shape)}{where}; training stopped, the last "
                                   "checkpoint on disk is intact")

    # -- the loop --------------------------------------------------------------------------------
    def fit(self, source: Any, *, resume: bool = False,
            callback: Callable[[Trainer, dict[str, StepMetrics]], None] | None = None
            ) -> TrainResult:
        """Train until ``cfg.steps`` / ``cfg.tokens`` (or one pass). ``resume`` continues from the
        checkpoints in ``out_dir``; ``callback(trainer, outputs)`` runs after every step."""
        src = as_source(source)
        d_src = getattr(src, "d_in", None)
        if isinstance(d_src, int) and d_src != self.d_in:
            where = " ".join(str(v) for v in (getattr(src, "path", None),
                                              getattr(src, "hook", None)) if v)
            raise ValueError(f"training data {where or type(src).__name__} has d_in={d_src} but "
                             f"the SAEs take d_in={self.d_in}")
        saved = self._has_checkpoint()
        if resume and not saved:
            # Killed before its first checkpoint: nothing to restore, so start afresh (what a
            # pipeline that always passes resume=True after a crash wants).
            log.warning("resume: no checkpoint in %s yet; starting from scratch", self.out_dir)
            resume = False
        if resume:
            self.load_state()
        elif saved:
            raise FileExistsError(f"{self.out_dir} already holds a training run; resume it "
                                  "(--resume / resume=True) or choose a new output folder")
        if not resume:  # a resumed run restores the saved RNG state instead
            torch.manual_seed(self.cfg.seed)
        self._open_logs(resume)
        it = src.batches(self.epoch, self.batch_in_epoch)
        if self.cfg.normalize and self.act_scale is None:
            head = list(itertools.islice(it, self.cfg.norm_batches))
            self.act_scale = self._estimate_scale(head)
            it = itertools.chain(head, it)
        bar = self._progress()
        done = self._done()
        while not done:
            got = False
            for x in it:
                got = True
                out = self.step(x)
                self.batch_in_epoch += 1
                if self.total_steps is None and self.cfg.tokens is not None:
                    self.total_steps = math.ceil(self.cfg.tokens / (x.shape[0] * self.world_size))
                    if bar is not None:
                        bar.total = self.total_steps
                done = self._done()
                self._after_step(out, bar, final=done)
                if callback is not None:
                    callback(self, out)
                if done:
                    break
            if done:
                break
            if not got and self.batch_in_epoch == 0:
                if self.step_count == 0:
                    raise ValueError("training data yielded no batches")
                break  # a single-use iterator is exhausted
            if self.cfg.steps is None and self.cfg.tokens is None:
                break  # one pass
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            it = src.batches(self.epoch, 0)
        if bar is not None:
            bar.close()
        every = self.cfg.checkpoint_every
        if self.step_count and (not every or self.step_count % every):
            self.save_checkpoint()  # the last step, unless the cadence just saved it
        self._close_logs()
        return TrainResult({n: self.export(n) for n in self.slots}, self.step_count, self.tokens,
                           self.act_scale)

    def _done(self) -> bool:
        return self.total_steps is not None and self.step_count >= self.total_steps

    def _after_step(self, out: dict[str, StepMetrics], bar, final: bool) -> None:
        cfg = self.cfg
        if self.step_count % cfg.log_every == 0 or final:
            self._log(out, bar)
        if bar is not None:
            bar.update(1)
        if cfg.checkpoint_every and self.step_count % cfg.checkpoint_every == 0:
            self.save_checkpoint()

    @torch.no_grad()
    def _estimate_scale(self, head: list[Tensor]) -> float:
        if not head:
            raise ValueError("training data yielded no batches to estimate the activation scale")
        acc = torch.zeros(2, dtype=torch.float64)
        for x in head:
            self._check_finite_all(x, "input activation batch (scale estimate)")
            acc += torch.stack([x.double().pow(2).sum().cpu(), torch.tensor(float(x.shape[0]))])
        pdist.all_reduce(acc, "sum")
        s = math.sqrt(float(acc[0] / acc[1]) / self.d_in)
        if not s > 0:
            raise ValueError("activation scale estimate is 0 (all-zero activations?)")
        log.info("activation scale s = %.6g (trains on x / s)", s)
        return s

    # -- metrics ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _metrics(self, s: _Slot, m: StepMetrics) -> dict[str, Any]:
        lo, sae = m.loss, s.sae
        codes = lo.codes
        vals = torch.stack([lo.loss.float(), lo.mse.float(), lo.aux.float(),
                            self._batch_var.to(lo.mse.device),
                            (codes.values > 0).sum(-1).float().mean()])
        pdist.all_reduce(vals, "mean")
        loss, mse, aux, var, l0 = (float(v) for v in vals)
        dec = sae.decoder
        orth = None
        if sae.cfg.decoder == "poly":
            U = dec.U.detach().float()
            orth = float(torch.linalg.matrix_norm(U.T @ U - torch.eye(U.shape[1],
                                                                       device=U.device)))
        return {"step": self.step_count, "tokens": self.tokens, "loss": loss, "mse": mse,
                "aux": aux, "fvu": mse / var if var > 0 else None, "l0": l0,
                "dead_frac": float((s.since_fired > self.cfg.dead_window).float().mean()),
                "lambda2": float(dec.lambda2) if getattr(dec, "lambda2", None) is not None
                else None,
                "lambda3": float(dec.lambda3) if getattr(dec, "lambda3", None) is not None
                else None,
                "orth_err": orth, "grad_norm": m.grad_norm, "lr": self.lr_used,
                "epoch": self.epoch}

    def _log(self, out: dict[str, StepMetrics], bar) -> None:
        now = time.perf_counter()
        tps = (self.tokens - self._tok_last) / max(now - self._t_last, 1e-9)
        self._t_last, self._tok_last = now, self.tokens
        first = None
        for name, m in out.items():
            rec = self._metrics(self.slots[name], m)
            rec["tokens_per_s"] = tps
            first = first or rec
            if self.rank == 0:
                f = self.slots[name].metrics_file
                if f is not None:
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                for lg in self._loggers:
                    lg(name, rec)
        if bar is not None and first is not None:
            bar.set_postfix(mse=f"{first['mse']:.4g}", l0=f"{first['l0']:.1f}")

    def _progress(self):
        if not self.cfg.progress or self.rank != 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.step_count, unit="step",
                    desc="train", dynamic_ncols=True)

    def _open_logs(self, resume: bool) -> None:
        if self.rank != 0:
            return
        for s in self.slots.values():
            if s.folder is None:
                continue
            s.folder.mkdir(parents=True, exist_ok=True)
            path = s.folder / METRICS_FILE
            if resume and path.exists():
                _truncate_metrics(path, self.step_count)
            s.metrics_file = open(path, "a" if resume else "w")
        if self.out_dir is not None:
            run = {"format": "polysae-train-run", "single": self.single,
                   "saes": {n: (s.sae.cfg.to_dict()) for n, s in self.slots.items()},
                   "train_config": self.cfg.to_dict(), "metadata": self.metadata}
            atomic_write_text(self.out_dir / RUN_FILE, json.dumps(run, indent=2))
        self._loggers = _make_loggers(self.cfg, self.out_dir)

    def _close_logs(self) -> None:
        for s in self.slots.values():
            if s.metrics_file is not None:
                s.metrics_file.close()
                s.metrics_file = None
        for lg in self._loggers:
            getattr(lg, "close", lambda: None)()
        self._loggers = []

    # -- checkpoints -----------------------------------------------------------------------------
    def export(self, name: str) -> SAE:
        """A copy of SAE ``name`` that takes raw activations (scale folded in), in eval mode."""
        sae = copy.deepcopy(self.slots[name].sae)
        if self.act_scale is not None:
            fold_scale(sae, self.act_scale)
        return sae.eval()

    def _state(self, s: _Slot) -> dict[str, Any]:
        cpu = lambda t: t.detach().to("cpu", copy=True)  # noqa: E731
        return {"format": "polysae-trainer-state", "format_version": STATE_FORMAT,
                "name": s.name, "step": self.step_count, "tokens": self.tokens,
                "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "total_steps": self.total_steps, "act_scale": self.act_scale,
                "world_size": self.world_size, "sae_config": s.sae.cfg.to_dict(),
                "train_config": self.cfg.to_dict(),
                "model": {k: cpu(v) for k, v in s.sae.state_dict().items()},
                "optimizer": _to_cpu(s.opt.state_dict()), "since_fired": cpu(s.since_fired),
                "rng": torch.get_rng_state()}

    def save_checkpoint(self) -> None:
        """Rank 0 writes every SAE's checkpoint (weights, config, state), each file atomically.

        Resume reads only trainer_state.pt (self-contained: unfolded weights, optimiser, counters,
        data position, RNG), so a kill between the files leaves a consistent older state."""
        if self.out_dir is None:
            return
        # Every rank must hold bitwise the same weights (same averaged gradients, same Adam step,
        # same retraction); checked here, where a divergence would otherwise be written to disk.
        pdist.assert_in_sync({n: s.sae for n, s in self.slots.items()})
        if self.rank != 0:
            return
        meta = dict(self.metadata, tokens_trained=self.tokens, step=self.step_count,
                    act_scale=self.act_scale)
        tmps = []
        for s in self.slots.values():
            # A copy only when there is a scale to fold in (saves GPU memory otherwise).
            out = s.sae if self.act_scale is None else self.export(s.name)
            out.save(s.folder, metadata=meta)
            tmp = s.folder / f".{STATE_FILE}.tmp{os.getpid()}"
            try:
                with open(tmp, "wb") as f:
                    torch.save(self._state(s), f)
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:  # e.g. out of space: drop this and the other unpublished states
                for p in [tmp, *(t for _, t in tmps)]:
                    p.unlink(missing_ok=True)
                raise
            tmps.append((s.folder, tmp))
        for folder, tmp in tmps:  # publish all states only once every one is on disk
            if (folder / STATE_FILE).exists():
                os.replace(folder / STATE_FILE, folder / PREV_STATE_FILE)
            os.replace(tmp, folder / STATE_FILE)

    def _has_checkpoint(self) -> bool:
        """Whether ``out_dir`` holds a trainer state (rank 0's disk decides for every rank)."""
        saved = self.rank == 0 and self.out_dir is not None and any(
            (s.folder / fn).exists() for s in self.slots.values() if s.folder
            for fn in (STATE_FILE, PREV_STATE_FILE))
        return bool(pdist.broadcast_object(saved))

    def load_state(self) -> None:
        """Restore every SAE from ``out_dir`` at the newest step all of them have saved.

        Distributed: rank 0 reads the states (checkpoints live on its disk only) and broadcasts
        them, so every rank resumes from identical weights, optimiser moments and position; an
        error on rank 0 is raised on every rank."""
        if self.out_dir is None:
            raise ValueError("resume needs out_dir")
        states, err, mine = None, None, None
        if self.rank == 0:
            try:
                states = self._read_states()
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                mine, err = e, (type(e) if isinstance(e, (ValueError, OSError)) else RuntimeError,
                                str(e))
        states, err = pdist.broadcast_object((states, err))
        if mine is not None:
            raise mine
        if err is not None:
            raise err[0](f"(rank 0) {err[1]}")
        for s in self.slots.values():
            path, st = states[s.name]
            if int(st["world_size"]) != self.world_size:
                log.warning("%s was written by %d ranks, resuming on %d: the data order changes",
                            path, st["world_size"], self.world_size)
            s.sae.load_state_dict(st["model"])
            s.opt.load_state_dict(st["optimizer"])
            s.since_fired = st["since_fired"].to(s.since_fired.device)
            self.step_count, self.tokens = int(st["step"]), int(st["tokens"])
            self.epoch, self.batch_in_epoch = int(st["epoch"]), int(st["batch_in_epoch"])
            self.total_steps = self.cfg.steps or st["total_steps"]
            self.act_scale = st["act_scale"]
            torch.set_rng_state(st["rng"])
        self._tok_last = self.tokens
        log.info("resumed at step %d (%d tokens)", self.step_count, self.tokens)

    def _read_states(self) -> dict[str, tuple[Path, dict[str, Any]]]:
        """name -> (path, trainer state) at the newest step every SAE has, validated."""
        cands: dict[str, dict[int, Path]] = {}
        for s in self.slots.values():
            found, bad = {}, []
            for fn in (STATE_FILE, PREV_STATE_FILE):
                p = s.folder / fn
                if p.exists():
                    try:
                        st = torch.load(p, map_location="cpu", weights_only=True)
                        found[int(st["step"])] = p
                    except Exception as e:  # noqa: BLE001 - a damaged file is skipped, named
                        log.warning("cannot read %s (%s); ignoring it", p, e)
                        bad.append(f"{p.name}: {str(e).splitlines()[0][:200]}")
            if not found:
                if bad:
                    raise ValueError(f"resume: no readable trainer state in {s.folder} "
                                     f"({'; '.join(bad)})")
                raise FileNotFoundError(f"resume: no {STATE_FILE} in {s.folder}")
            cands[s.name] = found
        common = set.intersection(*(set(f) for f in cands.values()))
        if not common:
            raise ValueError(f"resume: the SAEs in {self.out_dir} have no checkpoint step in "
                             f"common ({ {n: sorted(f) for n, f in cands.items()} })")
        step = max(common)
        out = {}
        for s in self.slots.values():
            path = cands[s.name][step]
            st = torch.load(path, map_location="cpu", weights_only=True)
            if st.get("format") != "polysae-trainer-state":
                raise ValueError(f"{path} is not a polysae trainer state")
            if int(st.get("format_version", 0)) > STATE_FORMAT:
                raise ValueError(f"{path}: trainer state format_version {st['format_version']} "
                                 f"is newer than this polysae reads ({STATE_FORMAT}); upgrade "
                                 "polysae")
            if st["sae_config"] != s.sae.cfg.to_dict():
                raise ValueError(f"resume: {path} was saved for a different SAE config than "
                                 f"{s.name!r}'s")
            out[s.name] = (path, st)
        return out

    @property
    def lr_used(self) -> float:
        """Learning rate of the step just taken."""
        c = self.cfg
        return lr_at(max(self.step_count - 1, 0), c.lr, c.schedule, warmup=c.warmup_steps,
                     total=self.total_steps, min_ratio=c.min_lr_ratio, decay_steps=c.decay_steps)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (and a torn last line)."""
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _make_loggers(cfg: TrainConfig, out_dir: Path | None) -> list[Callable]:
    loggers = []
    if "wandb" in cfg.log_to:
        try:
            import wandb  # type: ignore[import-not-found]

            run = wandb.init(project=cfg.wandb_project, config=cfg.to_dict(), resume="allow")
            fn = lambda name, rec: run.log({f"{name}/{k}": v for k, v in rec.items()  # noqa: E731
                                            if isinstance(v, (int, float))}, step=rec["step"])
            fn.close = run.finish
            loggers.append(fn)
        except ImportError:
            warnings.warn("log_to includes 'wandb' but wandb is not installed; skipping it",
                          stacklevel=2)
    if "tensorboard" in cfg.log_to:
        try:
            from torch.utils.tensorboard import SummaryWriter

            w = SummaryWriter(str((out_dir or Path(".")) / "tensorboard"))

            def fn(name, rec, w=w):
                for k, v in rec.items():
                    if isinstance(v, (int, float)) and k != "step":
                        w.add_scalar(f"{name}/{k}", v, rec["step"])

            fn.close = w.close
            loggers.append(fn)
        except ImportError:
            warnings.warn("log_to includes 'tensorboard' but tensorboard is not installed; "
                          "skipping it", stacklevel=2)
    return loggers


def train(saes: SAE | SAEConfig | Mapping[str, SAE | SAEConfig], source: Any,
          cfg: TrainConfig | None = None, out_dir: str | os.PathLike | None = None, *,
          resume: bool = False, metadata: Mapping[str, Any] | None = None,
          device: str | torch.device = "cpu",
          callback: Callable[[Trainer, dict[str, StepMetrics]], None] | None = None
          ) -> TrainResult:
    """Train SAE(s) on ``source`` (see :class:`Trainer`); configs are built after seeding, so
    the same seed gives the same initial weights."""
    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)

    def build(v):
        return SAE(v, device=device) if isinstance(v, SAEConfig) else v

    models = build(saes) if isinstance(saes, (SAE, SAEConfig)) else {
        n: build(v) for n, v in saes.items()}
    return Trainer(models, cfg, out_dir, metadata=metadata).fit(source, resume=resume,
                                                                callback=callback)


__all__ = ["TrainConfig", "Trainer", "TrainResult", "StepMetrics", "TrainingDiverged",
           "TensorSource", "as_source", "fold_scale", "train"]


import polysae  # noqa: E402

polysae._callable_module(__name__)  # polysae.train(...) calls the function
