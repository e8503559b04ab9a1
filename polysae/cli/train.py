"""``polysae train``: train one or several SAEs on harvested activations (one read of the data).

Examples::

    polysae train --acts acts --hook blocks.15.hook_resid_post --decoders linear poly \\
        --d-sae 4096 --k 64 --tokens 10_000_000 --out runs/l15      # vanilla + PolySAE side by side
    polysae train --out runs/l15 --resume                          # continue after a crash
    torchrun --nproc_per_node 8 -m polysae train --acts acts ...   # data-parallel (nccl on GPUs)

Under torchrun each rank trains a DistributedDataParallel replica on its 1/N of every global
batch (``--batch-size`` is global), rank 0 alone writes the run folder, and ``--resume`` restores
every rank from rank 0's checkpoint (docs/distributed.md, multi-node flags included).

Each SAE lands in ``RUN/<name>`` (``vanilla`` for a linear decoder, ``poly`` for PolySAE, with a
``-k<k>`` suffix when several ``--k`` values are swept), a loadable checkpoint plus
``trainer_state.pt`` and ``metrics.jsonl``. ``RUN/run.json`` keeps the settings for ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from polysae.cli import CLIError

HELP = "train SAEs (vanilla and/or PolySAE) on harvested activations, with exact resume"


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--acts", help="harvested activations folder (polysae harvest --out)")
    d.add_argument("--hook", help="hook to train on (default: the folder's only hook)")
    d.add_argument("--split", default="train", choices=("train", "all"),
                   help="shards to train on (default train: keeps the val shards held out)")
    d.add_argument("--batch-size", type=int, default=4096,
                   help="global batch in activation rows (split over ranks); default 4096")
    m = p.add_argument_group("SAE")
    m.add_argument("--decoder", choices=("linear", "poly"), default="poly",
                   help="decoder of a single SAE (default poly)")
    m.add_argument("--decoders", nargs="+", choices=("linear", "poly"),
                   help="train one SAE per decoder from the same stream, e.g. --decoders linear "
                        "poly (overrides --decoder)")
    m.add_argument("--sparsifier", default="topk",
                   choices=("topk", "batchtopk", "jumprelu", "relu", "matryoshka"))
    m.add_argument("--d-sae", type=int, help="latents (default 8 x d_in)")
    m.add_argument("--k", type=int, nargs="+", default=[64],
                   help="active latents per token; several values sweep k (default 64)")
    m.add_argument("--ranks", type=int, nargs=3, metavar=("R1", "R2", "R3"),
                   help="PolySAE ranks (default d_in, 64, 64 clipped)")
    m.add_argument("--order", type=int, default=3, choices=(1, 2, 3))
    t = p.add_argument_group("training")
    t.add_argument("--tokens", type=int, help="activation rows to train on (default: one pass)")
    t.add_argument("--steps", type=int, help="optimiser steps (overrides --tokens)")
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--schedule", default="constant", choices=("constant", "cosine", "linear"))
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--dead-window", type=int, default=1000,
                   help="steps without firing after which a latent feeds AuxK (default 1000)")
    t.add_argument("--retract-every", type=int, default=1,
                   help="retraction cadence in steps (1 = every step, the paper; 0 = never)")
    t.add_argument("--normalize", action="store_true",
                   help="train on x / s (s estimated once), folded into the saved weights")
    t.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the SAE step")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, help="run folder (one sub-folder per SAE)")
    o.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (same settings)")
    o.add_argument("--checkpoint-every", type=int, default=1000)
    o.add_argument("--log-every", type=int, default=10)
    o.add_argument("--log-to", nargs="*", default=[], choices=("wandb", "tensorboard"))
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def _names(decoders: list[str], ks: list[int]) -> list[tuple[str, str, int]]:
    out = []
    for dec in decoders:
        for k in ks:
            name = "vanilla" if dec == "linear" else "poly"
            out.append((name + (f"-k{k}" if len(ks) > 1 else ""), dec, k))
    return out


def main(args: argparse.Namespace) -> int:
    import torch

    from polysae import distributed as pdist

    out = Path(args.out)
    info = pdist.init_from_env()
    try:
        return _run(args, info, out)
    finally:
        if info.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _read_run(run_file: Path) -> tuple[dict | None, str | None]:
    if not run_file.is_file():
        return None, f"--resume: {run_file} not found (is --out a polysae training run?)"
    try:
        run = json.loads(run_file.read_text())
        if not isinstance(run, dict) or run.get("format") != "polysae-train-run":
            raise ValueError("not a polysae-train-run document")
        missing = [k for k in ("train_config", "saes") if not isinstance(run.get(k), dict)]
        if missing:
            raise ValueError(f"missing {missing}")
    except ValueError as e:
        return None, f"--resume: {run_file} is not a polysae run file ({e})"
    return run, None


def _run(args: argparse.Namespace, info, out: Path) -> int:
    import torch

    from polysae import distributed as pdist
    from polysae.config import SAEConfig
    from polysae.sae import SAE
    from polysae.store import ActivationStore
    from polysae.train import RUN_FILE, TrainConfig, Trainer, TrainingDiverged

    if args.resume:
        # rank 0's run folder is the one that counts (the others may not share its disk)
        run, err = pdist.broadcast_object(_read_run(out / RUN_FILE) if info.rank == 0
                                          else None)
        if err is not None:
            raise CLIError(err)
        meta = run.get("metadata", {})
        acts, hook = args.acts or meta.get("acts"), meta.get("hook")
        tcfg = TrainConfig.from_dict(run["train_config"])
        cfgs = {n: SAEConfig.from_dict(c) for n, c in run["saes"].items()}
        batch_size, split = meta.get("batch_size", args.batch_size), meta.get("split", "train")
    else:
        if not args.acts:
            raise CLIError("--acts is required (or --resume an existing --out)")
        acts, hook, split, batch_size = args.acts, args.hook, args.split, args.batch_size
        tcfg = _train_config(args)
        cfgs = None
    if acts is None or not Path(acts).is_dir():
        raise CLIError(f"--acts: {acts} is not a folder of harvested activations")
    if batch_size < 1:
        raise CLIError(f"--batch-size must be positive, got {batch_size}")
    if batch_size % info.world_size:
        raise CLIError(f"--batch-size {batch_size} is not divisible by the {info.world_size} "
                       "ranks")
    device = torch.device(args.device) if args.device else info.device
    if info.world_size > 1 and device.type == "cuda" and device.index is None:
        device = info.device  # --device cuda under torchrun: this rank's cuda:LOCAL_RANK
    store = ActivationStore(acts, hook, batch_size=batch_size // info.world_size, split=split,
                            seed=tcfg.seed, device=device, rank=info.rank,
                            world_size=info.world_size, drop_last=True)
    if cfgs is None:
        cfgs = _sae_configs(args, store.d_in)
    torch.manual_seed(tcfg.seed)
    saes = {n: SAE(c, device=device) for n, c in cfgs.items()}
    meta = {"model": store.manifest.get("model"), "hook": store.hook, "acts": str(acts),
            "batch_size": batch_size, "split": split}
    trainer = Trainer(saes, tcfg, out, metadata=meta)
    try:
        res = trainer.fit(store, resume=args.resume)
    except TrainingDiverged as e:
        who = f" (rank {info.rank} of {info.world_size})" if info.world_size > 1 else ""
        print(f"polysae train: error: training diverged{who}: {e}", file=sys.stderr)
        return 1
    except FileExistsError as e:
        raise CLIError(str(e)) from e
    if info.rank == 0:
        for name in res.saes:
            print(f"{out / name}: {res.steps} steps, {res.tokens} tokens")
    pdist.barrier()
    return 0


def _train_config(args: argparse.Namespace):
    from polysae.train import TrainConfig

    try:
        return TrainConfig(lr=args.lr, schedule=args.schedule, warmup_steps=args.warmup_steps,
                           tokens=args.tokens, steps=args.steps, dead_window=args.dead_window,
                           retract_every=args.retract_every, normalize=args.normalize,
                           bf16=args.bf16, seed=args.seed, checkpoint_every=args.checkpoint_every,
                           log_every=args.log_every, progress=not args.no_progress,
                           log_to=tuple(args.log_to))
    except ValueError as e:
        raise CLIError(_as_flag(e, "TrainConfig")) from e


def _sae_configs(args: argparse.Namespace, d_in: int):
    from polysae.config import SAEConfig

    d_sae = args.d_sae or 8 * d_in
    out = {}
    for name, dec, k in _names(args.decoders or [args.decoder], args.k):
        try:
            out[name] = SAEConfig(d_in=d_in, d_sae=d_sae, k=k, sparsifier=args.sparsifier,
                                  decoder=dec, ranks=tuple(args.ranks) if args.ranks else None,
                                  order=args.order)
        except ValueError as e:
            raise CLIError(f"{name}: {_as_flag(e, 'SAEConfig')}") from e
    return out


def _as_flag(e: Exception, cls: str) -> str:
    """``SAEConfig.d_sae: ...`` -> ``--d-sae: ...`` (the flag the user typed)."""
    import re

    return re.sub(rf"{cls}\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e))
