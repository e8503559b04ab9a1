"""One TopK training step: polysae (linear, poly) vs eai-sparsify vs SAELens (issue 26).

A step is what each library's trainer does per batch: forward, loss, backward, the optimiser
(torch Adam, lr 2e-4 for everyone) and the library's own per-step constraint, on the same random
batch:

- ``ref``       a plain-torch dense-decode TopK step (``REF_SRC``: encoder GEMM, top-k, codes
                densified to [B, F], ``z @ W_dec``, MSE, dense autograd, Adam). It is the common
                yardstick: its source is run verbatim in every process, so a peer that must live in
                its own virtualenv is compared through it;
- ``linear`` / ``poly``  ``polysae.training.Trainer.step`` (loss, backward, clip 1.0, Adam, the
                retraction of U every step for poly, dead-latent counters); poly ranks
                (d_in, 64, 64);
- ``sparsify``  eai-sparsify's ``SparseCoder`` as its ``Trainer`` steps it: unit-norm decoder rows,
                forward (FVU loss), backward, removal of the gradient parallel to the decoder rows,
                Adam, fired-latent bookkeeping (eager decode: ``SPARSIFY_DISABLE_TRITON=1``);
- ``saelens``   SAELens' ``TopKTrainingSAE`` as ``SAETrainer._train_step`` steps it (forward with
                its loss, firing statistics, backward, clip 1.0, Adam), in the peer virtualenv
                ``.peers/sae-lens`` (``scripts/peers.sh``), timed there beside its own ``ref``.

Every figure is a ratio to ``ref`` timed in the same process: the median over rounds of
(provider step / ref step of that round), the providers interleaved round robin with a rotating
start so that load from other processes hits all alike. A second pass times each stage
(encoder forward, decoder forward, loss, decoder backward, encoder backward, clip, Adam, constraint)
with a ``.detach()`` boundary between encoder and decoder, so the backward splits in two.

    .venv/bin/python benchmarks/bench_step_peers.py [--rounds 7] [--shapes 0 1 2] [--no-saelens]

Writes benchmarks/results/step_peers_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # eager decode on CPU (set before import)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from bench_decoder import device_tag, environment, resolve_device  # noqa: E402

SHAPES = [  # (d_in, d_sae, k, batch): the issue's two shapes, then the paper's at batch 4096
    (576, 4096, 32, 1024),
    (768, 16384, 64, 1024),
    (768, 16384, 64, 4096),
]
R23 = 64  # poly ranks (d_in, 64, 64)
LR = 2e-4
STAGES = ("enc_fwd", "dec_fwd", "loss", "dec_bwd", "enc_bwd", "clip", "adam", "constraint",
          "other")

# The reference step and the timing harness: exec'd verbatim in this process and in every peer's.
REF_SRC = r'''
import statistics, time
import torch

class Laps:
    """Wall-clock laps; a device sync at each boundary on CUDA."""
    def __init__(self, device):
        cuda = torch.device(device).type == "cuda"
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.sync()
        self.t = time.perf_counter()
        self.ms = {}
    def lap(self, name):
        self.sync()
        now = time.perf_counter()
        self.ms[name] = self.ms.get(name, 0.0) + (now - self.t) * 1e3
        self.t = now

class RefStep:
    """Plain-torch TopK SAE step with a DENSE decode: codes [B, F] @ W_dec; dense autograd."""
    def __init__(self, d_in, d_sae, k, device, lr, seed=0):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(d_sae, d_in, generator=g)
        W = W * (0.1 / W.norm(dim=1, keepdim=True))
        self.W_enc = W.T.contiguous().to(device).requires_grad_()
        self.b_enc = torch.zeros(d_sae, device=device, requires_grad=True)
        self.W_dec = W.clone().to(device).requires_grad_()
        self.b_dec = torch.zeros(d_in, device=device, requires_grad=True)
        self.params = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        self.opt = torch.optim.Adam(self.params, lr=lr)
        self.k, self.device = k, device
    def encode(self, x):
        pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)
        v, i = pre.topk(self.k, dim=-1, sorted=False)
        return torch.relu(v), i
    def decode(self, v, i):
        z = torch.zeros(v.shape[0], self.W_dec.shape[0], device=v.device, dtype=v.dtype)
        z = z.scatter(1, i, v)
        return torch.addmm(self.b_dec, z, self.W_dec)
    def step(self, x):
        v, i = self.encode(x)
        loss = (self.decode(v, i) - x).pow(2).sum(-1).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
    def stages(self, x):
        laps = Laps(self.device)
        v, i = self.encode(x)
        laps.lap("enc_fwd")
        vd = v.detach().requires_grad_()
        x_hat = self.decode(vd, i)
        laps.lap("dec_fwd")
        loss = (x_hat - x).pow(2).sum(-1).mean()
        laps.lap("loss")
        loss.backward()
        laps.lap("dec_bwd")
        v.backward(vd.grad)
        laps.lap("enc_bwd")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        laps.lap("adam")
        return laps.ms

def timed(fn):
    """(wall ms, process CPU ms): CPU time (all threads) is less sensitive to other processes."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - t) * 1e3, (time.process_time() - c) * 1e3

def interleave(providers, x, rounds, warmup, stage_reps):
    """providers: name -> object with step(x) and stages(x). Whole steps round robin (rotating
    start), then stage breakdowns. Returns {name: {"step_ms": [...], "stages": [{...}]}}."""
    names = list(providers)
    out = {n: {"step_ms": [], "cpu_ms": [], "stages": []} for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            ms, cpu = timed(lambda: providers[n].step(x))
            if r >= warmup:
                out[n]["step_ms"].append(ms)
                out[n]["cpu_ms"].append(cpu)
    for _ in range(stage_reps):
        for n in names:
            out[n]["stages"].append(providers[n].stages(x))
    return out
'''

SAELENS_SRC = r'''
import json, os, sys
import torch
import sae_lens
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

class SAELensStep:
    """SAELens' TopKTrainingSAE stepped as SAETrainer._train_step does (no logging/scheduler)."""
    def __init__(self, d_in, d_sae, k, device, lr):
        torch.manual_seed(0)
        self.sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k,
                                                         device=device))
        self.sae.train()
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr)
        self.since_fired = torch.zeros(d_sae, device=device)
        self.device = device
    def _input(self, x):
        return TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                              n_training_steps=0, is_logging_step=False)
    def _fired(self, feature_acts):
        with torch.no_grad():
            firing = feature_acts.bool().float()
            did_fire = firing.sum(-2).bool()
            self.since_fired += 1
            self.since_fired[did_fire] = 0
    def step(self, x):
        out = self.sae.training_forward_pass(step_input=self._input(x))
        self._fired(out.feature_acts)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()
    def stages(self, x):
        laps = Laps(self.device)
        sae = self.sae
        fa, _hidden = sae.encode_with_hidden_pre(x)
        laps.lap("enc_fwd")
        fad = fa.detach().requires_grad_()
        x_hat = sae.decode(fad)
        laps.lap("dec_fwd")
        loss = (x_hat - x).pow(2).sum(-1).mean()
        self._fired(fa)
        laps.lap("loss")
        loss.backward()
        laps.lap("dec_bwd")
        fa.backward(fad.grad)
        laps.lap("enc_bwd")
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        laps.lap("clip")
        self.opt.step()
        self.opt.zero_grad()
        laps.lap("adam")
        return laps.ms

def main():
    args = json.loads(sys.argv[1])
    torch.set_num_threads(args["threads"])
    d_in, d_sae, k, batch = args["shape"]
    dev = args["device"]
    x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(1)).to(dev)
    providers = {"ref": RefStep(d_in, d_sae, k, dev, args["lr"]),
                 "saelens": SAELensStep(d_in, d_sae, k, dev, args["lr"])}
    res = interleave(providers, x, args["rounds"], args["warmup"], args["stage_reps"])
    print("RESULT " + json.dumps({"result": res, "versions": {
        "sae_lens": sae_lens.__version__, "torch": torch.__version__},
        "threads": torch.get_num_threads()}))

main()
'''

_ns: dict = {}
exec(compile(REF_SRC, "REF_SRC", "exec"), _ns)
Laps, RefStep, interleave = _ns["Laps"], _ns["RefStep"], _ns["interleave"]


class PolysaeStep:
    """polysae's ``Trainer.step`` (the real training step) and an instrumented copy of it."""

    def __init__(self, decoder, d_in, d_sae, k, device, lr):
        from polysae import SAE, SAEConfig
        from polysae.training import TrainConfig, Trainer

        torch.manual_seed(0)
        ranks = (d_in, R23, R23)
        self.sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, decoder=decoder, ranks=ranks),
                       device=device)
        self.trainer = Trainer(self.sae, TrainConfig(lr=lr, progress=False))
        self.slot = self.trainer.slots["sae"]
        self.device = device

    def step(self, x):
        self.trainer.step(x)

    def stages(self, x):
        sae, opt = self.sae, self.slot.opt
        laps = Laps(self.device)
        codes = sae._codes(x)
        laps.lap("enc_fwd")
        v = codes.values.detach().requires_grad_()
        x_hat = sae.decode_sparse(v, codes.indices)
        laps.lap("dec_fwd")
        loss = (x_hat - x).pow(2).sum(-1).mean()
        laps.lap("loss")
        loss.backward()
        laps.lap("dec_bwd")
        codes.values.backward(v.grad)
        laps.lap("enc_bwd")
        torch.nn.utils.clip_grad_norm_(self.slot.params, 1.0)
        laps.lap("clip")
        opt.step()
        opt.zero_grad(set_to_none=True)
        laps.lap("adam")
        sae.retract_(fast=True)
        laps.lap("constraint")
        return laps.ms


class SparsifyStep:
    """eai-sparsify's SparseCoder stepped as its Trainer does (Adam, normalize_decoder=True)."""

    def __init__(self, d_in, d_sae, k, device, lr):
        from sparsify import SaeConfig, SparseCoder

        torch.manual_seed(0)
        self.sae = SparseCoder(d_in, SaeConfig(num_latents=d_sae, k=k), device=device,
                               dtype=torch.float32)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr)
        self.did_fire = torch.zeros(d_sae, dtype=torch.bool, device=device)
        self.device = device

    def step(self, x):
        sae = self.sae
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=None)
        self.did_fire[out.latent_indices.flatten()] = True
        (out.fvu + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()

    def stages(self, x):
        sae = self.sae
        laps = Laps(self.device)
        sae.set_decoder_norm_to_unit_norm()
        laps.lap("constraint")
        top_acts, top_idx, _pre = sae.encode(x)
        laps.lap("enc_fwd")
        v = top_acts.detach().requires_grad_()
        y = sae.decode(v, top_idx)
        laps.lap("dec_fwd")
        e = x - y
        fvu = e.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        self.did_fire[top_idx.flatten()] = True
        laps.lap("loss")
        fvu.backward()
        laps.lap("dec_bwd")
        top_acts.backward(v.grad)
        laps.lap("enc_bwd")
        sae.remove_gradient_parallel_to_decoder_directions()
        laps.lap("constraint")
        self.opt.step()
        self.opt.zero_grad()
        laps.lap("adam")
        return laps.ms


def summarise(raw: dict, base: str = "ref") -> dict:
    """Per provider: median step ms, median of per-round ratios to ``base``, median stage ms."""
    out = {}
    b, bc = raw[base]["step_ms"], raw[base]["cpu_ms"]
    for name, r in raw.items():
        ratios = [s / t for s, t in zip(r["step_ms"], b)]
        cpu_ratios = [s / t for s, t in zip(r["cpu_ms"], bc)]
        stages = {s: statistics.median(st.get(s, 0.0) for st in r["stages"]) for s in STAGES}
        stages = {s: v for s, v in stages.items() if v > 0}
        out[name] = {"step_ms": statistics.median(r["step_ms"]),
                     "ratio_to_ref": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "ratio_of_medians": statistics.median(r["step_ms"]) / statistics.median(b),
                     "cpu_ms": statistics.median(r["cpu_ms"]),
                     "cpu_ratio_to_ref": statistics.median(cpu_ratios),
                     "stages_ms": stages, "steps": r["step_ms"], "cpu_steps": r["cpu_ms"]}
    return out


def saelens_python():
    """The SAELens peer interpreter, or (None, why)."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import pytest  # noqa: F401  (peers.peer_python skips through pytest)
        from peers import _health, _venv_name
    except Exception as e:  # noqa: BLE001
        return None, f"tests/peers.py unavailable ({e})"
    venv = _venv_name("sae-lens")
    why = _health(venv)
    if why is not None:
        return None, why
    return ROOT / ".peers" / venv / "bin" / "python", None


def run_saelens(python, shape, args, device) -> dict:
    from peers import OFFLINE_ENV
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    env.update(OFFLINE_ENV)
    payload = json.dumps({"shape": list(shape), "rounds": args.rounds, "warmup": args.warmup,
                          "stage_reps": args.stage_reps, "lr": LR, "device": str(device),
                          "threads": torch.get_num_threads()})
    with tempfile.TemporaryDirectory(prefix="bench-saelens-") as cwd:
        r = subprocess.run([str(python), "-c", REF_SRC + SAELENS_SRC, payload], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=6 * 3600)
    if r.returncode != 0:
        raise RuntimeError(f"SAELens run failed:\n{r.stderr[-4000:]}")
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--stage-reps", type=int, default=3, help="instrumented steps per provider")
    ap.add_argument("--shapes", type=int, nargs="+", default=list(range(len(SHAPES))),
                    help="indices into SHAPES")
    ap.add_argument("--shape", type=int, nargs=4, default=None, metavar=("D_IN", "D_SAE", "K", "B"),
                    help="one custom shape instead of SHAPES (smoke runs)")
    ap.add_argument("--providers", nargs="+", default=["linear", "poly", "sparsify"],
                    choices=["linear", "poly", "sparsify"], help="besides ref (always timed)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in every process (default: torch's, the core count). On a "
                         "shared machine 1 avoids OpenMP barriers waiting for a busy core")
    ap.add_argument("--no-saelens", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default=None, help="result file suffix (default: the device tag)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device, "bench_step_peers")
    if device is None:
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    import polysae
    import polysae.kernels as pk
    import sparsify

    env = environment(device)
    env.update(polysae=polysae.__version__, sparsify=getattr(sparsify, "__version__", "1.3.3"),
               polysae_backend=pk.BACKEND)
    py, why = (None, "--no-saelens") if args.no_saelens else saelens_python()
    results = []
    for shape in ([tuple(args.shape)] if args.shape else [SHAPES[i] for i in args.shapes]):
        d_in, d_sae, k, batch = shape
        x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(1)).to(device)
        make = {"linear": lambda: PolysaeStep("linear", d_in, d_sae, k, device, LR),
                "poly": lambda: PolysaeStep("poly", d_in, d_sae, k, device, LR),
                "sparsify": lambda: SparsifyStep(d_in, d_sae, k, device, LR)}
        providers = {"ref": RefStep(d_in, d_sae, k, device, LR),
                     **{n: make[n]() for n in args.providers}}
        t0 = time.time()
        raw = interleave(providers, x, args.rounds, args.warmup, args.stage_reps)
        del providers
        row = {"shape": dict(d_in=d_in, d_sae=d_sae, k=k, batch=batch, ranks=[d_in, R23, R23]),
               "main": summarise(raw), "load_average_1m_end": os.getloadavg()[0],
               "wall_s": time.time() - t0}
        m = row["main"]
        for a, b, key in (("poly", "linear", "poly_over_linear"),
                          ("linear", "sparsify", "linear_over_sparsify")):
            if a not in m or b not in m:
                continue
            row[key] = statistics.median(p / q for p, q in zip(m[a]["steps"], m[b]["steps"]))
            row[key + "_cpu"] = statistics.median(
                p / q for p, q in zip(m[a]["cpu_steps"], m[b]["cpu_steps"]))
        print(f"{shape}: " + ", ".join(f"{n} {v['step_ms']:.0f} ms ({v['ratio_to_ref']:.2f}x ref)"
                                       for n, v in m.items())
              + (f"; poly/linear {row['poly_over_linear']:.2f} (CPU time "
                 f"{row['poly_over_linear_cpu']:.2f})" if "poly_over_linear" in row else ""),
              flush=True)
        if py is not None:
            sl = run_saelens(py, shape, args, device)
            row["saelens_process"] = summarise(sl["result"])
            row["saelens_versions"] = sl["versions"]
            s = row["saelens_process"]["saelens"]
            print(f"  saelens {s['step_ms']:.0f} ms ({s['ratio_to_ref']:.2f}x its ref)", flush=True)
        else:
            row["saelens_skipped"] = why
        results.append(row)
    write(Path(args.out), args.tag or device_tag(device), env, results, args)
    return 0


PEERS = ("linear", "poly", "sparsify", "saelens")


def _ms(v):
    return "—" if v is None else (f"{v:.0f}" if v >= 10 else f"{v:.1f}")


def _fmt(r):
    return f"{r['ratio_to_ref']:.2f} ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})"


def write(out: Path, tag: str, env, results, args):
    from polysae.fileio import atomic_write_text
    out.mkdir(parents=True, exist_ok=True)
    meta = {"benchmark": "step_peers", "env": env, "rounds": args.rounds, "warmup": args.warmup,
            "stage_reps": args.stage_reps, "lr": LR, "results": results}
    atomic_write_text(out / f"step_peers_{tag}.json", json.dumps(meta, indent=2) + "\n")
    sl_ver = next((r["saelens_versions"] for r in results if "saelens_versions" in r), None)
    lines = [f"# TopK training step: polysae vs eai-sparsify vs SAELens ({env['date']})", "",
             f"Device: {env['device_name']} ({env['device']}), {env['cpu_threads']} threads; torch "
             f"{env['torch']}; polysae {env['polysae']} ({env['polysae_backend']} path), sparsify "
             f"{env['sparsify']}"
             + (f", SAELens {sl_ver['sae_lens']} (torch {sl_ver['torch']}, own virtualenv)"
                if sl_ver else "") + f". 1-min load average {env['load_average_1m']:.1f} at start"
             " (a shared machine: read the ratios, not the times).", "",
             f"Each cell: median over {args.rounds} interleaved rounds of (step time / the "
             "dense-decode reference step of the same round, same process), min–max in brackets. "
             "Adam lr 2e-4 everywhere; each library's per-step constraint included "
             "(polysae poly: retraction of U; sparsify: unit-norm decoder rows + parallel-gradient "
             "removal; SAELens: clip 1.0).", "",
             "| shape (d_in, d_sae, k, batch) | polysae linear | polysae poly (d_in, 64, 64) | "
             "eai-sparsify | SAELens TopK | poly / linear | linear / sparsify |",
             "|---|---|---|---|---|---|---|"]
    def row(r, cpu):
        s, m = r["shape"], dict(r["main"])
        if "saelens_process" in r:
            m["saelens"] = r["saelens_process"]["saelens"]
        if cpu:
            cells = [f"{m[n]['cpu_ratio_to_ref']:.2f}" if n in m else "—" for n in PEERS]
        else:
            cells = [_fmt(m[n]) if n in m else "—" for n in PEERS]
        sfx = "_cpu" if cpu else ""
        cells += [f"{r[k + sfx]:.2f}" if k + sfx in r else "—"
                  for k in ("poly_over_linear", "linear_over_sparsify")]
        return f"| {s['d_in']}, {s['d_sae']}, {s['k']}, {s['batch']} | " + " | ".join(cells) + " |"

    lines += [row(r, False) for r in results]
    lines += ["", "Process CPU time (all threads) instead of wall time, same steps: less sensitive "
              "to other processes on a shared machine (median of per-round ratios):", "",
              "| shape | polysae linear | polysae poly | eai-sparsify | SAELens TopK | "
              "poly / linear | linear / sparsify |", "|---|---|---|---|---|---|---|"]
    lines += [row(r, True) for r in results]
    lines += ["", "## Per-stage breakdown (ms, median of "
              f"{args.stage_reps} instrumented steps)", "",
              "A `.detach()` between encoder and decoder splits the backward; `constraint` is the "
              "retraction (poly) or sparsify's decoder-row normalisation and gradient projection.",
              ""]
    for r in results:
        s = r["shape"]
        provs = dict(r["main"])
        if "saelens_process" in r:
            provs["saelens"] = r["saelens_process"]["saelens"]
            provs["ref (SAELens process)"] = r["saelens_process"]["ref"]
        lines += [f"### d_in {s['d_in']}, d_sae {s['d_sae']}, k {s['k']}, batch {s['batch']}", "",
                  "| stage | " + " | ".join(provs) + " |", "|---" * (1 + len(provs)) + "|"]
        for st in STAGES:
            if any(st in p["stages_ms"] for p in provs.values()):
                lines.append(f"| {st} | " + " | ".join(
                    _ms(p["stages_ms"].get(st)) for p in provs.values()) + " |")
        lines.append("| **whole step** | " + " | ".join(f"**{p['step_ms']:.0f}**"
                                                       for p in provs.values()) + " |")
        lines.append("")
    atomic_write_text(out / f"step_peers_{tag}.md", "\n".join(lines) + "\n")
    print(f"wrote {out / f'step_peers_{tag}.json'} and .md")


if __name__ == "__main__":
    sys.exit(main())
