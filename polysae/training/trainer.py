"""The training loop: :class:`Trainer` and :func:`train` (docs/training.md).

One :class:`Trainer` trains one or several SAEs from **one** activation stream: every batch is read
once and fed to each SAE in turn (a vanilla and a PolySAE with identical settings, or a sweep over
k or ranks), each with its own Adam optimiser, dead-latent counters, checkpoint folder and
``metrics.jsonl``. The per-SAE step follows the reference order exactly (docs/method.md):
``loss.backward()`` -> (all-reduce gradients across ranks) -> global-norm clipping at 1.0 -> Adam
step -> ``zero_grad`` -> retraction of U (every step by default) -> dead-latent counters (and
W_dec rows held at unit norm around the step with ``SAEConfig.unit_norm_decoder``).

Inputs: anything with ``batches(epoch=0, start=0)`` (``polysae.data.store.ActivationStore``,
:class:`~polysae.training.sources.TensorSource`), or any iterable of [B, d_in] tensors (a live
model, a generator); see :mod:`polysae.training.sources`.

The on-disk layout of a run is in :mod:`polysae.training`.

Activation normalisation (off by default, as in the paper): a scalar ``s`` with
``E||x/s||^2 = d_in`` is estimated once from the first batches; the SAE trains on ``x/s``. At
save :meth:`polysae.SAE.fold_scale_` rewrites the weights so the saved SAE maps raw ``x`` to
``s * x_hat_n(x/s)`` with identical codes (see its docstring for the derivation).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polysae.config import SAEConfig
from polysae.fileio import open_log
from polysae.sae import SAE, LossOutput
from polysae.training import distributed as pdist
from polysae.training import unit_norm
from polysae.training.config import TrainConfig
from polysae.training.optim import make_adam
from polysae.training.outputs import StepMetrics, TrainingDiverged, TrainResult
from polysae.training.logs import (
    METRICS_FILE,
    make_loggers,
    sae_record,
    truncate_metrics,
    write_run_file,
)
from polysae.training.schedule import lr_at
from polysae.training.sources import as_source
from polysae.training.state import (
    STATE_FORMAT,
    STATE_TAG,
    has_state,
    read_states,
    to_cpu,
    write_states,
)

log = logging.getLogger(__name__)

# -- the trainer ---------------------------------------------------------------------------------
class _Slot:
    """One SAE's training state."""

    def __init__(self, name: str, sae: SAE, cfg: TrainConfig, folder: Path | None):
        self.name, self.sae, self.folder = name, sae, folder
        self.params = [p for p in sae.parameters() if p.requires_grad]
        # Under torch.distributed: SAE.loss as the forward of a DDP module (it all-reduces the
        # gradients during backward and broadcasts rank 0's weights now); None in one process.
        self.ddp = pdist.wrap(sae) if pdist.world()[1] > 1 else None
        self.opt = make_adam(self.params, cfg)
        self.since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.b_dec.device)
        self.metrics_file = None


class Trainer:
    """Trains one SAE or several from one stream. ``saes``: an ``SAE`` (checkpoint written into
    ``out_dir`` itself) or a mapping name -> SAE (one sub-folder per name). ``metadata`` goes
    into every saved config.json (e.g. ``{"model": ..., "hook": ..., "acts": ...}``).

    Distributed use: call :func:`polysae.training.distributed.init_from_env` first and give each
    rank its disjoint shard of the data; rank 0 writes checkpoints and logs, every rank resumes."""

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
        unit_norm.before_step(sae)  # no-op unless SAEConfig.unit_norm_decoder
        gnorm = torch.nn.utils.clip_grad_norm_(s.params, cfg.grad_clip or math.inf)
        if not torch.isfinite(gnorm):
            bad = [n for n, p in sae.named_parameters()
                   if p.grad is not None and not torch.isfinite(p.grad).all()]
            raise TrainingDiverged(f"step {self.step_count + 1}: {s.name}: non-finite gradient "
                                   f"of {bad}")
        for group in s.opt.param_groups:
            group["lr"] = lr
        s.opt.step()
        unit_norm.after_step(sae)
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
        if self._off_manifold():  # retract_every > 1 and the run ended between retractions
            for s in self.slots.values():  # after the save: its trainer state keeps the raw U
                s.sae.retract_(fast=self.cfg.retract_fast)
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
    def _metrics(self, s: _Slot, m: StepMetrics) -> dict[str, Any]:
        dead = float((s.since_fired > self.cfg.dead_window).float().mean())
        return {"step": self.step_count, "tokens": self.tokens,
                **sae_record(s.sae, m.loss, self._batch_var), "dead_frac": dead,
                "grad_norm": m.grad_norm, "lr": self.lr_used, "epoch": self.epoch}

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
                truncate_metrics(path, self.step_count)
            s.metrics_file = open_log(path, "a" if resume else "w")  # errors name the file
        if self.out_dir is not None:
            write_run_file(self.out_dir, {
                "single": self.single,
                "saes": {n: (s.sae.cfg.to_dict()) for n, s in self.slots.items()},
                "train_config": self.cfg.to_dict(), "metadata": self.metadata})
        self._loggers = make_loggers(self.cfg, self.out_dir)

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
            sae.fold_scale_(self.act_scale)
        return sae.eval()

    def _off_manifold(self) -> bool:
        """Whether U may be off the constraint set now: a cadence ``retract_every > 1`` whose last
        retraction was not at this step (``retract_every = 0`` never retracts: U is free)."""
        every = self.cfg.retract_every
        return bool(every and every > 1 and self.step_count % every
                    and any(s.sae.cfg.decoder == "poly" for s in self.slots.values()))

    def _state(self, s: _Slot) -> dict[str, Any]:
        cpu = lambda t: t.detach().to("cpu", copy=True)  # noqa: E731
        return {"format": STATE_TAG, "format_version": STATE_FORMAT,
                "name": s.name, "step": self.step_count, "tokens": self.tokens,
                "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "total_steps": self.total_steps, "act_scale": self.act_scale,
                "world_size": self.world_size, "sae_config": s.sae.cfg.to_dict(),
                "train_config": self.cfg.to_dict(),
                "model": {k: cpu(v) for k, v in s.sae.state_dict().items()},
                "optimizer": to_cpu(s.opt.state_dict()), "since_fired": cpu(s.since_fired),
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
        states = {}
        retract = self._off_manifold()
        for s in self.slots.values():
            # A copy only when there is a scale to fold in or a U to retract (saves GPU memory
            # otherwise). sae.safetensors always holds U on the constraint set; the trainer state
            # keeps the raw weights, so a resumed run continues bit for bit.
            out = s.sae if self.act_scale is None else self.export(s.name)
            if retract and s.sae.cfg.decoder == "poly":
                out = copy.deepcopy(out) if out is s.sae else out
                out.retract_(fast=self.cfg.retract_fast)
            out.save(s.folder, metadata=meta)
            states[s.folder] = self._state(s)
        write_states(states)  # published together, once every one is on disk

    def _has_checkpoint(self) -> bool:
        """Whether ``out_dir`` holds a trainer state (rank 0's disk decides for every rank)."""
        saved = self.rank == 0 and self.out_dir is not None and any(
            has_state(s.folder) for s in self.slots.values() if s.folder)
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
                states = read_states({n: s.folder for n, s in self.slots.items()},
                                     {n: s.sae.cfg.to_dict() for n, s in self.slots.items()},
                                     self.out_dir)
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

    @property
    def lr_used(self) -> float:
        """Learning rate of the step just taken."""
        c = self.cfg
        return lr_at(max(self.step_count - 1, 0), c.lr, c.schedule, warmup=c.warmup_steps,
                     total=self.total_steps, min_ratio=c.min_lr_ratio, decay_steps=c.decay_steps)


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


__all__ = ["Trainer", "TrainResult", "StepMetrics", "TrainingDiverged", "train"]
