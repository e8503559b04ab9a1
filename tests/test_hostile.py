"""Hostile use (issue #29): concurrent writers, non-finite values, damaged files, process edges.

Each case asserts a clear error naming the culprit (file, field, flag, folder or holder) or a
clean success, never a traceback, and that valid files already on disk are left as they were.
Summarised in docs/bad-inputs.md (the rows from 61 on). Real subprocesses where the case is about
processes (two writers, Ctrl-C); everything else in-process through ``polysae.__main__.main``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from polysae.__main__ import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.0.hook_resid_post"
TRAIN = ["--hook", HOOK, "--split", "all", "--d-sae", "32", "--k", "4", "--ranks", "16", "8",
         "8", "--steps", "4", "--batch-size", "32", "--checkpoint-every", "1", "--no-progress"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")


def cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = cli_main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _tiny_model(d_model: int = 16):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    return HookedTransformer(HookedTransformerConfig(
        n_layers=1, d_model=d_model, n_ctx=16, d_head=8, n_heads=d_model // 8, d_vocab=60,
        act_fn="gelu")).eval()


def harvest_tiny(d: Path, rows: int = 320) -> Path:
    from polysae.data.harvesting import HarvestConfig, harvest

    d.mkdir(parents=True, exist_ok=True)
    toks = torch.randint(0, 60, (rows // 10, 10), generator=torch.Generator().manual_seed(1))
    np.save(d / "t.npy", toks.numpy())
    harvest(HarvestConfig(model="tiny", hooks=[HOOK], dataset=str(d / "t.npy"), tokens=rows,
                          ctx=10, out=str(d / "acts"), batch_size=8, shard_size=64,
                          dtype="float32", progress=False), model=_tiny_model())
    return d / "acts"


@pytest.fixture(scope="module")
def acts(tmp_path_factory) -> Path:
    return harvest_tiny(tmp_path_factory.mktemp("hostile"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _spawn(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "polysae", *map(str, argv)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the first process ended early: {proc.communicate()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the first process")
        time.sleep(0.1)


# -- 1. one writer per output folder --------------------------------------------------------------
def test_two_trainings_into_one_folder_and_ctrl_c(acts, tmp_path):
    """Two real `polysae train` processes on one --out: the second fails at once naming the
    folder and the first's pid, and changes nothing; Ctrl-C then ends the first with one line
    (step and resume hint) and exit 130."""
    from polysae.outlock import lock_paths

    run = tmp_path / "run"
    argv = ["train", "--acts", acts, "--out", run, *TRAIN[:-7], "--steps", "1000000",
            "--batch-size", "32", "--checkpoint-every", "20", "--no-progress"]
    first = _spawn(*argv)
    try:
        side = lock_paths(run)[1]
        _wait_for(lambda: side.is_file() and (run / "poly" / "trainer_state.pt").is_file(), first)
        before = snapshot(run / "poly")
        second = subprocess.run([sys.executable, "-m", "polysae", *map(str, argv)], cwd=ROOT,
                                env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1, second.stderr
        assert f"output folder {run} is in use by pid {first.pid}" in second.stderr
        assert "polysae train" in second.stderr and "Traceback" not in second.stderr
        now = snapshot(run / "poly")
        assert now["config.json"] and set(before) <= set(now)  # the first run goes on
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("polysae train: interrupted at step ")
    assert f"polysae train --out {run} --resume" in last
    assert not side.exists()  # the lock's sidecar goes with its holder


def _hold(folder: Path) -> subprocess.Popen:
    """A real process holding ``folder``'s output lock until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from polysae.outlock import output_lock
        with output_lock({str(folder)!r}, "polysae harvest --out {folder}"):
            print("held", flush=True)
            time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.parametrize("cmd", ["harvest", "train", "eval", "export", "browse", "run"])
def test_every_writer_refuses_a_locked_folder(cmd, acts, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("first run's file")
    argv = {"harvest": ["harvest", "--out", out, "--model", "tiny"],
            "train": ["train", "--acts", acts, "--out", out],
            "eval": ["eval", "--sae", tmp_path, "--out", out],
            "export": ["export", tmp_path, out, "--format", "polysae"],
            "browse": ["browse", "--sae", tmp_path, "--acts", acts, "--out", out],
            "run": ["run", "--out", out]}[cmd]
    holder = _hold(out)
    try:
        code, err = cli(capsys, *argv)
        inner_code, inner_err = cli(capsys, *[a if a != out else out / "sub" for a in argv])
    finally:
        holder.kill()
        holder.wait()
    assert code == 1 and f"output folder {out} is in use by pid {holder.pid}" in err, err
    assert "polysae harvest --out" in err  # the holder's command line, from the sidecar
    assert inner_code == 1 and f"is inside {out}, which another polysae process" in inner_err
    assert snapshot(out) == {"keep.txt": b"first run's file"}
    # the holder died: its lock goes with it (a stale sidecar is not a lock)
    from polysae.outlock import output_lock

    with output_lock(out):
        pass
