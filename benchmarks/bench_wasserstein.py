"""Batched torch W1 (polysae.wasserstein) vs the paper's per-latent scipy loop.

Workload: one balanced probe task with mean-pooled sparse-ish codes, n texts per side and F latents
(default 16,384, the paper's GPT-2 width), plus an unbalanced variant (searchsorted path). Both
methods run side by side in one process; the ratio is scipy time / torch time (best of `--repeat`).
Writes benchmarks/results/wasserstein_<device>.json and .md.

    .venv/bin/python benchmarks/bench_wasserstein.py [--latents 16384] [--n 1000] [--repeat 3]
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

from polysae.sae import atomic_write_text
from polysae.wasserstein import wasserstein_1d


def _best(fn, repeat):
    times = []
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latents", type=int, default=16384)
    ap.add_argument("--n", type=int, default=1000,
                    help="texts per side (SAEBench: 1000 test / 4000 train per class)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    cases = [("balanced", 250, 250), ("balanced", a.n, a.n), ("unbalanced", a.n, a.n * 3 // 2)]
    for case, nu, nv in cases:
        # Mean-pooled TopK codes: mostly small non-negative values with many exact zeros.
        u = torch.relu(torch.randn(nu, a.latents, generator=g) - 1.0)
        v = torch.relu(torch.randn(nv, a.latents, generator=g) - 0.9)
        un, vn = u.double().numpy(), v.double().numpy()
        t_scipy, ref = _best(lambda: np.array([wasserstein_distance(un[:, f], vn[:, f])
                                               for f in range(a.latents)]), 1)
        ud, vd = u.to(a.device), v.to(a.device)

        def run():
            w = wasserstein_1d(ud, vd)
            if ud.is_cuda:
                torch.cuda.synchronize()
            return w
        run()  # warm-up
        t_torch, got = _best(run, a.repeat)
        err = float(np.abs(got.cpu().numpy() - ref).max())
        rows.append({"case": case, "n_pos": nu, "n_neg": nv, "latents": a.latents,
                     "scipy_s": t_scipy, "torch_s": t_torch, "speedup": t_scipy / t_torch,
                     "max_abs_err": err})
        print(f"{case:10s} n={nu}/{nv} F={a.latents}: scipy {t_scipy:.3f}s  torch {t_torch:.4f}s  "
              f"speedup {t_scipy / t_torch:.0f}x  max|err| {err:.1e}")
    dev = (torch.cuda.get_device_name() if a.device.startswith("cuda")
           else f"cpu ({platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} threads)")
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": dev,
            "torch": torch.__version__, "scipy": scipy.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "repeat": a.repeat, "scipy_repeat": 1,
            "goal": "speedup >= 50x at 16k latents", "results": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if a.device.startswith("cuda") else "cpu"
    atomic_write_text(out / f"wasserstein_{tag}.json", json.dumps(meta, indent=2) + "\n")
    md = [f"# W1 per latent: batched torch vs scipy loop ({meta['date']})", "",
          f"Device: {dev}; torch {meta['torch']}, scipy {meta['scipy']}, numpy {meta['numpy']}, "
          f"Python {meta['python']}. Torch best of {a.repeat} after warm-up; scipy one pass.", "",
          "| case | n pos / neg | latents | scipy loop (s) | torch batched (s) | speedup "
          "| max abs err |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['case']} | {r['n_pos']} / {r['n_neg']} | {r['latents']} | {r['scipy_s']:.3f} | "
           f"{r['torch_s']:.4f} | {r['speedup']:.0f}x | {r['max_abs_err']:.1e} |" for r in rows]
    atomic_write_text(out / f"wasserstein_{tag}.md", "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    raise SystemExit(main())
