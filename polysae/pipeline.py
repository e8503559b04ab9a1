"""The end-to-end job behind ``polysae run``: harvest -> train vanilla + PolySAE -> evaluate ->
browse.

Every stage is resumable and skipped when already complete, so re-running the same command after a
crash continues where it stopped:

- harvest resumes shard by shard (byte-identical to an uninterrupted run,
  :mod:`polysae.data.harvesting`);
- training resumes from the last checkpoint of both SAEs (:class:`polysae.training.Trainer`);
- evaluation and the browser rerun only when their inputs changed (a stage file records the
  sha256 of the checkpoints they read).

Layout of ``out``::

    out/acts/           harvested activations (manifest.json + shards), train/val split by shard
    out/train/vanilla/  linear-decoder TopK SAE (checkpoint, trainer_state.pt, metrics.jsonl)
    out/train/poly/     PolySAE with identical settings, trained on the same batches
    out/report/         metrics.json, report.md, *.png (vanilla vs poly side by side)
    out/browser/        static feature browser of the PolySAE (open index.html)
    out/stages.json     which stages finished, with the inputs they saw
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from polysae.config import SAEConfig, check_sae_overrides, known_fields, plain_dict
from polysae.data.actformat import provenance
from polysae.data.backend import BACKENDS
from polysae.data.harvesting import HarvestConfig
from polysae.device import resolve_device
from polysae.evaluation import EvalConfig
from polysae.fileio import atomic_write_text
from polysae.stages import Stages, checkpoint_key
from polysae.training import TrainConfig

log = logging.getLogger(__name__)


def _default_harvest() -> HarvestConfig:
    return HarvestConfig(hooks=["blocks.9.hook_resid_post"], shard_size=8192)


def _default_train() -> TrainConfig:
    # The paper's 3e-4 is tuned for ~73k steps; the default run makes a few hundred, where 1e-3
    # on normalised activations converges much further (measured: per-token MSE after 60 steps
    # 412 at 3e-4 vs 136 at 1e-3).
    return TrainConfig(lr=1e-3, normalize=True)


def _default_eval() -> EvalConfig:
    return EvalConfig(probe_train_per_class=32, probe_test_per_class=16)


@dataclass
class RunConfig:
    """Settings of ``polysae run``: its own few fields plus the nested configs of each stage
    (``harvest``, ``train``, ``eval``) and overrides of :class:`polysae.SAEConfig` shared by both
    SAEs. Defaults fit a 2-core CPU in under 10 minutes on the bundled SmolLM2-135M and BBC
    corpus; every size scales up by flag."""

    out: str = "polysae-run"
    """Output folder of the whole run (re-run the same command to resume)."""
    batch_size: int = 1024
    """Training batch in activation rows."""
    epochs: int = 3
    """Passes over the training split when neither ``train.steps`` nor ``train.tokens`` is
    given."""
    scale_cadence: bool = True
    """Derive the trainer's cadences from the run's length (dead_window = steps/8, at least 10;
    checkpoint_every = steps/4; log_every = steps/50) instead of taking ``train``'s values, so
    short runs still checkpoint, log and count dead latents sensibly."""
    seed: int = 42
    """Seed of everything random: the harvest's document order, initialisation and data order
    (it sets ``harvest.seed`` and ``train.seed``)."""
    device: str | None = None
    """Device for the model and the SAEs (default: cuda when present, else cpu)."""
    backend: str = field(default="transformer_lens", metadata={"choices": BACKENDS})
    """What runs the model, for the harvest and the evaluation alike: transformer_lens (default),
    hf (plain transformers with forward hooks) or nnsight (pip install 'polysae[nnsight]')."""
    browser: bool = True
    """Build the feature browser of the PolySAE."""
    progress: bool = True
    """Show progress bars."""
    sae: dict[str, Any] = field(default_factory=lambda: {"d_sae": 2048, "k": 32},
                                metadata={"flags_from": SAEConfig})
    """Overrides of :class:`polysae.SAEConfig` shared by both SAEs (``d_in`` comes from the
    harvest, ``decoder`` is linear for one and poly for the other)."""
    harvest: HarvestConfig = field(default_factory=_default_harvest)
    """What to harvest (``out`` is ``<out>/acts``; ``device``, ``seed``, ``backend`` and
    ``progress`` are the run's). The SAEs train on the first hook."""
    train: TrainConfig = field(default_factory=_default_train)
    """How to train both SAEs (``steps`` derived from ``epochs`` unless ``steps``/``tokens`` are
    given; ``seed`` and ``progress`` are the run's; cadences see ``scale_cadence``)."""
    eval: EvalConfig = field(default_factory=_default_eval)
    """How to evaluate them side by side (``device``, ``backend`` and ``progress`` are the
    run's)."""

    def __post_init__(self) -> None:
        for name, cls in (("harvest", HarvestConfig), ("train", TrainConfig),
                          ("eval", EvalConfig)):
            v = getattr(self, name)
            if isinstance(v, dict):  # e.g. read back from run_config.json
                setattr(self, name, TrainConfig.from_dict(v) if cls is TrainConfig else cls(**v))
        for name in ("batch_size", "epochs"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"RunConfig.{name} must be >= 1, got {v!r}")
        if not self.harvest.hooks:
            raise ValueError("RunConfig.harvest.hooks must name at least one hook")
        if self.backend not in BACKENDS:
            raise ValueError(f"RunConfig.backend {self.backend!r}: expected one of "
                             f"{list(BACKENDS)}")
        self.sae = check_sae_overrides(self.sae, fixed=("d_in", "decoder"), owner="RunConfig.sae")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Read back ``run_config.json`` (unknown keys dropped)."""
        return cls(**known_fields(cls, d))

    def to_dict(self) -> dict[str, Any]:
        return plain_dict(self)


class RunResult(NamedTuple):
    out: Path
    """The run folder."""
    metrics: dict
    """The evaluation metrics (also in out/report/metrics.json)."""
    seconds: dict
    """Wall seconds spent in each stage by this call (0 for a skipped stage)."""


class StageConfigs(NamedTuple):
    """What each stage of a run gets, derived from a :class:`RunConfig` (:func:`stage_configs`)."""

    harvest: HarvestConfig
    """The harvest (into ``<out>/acts``)."""
    saes: dict
    """``{"vanilla": SAEConfig, "poly": SAEConfig}``: identical but for the decoder."""
    train: TrainConfig
    """Training settings of both SAEs, with the step count and cadences resolved."""
    eval: EvalConfig
    """Evaluation settings."""


def harvest_config(cfg: RunConfig, device: str) -> HarvestConfig:
    """The harvest of ``cfg`` (into ``<out>/acts``, with the run's device, seed, backend and
    progress)."""
    return dataclasses.replace(cfg.harvest, out=str(Path(cfg.out) / "acts"), device=device,
                               seed=cfg.seed, progress=cfg.progress, backend=cfg.backend)


def stage_configs(cfg: RunConfig, *, device: str, d_in: int, n_rows: int) -> StageConfigs:
    """The stage configs of ``cfg`` for a store of ``n_rows`` training rows of width ``d_in``."""
    hcfg = harvest_config(cfg, device)
    sae_cfgs = {"vanilla": SAEConfig(d_in=d_in, decoder="linear", **cfg.sae),
                "poly": SAEConfig(d_in=d_in, decoder="poly", **cfg.sae)}
    steps = cfg.train.steps
    if steps is None:
        rows = cfg.train.tokens or cfg.epochs * n_rows
        steps = max(1, rows // cfg.batch_size)
    cadence = dict(dead_window=max(10, steps // 8), checkpoint_every=max(1, steps // 4),
                   log_every=max(1, steps // 50)) if cfg.scale_cadence else {}
    tcfg = dataclasses.replace(cfg.train, steps=steps, tokens=None, seed=cfg.seed,
                               progress=cfg.progress, **cadence)
    ecfg = dataclasses.replace(cfg.eval, device=device, progress=cfg.progress,
                               backend=cfg.backend)
    return StageConfigs(hcfg, sae_cfgs, tcfg, ecfg)


def run(cfg: RunConfig) -> RunResult:
    """Run (or resume) the whole job; see the module docstring."""
    from polysae.data.harvesting import harvest
    from polysae.data.models import load_model
    from polysae.data.store import ActivationStore
    from polysae.evaluation import evaluate
    from polysae.sae import SAE, load_checkpoint
    from polysae.training import Trainer

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "run_config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    device = resolve_device(cfg.device)
    stages = Stages(out)
    seconds: dict[str, float] = {}
    hook = cfg.harvest.hooks[0]

    t = time.perf_counter()
    lm = load_model(cfg.harvest.model, device=device,
                    dtype=getattr(torch, cfg.harvest.model_dtype), backend=cfg.backend)
    seconds["load_model"] = time.perf_counter() - t

    # 1. harvest (resumes by itself; a no-op when complete)
    t = time.perf_counter()
    hres = harvest(harvest_config(cfg, device), model=lm)
    seconds["harvest"] = time.perf_counter() - t
    log.info("harvest: %d rows per hook in %s (%.0f tok/s this call)", hres.n_rows, hres.out,
             hres.tokens_per_s)

    # 2. train a vanilla TopK SAE and a PolySAE with identical settings on the same batches
    t = time.perf_counter()
    store = ActivationStore(out / "acts", hook, batch_size=cfg.batch_size, split="train",
                            seed=cfg.seed, device=device)
    stage = stage_configs(cfg, device=device, d_in=store.d_in, n_rows=store.n_rows)
    sae_cfgs, tcfg = stage.saes, stage.train
    train_dir = out / "train"
    ckpts = {n: train_dir / n for n in sae_cfgs}
    train_key = hashlib.sha256(json.dumps(
        [tcfg.to_dict(), {n: c.to_dict() for n, c in sae_cfgs.items()},
         (out / "acts" / "manifest.json").read_text()], sort_keys=True, default=str).encode()
    ).hexdigest()
    if not (stages.done("train", train_key) and all((p / "config.json").exists()
                                                    for p in ckpts.values())):
        resume = (train_dir / "run.json").exists()
        torch.manual_seed(cfg.seed)
        saes = {n: SAE(c, device=device) for n, c in sae_cfgs.items()}
        meta = {**provenance(store.manifest), "model": cfg.harvest.model, "hook": hook,
                "acts": str(out / "acts")}
        Trainer(saes, tcfg, train_dir, metadata=meta).fit(store, resume=resume)
        stages.mark("train", train_key)
    seconds["train"] = time.perf_counter() - t

    # 3. evaluate both side by side
    t = time.perf_counter()
    key = checkpoint_key(*ckpts.values())
    report_dir = out / "report"
    if stages.done("eval", key) and (report_dir / "metrics.json").exists():
        metrics = json.loads((report_dir / "metrics.json").read_text())
    else:
        metrics = evaluate({n: str(p) for n, p in ckpts.items()}, model=lm, hook=hook,
                           acts=str(out / "acts"), out=report_dir, config=stage.eval)
        stages.mark("eval", key)
    seconds["eval"] = time.perf_counter() - t

    # 4. the feature browser of the PolySAE
    t = time.perf_counter()
    if cfg.browser and not stages.done("browser", key):
        from polysae.browser import build_site

        poly, _ = load_checkpoint(ckpts["poly"], device=device)
        val = ActivationStore(out / "acts", hook, batch_size=cfg.batch_size, split="val",
                              shuffle=False, device=device)
        # overwrite=True: out/browser is this run's own sub-folder (the layout above), the
        # command holds the lock of the whole run folder, and stages.json rebuilds it exactly
        # when its inputs changed, so the site there is this run's earlier one (a retrained SAE,
        # or a build cut short before it was marked). A folder there that is not a site is still
        # refused: build_site never replaces one.
        build_site(poly, val, out / "browser", model=lm.model, tokenizer=lm.tokenizer,
                   report=report_dir / "metrics.json", progress=cfg.progress, overwrite=True)
        stages.mark("browser", key)
    seconds["browser"] = time.perf_counter() - t
    atomic_write_text(out / "timings.json", json.dumps(seconds, indent=2))
    return RunResult(out, metrics, seconds)

