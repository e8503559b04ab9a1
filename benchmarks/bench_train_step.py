"""One PolySAE training step broken down by stage, for each decode path (issue 4; docs/kernels.md).

Stages, in step order: encode (pre-activation GEMM), top-k, decode, loss, backward, clip
(``clip_grad_norm_``), Adam, retraction (``SAE.retract_()``, CholeskyQR2 with QR fallback). The
reference Householder-QR retraction (``retract_(fast=False)``) is timed once per config as an extra
line, outside the step total. Decode paths, run side by side on the same SAE weights and batch:

- ``dense_ref``     codes densified to [B, F], ``codes @ U`` (the paper's code as shipped);
- ``torch_sparse``  ``polysae.kernels`` torch path (embedding_bag gather);
- ``triton``        the fused Triton decode plus ``topk_encode`` (k-sparse encoder backward; its
                    top-k time is reported inside "encode"); CUDA only.

Every stage is bracketed by a device synchronisation so the per-stage split is exact; the step total
is the sum of stages (the syncs cost a few microseconds each on a GPU). Medians over ``--steps``
after ``--warmup`` steps, the paths interleaved step by step. Configs: on CUDA the GPT-2 and
Gemma-2-2B paper configs at B = 4096; on CPU a reduced GPT-2-width config (B 256, d_sae 8192)
where only ratios and the shape of the breakdown mean anything. Writes
benchmarks/results/train_step_<device>.json and .md.

    .venv/bin/python benchmarks/bench_train_step.py [--steps 3] [--warmup 1]

``--batch/--d-in/--d-sae/--k/--r`` replace the configs by one of that size (ranks (d_in, r, r));
``--triton`` adds the Triton path off CUDA too (the interpreter: correctness, not speed; the GPU
suite's dry run uses it at toy sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if __name__ == "__main__" and "--triton" in sys.argv and not torch.cuda.is_available():
    # The dispatch is decided when polysae.kernels is imported: ask for the interpreter first.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import polysae.kernels as pk  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from polysae.kernels.reference import densify  # noqa: E402

from polysae import SAE, SAEConfig  # noqa: E402
from polysae.fileio import atomic_write_text  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_decoder import device_tag, environment, resolve_device  # noqa: E402

STAGES = ("encode", "topk", "decode", "loss", "backward", "clip", "adam", "retraction")


class Laps:
    """Wall-clock laps with a device sync at each boundary."""

    def __init__(self, device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.sync()
        self.t = time.perf_counter()
        self.ms = {}

    def lap(self, name):
        self.sync()
        now = time.perf_counter()
        self.ms[name] = (now - self.t) * 1e3
        self.t = now


def train_step(sae: SAE, opt, x, path: str, device) -> dict[str, float]:
    cfg = sae.cfg
    if path != "dense_ref":
        pk.set_backend("triton" if path == "triton" else "torch")
    laps = Laps(device)
    if path == "triton":  # encoder GEMM + top-k in one op whose backward is k-sparse
        x_in = x - sae.b_dec if cfg.apply_b_dec_to_input else x
        v, i, _ = pk.topk_encode(x_in, sae.W_enc, sae.b_enc, cfg.k)
        laps.lap("encode")
        laps.lap("topk")  # included in "encode" on this path
    else:
        pre = sae.pre_acts(x)
        laps.lap("encode")
        v, i = pre.topk(cfg.k, dim=-1, sorted=False)
        v = F.relu(v)
        laps.lap("topk")
    if path == "dense_ref":
        x_hat = sae.decoder.decode_dense(densify(v, i, cfg.d_sae), sae.b_dec)
    else:
        x_hat = sae.decode_sparse(v, i)
    laps.lap("decode")
    loss = (x_hat - x).pow(2).sum(-1).mean()
    laps.lap("loss")
    loss.backward()
    laps.lap("backward")
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    laps.lap("clip")
    opt.step()
    opt.zero_grad(set_to_none=True)
    laps.lap("adam")
    sae.retract_(fast=True)
    laps.lap("retraction")
    return laps.ms


def configs(device, args=None):
    if args is not None and any(getattr(args, a) is not None
                                for a in ("batch", "d_in", "d_sae", "k", "r")):
        gpu = device.type == "cuda"
        d = args.d_in or 768
        F_ = args.d_sae or (16384 if gpu else 8192)
        k = args.k or 64
        r = args.r or 64
        ranks = (min(d, F_), r, r)
        return [dict(name=f"custom ({d}, {F_}, k {k}, ranks {ranks})",
                     B=args.batch or (4096 if gpu else 256), d_in=d, d_sae=F_, k=k, ranks=ranks)]
    if device.type == "cuda":
        return [dict(name="GPT-2 small paper (768, 16k, k 64, ranks (768,64,64))", B=4096,
                     d_in=768, d_sae=16384, k=64, ranks=(768, 64, 64)),
                dict(name="Gemma-2-2B paper (2304, 16k, k 64, ranks (2304,128,128))", B=4096,
                     d_in=2304, d_sae=16384, k=64, ranks=(2304, 128, 128))]
    return [dict(name="GPT-2 width, reduced (768, 8k, k 64, ranks (768,64,64))", B=256,
                 d_in=768, d_sae=8192, k=64, ranks=(768, 64, 64))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 GPU / 3 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 / 1)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--triton", action="store_true",
                    help="include the Triton path off CUDA too (interpreter: correctness only)")
    for a in ("batch", "d-in", "d-sae", "k", "r"):
        ap.add_argument(f"--{a}", type=int, default=None,
                        help="one custom config instead of the defaults (ranks (d_in, r, r))")
    args = ap.parse_args(argv)
    device = resolve_device(args.device, "bench_train_step")
    if device is None:
        return 2
    gpu = device.type == "cuda"
    steps = args.steps or (20 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    paths = ["dense_ref", "torch_sparse"] + (
        ["triton"] if (gpu or args.triton) and pk._TRITON is not None else [])
    env = environment(device)
    results = []
    for c in configs(device, args):
        torch.manual_seed(0)
        sae0 = SAE(SAEConfig(d_in=c["d_in"], d_sae=c["d_sae"], k=c["k"], decoder="poly",
                             ranks=c["ranks"]), device=device)
        state = {k: t.clone() for k, t in sae0.state_dict().items()}
        x = torch.randn(c["B"], c["d_in"], device=device)
        row = {**c, "ranks": list(c["ranks"]), "stages_ms": {}, "step_ms": {}}
        # Paths are interleaved step by step (round robin), so that load from other processes on a
        # shared machine hits every path alike; each path has its own SAE copy and optimiser.
        models = {}
        for path in paths:
            sae = SAE(sae0.cfg, device=device)
            sae.load_state_dict(state)
            sae.train()
            models[path] = (sae, torch.optim.Adam(sae.parameters(), lr=1e-4))
        runs = {path: [] for path in paths}
        for step in range(warmup + steps):
            for path in paths:
                ms = train_step(*models[path], x, path, device)
                if step >= warmup:
                    runs[path].append(ms)
        for path in paths:
            med = {s: statistics.median(r[s] for r in runs[path]) for s in STAGES}
            row["stages_ms"][path] = med
            row["step_ms"][path] = statistics.median(sum(r.values()) for r in runs[path])
            print(f"{c['name']} [{path}] step {row['step_ms'][path]:.2f} ms: "
                  + ", ".join(f"{s} {med[s]:.2f}" for s in STAGES), flush=True)
        with torch.no_grad():
            laps = []
            for _ in range(max(1, steps // 2)):
                lp = Laps(device)
                sae0.retract_(fast=False)
                lp.lap("qr")
                laps.append(lp.ms["qr"])
        row["retraction_householder_qr_ms"] = statistics.median(laps)
        base = "triton" if "triton" in paths else "torch_sparse"
        ratio = row["step_ms"]["dense_ref"] / row["step_ms"][base]
        row["step_ratio_dense_ref_over_" + base] = ratio
        results.append(row)
    write(Path(args.out), device, env, results, paths, steps, warmup)
    return 0


def write(out: Path, device, env, results, paths, steps, warmup):
    out.mkdir(parents=True, exist_ok=True)
    tag = device_tag(device)
    meta = {"benchmark": "train_step", "env": env, "steps": steps, "warmup": warmup,
            "paths": paths, "results": results}
    atomic_write_text(out / f"train_step_{tag}.json", json.dumps(meta, indent=2) + "\n")
    lines = [f"# PolySAE training step, per-stage breakdown ({env['date']})", "",
             f"Device: {env['device_name']} ({env['device']}); torch {env['torch']}, triton "
             f"{env['triton']}, Python {env['python']}, {env['cpu_threads']} CPU threads, "
             f"1-min load average {env['load_average_1m']:.1f} at start. Median of "
             f"{steps} steps after {warmup} warm-up; a device sync brackets every stage; Adam "
             "lr 1e-4, clip 1.0, retraction = CholeskyQR2 (`retract_(fast=True)`).", ""]
    if device.type != "cuda":
        lines += ["CPU run at reduced size (shared 2-core machine: ratios and the shape of the "
                  "breakdown only). **GPU numbers (B 4096, paper configs, Triton path) are pending "
                  "an H100 run** of this same script.", ""]
    for r in results:
        lines += [f"## {r['name']}, B = {r['B']}", "",
                  "| stage (ms) | " + " | ".join(paths) + " |", "|---" * (1 + len(paths)) + "|"]
        for s in STAGES:
            lines.append(f"| {s} | " + " | ".join(f"{r['stages_ms'][p][s]:.2f}" for p in paths)
                         + " |")
        lines.append("| **step** | " + " | ".join(f"**{r['step_ms'][p]:.2f}**" for p in paths)
                     + " |")
        key = next(k for k in r if k.startswith("step_ratio_"))
        lines += ["", f"Step ratio {key[len('step_ratio_'):].replace('_over_', ' / ')}: "
                  f"{r[key]:.2f}x. Reference Householder-QR retraction (`retract_(fast=False)`): "
                  f"{r['retraction_householder_qr_ms']:.2f} ms per step (vs CholeskyQR2 above).",
                  ""]
    atomic_write_text(out / f"train_step_{tag}.md", "\n".join(lines) + "\n")
    print(f"wrote {out / f'train_step_{tag}.json'} and .md")


if __name__ == "__main__":
    sys.exit(main())
