"""Exact resume after ``kill -9``: the per-step loss trajectory is bit-identical on CPU.

Two child processes run the same script: one trains 30 steps straight through; the other is
killed with SIGKILL by its own callback at step 23 (checkpoints every 10 steps, so the last good
one is step 20 and steps 21-23 must be recomputed), then a third process resumes it. Three SAEs
share the stream (TopK vanilla, TopK poly, BatchTopK poly: the EMA threshold buffer and the dead
counters must survive), with activation normalisation on (the scale must be restored, not
re-estimated) and AuxK active (dead window 3 steps).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import polysae

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from polysae import SAE, SAEConfig
    from polysae.training import TensorSource, TrainConfig, Trainer

    out, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(32, 16, generator=g), dim=-1)
    X = ((0.5 + torch.rand(4096, 32, generator=g)) * (torch.rand(4096, 32, generator=g) < 0.08)
         ) @ dirs * 5.0
    cfg = TrainConfig(steps=30, lr=3e-3, checkpoint_every=10, log_every=1, dead_window=3,
                      normalize=True, norm_batches=3, progress=False, seed=7,
                      retract_every=int(os.environ.get("RETRACT_EVERY", "1")))
    torch.manual_seed(cfg.seed)
    saes = {"vanilla": SAE(SAEConfig(16, 48, k=4, decoder="linear")),
            "poly": SAE(SAEConfig(16, 48, k=4, ranks=(16, 8, 8))),
            "poly-btk": SAE(SAEConfig(16, 48, k=4, ranks=(16, 8, 8), sparsifier="batchtopk"))}

    def cb(trainer, outputs):
        if trainer.step_count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    bs = int(os.environ["BS"])
    Trainer(saes, cfg, out).fit(TensorSource(X, bs, seed=3), resume=resume, callback=cb)
""")


def run(tmp_path, out, kill_at, resume, bs=350, retract_every=1):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    # The plain-torch decode path (conftest forces it in-process; a child would otherwise pick the
    # Triton interpreter, ~1000x slower, through the inherited TRITON_INTERPRET=1).
    env = dict(os.environ, BS=str(bs), POLYSAE_DISABLE_TRITON="1",
               RETRACT_EVERY=str(retract_every))
    return subprocess.run([sys.executable, str(script), str(out), str(kill_at),
                           "1" if resume else "0"], env=env, capture_output=True, text=True,
                          timeout=300)


def trajectory(folder):
    return [(m["step"], m["tokens"], m["loss"], m["mse"], m["aux"], m["l0"], m["dead_frac"])
            for m in map(json.loads, (folder / "metrics.jsonl").open())]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The uninterrupted run (shared by both tests)."""
    d = tmp_path_factory.mktemp("ref")
    done = run(d, d / "ref", -1, False)
    assert done.returncode == 0, done.stderr
    return d / "ref"


def test_kill_9_then_resume_is_bit_identical(tmp_path, ref):
    """350-row batches over 4096 rows: 11 per epoch. The checkpoint at step 20 sits mid-epoch 1
    (batch 9), the kill at step 23 is in epoch 2, so the resumed run restarts mid-epoch and
    crosses an epoch boundary again."""
    killed = run(tmp_path, tmp_path / "run", 23, False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    st = torch.load(tmp_path / "run" / "poly" / "trainer_state.pt", weights_only=True)
    assert st["step"] == 20
    assert max(m[0] for m in trajectory(tmp_path / "run" / "poly")) == 23  # logged past the ckpt
    resumed = run(tmp_path, tmp_path / "run", -1, True)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("vanilla", "poly", "poly-btk"):
        a, b = trajectory(ref / name), trajectory(tmp_path / "run" / name)
        assert [m[0] for m in a] == list(range(1, 31))
        assert a == b, name  # floats compared exactly
        ta = polysae.load(ref / name).tensors()
        tb = polysae.load(tmp_path / "run" / name).tensors()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)
    assert (st["epoch"], st["batch_in_epoch"]) == (1, 9)
    state_file = tmp_path / "run" / "poly" / "trainer_state.pt"
    assert torch.load(state_file, weights_only=True)["epoch"] == 2


def test_resume_picks_common_step_when_states_disagree(tmp_path, ref):
    """A kill between the renames of two SAEs' states leaves one SAE a checkpoint ahead; resume
    falls back to the newest step both have (the .prev state)."""
    assert run(tmp_path, tmp_path / "run", 23, False).returncode == -signal.SIGKILL
    # simulate the torn publish: "poly" lost its newest state, keeping only the previous one
    poly = tmp_path / "run" / "poly"
    os.replace(poly / "trainer_state.prev.pt", poly / "trainer_state.pt")
    assert torch.load(poly / "trainer_state.pt", weights_only=True)["step"] == 10
    assert run(tmp_path, tmp_path / "run", -1, True).returncode == 0
    for name in ("vanilla", "poly", "poly-btk"):
        assert trajectory(ref / name) == trajectory(tmp_path / "run" / name)


def test_resume_between_retractions_is_bit_identical(tmp_path):
    """retract_every=3: the step-20 checkpoint falls between retractions (last at 18). Its
    sae.safetensors holds a retracted copy, its trainer state the raw weights, so the run killed
    at 23 and resumed from 20 matches the uninterrupted one bit for bit."""
    from polysae.orthogonal import orthogonality_error
    ref3 = run(tmp_path, tmp_path / "ref", -1, False, retract_every=3)
    assert ref3.returncode == 0, ref3.stderr
    killed = run(tmp_path, tmp_path / "run", 23, False, retract_every=3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    poly = tmp_path / "run" / "poly"
    st = torch.load(poly / "trainer_state.pt", weights_only=True)
    assert st["step"] == 20
    assert orthogonality_error(st["model"]["decoder.U"]) > 1e-6  # raw: 2 steps since step 18
    from polysae.sae import load_checkpoint
    assert orthogonality_error(load_checkpoint(poly)[0].decoder.U) < 1e-5
    resumed = run(tmp_path, tmp_path / "run", -1, True, retract_every=3)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("vanilla", "poly", "poly-btk"):
        assert trajectory(tmp_path / "ref" / name) == trajectory(tmp_path / "run" / name), name
        ta = polysae.load(tmp_path / "ref" / name).tensors()
        tb = polysae.load(tmp_path / "run" / name).tensors()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)
