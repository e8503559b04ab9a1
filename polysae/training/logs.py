"""A run's logs: ``run.json``, one ``metrics.jsonl`` per SAE, and optional wandb/TensorBoard."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polysae.fileio import atomic_write_text
from polysae.sae import SAE, LossOutput
from polysae.training import distributed as pdist
from polysae.training.config import TrainConfig

METRICS_FILE = "metrics.jsonl"
"""Per-SAE log: one JSON object per logged step."""
RUN_FILE = "run.json"
"""Train config + SAE names of a run folder (lets ``--resume`` rebuild the run)."""
RUN_FORMAT = "polysae-train-run"


@torch.no_grad()
def sae_record(sae: SAE, lo: LossOutput, batch_var: Tensor) -> dict[str, Any]:
    """One SAE's numbers of a logged step: loss terms, FVU (``mse / batch_var``), L0 (averaged
    over ranks), the lambdas and the orthonormality error ``||W^T W - I||_F`` of a poly decoder,
    W = [U | U2 | U3] (every column the retraction keeps orthonormal)."""
    codes = lo.codes
    vals = torch.stack([lo.loss.float(), lo.mse.float(), lo.aux.float(),
                        batch_var.to(lo.mse.device), (codes.values > 0).sum(-1).float().mean()])
    pdist.all_reduce(vals, "mean")
    loss, mse, aux, var, l0 = (float(v) for v in vals)
    dec = sae.decoder
    orth = None
    if sae.cfg.decoder == "poly":
        orth = dec.orthogonality_error()
    lam = {n: float(getattr(dec, n)) if getattr(dec, n, None) is not None else None
           for n in ("lambda2", "lambda3")}
    return {"loss": loss, "mse": mse, "aux": aux, "fvu": mse / var if var > 0 else None,
            "l0": l0, **lam, "orth_err": orth}


def write_run_file(out_dir: Path, doc: dict) -> None:
    """Write ``out_dir/run.json`` (``doc`` gets the format tag) atomically."""
    atomic_write_text(out_dir / RUN_FILE, json.dumps({"format": RUN_FORMAT, **doc}, indent=2))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (and a torn last line)."""
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def make_loggers(cfg: TrainConfig, out_dir: Path | None) -> list[Callable]:
    """The optional metric loggers named in ``cfg.log_to``: callables ``fn(sae_name, record)`` with
    a ``close()``; a logger whose package is missing is skipped with a warning."""
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
