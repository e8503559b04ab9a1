"""``polysae run``: the whole job in one command (harvest -> train vanilla + PolySAE -> evaluate
-> report + feature browser). With no flags it runs offline on a CPU on the bundled SmolLM2-135M
and BBC News corpus; every size scales up by flag. Re-running the same command resumes.

Examples::

    polysae run                                        # defaults, ~5-10 min on 2 CPU cores
    polysae run --model gpt2 --hooks blocks.8.hook_resid_post --tokens 50_000_000 \\
        --d-sae 16384 --k 64 --ranks 768 64 64 --batch-size 4096 --device cuda --out runs/gpt2
"""

from __future__ import annotations

import argparse
import dataclasses

HELP = "the whole job: harvest, train a vanilla and a PolySAE side by side, evaluate, report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from polysae.pipeline import RunConfig

    d = RunConfig()
    p.add_argument("--out", default=d.out, help=f"run folder (default {d.out})")
    p.add_argument("--model", default=d.model, help=f"language model (default {d.model})")
    p.add_argument("--hooks", nargs="+", default=d.hooks,
                   help=f"hook points to harvest; SAEs train on the first (default {d.hooks[0]})")
    p.add_argument("--dataset", default=d.dataset, help=f"text to harvest (default {d.dataset})")
    p.add_argument("--tokens", type=int, default=d.tokens,
                   help=f"tokens to harvest (default {d.tokens})")
    p.add_argument("--ctx", type=int, default=d.ctx, help=f"context length (default {d.ctx})")
    p.add_argument("--model-dtype", default=d.model_dtype,
                   choices=("float32", "bfloat16", "float16"))
    p.add_argument("--store-dtype", default=d.store_dtype,
                   choices=("float32", "bfloat16", "float16"))
    p.add_argument("--shard-size", type=int, default=d.shard_size, help="rows per shard")
    p.add_argument("--d-sae", type=int, default=d.d_sae, help=f"latents (default {d.d_sae})")
    p.add_argument("--k", type=int, default=d.k, help=f"active latents per token (default {d.k})")
    p.add_argument("--sparsifier", default=d.sparsifier,
                   choices=("topk", "batchtopk", "jumprelu", "relu", "matryoshka"))
    p.add_argument("--ranks", type=int, nargs=3, metavar=("R1", "R2", "R3"),
                   help="PolySAE ranks (default d_in 64 64)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch (rows)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--train-tokens", type=int, help="rows to train on (default: --epochs passes)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"passes (default {d.epochs})")
    p.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="train on raw activations (the paper's setting)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--eval-recon-tokens", type=int, default=d.eval_recon_tokens)
    p.add_argument("--eval-probe-train-per-class", type=int, default=d.eval_probe_train_per_class)
    p.add_argument("--eval-probe-test-per-class", type=int, default=d.eval_probe_test_per_class)
    p.add_argument("--eval-ce-contexts", type=int, default=d.eval_ce_contexts)
    p.add_argument("--no-browser", action="store_true", help="skip the feature browser")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    from polysae.pipeline import RunConfig, run

    names = {f.name for f in dataclasses.fields(RunConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.ranks:
        kw["ranks"] = tuple(args.ranks)
    cfg = RunConfig(**kw, browser=not args.no_browser, progress=not args.no_progress)
    res = run(cfg)
    m = res.metrics
    print(f"\npolysae run: done in {sum(res.seconds.values()):.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in res.seconds.items())})")
    print(f"  report:  {res.out / 'report' / 'report.md'}")
    if cfg.browser:
        print(f"  browser: {res.out / 'browser' / 'index.html'}")
    summary = m.get("summary") if isinstance(m, dict) else None
    if summary:
        print(f"  summary: {summary}")
    return 0
