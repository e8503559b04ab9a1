"""Feature-browser build cost at scale: d_sae 16k over 1M harvested tokens, on CPU.

    .venv/bin/python benchmarks/bench_browser.py [--tokens 1000000] [--d-sae 16384] [--d-in 64]

Set-up (cached in --work): a tiny random 1-layer HookedTransformer with SmolLM2's tokenizer and
vocabulary (49,152) harvests --tokens tokens of the bundled BBC corpus through polysae's own
harvester (real text, real document ids, real multi-byte tokens) into an ActivationStore; a
random PolySAE (TopK k=64, ranks (d_in, 64, 64)) is saved beside it.

Each measured phase runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own:
- ``open``: imports, open the store, load tokenizer and W_U (the floor every phase pays);
- ``encode``: the SAE encoder alone over the same rows in the same chunks (what any pass costs);
- ``build``: ``polysae.browser.build_site`` end to end (pair scoring, the one streaming pass,
  logit tables, writing the site).
Printed and written (benchmarks/results/browser_<date>.{json,md}): seconds, peak RSS, the
build / encode time ratio (the browser's overhead over a bare encoder pass, measured side by side
in one run) and the site's size on disk. The machine is shared, so times are wall-clock under
whatever else runs; the ratio is the more stable figure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_harvest import cpu_name  # noqa: E402 (benchmarks/ is the script's folder)

HOOK = "blocks.0.hook_resid_post"
ROOT = Path(__file__).resolve().parents[1]


def _tokenizer():
    from polysae.data.models import cache_dir, load_model

    tok_dir = cache_dir() / "models" / "smollm2-135m" / "tokenizer"
    if not tok_dir.is_dir():  # first use converts the bundled GGUF into the cache
        load_model("smollm2-135m")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def prepare(work: Path, tokens: int, d_in: int, d_sae: int, k: int) -> None:
    import torch
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from polysae import SAE, SAEConfig
    from polysae.data.harvesting import HarvestConfig, harvest

    stamp = work / "prepared.json"
    want = {"tokens": tokens, "d_in": d_in, "d_sae": d_sae, "k": k}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tok = _tokenizer()
    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(
        n_layers=1, d_model=d_in, n_ctx=128, d_head=16, n_heads=d_in // 16,
        d_vocab=len(tok), act_fn="gelu", seed=0)).eval()
    model.tokenizer = tok
    t0 = time.perf_counter()
    harvest(HarvestConfig(model="tiny-smollm2-vocab", hooks=[HOOK], dataset="bbc", tokens=tokens,
                          ctx=128, out=str(work / "acts"), dtype="float16", batch_size=64,
                          progress=False), model=model)
    print(f"harvested {tokens} tokens in {time.perf_counter() - t0:.1f} s", flush=True)
    save_file({"W_U": model.W_U.detach().contiguous()}, str(work / "w_u.safetensors"))
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, decoder="poly"))
    sae.save(work / "sae", metadata={"hook": HOOK, "model": "tiny-smollm2-vocab"})
    stamp.write_text(json.dumps(want))


def phase(name: str, work: Path) -> dict:
    """Run in a subprocess: one measured phase; returns its figures."""
    t_start = time.perf_counter()
    import torch
    from safetensors.torch import load_file

    from polysae.browser import BrowseConfig, build_site
    from polysae.data.store import ActivationStore
    from polysae.sae import load_checkpoint

    torch.set_num_threads(os.cpu_count() or 1)
    store = ActivationStore(work / "acts", split="all", shuffle=False)
    sae, _ = load_checkpoint(work / "sae")
    tok = _tokenizer()
    W_U = load_file(str(work / "w_u.safetensors"))["W_U"]
    cfg = BrowseConfig()
    out: dict = {"phase": name, "rows": store.n_rows}
    t0 = time.perf_counter()
    if name == "encode":
        with torch.no_grad():
            for s in range(0, store.n_rows, cfg.stats.chunk_rows):
                x = store.read_rows(s, min(store.n_rows, s + cfg.stats.chunk_rows)).float()
                sae.encode_sparse(x)
    elif name == "build":
        class _M:  # what build_site reads from a model
            pass
        m = _M()
        m.W_U, m.tokenizer = W_U, tok
        timings: dict = {}
        site = work / "site"
        build_site(sae, store, site, model=m, config=cfg, meta={"bench": True}, timings=timings,
                   overwrite=True)  # a cached --work keeps the last run's site
        out["stages_s"] = {k: round(v, 2) for k, v in timings.items()}
        out["site_mb"] = round(sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
                               / 2 ** 20, 1)
        out["site_files"] = sum(1 for p in site.rglob("*") if p.is_file())
    out["seconds"] = round(time.perf_counter() - t0, 2)
    ru = resource.getrusage(resource.RUSAGE_SELF)  # CPU time is per process (reset at fork)
    out["cpu_seconds_total"] = round(ru.ru_utime + ru.ru_stime, 1)
    out["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    out["setup_seconds"] = round(t0 - t_start, 2)
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _peak_rss_mb() -> float:
    """This process's own high-water RSS. ru_maxrss is not it on Linux: a child starts with its
    parent's high-water mark (kept across fork + execve), so read VmHWM of the new mm."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--d-in", type=int, default=64)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_browser"))
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    a = ap.parse_args()
    work = Path(a.work)
    if a.phase:
        print(json.dumps(phase(a.phase, work)))
        return 0
    prepare(work, a.tokens, a.d_in, a.d_sae, a.k)
    results = {}
    for name in ("open", "encode", "build"):
        r = subprocess.run([sys.executable, __file__, "--phase", name, "--work", str(work)],
                           capture_output=True, text=True, env={**os.environ,
                                                                "HF_HUB_OFFLINE": "1"})
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        results[name] = json.loads(r.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    import torch

    import polysae

    doc = {
        "benchmark": "feature browser build (polysae browse)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU: {cpu_name()} ({os.cpu_count()} cores visible, shared with other jobs)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "polysae": polysae.__version__},
        "setup": {"tokens": results["build"]["rows"], "d_in": a.d_in, "d_sae": a.d_sae,
                  "k": a.k, "decoder": "poly, ranks (d_in, 64, 64)", "store": "float16 shards",
                  "vocab": 49152, "browse_config": "defaults (20 contexts, 2000 pair candidates, "
                                                   "200 pairs, chunk 2048 rows)"},
        "results": results,
        "ratio_build_over_encode": round(results["build"]["seconds"]
                                         / results["encode"]["seconds"], 2),
        "extra_rss_mb_build_over_open": round(results["build"]["peak_rss_mb"]
                                              - results["open"]["peak_rss_mb"], 1),
    }
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"browser_{dt.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    b, e, o = results["build"], results["encode"], results["open"]
    md = [
        f"# Feature browser build — {doc['date']}",
        "",
        f"{doc['device']}; torch {torch.__version__}, polysae {polysae.__version__}.",
        f"{doc['setup']['tokens']:,} harvested BBC tokens (float16 store), d_in {a.d_in}, "
        f"d_sae {a.d_sae}, TopK k={a.k}, poly decoder; default BrowseConfig.",
        "",
        "| phase | wall seconds | CPU seconds (whole process) | peak RSS (MB) | load avg at end |",
        "|---|---:|---:|---:|---:|",
        f"| open (imports, store, tokenizer, W_U) | {o['setup_seconds']} | "
        f"{o.get('cpu_seconds_total', '')} | {o['peak_rss_mb']} | {o.get('load_avg_1m_end', '')} |",
        f"| encoder alone over all rows | {e['seconds']} | {e.get('cpu_seconds_total', '')} | "
        f"{e['peak_rss_mb']} | {e.get('load_avg_1m_end', '')} |",
        f"| build_site end to end | {b['seconds']} | {b.get('cpu_seconds_total', '')} | "
        f"{b['peak_rss_mb']} | {b.get('load_avg_1m_end', '')} |",
        "",
        "Wall seconds exclude process start-up and imports; CPU seconds include them. The "
        "machine's two cores were shared with other jobs (see the load average), so wall time "
        "overstates an idle machine's; CPU seconds / 2 bounds it from below.",
        "",
        f"build / encode time: **{doc['ratio_build_over_encode']}x**; build stages (s): "
        f"{b.get('stages_s')}; site: {b.get('site_mb')} MB in {b.get('site_files')} files.",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
