"""SAEBench absorption of a finished ``polysae replicate`` run's SAEs, re-measured at other word counts.

A replicate run's absorption depends on how many first-letter words it used: too few leave
letters below SAEBench's ground-truth probe bar (F1 > 0.6), and SAEBench reports absorption only
with at least 20 counted letters. This re-evaluates absorption alone (both variants, ``linear``
and ``full``) for every cell's vanilla and PolySAE checkpoints, with one shared set of word
forwards and ground-truth probe (the SAEs differ, the model and words do not), and reports per
sparsifier the mean ± std per decoder and the paired poly − vanilla difference over seeds (95% t
interval, :func:`polysae.replicate.paired.paired_diff`).

    .venv/bin/python benchmarks/replicate_absorption.py runs/replicate-cpu/rep-v2 \\
        --out benchmarks/results/replicate_cpu_v2_absorption

Reads ``RUN/cells/<sparsifier>/seed<S>/train/{vanilla,poly}`` and ``RUN/replicate.json`` (model,
hook); writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import torch

KEYS = (("mean_absorption_fraction", "absorption fraction"),
        ("mean_full_absorption_rate", "full absorption"))
VARIANTS = ("linear", "full")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished polysae replicate folder")
    ap.add_argument("--out", type=Path, required=True, help="output path without suffix")
    ap.add_argument("--train-words", type=int, default=None,
                    help="absorption train words (default: EvalConfig's)")
    ap.add_argument("--test-words", type=int, default=None,
                    help="absorption test words (default: EvalConfig's)")
    args = ap.parse_args(argv)

    from polysae import __version__
    from polysae.data.models import load_model
    from polysae.evaluation import EvalConfig, evaluate, jsonable
    from polysae.fileio import atomic_write_text
    from polysae.replicate.paired import paired_diff

    rep = json.loads((args.run / "replicate.json").read_text())
    base = EvalConfig()
    cfg = EvalConfig(steering=False, ce_contexts=0, interactions=False, tpp=False, datasets=(),
                     recon_tokens=256, progress=False, device="cpu",
                     absorption_train_words=args.train_words or base.absorption_train_words,
                     absorption_test_words=args.test_words or base.absorption_test_words)
    lm = load_model(rep["model"])
    cells = sorted(args.run.glob("cells/*/seed*/train"))
    if not cells:
        raise SystemExit(f"{args.run}: no cells/<sparsifier>/seed<S>/train folders")
    t0 = time.perf_counter()
    per: dict[str, dict[int, dict]] = {}
    setup = None
    for train in cells:
        sp, seed = train.parts[-3], int(train.parts[-2][len("seed"):])
        m = evaluate({d: train / d for d in ("vanilla", "poly")}, model=lm, hook=rep["hook"],
                     config=cfg)
        setup = setup or m["absorption_setup"]
        per.setdefault(sp, {})[seed] = {d: m["saes"][d]["absorption"] for d in ("vanilla", "poly")}
        print(f"{sp} seed {seed}: done ({time.perf_counter() - t0:.0f} s)", flush=True)

    table: dict[str, dict] = {}
    for sp, seeds in per.items():
        order = sorted(seeds)
        rows = {}
        for v in VARIANTS:
            for key, _ in KEYS:
                val = {d: [seeds[s][d].get(v, {}).get(key) for s in order]
                       for d in ("vanilla", "poly")}
                pd = paired_diff(val["vanilla"], val["poly"])._asdict()
                pd = {k: (x._asdict() if hasattr(x, "_asdict") else x) for k, x in pd.items()}
                rows[f"{key}:{v}"] = {"values": val, "diff": jsonable(pd)}
        letters = {d: [seeds[s][d]["linear"].get("n_letters") for s in order]
                   for d in ("vanilla", "poly")}
        valid = all(seeds[s][d][v].get("valid") for s in order for d in ("vanilla", "poly")
                    for v in VARIANTS)
        table[sp] = {"seeds": order, "metrics": rows, "letters_counted": letters, "valid": valid}
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "polysae_version": __version__, "torch_version": torch.__version__,
           "run": str(args.run), "model": rep["model"], "hook": rep["hook"],
           "train_words": setup["train_words"], "test_words": setup["test_words"],
           "icl_examples": setup["icl_examples"], "probe_f1": setup["probe_f1"],
           "seconds": round(time.perf_counter() - t0, 1), "sparsifiers": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(res, indent=1) + "\n")

    def ms(xs):
        xs = [x for x in xs if x is not None]
        t = torch.tensor(xs, dtype=torch.float64)
        return f"{t.mean():.4f} ± {t.std():.4f}" if len(xs) > 1 else "–"

    def diff(d):
        s = f"{d['mean']:+.4f} [{d['t_low']:+.4f}, {d['t_high']:+.4f}]"
        return f"**{s}**" if d["t_low"] > 0 or d["t_high"] < 0 else s

    n_ok = sum(f > 0.6 for f in setup["probe_f1"].values())
    md = [f"# SAEBench absorption of `{args.run}` re-measured ({res['date']})", "",
          f"polysae {__version__}, torch {torch.__version__}; model `{rep['model']}`, hook "
          f"`{rep['hook']}`; {res['train_words']} train / {res['test_words']} test words, "
          f"{res['icl_examples']} in-context examples; {n_ok} letters have a ground-truth probe "
          f"F1 > 0.6 (SAEBench reports absorption only with >= 20). Only absorption is "
          f"re-measured: the checkpoints are the run's own; {res['seconds']} s in all.", "",
          "Cells: mean ± std over seeds; Δ: paired poly − vanilla over seeds with its 95% t "
          "interval (**bold** when it excludes 0). Lower absorption is better.", "",
          "| sparsifier | seeds | letters counted (vanilla / poly) | metric | vanilla | poly | Δ |",
          "|---|---|---|---|---|---|---|"]
    for sp, t in table.items():
        lc = " / ".join(f"{min(x for x in t['letters_counted'][d] if x is not None)}–"
                        f"{max(x for x in t['letters_counted'][d] if x is not None)}"
                        for d in ("vanilla", "poly"))
        for v in VARIANTS:
            for key, label in KEYS:
                r = t["metrics"][f"{key}:{v}"]
                md.append(f"| {sp} | {len(t['seeds'])} | {lc} | {label} ({v}) | "
                          f"{ms(r['values']['vanilla'])} | {ms(r['values']['poly'])} | "
                          f"{diff(r['diff'])} |")
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
