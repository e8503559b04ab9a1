"""Retraction every step vs every n steps: a paired comparison of two ``polysae replicate`` runs.

Both runs use the same store, seeds and settings except ``--train.retract-every`` (1 in run A, n in
run B). Their vanilla SAEs are therefore identical (the linear decoder has nothing to retract;
checked here), and the PolySAEs of one seed saw the same data in the same order. For every
sparsifier and metric this reports the PolySAE mean of each run and the paired difference B − A
over seeds (95% t interval), with :func:`polysae.replicate.paired.paired_diff`.

    .venv/bin/python benchmarks/compare_retract_cadence.py RUN_A RUN_B --every 4 \\
        --out benchmarks/results/retract_cadence_cpu

Reads ``RUN/cells/<sparsifier>/seed<S>/report/metrics.json``; writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = [  # (key, label, path in metrics.json saes.<name>, lower is better)
    ("fvu", "FVU", ("reconstruction", "fvu"), True),
    ("mse_saebench", "MSE (SAEBench)", ("reconstruction", "mse_saebench"), True),
    ("ce_recovered", "CE rec.", ("reconstruction", "ce", "ce_loss_recovered"), False),
    ("l0", "L0", ("reconstruction", "l0"), None),
    ("dead_fraction", "dead", ("reconstruction", "dead_fraction"), True),
    ("f1_k1", "F1@1", ("probing", "f1", "1"), False),
    ("f1_k5", "F1@5", ("probing", "f1", "5"), False),
    ("w1", "W1 (paper)", ("probing", "w1"), None),
    ("w1_std", "W1/std", ("probing", "w1_std"), None),
]


def dig(d, path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def cells(run: Path) -> dict[tuple[str, int], dict]:
    out = {}
    for f in sorted(run.glob("cells/*/seed*/report/metrics.json")):
        sp, seed = f.parts[-4], int(f.parts[-3][len("seed"):])
        out[(sp, seed)] = json.loads(f.read_text())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_a", type=Path, help="replicate folder, retraction every step")
    ap.add_argument("run_b", type=Path, help="replicate folder, retraction every n steps")
    ap.add_argument("--every", type=int, required=True, help="run B's --train.retract-every")
    ap.add_argument("--out", type=Path, required=True, help="output path without suffix")
    ap.add_argument("--note", default="", help="a sentence on the run size for the markdown")
    args = ap.parse_args(argv)
    from polysae.replicate.paired import paired_diff

    A, B = cells(args.run_a), cells(args.run_b)
    keys = sorted(set(A) & set(B))
    if not keys:
        print("no (sparsifier, seed) cell finished in both runs", file=sys.stderr)
        return 1
    vanilla_equal = all(
        dig(A[k]["saes"]["vanilla"], m[2]) == dig(B[k]["saes"]["vanilla"], m[2])
        for k in keys for m in METRICS)
    doc = {"run_a": str(args.run_a), "run_b": str(args.run_b), "every": args.every,
           "cells": [list(k) for k in keys], "vanilla_identical": vanilla_equal,
           "sparsifiers": {}}
    lines = [f"# PolySAE retraction every step vs every {args.every} steps", "",
             f"Two `polysae replicate` runs, identical except `--train.retract-every` (1 vs "
             f"{args.every}); same store, seeds and data order. {args.note}".rstrip(), "",
             "Δ = (every " f"{args.every}) − (every step), paired by seed, mean with its 95% t "
             "interval; **bold** when the interval excludes 0. Vanilla SAEs identical in both "
             f"runs: {'yes' if vanilla_equal else 'NO'}.", ""]
    for sp in sorted({k[0] for k in keys}):
        seeds = sorted(k[1] for k in keys if k[0] == sp)
        lines += [f"## {sp} (seeds {', '.join(map(str, seeds))})", "",
                  f"| metric | PolySAE every step | PolySAE every {args.every} | Δ | "
                  "vanilla (both runs) |", "|---|---|---|---|---|"]
        block = {}
        for key, label, path, _lower in METRICS:
            a = [dig(A[(sp, s)]["saes"]["poly"], path) for s in seeds]
            b = [dig(B[(sp, s)]["saes"]["poly"], path) for s in seeds]
            v = [dig(A[(sp, s)]["saes"]["vanilla"], path) for s in seeds]
            if any(x is None for x in a + b):
                continue
            d = paired_diff(a, b)
            block[key] = {"every_1": a, f"every_{args.every}": b, "vanilla": v,
                          "diff": d.to_dict()}
            mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
            sig = d.t_low > 0 or d.t_high < 0
            cell = f"{d.mean:.4g} [{d.t_low:.3g}, {d.t_high:.3g}]"
            vv = f"{mean(v):.4g}" if all(x is not None for x in v) else "—"
            lines.append(f"| {label} | {mean(a):.4g} | {mean(b):.4g} | "
                         f"{'**' + cell + '**' if sig else cell} | {vv} |")
        doc["sparsifiers"][sp] = {"seeds": seeds, "metrics": block}
        lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
