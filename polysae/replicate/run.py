"""``polysae replicate``: vanilla vs PolySAE over seeds, with paired confidence intervals.

For each sparsifier (TopK, BatchTopK, Matryoshka) and each of N seeds, a vanilla (linear-decoder)
SAE and a PolySAE are trained **on the same batches in the same order** (one
:class:`polysae.training.Trainer` stream feeds both) from one activation store, and evaluated on the
same held-out rows, probing texts and steering prompts (:func:`polysae.evaluation.evaluate`). A
seed sets initialisation and data order; the pair of one seed shares both, so the per-seed
difference poly - vanilla is a paired measurement (:mod:`polysae.replicate.paired`).

Layout of ``out``::

    out/acts/                          the activation store (when harvested here)
    out/cells/<sparsifier>/seed<S>/    one (sparsifier, seed) cell:
        train/{vanilla,poly}/          checkpoints, metrics.jsonl (resumable)
        report/                        metrics.json, report.md, plots of this cell
        stages.json                    which of train/eval finished, with their input keys
    out/replicate.json                 every cell's numbers and the paired comparisons
    out/replicate.md                   the table (rows = sparsifier x decoder) + reading notes
    out/paired_f1.png                  paired F1 differences per seed with their intervals

Re-running the same command skips finished cells (and resumes a cell's interrupted training).
Metric definitions: ``docs/evaluation.md``; which of them follow the paper's protocol and which
are polysae's own is recorded per metric in ``replicate.json`` (``protocol``) and in the table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from polysae.config import SAEConfig
from polysae.data.actformat import provenance
from polysae.device import resolve_device
from polysae.evaluation import jsonable
from polysae.fileio import atomic_write_text
from polysae.replicate.compare import compare
from polysae.replicate.config import CellResult, ReplicateConfig, ReplicateResult
from polysae.stages import Stages, checkpoint_key, config_key

log = logging.getLogger(__name__)


# -- running ------------------------------------------------------------------------------------
def _resolve_store(cfg: ReplicateConfig, out: Path, lm: Any, device: str) -> tuple[Path, str]:
    """The activation store (harvested into out/acts when none is given) and the hook."""
    from polysae.data.actformat import read_manifest

    if cfg.acts is None:
        from polysae.data.harvesting import harvest

        hcfg = dataclasses.replace(cfg.harvest, out=str(out / "acts"), device=device,
                                   progress=cfg.progress, backend=cfg.backend,
                                   model=cfg.model or cfg.harvest.model,
                                   hooks=list(cfg.harvest.hooks or ([cfg.hook] if cfg.hook
                                                                    else [])))
        harvest(hcfg, model=lm)
        acts = out / "acts"
    else:
        acts = Path(cfg.acts)
    manifest = read_manifest(acts)
    hooks = list(manifest.get("hooks", []))
    hook = cfg.hook or (hooks[0] if hooks else None)
    if hook not in hooks:
        raise ValueError(f"replicate: activation store {acts} holds hooks {hooks}, not "
                         f"{hook!r} (--hook)")
    return acts, hook


def _load_lm(cfg: ReplicateConfig, acts: Path | None, device: str) -> Any:
    from polysae.data.models import load_model

    name = cfg.model
    if name is None and acts is not None:
        from polysae.data.actformat import read_manifest

        name = read_manifest(acts).get("model")
    name = name or cfg.harvest.model
    return load_model(name, device=device, backend=cfg.backend)


def run_cell(cfg: ReplicateConfig, sparsifier: str, seed: int, *, acts: Path, hook: str,
             lm: Any, out: Path, device: str) -> CellResult:
    """Train (or resume) and evaluate one (sparsifier, seed) pair; skipped when complete."""
    from polysae.data.actformat import read_manifest
    from polysae.data.store import ActivationStore
    from polysae.evaluation import evaluate
    from polysae.replicate.codescale import code_scale
    from polysae.sae import SAE
    from polysae.training import Trainer

    folder = out / "cells" / sparsifier / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    stages = Stages(folder)
    store = ActivationStore(acts, hook, batch_size=cfg.batch_size, split="train", seed=seed,
                            device=device)
    common = dict(cfg.sae, d_in=store.d_in, sparsifier=sparsifier)
    sae_cfgs = {"vanilla": SAEConfig(decoder="linear", **common),
                "poly": SAEConfig(decoder="poly", **common)}
    tcfg = cfg.train
    if tcfg.steps is None and tcfg.tokens is None:
        tcfg = dataclasses.replace(tcfg, steps=max(1, int(cfg.epochs * store.n_rows)
                                                   // cfg.batch_size))
    tcfg = dataclasses.replace(tcfg, seed=seed, progress=cfg.progress)
    train_dir = folder / "train"
    ckpts = {n: train_dir / n for n in sae_cfgs}
    manifest = read_manifest(acts)
    train_key = config_key(tcfg.to_dict(), {n: c.to_dict() for n, c in sae_cfgs.items()},
                           manifest.get("config"), manifest.get("n_rows"), hook,
                           cfg.batch_size)
    ecfg = dataclasses.replace(cfg.eval, device=device, progress=cfg.progress,
                               backend=cfg.backend)
    eval_key = None
    if stages.done("train", train_key) and all((p / "config.json").exists()
                                               for p in ckpts.values()):
        eval_key = config_key(checkpoint_key(*ckpts.values()), dataclasses.asdict(ecfg))
        metrics_path = folder / "report" / "metrics.json"
        if stages.done("eval", eval_key) and metrics_path.exists():
            return CellResult(sparsifier, seed, folder, json.loads(metrics_path.read_text()),
                              True)
    else:
        print(f"[replicate] {sparsifier} seed {seed}: training vanilla + poly "
              f"({tcfg.steps or tcfg.tokens} {'steps' if tcfg.steps else 'rows'})",
              file=sys.stderr)
        resume = (train_dir / "run.json").exists() or any(
            (p / "trainer_state.pt").exists() for p in ckpts.values())
        torch.manual_seed(seed)
        saes = {n: SAE(c, device=device) for n, c in sae_cfgs.items()}
        meta = {**provenance(manifest), "model": getattr(lm, "name", None), "hook": hook,
                "acts": str(acts), "seed": seed}
        Trainer(saes, tcfg, train_dir, metadata=meta).fit(store, resume=resume)
        stages.mark("train", train_key)
        eval_key = config_key(checkpoint_key(*ckpts.values()), dataclasses.asdict(ecfg))
    print(f"[replicate] {sparsifier} seed {seed}: evaluating", file=sys.stderr)
    evaluate({n: str(p) for n, p in ckpts.items()}, model=lm, hook=hook, acts=str(acts),
             out=folder / "report", config=ecfg)
    metrics = json.loads((folder / "report" / "metrics.json").read_text())
    # Code scale / term shares (the W1 scale confound): on the same held-out rows.
    from polysae.sae import load_checkpoint

    val = ActivationStore(acts, hook, split="val", batch_size=4096, shuffle=False)
    rows = val.read_rows(0, min(ecfg.recon_tokens, val.n_rows)).float()
    for n, p in ckpts.items():
        sae, _ = load_checkpoint(p, device=device)
        metrics["saes"][n]["scale"] = code_scale(sae, torch.split(rows, 4096))._asdict()
    metrics = jsonable(metrics)
    atomic_write_text(folder / "report" / "metrics.json", json.dumps(metrics, indent=1))
    stages.mark("eval", eval_key)
    return CellResult(sparsifier, seed, folder, metrics, False)


def replicate(cfg: ReplicateConfig | None = None, *, model: Any = None) -> ReplicateResult:
    """Run (or resume) the whole comparison; see the module docstring. ``model``: an already
    loaded :class:`polysae.data.models.LoadedModel` (default: load ``cfg.model`` / the store's)."""
    cfg = cfg or ReplicateConfig()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    atomic_write_text(out / "replicate_config.json", json.dumps(cfg.to_dict(), indent=2))
    t0 = time.perf_counter()
    if cfg.acts is not None:
        from polysae.data.actformat import read_manifest

        read_manifest(cfg.acts)  # a clear error for a missing/unreadable store, before loading
    lm = model if model is not None else _load_lm(cfg, Path(cfg.acts) if cfg.acts else None,
                                                  device)
    acts, hook = _resolve_store(cfg, out, lm, device)
    cells: list[CellResult] = []
    n = len(cfg.sparsifiers) * cfg.seeds
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc="replicate cells", disable=not cfg.progress, file=sys.stderr)
    for sp in cfg.sparsifiers:
        for seed in cfg.seed_list:
            bar.set_postfix_str(f"{sp} seed {seed}")
            cells.append(run_cell(cfg, sp, seed, acts=acts, hook=hook, lm=lm, out=out,
                                  device=device))
            bar.update(1)
    bar.close()
    table = compare(cells, cfg)
    table.update(acts=str(acts), hook=hook, seconds=round(time.perf_counter() - t0, 1))
    atomic_write_text(out / "replicate.json",
                      json.dumps(table, indent=1, sort_keys=True))
    from polysae.replicate.report import plot_paired_f1, render_markdown

    atomic_write_text(out / "replicate.md", render_markdown(table))
    plot_paired_f1(table, out / "paired_f1.png")
    return ReplicateResult(out, table, cells)


__all__ = ["replicate", "run_cell"]
