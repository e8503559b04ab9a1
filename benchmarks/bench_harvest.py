"""Harvest throughput on the bundled SmolLM2-135M, measured side by side in one run.

Three paths over the same token batches (BBC text, ``--batch`` contexts of ``--ctx`` tokens):

- ``bare``: ``model(tokens, stop_at_layer=L+1)`` in inference mode: the forward alone, stopped after
  the hooked layer, nothing kept; the ceiling for any harvester.
- ``harvest``: ``polysae.data.harvesting`` end to end into a fresh folder (capture, dtype cast,
  shards written by the background thread, manifest), its loop time.
- ``run_with_cache``: TransformerLens ``run_with_cache(tokens, names_filter=hook)``, a full forward
  keeping only the wanted hook (the strict baseline);
- ``run_with_cache_all``: plain ``run_with_cache(tokens)``, TransformerLens' default, which keeps
  every hook point (what a user writes without thinking about it).

Repeats are interleaved (bare, harvest, run_with_cache, bare, ...) so load drift on a shared CPU
hits all three alike; the ratios reported are medians over repeats of per-repeat ratios. Two
clocks: wall time (what a user waits) and process CPU time (the work done; on a machine shared
with other jobs wall-clock ratios are mostly noise while CPU-time ratios stay stable; use
``--threads 1`` there so no spinning OpenMP thread inflates CPU time). For harvest both clocks
cover its forward/write loop (``HarvestResult.seconds`` / ``cpu_seconds``, the writer thread's CPU
included), not the one-off set-up (tokenizing, probe forward, disk check).
Goals (issue 3): harvest / bare >= 0.90 and harvest / run_with_cache >= 2.5.

``--backend hf`` / ``--backend nnsight`` (issue 23) harvest through that backend instead, and
``bare`` becomes a bare ``transformers`` forward stopped at the hook's layer: a second, plain copy
of the Hugging Face model (never hooked, never wrapped by nnsight) with its block list cut after
the hooked layer, run in inference mode with ``use_cache=False``, nothing kept. Goal: harvest /
bare >= 0.90 for both; the TransformerLens baselines are left out.

    .venv/bin/python benchmarks/bench_harvest.py [--batches 4 --batch 16 --ctx 128 --layer 15]
Writes benchmarks/results/harvest_<device>.json and .md.

``--model`` takes any name or folder ``polysae harvest --model`` takes (the GPU suite passes a
randomly initialised model of SmolLM2-135M's shapes when the bundled weights are absent, and says
so with ``--note``), ``--dataset`` any dataset it reads. A model without TransformerLens hooks (a
plain Hugging Face folder) has no ``run_with_cache``: its ``bare`` path is ``capture`` stopped
after the hook, and the two TransformerLens baselines are left out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=4, help="forward batches per measurement")
    ap.add_argument("--batch", type=int, default=16, help="contexts per batch")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--layer", type=int, default=15, help="hooked layer (resid_post)")
    ap.add_argument("--hook", default=None,
                    help="hook name (default blocks.<layer>.hook_resid_post)")
    ap.add_argument("--model", default="smollm2-135m",
                    help="bundled name, TransformerLens name or local HF folder")
    ap.add_argument("--dataset", default="bbc", help="any dataset polysae harvest reads")
    ap.add_argument("--backend", default=None,
                    choices=("transformer_lens", "hf", "nnsight"),
                    help="backend the harvest runs through (default: load_model's default); hf "
                         "and nnsight are compared with a bare transformers forward")
    ap.add_argument("--note", default="", help="recorded in the results (e.g. 'random weights')")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--store-dtype", default="float16")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from polysae import HarvestConfig, harvest
    from polysae.data import chunking, models
    from polysae.version import __version__

    dtype = getattr(torch, args.model_dtype)
    t = time.perf_counter()
    lm = models.load_model(args.model, device=args.device, dtype=dtype,
                           **({"backend": args.backend} if args.backend else {}))
    load_s = time.perf_counter() - t
    tl = hasattr(lm.model, "run_with_cache")  # TransformerLens: stop_at_layer, run_with_cache
    if tl:
        import transformer_lens
    hook = args.hook or f"blocks.{args.layer}.hook_resid_post"
    plain = None if tl or lm.backend == "transformer_lens" else bare_transformers(
        models, args.model, args.device, dtype, hook)
    n_ctx = args.batches * args.batch
    chunks = chunking.build_chunks(args.dataset, lm.tokenizer, args.ctx, n_ctx)
    batches = [b.to(args.device) for b in chunks.tokens.split(args.batch)]
    n_tok = chunks.tokens.numel()
    dev = torch.device(args.device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(step) -> tuple[float, float]:
        """(wall tok/s, tok per CPU-second) of ``step(batch)`` over all batches."""
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for b in batches:
                step(b)
        sync()
        return n_tok / (time.perf_counter() - t0), n_tok / (time.process_time() - c0)

    def bare() -> tuple[float, float]:
        if plain is not None:  # a bare transformers forward, blocks after the hook's cut off
            return timed(lambda b: plain(input_ids=b, use_cache=False))
        if not tl:  # plain HF model: the forward stopped right after the hook, nothing kept
            return timed(lambda b: models.capture(lm, b, [hook]))
        return timed(lambda b: lm.model(b, stop_at_layer=args.layer + 1))

    def keep(cache) -> None:
        cache[hook].to("cpu", torch.float16)  # what a harvester would keep

    def rwc() -> tuple[float, float]:
        return timed(lambda b: keep(lm.model.run_with_cache(b, names_filter=hook)[1]))

    def rwc_all() -> tuple[float, float]:
        return timed(lambda b: keep(lm.model.run_with_cache(b)[1]))

    def harv(tmp: Path, i: int) -> tuple[float, float]:
        r = harvest(HarvestConfig(model=args.model, hooks=[hook], dataset=args.dataset,
                                  tokens=n_tok, ctx=args.ctx, out=str(tmp / f"h{i}"),
                                  batch_size=args.batch, shard_size=4 * args.batch * args.ctx,
                                  dtype=args.store_dtype, model_dtype=args.model_dtype,
                                  device=args.device, progress=False), model=lm)
        assert r.n_rows == n_tok
        return r.tokens_per_s, n_tok / r.cpu_seconds

    bare()  # warm-up (allocator, thread pool)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            (b, bc), (h, hc) = bare(), harv(Path(tmp), i)
            (c, cc), (a, ac) = (rwc(), rwc_all()) if tl else ((None, None), (None, None))
            rows.append({"bare": b, "harvest": h, "run_with_cache": c, "run_with_cache_all": a,
                         "bare_cpu": bc, "harvest_cpu": hc, "run_with_cache_cpu": cc,
                         "run_with_cache_all_cpu": ac})
            print(f"repeat {i}: wall tok/s bare {b:,.0f}, harvest {h:,.0f}, run_with_cache "
                  f"{c or 0:,.0f}, run_with_cache_all {a or 0:,.0f}; per CPU-second {bc:,.0f}, "
                  f"{hc:,.0f}, {cc or 0:,.0f}, {ac or 0:,.0f}", file=sys.stderr)
    med = {k: (statistics.median(r[k] for r in rows) if rows[0][k] is not None else None)
           for k in rows[0]}

    def ratio(a: str, b: str) -> float | None:
        if rows[0][b] is None:
            return None
        return statistics.median(r[a] / r[b] for r in rows)

    def f(x, fmt=",.0f") -> str:
        return "n/a" if x is None else format(x, fmt)

    ratio_bare, ratio_rwc = ratio("harvest", "bare"), ratio("harvest", "run_with_cache")
    cpu_bare = ratio("harvest_cpu", "bare_cpu")
    cpu_rwc = ratio("harvest_cpu", "run_with_cache_cpu")
    ratio_all = ratio("harvest", "run_with_cache_all")
    cpu_all = ratio("harvest_cpu", "run_with_cache_all_cpu")
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    device = torch.cuda.get_device_name() if dev.type == "cuda" else cpu_name()
    busy = dev.type == "cpu" and load is not None and load[0] > (os.cpu_count() or 1)
    result = {
        "benchmark": "harvest", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": device, "device_type": dev.type, "threads": args.threads,
        "versions": {"polysae": __version__, "torch": torch.__version__,
                     "transformer_lens": (getattr(transformer_lens, "__version__", "3.x")
                                          if tl else None),
                     "transformers": __import__("transformers").__version__,
                     "nnsight": (__import__("nnsight").__version__
                                 if lm.backend == "nnsight" else None),
                     "python": platform.python_version()},
        "model": args.model, "model_kind": lm.kind, "backend": lm.backend,
        "bare": ("transformers forward, blocks after the hook's layer cut off" if plain is not None
                 else "TransformerLens stop_at_layer" if tl else "capture stopped at the hook"),
        "note": args.note, "dataset": args.dataset,
        "model_dtype": args.model_dtype, "store_dtype": args.store_dtype,
        "hook": hook, "batch": args.batch, "ctx": args.ctx, "tokens_per_measurement": n_tok,
        "repeats": rows, "median_tok_s": med, "model_load_s": load_s,
        "harvest_over_bare": ratio_bare, "harvest_over_run_with_cache": ratio_rwc,
        "harvest_over_run_with_cache_all": ratio_all,
        "cpu_time": {"harvest_over_bare": cpu_bare, "harvest_over_run_with_cache": cpu_rwc,
                     "harvest_over_run_with_cache_all": cpu_all},
        "load_average_at_end": load, "cpu_cores": os.cpu_count(),
        "cpu_shared_with_other_jobs": busy,
        "goals": {"harvest_over_bare": 0.90, "harvest_over_run_with_cache": 2.5},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The ratio to a full forward depends on depth (a layer-L harvest skips layers L+1.. and the
    # LM head), so results are kept per hooked layer.
    stem = f"harvest_{dev.type}_L{args.layer}" + (
        "" if args.model_dtype == "float32" else f"_{args.model_dtype}") + (
        "" if lm.backend == "transformer_lens" else f"_{lm.backend}")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    name = "SmolLM2-135M" if args.model == "smollm2-135m" else Path(args.model).name
    threads_note = f"load average {load}" if load else "load unknown"
    bare_label = (f"bare transformers forward, blocks after layer {args.layer} cut off"
                  if plain is not None else
                  f"bare forward, stop after {f'layer {args.layer}' if tl else hook}")
    md = [f"# Harvest throughput: {name}, {hook}, {args.model_dtype} model, "
          f"{args.store_dtype} storage, {lm.backend} backend",
          "", *([f"Model: {args.note}.", ""] if args.note else []),
          f"{device}, {args.threads} threads; "
          + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v) + "; "
          f"{result['date'][:19]}Z; {args.batch}x{args.ctx} tokens per batch, {n_tok} tokens per "
          f"measurement, median of {args.repeats} interleaved repeats.", "",
          f"Load average at the end: {load}.", "",
          "| path | wall tok/s | harvest / path (wall) | tok per CPU-s | harvest / path (CPU) "
          "| goal |", "|---|---|---|---|---|---|",
          f"| {bare_label} | "
          f"{med['bare']:,.0f} | {ratio_bare:.2f} | {med['bare_cpu']:,.0f} | {cpu_bare:.2f} "
          "| >= 0.90 |",
          f"| polysae harvest (to disk) | {med['harvest']:,.0f} | 1.00 | "
          f"{med['harvest_cpu']:,.0f} | 1.00 | |",
          *([f"| TL run_with_cache, full forward | {f(med['run_with_cache'])} | "
             f"{f(ratio_rwc, '.2f')} | {f(med['run_with_cache_cpu'])} | {f(cpu_rwc, '.2f')} "
             "| >= 2.5 |",
             f"| TL run_with_cache, full forward, all hooks cached (TL default) | "
             f"{f(med['run_with_cache_all'])} | {f(ratio_all, '.2f')} | "
             f"{f(med['run_with_cache_all_cpu'])} | {f(cpu_all, '.2f')} | >= 2.5 |"] if tl
            else []), ""]
    md += ([f"The CPU was shared with other jobs ({threads_note} on {os.cpu_count()} cores): "
            "wall-clock ratios are mostly noise, CPU-time ratios are the ones to read.", ""]
           if busy else [])
    (out / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


def bare_transformers(models, name: str, device: str, dtype, hook: str):
    """A plain ``transformers`` copy of ``name`` whose block list ends at ``hook``'s block: its
    base model's forward is the bare forward stopped at the hook's layer."""
    import re

    be = models.as_backend(models.load_model(name, device=device, dtype=dtype, backend="hf"))
    m = re.match(r"(.*?)\.(\d+)(?:\.|$)", be.site(hook).module)  # model.layers.15[.mlp]
    if m is None:
        raise SystemExit(f"hook {hook!r} is not inside a block; no layer to stop at")
    blocks, layer = m.group(1), int(m.group(2))
    owner, attr = blocks.rsplit(".", 1) if "." in blocks else ("", blocks)
    base = be.hf.get_submodule(owner)
    setattr(base, attr, getattr(base, attr)[: layer + 1])
    return base


if __name__ == "__main__":
    sys.exit(main())
