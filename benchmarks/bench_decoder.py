"""Sparse polynomial decoder vs the dense reference (issue 4), forward and forward+backward.

Providers, all run side by side in one process on the same inputs:

- ``ref_dense_fp32``  codes densified to [B, F], then ``codes @ U`` (the paper's code, as shipped);
- ``ref_dense_bf16``  the same under bf16 autocast;
- ``torch_sparse``    ``reference.poly_decode_ref``: embedding_bag gather of U rows (its backward is
                      the index_add/segment reduction of embedding_bag), one merged C GEMM;
- ``fused_triton``    ``polysae.kernels`` Triton path (CUDA only: interpreter timings mean nothing);
- ``linear_dense`` / ``linear_sparse`` / ``linear_triton``: a linear TopK decode (W_dec [F, d_in])
                      the same three ways, to price the polynomial like for like.

Axes on CUDA (issue 4): d_in {768, 2304} x d_sae {16k, 32k, 65k} x k {32, 64, 128} x ranks
(d, 64, 64) / (d, 128, 128), B = 4096. On CPU the torch providers run at reduced sizes
(``--cpu-grid``; default B 256, d_in 768, d_sae {4k, 16k}, k {32, 64}) and only ratios matter.

Inputs: TopK of random pre-activations plus a Zipf-like per-latent bias
(docs/kernels.md#load-balance).
Correctness gate before timing: every provider's x_hat and all gradients (values, U, C1..C3, λ2, λ3,
b_dec; W_dec for linear) against ``torch_sparse`` in fp32 — max error relative to each tensor's
scale must stay within 1e-4 (fp32 providers) or 0.15 (bf16 autocast); a failure aborts with exit
code 1.
Timing: ``triton.testing.do_bench`` on CUDA (L2 flushed, median, ``grad_to_none``); on CPU the
median of ``--reps`` wall-clock runs after two warm-ups. % of roofline uses the H100 cost model of
docs/kernels.md#roofline-model (``roofline_ms`` below; meaningful on an H100 only).

    .venv/bin/python benchmarks/bench_decoder.py            # CPU: reduced grid, ~2 min
    .venv/bin/python benchmarks/bench_decoder.py --quick    # one config (CI smoke / GPU sanity)
    .venv/bin/python benchmarks/bench_decoder.py --dry-run  # gate only, Triton via the interpreter
    python benchmarks/bench_decoder.py                       # on an H100: the full grid
    python benchmarks/bench_decoder.py --sweep-blocks --quick  # Triton block sizes (TODO(gpu))

Axes can be overridden (``--d-in 768 --d-sae 16384 65536`` ...) to split a GPU sweep across runs;
give each part its own ``--suffix`` (e.g. ``_d768``) so that the results files do not overwrite each
other. Writes benchmarks/results/decoder_<device>.json and .md. ``--triton`` adds the Triton
providers off CUDA too (the interpreter: correctness, not speed; used by the GPU suite's dry run).

``--sweep-blocks`` times the fused Triton decode (poly and linear, fwd+bwd) for every
``--block-n`` x ``--block-r`` (x ``--num-warps``) of ``polysae.kernels.sparse_gather`` at the
first config of the grid, each gated for correctness first (the ``TODO(gpu)`` block-size sweep of
kernels/sparse_gather.py); writes decoder_blocks_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

if __name__ == "__main__" and ("--dry-run" in sys.argv or "--triton" in sys.argv) \
        and not torch.cuda.is_available():
    # The dispatch is decided when polysae.kernels is imported: ask for the interpreter first.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import polysae.kernels as pk  # noqa: E402
from polysae.kernels import reference as ref  # noqa: E402

from polysae.fileio import atomic_write_text  # noqa: E402

# --- roofline model (docs/kernels.md#roofline-model, H100 constants; decoder part only) ---------
HBM_BW, L2_BW, P_BF16, P_FP32 = 3.0e12, 6.0e12, 800e12, 60e12


def roofline_ms(B, d, F, k, ranks, shared=True):
    """Lower-bound decoder times (ms) per provider kind, fwd and fwd+bwd: the cost model of
    docs/kernels.md#roofline-model (dense reference at fp32/bf16 peak; sparse design as gather
    traffic vs L2/HBM plus the merged C GEMM at bf16 peak; linear TopK gather)."""
    R1, R2, R3 = ranks
    SR = R1 + R2 + R3
    RU = R1 if shared else SR
    RUd = R1 if shared else R1 + R2 + R3 + (R3 if R3 < R2 else 0)
    ref32 = (2 * B * F * RUd + 2 * B * d * SR) / P_FP32
    ref16 = (2 * B * F * RUd + 2 * B * d * SR) / P_BF16
    gather = max(F * RU * 2 / HBM_BW, B * k * RU * 2 / L2_BW)
    c_fwd = 2 * B * d * SR / P_BF16
    sp_f = gather + c_fwd
    sp_fb = (sp_f + 4 * B * d * SR / P_BF16 + max(F * RU * 6 / HBM_BW, B * k * RU * 4 / L2_BW)
             + 6 * B * SR * 4 / HBM_BW)
    lin_f = max(F * d * 2 / HBM_BW, B * k * d * 2 / L2_BW)
    lin_fb = lin_f + max(F * d * 6 / HBM_BW, B * k * d * 4 / L2_BW)
    lin_dense_f = 2 * B * F * d / P_BF16
    ms = 1e3
    return {
        "ref_dense_fp32": (ref32 * ms, 3 * ref32 * ms),
        "ref_dense_bf16": (ref16 * ms, 3 * ref16 * ms),
        "fused_triton": (sp_f * ms, sp_fb * ms),
        "linear_triton": (lin_f * ms, lin_fb * ms),
        "linear_dense": (lin_dense_f * ms, 3 * lin_dense_f * ms),
    }


# --- inputs -------------------------------------------------------------------------------------
def zipf_codes(B, K, F, device, gen, alpha=1.1):
    """[B, K] positive values and indices from a TopK whose latent frequencies are Zipf-like."""
    r = torch.arange(1, F + 1, device=device, dtype=torch.float32)
    bias = (-alpha * torch.log(r))[torch.randperm(F, device=device, generator=gen)]
    pre = torch.randn(B, F, device=device, generator=gen) + 2.0 * (bias - bias.mean())
    v, i = pre.topk(K, dim=-1, sorted=False)
    return v.sigmoid() + 0.05, i


def make_params(d, F, ranks, device, gen):
    r1, r2, r3 = ranks
    # QR returns column-major Q; the SAE keeps U row-major (retract_ copies into it), so do we.
    U = torch.linalg.qr(torch.randn(F, r1, device=device, generator=gen))[0].contiguous()

    def c(r):
        return torch.randn(d, r, device=device, generator=gen) * r ** -0.5

    return {"U": U, "C1": c(r1), "C2": c(r2), "C3": c(r3),
            "lambda2": torch.tensor(-0.5, device=device),
            "lambda3": torch.tensor(0.5, device=device),
            "b_dec": torch.randn(d, device=device, generator=gen) * 0.1,
            "W_dec": torch.randn(F, d, device=device, generator=gen) * d ** -0.5}


# --- providers ----------------------------------------------------------------------------------
POLY = ("U", "C1", "C2", "C3", "lambda2", "lambda3", "b_dec")
LIN = ("W_dec", "b_dec")


def _dense(values, indices, F):
    return ref.densify(values, indices, F)


def providers(device, triton_ok: bool | None = None):
    """name -> (kind, fn(values, indices, p, F) -> x_hat). Triton providers join on CUDA (or when
    ``triton_ok``: the interpreter, for ``--dry-run``)."""
    def poly_dense(v, i, p, F):
        return ref.poly_decode_dense_ref(_dense(v, i, F), p["U"], p["C1"], p["C2"], p["C3"],
                                         p["lambda2"], p["lambda3"], p["b_dec"])

    def poly_dense_bf16(v, i, p, F):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            return poly_dense(v, i, p, F)

    def poly_sparse(v, i, p, F):
        return ref.poly_decode_ref(v, i, p["U"], p["C1"], p["C2"], p["C3"], p["lambda2"],
                                   p["lambda3"], p["b_dec"])

    out = {
        "ref_dense_fp32": ("poly", poly_dense),
        "ref_dense_bf16": ("poly", poly_dense_bf16),
        "torch_sparse": ("poly", poly_sparse),
        "linear_dense": ("linear", lambda v, i, p, F: ref.linear_decode_dense_ref(
            _dense(v, i, F), p["W_dec"], p["b_dec"])),
        "linear_sparse": ("linear", lambda v, i, p, F: ref.linear_decode_ref(
            v, i, p["W_dec"], p["b_dec"])),
    }
    if triton_ok is None:
        triton_ok = device.type == "cuda"
    if triton_ok and pk._TRITON is not None:
        from polysae.kernels import triton_ops as tops
        out["fused_triton"] = ("poly", lambda v, i, p, F: tops.poly_decode(
            v, i, p["U"], p["C1"], p["C2"], p["C3"], p["lambda2"], p["lambda3"], p["b_dec"]))
        out["linear_triton"] = ("linear", lambda v, i, p, F: tops.linear_decode(
            v, i, p["W_dec"], p["b_dec"]))
    return out


GATE_REF = {"poly": "torch_sparse", "linear": "linear_sparse"}


def _run_with_grads(fn, v, i, p, names, F, g):
    v = v.detach().requires_grad_()
    leaves = {n: p[n].detach().requires_grad_() for n in names}
    out = fn(v, i, {**p, **leaves}, F)
    out.backward(g.to(out.dtype))
    return [out.detach().float(), v.grad.float()] + [leaves[n].grad.float() for n in names]


def gate(provs, v, i, p, F, g):
    """Max scaled error of every provider's output and gradients vs the torch sparse path."""
    errs = {}
    for name, (kind, fn) in provs.items():
        names = POLY if kind == "poly" else LIN
        got = _run_with_grads(fn, v, i, p, names, F, g)
        exp = _run_with_grads(provs[GATE_REF[kind]][1], v, i, p, names, F, g)
        e = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                for a, b in zip(got, exp))
        # fp32 paths differ only by summation order: 1e-4 of each tensor's scale. bf16 autocast
        # rounds U, C and H to 8 mantissa bits (3.9e-3), the cubic chain triples relative error and
        # the 0-d lambda gradients are sums that cancel, so 0.15 of scale; a wrong term is O(1).
        tol = 0.15 if "bf16" in name else 1e-4
        errs[name] = e
        if not e <= tol:
            raise SystemExit(f"correctness gate FAILED for {name}: scaled error {e:.3g} > {tol:g}")
    return errs


# --- timing -------------------------------------------------------------------------------------
def closures(fn, kind, v, i, p, F, g):
    """(forward-only callable, forward+backward callable, tensors whose .grad to reset)."""
    names = POLY if kind == "poly" else LIN
    vv = v.detach().requires_grad_()
    leaves = {n: p[n].detach().requires_grad_() for n in names}
    pp = {**p, **leaves}

    def fwd():
        with torch.no_grad():
            return fn(v, i, pp, F)

    def fwd_bwd():
        fn(vv, i, pp, F).backward(g)
    return fwd, fwd_bwd, [vv, *leaves.values()]


def time_all(device, provs, v, i, p, F, g, reps):
    """{name: (fwd ms, fwd+bwd ms)}. CUDA: do_bench per provider. CPU: providers interleaved rep by
    rep (round robin) after two warm-ups each, median; on a shared machine this spreads background
    load over all providers alike, so the ratios stay meaningful even when absolute ms drift."""
    cl = {n: closures(fn, kind, v, i, p, F, g) for n, (kind, fn) in provs.items()}
    if device.type == "cuda":
        import triton.testing
        return {n: (triton.testing.do_bench(f, quantiles=[0.5]),
                    triton.testing.do_bench(fb, grad_to_none=gs, quantiles=[0.5]))
                for n, (f, fb, gs) in cl.items()}
    ts = {n: ([], []) for n in cl}
    for rep in range(reps + 2):  # the first two rounds warm up: first touches cost 5-50x
        for n, (f, fb, gs) in cl.items():
            for j, call in enumerate((f, fb)):
                for t in gs:
                    t.grad = None
                t0 = time.perf_counter()
                call()
                if rep >= 2:
                    ts[n][j].append((time.perf_counter() - t0) * 1e3)
    return {n: (statistics.median(a), statistics.median(b)) for n, (a, b) in ts.items()}


# --- main ---------------------------------------------------------------------------------------
def grid(args, device):
    if args.quick:
        return [(args.batch or (4096 if device.type == "cuda" else 256), 768, 16384, 64,
                 (768, 64, 64))]
    full = device.type == "cuda" and not args.cpu_grid
    B = args.batch or (4096 if full else 256)
    d_ins = args.d_in or ((768, 2304) if full else (768,))
    d_saes = args.d_sae or ((16384, 32768, 65536) if full else (4096, 16384))
    ks = args.k or ((32, 64, 128) if full else (32, 64))
    rs = args.r or ((64, 128) if full else (64,))
    return [(B, d, F, k, (d, r, r)) for d, F, k, r in itertools.product(d_ins, d_saes, ks, rs)]


RATIOS = [("ref_dense_fp32", "fused_triton"), ("ref_dense_bf16", "fused_triton"),
          ("fused_triton", "linear_triton"), ("ref_dense_fp32", "torch_sparse"),
          ("ref_dense_bf16", "torch_sparse"), ("torch_sparse", "linear_sparse"),
          ("linear_dense", "linear_sparse")]


def device_tag(device):
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def environment(device):
    env = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
           # other jobs on a shared machine skew wall-clock times: record how busy it was
           "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="one config only")
    ap.add_argument("--cpu-grid", action="store_true", help="reduced grid even on CUDA")
    ap.add_argument("--batch", type=int, default=None, help="rows B (default 4096 CUDA / 256 CPU)")
    ints = dict(type=int, nargs="+", default=None)
    ap.add_argument("--d-in", **ints, help="override the d_in axis (e.g. to split a GPU run)")
    ap.add_argument("--d-sae", **ints, help="override the d_sae axis")
    ap.add_argument("--k", **ints, help="override the k axis")
    ap.add_argument("--r", **ints, help="override R2 = R3 (ranks are (d_in, r, r))")
    ap.add_argument("--reps", type=int, default=5, help="CPU timed repetitions (median)")
    ap.add_argument("--skip", default="", help="comma-separated providers to leave out")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--suffix", default="",
                    help="appended to the results file name, e.g. '_d768' for one part of a split")
    ap.add_argument("--triton", action="store_true",
                    help="include the Triton providers off CUDA too (interpreter: correctness, "
                         "not speed)")
    ap.add_argument("--sweep-blocks", action="store_true",
                    help="time the fused Triton decode for each --block-n x --block-r x "
                         "--num-warps at the first config of the grid (the TODO(gpu) sweep)")
    ap.add_argument("--block-n", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--block-r", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--num-warps", type=int, nargs="+", default=None,
                    help="warps per program to sweep (default: the kernels' NUM_WARPS only)")
    ap.add_argument("--dry-run", action="store_true",
                    help="no timing: run the correctness gate of every provider, Triton included "
                         "(interpreter on CPU), on a tiny shape, and write nothing")
    args = ap.parse_args(argv)
    device = resolve_device(args.device, "bench_decoder")
    if device is None:
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference as shipped: full fp32
    if args.dry_run:
        return dry_run(device)
    if args.sweep_blocks:
        return sweep_blocks(device, args)
    provs = {k: v for k, v in providers(device, triton_ok=args.triton or None).items()
             if k not in args.skip.split(",")}
    env = environment(device)
    print(f"# device {env['device_name']}; torch {env['torch']}; triton {env['triton']}")
    rows = []
    for B, d, F, k, ranks in grid(args, device):
        gen = torch.Generator(device=device).manual_seed(0)
        v, i = zipf_codes(B, k, F, device, gen)
        p = make_params(d, F, ranks, device, gen)
        g = torch.randn(B, d, device=device, generator=gen)
        errs = gate(provs, v, i, p, F, g)
        row = {"B": B, "d_in": d, "d_sae": F, "k": k, "ranks": list(ranks), "gate_error": errs,
               "fwd_ms": {}, "fwd_bwd_ms": {}}
        for name, (fwd, fb) in time_all(device, provs, v, i, p, F, g, args.reps).items():
            row["fwd_ms"][name], row["fwd_bwd_ms"][name] = fwd, fb
        roof = roofline_ms(B, d, F, k, ranks)
        row["roofline_ms"] = {n: list(t) for n, t in roof.items()}
        row["pct_of_roofline_fwd_bwd"] = (
            {n: 100 * roof[n][1] / row["fwd_bwd_ms"][n] for n in roof if n in row["fwd_bwd_ms"]}
            if device.type == "cuda" else {})
        row["ratios_fwd_bwd"] = {f"{a}/{b}": row["fwd_bwd_ms"][a] / row["fwd_bwd_ms"][b]
                                 for a, b in RATIOS if a in provs and b in provs}
        row["ratios_fwd"] = {f"{a}/{b}": row["fwd_ms"][a] / row["fwd_ms"][b]
                             for a, b in RATIOS if a in provs and b in provs}
        rows.append(row)
        print(f"B={B} d={d} F={F} k={k} ranks={ranks}: fwd+bwd ms "
              + ", ".join(f"{n} {t:.2f}" for n, t in row["fwd_bwd_ms"].items())
              + " | " + ", ".join(f"{r} {x:.1f}x" for r, x in row["ratios_fwd_bwd"].items()),
              flush=True)
    write_results(Path(args.out), device, env, args, rows, list(provs))
    return 0


def dry_run(device) -> int:
    """Gate every provider (Triton too, under the interpreter on CPU) on a tiny odd shape."""
    provs = providers(device, triton_ok=pk._TRITON is not None)
    gen = torch.Generator(device=device).manual_seed(0)
    B, d, F, k, ranks = 19, 24, 67, 5, (20, 6, 5)
    v, i = zipf_codes(B, k, F, device, gen)
    p = make_params(d, F, ranks, device, gen)
    g = torch.randn(B, d, device=device, generator=gen)
    errs = gate(provs, v, i, p, F, g)
    print("dry run, correctness gate passed: " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    return 0


def _block_modules():
    """The kernel modules holding launch-time block-size globals (poly_chain copies BLOCK_N and
    NUM_WARPS at import, so both are set)."""
    from polysae.kernels import poly_chain, sparse_gather
    return sparse_gather, poly_chain


def set_blocks(block_n: int, block_r: int, num_warps: int) -> tuple[int, int, int]:
    """Set the Triton launch block sizes; returns the previous (BLOCK_N, BLOCK_R, NUM_WARPS)."""
    sg, pc = _block_modules()
    old = (sg.BLOCK_N, sg.BLOCK_R, sg.NUM_WARPS)
    sg.BLOCK_N, sg.BLOCK_R, sg.NUM_WARPS = block_n, block_r, num_warps
    pc.BLOCK_N, pc.NUM_WARPS = block_n, num_warps
    return old


def sweep_blocks(device, args) -> int:
    """Fused poly and linear decode, fwd+bwd, for each block-size combination at one config.

    Every combination is gated for correctness before timing; a gate failure is a bug (exit 1),
    while a combination that does not compile or launch (out of registers or shared memory) is
    recorded and skipped. Results are rewritten after every combination, so a sweep cut short
    keeps what it measured."""
    if pk._TRITON is None:
        print("bench_decoder --sweep-blocks: the Triton path is unavailable here (needs CUDA, or "
              "TRITON_INTERPRET=1 with --triton)", file=sys.stderr)
        return 2
    all_provs = providers(device, triton_ok=True)
    gate_provs = {n: all_provs[n] for n in ("torch_sparse", "linear_sparse", "fused_triton",
                                            "linear_triton")}
    timed = {n: gate_provs[n] for n in ("fused_triton", "linear_triton")}
    B, d, F, k, ranks = grid(args, device)[0]
    gen = torch.Generator(device=device).manual_seed(0)
    v, i = zipf_codes(B, k, F, device, gen)
    p = make_params(d, F, ranks, device, gen)
    g = torch.randn(B, d, device=device, generator=gen)
    sg, _ = _block_modules()
    default = (sg.BLOCK_N, sg.BLOCK_R, sg.NUM_WARPS)
    warps = args.num_warps or [default[2]]
    combos = list(itertools.product(args.block_n, args.block_r, warps))
    env = environment(device)
    rows = []
    try:
        for bn, br, nw in combos:
            set_blocks(bn, br, nw)
            row = {"BLOCK_N": bn, "BLOCK_R": br, "NUM_WARPS": nw,
                   "default": (bn, br, nw) == default}
            t0 = time.perf_counter()
            try:
                row["gate_error"] = gate(gate_provs, v, i, p, F, g)
            except SystemExit as e:  # a wrong result at these block sizes: a bug
                row.update(error=str(e), error_kind="gate")
            except Exception as e:  # noqa: BLE001 - does not compile / launch here
                row.update(error=f"{type(e).__name__}: {e}"[:500], error_kind="launch")
            if "error" not in row:
                row["compile_and_gate_s"] = time.perf_counter() - t0
                ms = time_all(device, timed, v, i, p, F, g, args.reps)
                row["fwd_bwd_ms"] = {n: t[1] for n, t in ms.items()}
                row["fwd_ms"] = {n: t[0] for n, t in ms.items()}
            rows.append(row)
            print(f"BLOCK_N {bn} BLOCK_R {br} NUM_WARPS {nw}: "
                  + (row.get("error") or ", ".join(f"{n} fwd+bwd {t:.3f} ms"
                                                   for n, t in row["fwd_bwd_ms"].items())),
                  flush=True)
            _write_sweep(Path(args.out), device, env, args, (B, d, F, k, ranks), default, rows,
                         list(timed), len(combos))
    finally:
        set_blocks(*default)
    ok = [r for r in rows if "error" not in r]
    bad_gate = [r for r in rows if r.get("error_kind") == "gate"]
    return 0 if ok and not bad_gate else 1


def _write_sweep(out: Path, device, env, args, config, default, rows, names, planned) -> None:
    B, d, F, k, ranks = config
    ok = [r for r in rows if "error" not in r]
    best = {n: min(ok, key=lambda r: r["fwd_bwd_ms"][n]) for n in names} if ok else {}
    base = next((r for r in ok if r["default"]), None)
    summary = {n: {"best": {k2: b[k2] for k2 in ("BLOCK_N", "BLOCK_R", "NUM_WARPS")},
                   "best_ms": b["fwd_bwd_ms"][n],
                   "default_ms": base["fwd_bwd_ms"][n] if base else None,
                   "speedup_vs_default": (base["fwd_bwd_ms"][n] / b["fwd_bwd_ms"][n]
                                          if base else None)}
               for n, b in best.items()}
    out.mkdir(parents=True, exist_ok=True)
    tag = device_tag(device) + args.suffix
    meta = {"benchmark": "decoder_blocks", "env": env, "args": vars(args),
            "config": {"B": B, "d_in": d, "d_sae": F, "k": k, "ranks": list(ranks)},
            "default": dict(zip(("BLOCK_N", "BLOCK_R", "NUM_WARPS"), default)),
            "planned": planned, "rows": rows, "best": summary, "errors": len(rows) - len(ok),
            "gate_failures": sum(r.get("error_kind") == "gate" for r in rows)}
    atomic_write_text(out / f"decoder_blocks_{tag}.json", json.dumps(meta, indent=2) + "\n")
    lines = [f"# Triton block-size sweep, fused sparse decode fwd+bwd ({env['date']})", "",
             f"Device: {env['device_name']}; torch {env['torch']}, triton {env['triton']}. Config "
             f"B {B}, d_in {d}, d_sae {F}, k {k}, ranks {tuple(ranks)}; shipped default "
             f"BLOCK_N {default[0]}, BLOCK_R {default[1]}, NUM_WARPS {default[2]} "
             f"(kernels/sparse_gather.py). {len(rows)} of {planned} combinations run; each passed "
             "the correctness gate (x_hat and all gradients vs the torch path) before timing "
             "unless its row says otherwise.", ""]
    if device.type != "cuda":
        lines += ["Not a CUDA run: these timings are the Triton interpreter's and mean nothing.",
                  ""]
    lines += ["| BLOCK_N | BLOCK_R | NUM_WARPS | poly fwd+bwd (ms) | linear fwd+bwd (ms) | note |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        note = "default" if r["default"] else ""
        if "error" in r:
            err = r["error"].replace("\n", " ").replace("|", "/")[:160]
            lines.append(f"| {r['BLOCK_N']} | {r['BLOCK_R']} | {r['NUM_WARPS']} | - | - | "
                         f"{note} {r['error_kind']}: {err} |")
        else:
            lines.append(f"| {r['BLOCK_N']} | {r['BLOCK_R']} | {r['NUM_WARPS']} | "
                         f"{r['fwd_bwd_ms']['fused_triton']:.3f} | "
                         f"{r['fwd_bwd_ms']['linear_triton']:.3f} | {note} |")
    lines.append("")
    for n, s_ in summary.items():
        sp = (f"{s_['speedup_vs_default']:.2f}x vs the default"
              if s_["speedup_vs_default"] else "default not measured")
        lines.append(f"- best for {n}: BLOCK_N {s_['best']['BLOCK_N']}, BLOCK_R "
                     f"{s_['best']['BLOCK_R']}, NUM_WARPS {s_['best']['NUM_WARPS']} "
                     f"({s_['best_ms']:.3f} ms; {sp})")
    atomic_write_text(out / f"decoder_blocks_{tag}.md", "\n".join(lines) + "\n")


TARGETS = ("GPU targets (H100, issue 4): fused vs ref_dense_fp32 fwd+bwd >= 15x at d_in 768, d_sae "
           "16k, k 64, ranks (768,64,64) (roofline ~21x); >= 50x at d_sae 65k; fused poly / linear "
           "sparse <= 1.35x.")


def md_table(rows, columns, cell):
    """Markdown table: one line per config (B, d_in, d_sae, k, ranks), one column per name."""
    head = ["| B | d_in | d_sae | k | ranks | " + " | ".join(columns) + " |",
            "|---" * (5 + len(columns)) + "|"]
    return head + [f"| {r['B']} | {r['d_in']} | {r['d_sae']} | {r['k']} | {tuple(r['ranks'])} | "
                   + " | ".join(cell(r, n) for n in columns) + " |" for r in rows]


def resolve_device(name: str, prog: str) -> torch.device | None:
    """The requested device, or None (after a message on stderr) when CUDA is asked but absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: --device cuda but CUDA is not available", file=sys.stderr)
        return None
    return device


def write_results(out: Path, device, env, args, rows, names):
    out.mkdir(parents=True, exist_ok=True)
    tag = device_tag(device) + args.suffix
    meta = {"benchmark": "decoder", "env": env, "args": vars(args), "providers": names,
            "targets": TARGETS, "rows": rows}
    atomic_write_text(out / f"decoder_{tag}.json", json.dumps(meta, indent=2) + "\n")
    timing = ("triton.testing.do_bench median (L2 flushed)" if device.type == "cuda" else
              f"median of {args.reps} wall-clock runs after 2 warm-ups, providers interleaved, "
              f"{env['cpu_threads']} torch threads, 1-min load average "
              f"{env['load_average_1m']:.1f} at start (shared machine: ratios, not absolute ms)")
    lines = [f"# Sparse polynomial decoder benchmark ({env['date']})", "",
             f"Device: {env['device_name']} ({env['device']}); torch {env['torch']}, triton "
             f"{env['triton']}, Python {env['python']}. Timing: {timing}. Zipf-like TopK indices; "
             "every provider passed the correctness gate (x_hat and all gradients vs torch_sparse) "
             "before timing.", ""]
    if device.type != "cuda":
        lines += ["CPU run: torch providers only, reduced sizes. **GPU numbers (fused Triton, full "
                  "axes, % of roofline) are pending an H100 run** of this same script.", ""]
    ratio_names = list(rows[0]["ratios_fwd_bwd"]) if rows else []
    lines += [TARGETS, "", "## Forward + backward (ms)", ""]
    lines += md_table(rows, names, lambda r, n: f"{r['fwd_bwd_ms'][n]:.3f}")
    lines += ["", "## Forward only (ms)", ""]
    lines += md_table(rows, names, lambda r, n: f"{r['fwd_ms'][n]:.3f}")
    lines += ["", "## Ratios, forward + backward (time of first / time of second)", ""]
    lines += md_table(rows, ratio_names, lambda r, n: f"{r['ratios_fwd_bwd'][n]:.2f}x")
    if device.type == "cuda" and rows:
        pn = list(rows[0]["pct_of_roofline_fwd_bwd"])
        lines += ["", "## % of the H100 roofline model (fwd+bwd; docs/kernels.md)", ""]
        lines += md_table(rows, pn, lambda r, n: f"{r['pct_of_roofline_fwd_bwd'][n]:.0f}%")
    atomic_write_text(out / f"decoder_{tag}.md", "\n".join(lines) + "\n")
    print(f"wrote {out / f'decoder_{tag}.json'} and .md")


if __name__ == "__main__":
    sys.exit(main())
