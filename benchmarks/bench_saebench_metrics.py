"""Cost of SAEBench absorption and TPP (both variants) in ``polysae eval`` at its default sizes.

Runs :func:`polysae.evaluate` on the bundled SmolLM2 with the given SAEs (default: two random
4,096-latent k=32 SAEs at ``blocks.9.hook_resid_post``, vanilla and poly: the cost does not depend
on training) with everything but probing, absorption and TPP switched off, and reports

- per SAE: absorption and TPP seconds (both variants together; the ``<= 60 s`` budget);
- shared by all SAEs: the absorption word forwards + ground-truth probe, the TPP probes;
- the load average before and after (2 shared cores: other jobs inflate every figure).

Writes benchmarks/results/saebench_metrics_<device>.json and .md.

    .venv/bin/python benchmarks/bench_saebench_metrics.py [--sae RUN/vanilla --sae RUN/poly]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import torch

from polysae import SAE, SAEConfig
from polysae.evaluation import EvalConfig, evaluate
from polysae.fileio import atomic_write_text


def _random_saes(d_sae: int, k: int) -> dict[str, SAE]:
    torch.manual_seed(0)
    return {dec: SAE(SAEConfig(d_in=576, d_sae=d_sae, k=k, decoder=d)).eval()
            for dec, d in (("vanilla", "linear"), ("poly", "poly"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sae", action="append", help="checkpoint folder (repeatable)")
    ap.add_argument("--hook", default="blocks.9.hook_resid_post")
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--out", default=None, help="results stem (default saebench_metrics_<dev>)")
    args = ap.parse_args()
    saes = ({Path(p).name: p for p in args.sae} if args.sae
            else _random_saes(args.d_sae, args.k))
    d = EvalConfig()
    cfg = EvalConfig(steering=False, ce_contexts=0, interactions=False, recon_tokens=512,
                     progress=False, device="cpu")
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    m = evaluate(saes, model="smollm2-135m", hook=args.hook, config=cfg)
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()
    per = {}
    for name, s in m["saes"].items():
        ab_, tp = s.get("absorption", {}), s.get("tpp", {})
        per[name] = {
            "decoder": s["info"]["decoder"], "d_sae": s["info"]["d_sae"], "k": s["info"]["k"],
            "absorption_s": ab_.get("seconds"), "tpp_s": tp.get("seconds"),
            "absorption_linear": (ab_.get("linear") or {}).get("mean_absorption_fraction"),
            "absorption_full": (ab_.get("full") or {}).get("mean_absorption_fraction"),
            "letters_counted": (ab_.get("linear") or {}).get("n_letters"),
            "tpp20_linear": (tp.get("linear") or {}).get("total", {}).get("20"),
            "tpp20_full": (tp.get("full") or {}).get("total", {}).get("20")}
    res = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "polysae_version": m["polysae_version"], "torch_version": torch.__version__,
        "python": platform.python_version(), "device": "cpu",
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "loadavg_before": load0,
        "loadavg_after": load1, "model": "smollm2-135m", "hook": args.hook,
        "sizes": {"absorption_train_words": d.absorption_train_words,
                  "absorption_test_words": d.absorption_test_words,
                  "absorption_icl": d.absorption_icl, "tpp_n_values": list(d.tpp_n_values),
                  "datasets": list(d.datasets), "probe_train_per_class": d.probe_train_per_class,
                  "probe_test_per_class": d.probe_test_per_class, "probe_ctx": d.probe_ctx},
        "absorption_shared_s": (m.get("absorption_setup") or {}).get("seconds_shared"),
        "tpp_shared_s": (m.get("tpp_setup") or {}).get("seconds_shared"),
        "stages_s": m["timings_s"], "wall_s": round(wall, 1), "per_sae": per,
        "saes": (list(args.sae) if args.sae
                 else f"random, seed 0, d_sae {args.d_sae}, k {args.k} (cost does not depend "
                      "on training)")}
    stem = args.out or "saebench_metrics_cpu"
    out = Path(__file__).resolve().parent / "results"
    atomic_write_text(out / f"{stem}.json", json.dumps(res, indent=1) + "\n")
    rows = [f"| {n} | {p['decoder']} | {p['d_sae']} | {p['k']} | {p['absorption_s']} | "
            f"{p['tpp_s']} | {p['letters_counted']} | {_f(p['absorption_linear'])} / "
            f"{_f(p['absorption_full'])} | {_f(p['tpp20_linear'])} / {_f(p['tpp20_full'])} |"
            for n, p in per.items()]
    md = [f"# SAEBench absorption and TPP in `polysae eval` ({res['date']})", "",
          f"polysae {res['polysae_version']}, torch {res['torch_version']}, Python "
          f"{res['python']}, CPU ({res['cores']} cores, {res['torch_threads']} torch threads), "
          f"load average {load0[0]:.1f} before / {load1[0]:.1f} after. Model "
          f"`{res['model']}`, hook `{res['hook']}`; default sizes {res['sizes']}. SAEs: "
          f"{res['saes']}.", "",
          "| SAE | decoder | d_sae | k | absorption s (both variants) | TPP s (both variants) | "
          "letters counted | absorption linear / full | TPP@20 linear / full |",
          "|---|---|---|---|---|---|---|---|---|", *rows, "",
          f"Shared by all SAEs: absorption words (model forwards, ground-truth probe) "
          f"{res['absorption_shared_s']} s; TPP probes {res['tpp_shared_s']} s. Stages: "
          f"{res['stages_s']}. Wall {res['wall_s']} s (model load included).", ""]
    atomic_write_text(out / f"{stem}.md", "\n".join(md))
    print("\n".join(md))


def _f(v) -> str:
    return "–" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    main()
