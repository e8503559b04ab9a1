"""End-to-end training throughput (tokens/s) through ``polysae.training.Trainer``: linear vs poly
decoders, with and without the orthogonality retraction every step (issue 5, item 9).

Variants, each its own SAE with the same width, k and batch, stepped side by side in one process
(round-robin: one step of each variant per round, the order rotated every round, so
machine-load drift and cache effects hit all alike):

- ``linear``            vanilla TopK SAE (W_dec);
- ``poly``              PolySAE, retraction every step (CholeskyQR2, the default);
- ``poly_no_retract``   PolySAE, ``retract_every=0`` (prices the retraction);
- ``poly_householder``  PolySAE, retraction every step with Householder QR (``retract_fast=False``);
- ``linear+poly``       one Trainer holding both SAEs on one stream (the comparison run's cost).

A step is ``Trainer.step`` in full: finiteness check, loss (encode, TopK, sparse decode, AuxK
path), backward, clipping, Adam, retraction, dead-latent counters. Timing: median over ``--steps``
rounds after ``--warmup``; CUDA is synchronised around each step. tokens/s = batch / median step.
The torch decode path is used on CPU (the Triton interpreter is not a speed measure); on CUDA
whatever ``polysae.kernels`` resolves.

    .venv/bin/python benchmarks/bench_train.py               # CPU, reduced size (~1-2 min)
    python benchmarks/bench_train.py --d-in 768 --d-sae 16384 --k 64 --batch 4096   # GPU

Writes benchmarks/results/train_<device>.json and .md (device, versions, date, load average).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import polysae.kernels as pk
import torch

import polysae
from polysae import SAE, SAEConfig
from polysae.fileio import atomic_write_text
from polysae.training import TrainConfig, Trainer

RESULTS = Path(__file__).resolve().parent / "results"


def variants(args) -> dict[str, tuple[dict[str, SAEConfig], TrainConfig]]:
    ranks = (min(args.d_in, args.d_sae), args.r2, args.r2)
    lin = SAEConfig(args.d_in, args.d_sae, k=args.k, decoder="linear")
    poly = SAEConfig(args.d_in, args.d_sae, k=args.k, decoder="poly", ranks=ranks)
    tc = dict(progress=False, dead_window=args.dead_window)
    return {
        "linear": ({"sae": lin}, TrainConfig(**tc)),
        "poly": ({"sae": poly}, TrainConfig(**tc)),
        "poly_no_retract": ({"sae": poly}, TrainConfig(retract_every=0, **tc)),
        "poly_householder": ({"sae": poly}, TrainConfig(retract_fast=False, **tc)),
        "linear+poly": ({"vanilla": lin, "poly": poly}, TrainConfig(**tc)),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cpu":
        pk.set_backend("torch")
    torch.manual_seed(0)
    trainers = {}
    for name, (cfgs, tc) in variants(args).items():
        saes = {n: SAE(c, device=device) for n, c in cfgs.items()}
        trainers[name] = Trainer(saes, tc)
    g = torch.Generator().manual_seed(1)
    # Heavy-tailed synthetic activations with a shared mean, roughly like a residual stream.
    batches = [(torch.randn(args.batch, args.d_in, generator=g) * 0.5 + 0.1).to(device)
               for _ in range(4)]
    times: dict[str, list[float]] = {n: [] for n in trainers}
    names = list(trainers)
    for r in range(args.warmup + args.steps):
        # rotate the order each round so no variant always runs right after the same one
        for name in names[r % len(names):] + names[:r % len(names)]:
            tr = trainers[name]
            x = batches[r % len(batches)]
            sync(device)
            t0 = time.perf_counter()
            tr.step(x)
            sync(device)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {"median_step_ms": med * 1e3, "tokens_per_s": args.batch / med,
                      "steps_timed": len(ts)}
    lin, poly = rows["linear"]["tokens_per_s"], rows["poly"]["tokens_per_s"]
    ratios = {
        "poly / linear (tokens/s)": poly / lin,
        "poly_no_retract / poly (tokens/s)": rows["poly_no_retract"]["tokens_per_s"] / poly,
        "poly_householder / poly (tokens/s)": rows["poly_householder"]["tokens_per_s"] / poly,
        "linear+poly step / (linear + poly steps)":
            rows["linear+poly"]["median_step_ms"] /
            (rows["linear"]["median_step_ms"] + rows["poly"]["median_step_ms"]),
    }
    return {"rows": rows, "ratios": ratios}


def environment(device: torch.device) -> dict:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.machine()} cpu")
    return {"device": name, "device_type": device.type, "torch": torch.__version__,
            "triton": tv, "polysae": polysae.__version__, "python": platform.python_version(),
            "decode_backend": pk.BACKEND, "threads": torch.get_num_threads(),
            "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def markdown(res: dict, args) -> str:
    env = res["env"]
    lines = [f"# Training throughput through Trainer.step ({env['date']})", "",
             f"Device: {env['device']} ({env['device_type']}); torch {env['torch']}, triton "
             f"{env['triton']}, polysae {env['polysae']}, Python {env['python']}, decode backend "
             f"{env['decode_backend']}, {env['threads']} threads, 1-min load average "
             f"{env['load_avg_1min']} at start.", "",
             f"Config: d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, ranks "
             f"({min(args.d_in, args.d_sae)}, {args.r2}, {args.r2}), batch {args.batch}; TopK, "
             f"Adam, clip 1.0; median of {args.steps} steps after {args.warmup} warm-up, "
             "variants interleaved step by step.", "",
             "| variant | median step (ms) | tokens/s |", "|---|---|---|"]
    for name, r in res["rows"].items():
        lines.append(f"| {name} | {r['median_step_ms']:.2f} | {r['tokens_per_s']:.0f} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    for k, v in res["ratios"].items():
        lines.append(f"| {k} | {v:.3f} |")
    if env["device_type"] == "cpu":
        lines += ["", "CPU run at reduced size on a shared machine: ratios are the result, "
                  "absolute numbers only describe this box. GPU figures: run this script on a "
                  "CUDA machine."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--d-in", type=int, default=768 if cuda else 256)
    p.add_argument("--d-sae", type=int, default=16384 if cuda else 4096)
    p.add_argument("--k", type=int, default=64 if cuda else 32)
    p.add_argument("--r2", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096 if cuda else 1024)
    p.add_argument("--steps", type=int, default=20 if cuda else 25)
    p.add_argument("--warmup", type=int, default=3 if cuda else 2)
    p.add_argument("--dead-window", type=int, default=1000)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device)
    res = run(args)
    res["env"], res["config"] = env, vars(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"train_{device.type}"
    atomic_write_text(out / f"{stem}.json", json.dumps(res, indent=2))
    md = markdown(res, args)
    atomic_write_text(out / f"{stem}.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
