"""The GPU suite's CPU dry run (issue 24): ``bash benchmarks/gpu_suite.sh --cpu-dry-run`` runs every
step of the suite at toy sizes on CPU (Triton under the interpreter where a step times kernels), so
the script that will run on the day a GPU is lent cannot rot. No bundled model is loaded (a toy
random model is generated), so this is not ``slow``; it takes about a minute on 2 CPU cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = ["env", "gpu_tests", "decoder", "train_step", "train", "model", "harvest", "run", "blocks"]


def test_gpu_suite_cpu_dry_run(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    # About a minute on an idle 2-core machine (the suite's own dry-run budget is 170 s); the
    # budget is raised here so that a CI machine busy with other tests does not skip steps.
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--cpu-dry-run",
                        "--budget", "420", "--out", str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=480)
    summary = out / "suite_cpu-dry-run.json"
    assert summary.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(summary.read_text())
    log = (out / "suite_cpu-dry-run.log").read_text()
    failed = {n: s.get("error") for n, s in res["steps"].items() if s["status"] != "ok"}
    assert not failed, f"{failed}\n--- log tail ---\n{log[-4000:]}"
    assert p.returncode == 0 and res["ok"] is True
    assert list(res["steps"]) == STEPS
    assert res["mode"] == "cpu-dry-run" and res["total_s"] <= 420

    for key in ("suite", "mode", "ok", "date", "budget_s", "total_s", "env", "model", "steps",
                "ratios", "targets", "files"):
        assert key in res, key
    for key in ("device_name", "torch", "triton", "python", "date", "kernels_backend",
                "polysae_file", "kernels_file"):
        assert key in res["env"], key
    # the steps imported polysae and polysae.kernels from this working tree
    assert res["env"]["polysae_file"].startswith(str(REPO / "polysae"))
    assert res["env"]["kernels_file"].startswith(str(REPO / "kernels"))
    assert res["model"]["random"] is True and "randomly initialised" in res["model"]["note"]

    r = res["ratios"]
    assert set(r) == {"gpu_tests", "decoder", "train_step", "train", "harvest", "run", "blocks"}
    assert r["gpu_tests"]["failed"] == 0 and r["gpu_tests"]["errors"] == 0
    assert r["gpu_tests"]["skipped"] > 0  # collected (then skipped: no CUDA)
    assert len(r["decoder"]) == 2  # two d_sae, as the GPU run's 16k and 65k
    for row in r["decoder"].values():
        for k in ("ref_dense_fp32/fused_triton", "fused_triton/linear_triton"):
            assert row[k] > 0, k
    (step,) = r["train_step"].values()
    assert step["dense_ref/triton step"] > 0
    assert r["train"]["poly / linear (tokens/s)"] > 0
    assert r["harvest"]["harvest/bare"] > 0 and r["harvest"]["harvest/run_with_cache"] > 0
    assert set(r["run"]["fvu"]) == {"vanilla", "poly"}
    assert r["blocks"]["fused_triton"]["speedup_vs_default"] > 0

    for name in ("decoder", "train_step", "train", "harvest", "decoder_blocks", "suite"):
        for ext in ("json", "md"):
            assert (out / f"{name}_cpu-dry-run.{ext}").exists(), (name, ext)
    md = (out / "suite_cpu-dry-run.md").read_text()
    assert "CPU dry run" in md and "| run | ok |" in md
