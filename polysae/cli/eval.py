"""``polysae eval``: evaluate one or more SAEs side by side and write metrics.json, report.md and
plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from polysae.cli import CLIError

HELP = "evaluate SAEs (reconstruction, CE recovered, probing F1, W1, interactions, steering)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, metavar="RUN",
                   help="a checkpoint folder, or a run folder holding one per SAE (RUN/<name>/)")
    p.add_argument("--baseline", metavar="RUN2",
                   help="another checkpoint/run evaluated beside it (e.g. the vanilla SAE)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--model", help="model name or folder (default: the checkpoint's metadata)")
    p.add_argument("--hook", help="hook name (default: the checkpoint's metadata)")
    p.add_argument("--acts", metavar="DIR",
                   help="harvest folder; its held-out val split is used for reconstruction "
                        "(default: harvest a small held-out set live)")
    p.add_argument("--datasets", default="bbc,tweets,fortunes",
                   help="comma-separated probing datasets: bundled names, labelled .csv/.jsonl "
                        "files, or Hugging Face names owner/name[:split] (online); '' skips "
                        "probing (default: bbc,tweets,fortunes)")
    p.add_argument("--text-column", default="text",
                   help="text column/key of .csv/.jsonl and Hugging Face datasets (default text)")
    p.add_argument("--label-column", default="label",
                   help="label column/key of .csv/.jsonl and Hugging Face datasets "
                        "(default label)")
    p.add_argument("--train-per-class", type=int, default=24, help="probe train docs per class")
    p.add_argument("--test-per-class", type=int, default=12, help="probe test docs per class")
    p.add_argument("--probe-ctx", type=int, default=64,
                   help="tokens per probing text (SAEBench 128)")
    p.add_argument("--ks", default="1,2,5", help="probe sparsities (default 1,2,5)")
    p.add_argument("--tokens", type=int, default=8192, help="held-out tokens (default 8192)")
    p.add_argument("--ce-contexts", type=int, default=16,
                   help="contexts for CE/KL loss recovered (0 skips)")
    p.add_argument("--live-dataset", help="text for the live held-out set (default: training "
                                          "dataset from the metadata, else bbc)")
    p.add_argument("--pairs", type=int, default=10, help="top interaction pairs listed")
    p.add_argument("--no-interactions", action="store_true", help="skip interaction statistics")
    p.add_argument("--no-steering", action="store_true", help="skip steering")
    p.add_argument("--alphas", default="0.25,0.5,1,2",
                   help="steering strengths as multiples of the median hook norm")
    p.add_argument("--concepts", metavar="FILE.jsonl",
                   help="steering concepts, one JSON object per line with name, word_i, word_j, "
                        "target, prompt (default: the paper's five examples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="texts per model forward")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _checkpoints(run: Path, flag: str) -> list[tuple[str, Path]]:
    if (run / "config.json").is_file():
        return [(run.name, run)]
    if not run.is_dir():
        raise CLIError(f"{flag} {run}: no such folder")
    subs = sorted(p for p in run.iterdir() if (p / "config.json").is_file())
    if not subs:
        raise CLIError(f"{flag} {run}: neither a checkpoint (config.json + sae.safetensors) nor a "
                       "run folder holding checkpoints")
    return [(p.name, p) for p in subs]


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CLIError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not vals or min(vals) < 1:
        raise CLIError(f"{flag} {text!r}: expected positive integers")
    return vals


def main(args: argparse.Namespace) -> int:
    ckpts = _checkpoints(Path(args.sae), "--sae")
    if args.baseline:
        ckpts = _checkpoints(Path(args.baseline), "--baseline") + ckpts
    saes: dict[str, Path] = {}
    for name, path in ckpts:
        key = name
        n = 2
        while key in saes:
            key = f"{name}-{n}"
            n += 1
        saes[key] = path
    try:
        alphas = tuple(float(a) for a in args.alphas.split(",") if a.strip())
    except ValueError:
        raise CLIError(f"--alphas {args.alphas!r}: expected comma-separated numbers") from None
    for flag, v in (("--tokens", args.tokens), ("--train-per-class", args.train_per_class),
                    ("--test-per-class", args.test_per_class), ("--batch-size", args.batch_size)):
        if v < 1:
            raise CLIError(f"{flag} must be >= 1, got {v}")
    if args.probe_ctx < 2:
        raise CLIError(f"--probe-ctx must be >= 2, got {args.probe_ctx}")
    if args.acts and not (Path(args.acts) / "manifest.json").is_file():
        raise CLIError(f"--acts {args.acts}: not a harvest folder (no manifest.json)")
    datasets = tuple(d.strip() for d in args.datasets.split(",") if d.strip())
    if args.concepts:
        from polysae.steering import load_concepts

        try:
            load_concepts(args.concepts)   # fail before any model is loaded
        except (FileNotFoundError, ValueError) as e:
            raise CLIError(f"--concepts: {e}") from None

    from polysae.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(datasets=datasets, text_column=args.text_column,
                     label_column=args.label_column, probe_train_per_class=args.train_per_class,
                     probe_test_per_class=args.test_per_class, probe_ctx=args.probe_ctx,
                     ks=_ints(args.ks, "--ks"), seed=args.seed, recon_tokens=args.tokens,
                     live_dataset=args.live_dataset, ce_contexts=max(0, args.ce_contexts),
                     interactions=not args.no_interactions, n_pairs=args.pairs,
                     steering=not args.no_steering, alpha_scales=alphas,
                     concepts=args.concepts,
                     batch_size=args.batch_size, device=args.device,
                     progress=not args.no_progress)
    m = evaluate({k: str(v) for k, v in saes.items()}, model=args.model, hook=args.hook,
                 acts=args.acts, out=args.out, config=cfg)
    for name, s in m["saes"].items():
        rec = s.get("reconstruction", {})
        line = f"{name}: fvu {rec.get('fvu', float('nan')):.4f}  l0 {rec.get('l0', 0):.1f}"
        ce = rec.get("ce") or {}
        if ce.get("ce_loss_recovered") is not None:
            line += f"  CE recovered {ce['ce_loss_recovered']:.4f}"
        if "probing" in s:
            line += "  F1 " + " ".join(f"k{k}={v:.3f}" for k, v in s["probing"]["f1"].items())
            line += f"  W1 {s['probing'].get('w1', float('nan')):.4g}"
        print(line)
    print(f"wrote {Path(args.out) / 'report.md'} and metrics.json")
    return 0
