"""Batched W1 (polysae.evaluation.wasserstein) vs the paper's per-latent scipy loop.

Workloads: one probe task's pooled codes, n texts per side and F latents (default 16,384, the
paper's GPT-2 width):

- ``uniform``: every latent fires with the same probability (relu(randn - 1), ~16 % non-zero);
  balanced 250/250, 1000/1000 and 4000/4000 (SAEBench's 4000 train texts per class), and
  unbalanced 1000/1500 (restricted quantile grid);
- ``mixed``: per-latent firing probability log-uniform in [1e-3, 1], as in real SAE codes where a
  few dense latents sit in every block (those are sorted whole);
- ``latent-major``: the 1000/1000 uniform data stored latent-major (``X.T`` of a contiguous
  [F, n]), which skips the transposing copy; scipy gets the same memory (contiguous columns).

Every repeat times the scipy loop (one pass, seconds long), polysae on all threads and on one
thread (best of ``--inner`` consecutive calls each) and a plain batched baseline (numpy sort of
whole rows + mean |difference|, what a straightforward vectorised port does) back to back, so all
see the same machine state; the figures are the minima over ``--repeat`` and the speed-up is the
ratio of the minima (the median of the per-repeat ratios is printed beside it). Writes
benchmarks/results/wasserstein_<device>.json and .md.

    .venv/bin/python benchmarks/bench_wasserstein.py [--latents 16384] [--repeat 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import scipy
import torch
from scipy.stats import wasserstein_distance

from polysae.evaluation.wasserstein import wasserstein_1d
from polysae.fileio import atomic_write_text


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _scipy_loop(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.array([wasserstein_distance(u[:, f], v[:, f]) for f in range(u.shape[1])])


def _dense_batched(u: np.ndarray, v: np.ndarray) -> np.ndarray | None:
    """The straightforward vectorised port: sort every latent's whole sample, mean |diff|."""
    if u.shape[0] != v.shape[0]:
        return None
    a, b = np.sort(u.T, axis=1), np.sort(v.T, axis=1)
    return np.abs(np.subtract(a, b, dtype=np.float64)).mean(axis=1)


def _codes(kind: str, n: int, f: int, shift: float, g: torch.Generator) -> torch.Tensor:
    if kind == "mixed":
        dens = torch.exp(torch.empty(f).uniform_(float(np.log(1e-3)), 0.0, generator=g))
        on = torch.rand(n, f, generator=g) < dens
        return torch.where(on, (torch.randn(n, f, generator=g) + shift).abs(), torch.zeros(()))
    return torch.relu(torch.randn(n, f, generator=g) - 1.0 + shift)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latents", type=int, default=16384)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--inner", type=int, default=5,
                    help="polysae calls per repeat (best taken); scipy runs once per repeat")
    ap.add_argument("--quick", action="store_true", help="skip the 4000/4000 case")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    cases = [("uniform", 250, 250, False), ("uniform", 1000, 1000, False),
             ("uniform", 1000, 1500, False), ("uniform", 4000, 4000, False),
             ("mixed", 250, 250, False), ("mixed", 1000, 1000, False),
             ("uniform", 1000, 1000, True)]
    if a.quick:
        cases = [c for c in cases if c[1] <= 1000]
    rows = []
    for kind, nu, nv, lm in cases:
        u = _codes(kind, nu, a.latents, 0.0, g)
        v = _codes(kind, nv, a.latents, 0.1, g)
        if lm:   # same values, stored latent-major
            u, v = u.T.contiguous().T, v.T.contiguous().T
        un, vn = u.double().numpy(), v.double().numpy()
        if lm:
            un, vn = un.T.copy().T, vn.T.copy().T
        ud, vd = u.to(a.device), v.to(a.device)

        def ours():
            w = wasserstein_1d(ud, vd)
            if ud.is_cuda:
                torch.cuda.synchronize()
            return w

        def ours_1t():
            torch.set_num_threads(1)
            try:
                return wasserstein_1d(ud, vd)
            finally:
                torch.set_num_threads(threads)

        ours()  # warm-up
        t = {"scipy": [], "polysae": [], "polysae_1t": [], "dense": []}
        ref = got = None
        for _ in range(a.repeat):
            dt_, ref = _timed(lambda: _scipy_loop(un, vn))
            t["scipy"].append(dt_)
            runs = [_timed(ours) for _ in range(a.inner)]
            got = runs[-1][1]
            t["polysae"].append(min(r[0] for r in runs))
            if a.device == "cpu":
                t["polysae_1t"].append(min(_timed(ours_1t)[0] for _ in range(a.inner)))
                dt_, dense = _timed(lambda: _dense_batched(u.numpy(), v.numpy()))
                if dense is not None:
                    t["dense"].append(dt_)
        err = float(np.abs(got.cpu().numpy() - ref).max())
        best = {k: min(x) if x else None for k, x in t.items()}
        ratios = [s / p for s, p in zip(t["scipy"], t["polysae"])]
        row = {"case": kind + (" latent-major" if lm else ""), "n_pos": nu, "n_neg": nv,
               "latents": a.latents, "density": float((u > 0).float().mean()),
               "scipy_s": best["scipy"], "polysae_s": best["polysae"],
               "polysae_1thread_s": best["polysae_1t"], "dense_batched_s": best["dense"],
               "speedup": best["scipy"] / best["polysae"],
               "speedup_median_of_repeats": float(np.median(ratios)),
               "speedup_1thread": (best["scipy"] / best["polysae_1t"]
                                   if best["polysae_1t"] else None),
               "max_abs_err": err}
        rows.append(row)
        print(f"{row['case']:21s} n={nu}/{nv} F={a.latents}: scipy {best['scipy']:.3f}s  "
              f"polysae {best['polysae'] * 1e3:.1f}ms ({row['speedup']:.0f}x, median "
              f"{row['speedup_median_of_repeats']:.0f}x)"
              + (f"  1 thread {best['polysae_1t'] * 1e3:.1f}ms ({row['speedup_1thread']:.0f}x)"
                 if best["polysae_1t"] else "")
              + (f"  dense batched {best['dense'] * 1e3:.1f}ms" if best["dense"] else "")
              + f"  max|err| {err:.1e}", flush=True)
    dev = (torch.cuda.get_device_name() if a.device.startswith("cuda")
           else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                f"{threads} threads)")
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": dev,
            "torch": torch.__version__, "scipy": scipy.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "repeat": a.repeat, "inner": a.inner,
            "threads": threads,
            "goal": "speedup >= 50x at 16k latents", "results": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if a.device.startswith("cuda") else "cpu"
    atomic_write_text(out / f"wasserstein_{tag}.json", json.dumps(meta, indent=2) + "\n")

    def ms(x):
        return "-" if x is None else f"{x * 1e3:.1f}"

    md = [f"# W1 per latent: polysae batched vs the scipy loop ({meta['date']})", "",
          f"Device: {dev}; torch {meta['torch']}, scipy {meta['scipy']}, numpy {meta['numpy']}, "
          f"Python {meta['python']}. Minimum of {a.repeat} back-to-back repeats (scipy: one pass "
          f"each; polysae: best of {a.inner} calls each); speed-up = scipy / polysae (all "
          "threads), median of per-repeat ratios in brackets. "
          "Dense batched = numpy sort of whole rows + mean |diff| (balanced cases only).", "",
          "| case | n pos / neg | latents | non-zero | scipy loop (s) | polysae (ms) | speed-up "
          "| 1 thread (ms) | 1-thread speed-up | dense batched (ms) | max abs err |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['case']} | {r['n_pos']} / {r['n_neg']} | {r['latents']} | "
           f"{r['density']:.0%} | {r['scipy_s']:.3f} | {ms(r['polysae_s'])} | "
           f"{r['speedup']:.0f}x ({r['speedup_median_of_repeats']:.0f}x) | "
           f"{ms(r['polysae_1thread_s'])} | "
           + (f"{r['speedup_1thread']:.0f}x" if r['speedup_1thread'] else "-")
           + f" | {ms(r['dense_batched_s'])} | {r['max_abs_err']:.1e} |" for r in rows]
    atomic_write_text(out / f"wasserstein_{tag}.md", "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
