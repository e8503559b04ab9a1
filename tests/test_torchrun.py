"""``torchrun -m polysae train`` on CPU (gloo), through the real launcher and the real CLI.

A tiny harvest (1-layer random HookedTransformer, d_model 16, 640 rows in 7 float32 shards) is
trained by two SAEs at once (TopK vanilla and TopK PolySAE, AuxK active with a dead window of 3)
for 40 steps with checkpoints every 2 steps.

- 2 ranks == 1 process: ``torchrun --nproc_per_node 2 --standalone`` with ``--batch-size 64``
  (32 rows per rank) against ``polysae train --batch-size 64`` in one process. The ranks' rows
  of a step are exactly the 1-process batch (ActivationStore rank slicing), so the only
  difference is float32 reassociation: DDP sums the two per-rank mean-loss gradients in its
  all-reduce and halves them, one process takes one mean over 64 rows. Tolerance: atol/rtol 1e-5
  on every weight after 40 steps, rel 1e-5 on every logged loss. Measured on this 2-core CPU
  (torch 2.13): max abs weight difference ~1e-7; see the test's assertion message.
- kill -9 and resume: the same 2-rank run, SIGKILLed (launcher and both workers) as soon as its
  first checkpoint is on disk, then restarted with ``--resume`` as a *two-node* job (two torchrun
  launchers, ``--nnodes 2 --node_rank 0/1 --master_addr 127.0.0.1``, one worker each), must end
  bitwise equal to the uninterrupted 2-rank run: same weights, same loss trajectory.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import polysae
from polysae.__main__ import main as cli_main
from polysae.data.harvesting import HarvestConfig, harvest

HOOK = "blocks.0.hook_resid_post"
STEPS, EVERY, BATCH = 40, 2, 64
TRAIN = ["--hook", HOOK, "--split", "all", "--decoders", "linear", "poly", "--d-sae", "48",
         "--k", "4", "--ranks", "16", "8", "8", "--dead-window", "3", "--lr", "3e-3",
         "--steps", str(STEPS), "--batch-size", str(BATCH), "--checkpoint-every", str(EVERY),
         "--log-every", "1", "--seed", "3", "--no-progress"]
NAMES = ("vanilla", "poly")


@pytest.fixture(scope="module")
def acts(tmp_path_factory) -> Path:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    d = tmp_path_factory.mktemp("acts")
    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=32, d_head=8, n_heads=2, d_vocab=100, act_fn="gelu")).eval()
    toks = torch.randint(0, 100, (40, 16), generator=torch.Generator().manual_seed(1))
    np.save(d / "t.npy", toks.numpy())
    harvest(HarvestConfig(model="tiny", hooks=[HOOK], dataset=str(d / "t.npy"), tokens=640,
                          ctx=16, out=str(d / "acts"), batch_size=8, shard_size=100,
                          dtype="float32", progress=False), model=model)
    return d / "acts"


def _env() -> dict:
    # the plain-torch decode path (a child would otherwise pick the Triton interpreter through
    # the TRITON_INTERPRET=1 that conftest sets), one thread per rank on the 2 cores
    return dict(os.environ, POLYSAE_DISABLE_TRITON="1", OMP_NUM_THREADS="1",
                PYTHONUNBUFFERED="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(launch: list[str], args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "polysae", "train",
           *args]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(p: subprocess.Popen, timeout: float = 900) -> str:
    """Wait for a launcher (generous: a loaded 2-core machine is slow); never leave it running."""
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p)
        raise
    assert p.returncode == 0, out
    return out


def standalone(out: Path, acts: Path, extra=()) -> subprocess.Popen:
    return torchrun(["--nproc_per_node", "2", "--standalone"],
                    ["--acts", str(acts), *TRAIN, "--out", str(out), *extra])


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


def kill_tree(p: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker (torchrun puts each worker in its own session, so
    killing the launcher's process group alone would leave them running)."""
    todo, seen = [p.pid], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo.extend(_children(pid))
    for pid in reversed(seen):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait(timeout=30)


def trajectory(folder: Path) -> list[tuple]:
    return [(m["step"], m["tokens"], m["loss"], m["mse"], m["aux"], m["l0"], m["dead_frac"])
            for m in map(json.loads, (folder / "metrics.jsonl").open())]


@pytest.fixture(scope="module")
def ref2(acts, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run."""
    out = tmp_path_factory.mktemp("ref2") / "run"
    finish(standalone(out, acts))
    return out


def test_two_ranks_under_torchrun_equal_one_process(ref2, acts, tmp_path):
    one = tmp_path / "one"
    assert cli_main(["train", "--acts", str(acts), *TRAIN, "--out", str(one)]) == 0
    worst = 0.0
    for name in NAMES:
        a, b = polysae.load(ref2 / name).tensors(), polysae.load(one / name).tensors()
        for k in b:
            worst = max(worst, float((a[k] - b[k]).abs().max()))
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=f"{name}.{k}")
        la, lb = trajectory(ref2 / name), trajectory(one / name)
        assert [m[0] for m in la] == list(range(1, STEPS + 1))
        assert [m[1] for m in la] == [m[1] for m in lb] == [BATCH * s for s in range(1, 41)]
        assert [m[2] for m in la] == pytest.approx([m[2] for m in lb], rel=1e-5)
        st = torch.load(ref2 / name / "trainer_state.pt", weights_only=True)
        assert (st["world_size"], st["step"], st["tokens"]) == (2, STEPS, STEPS * BATCH)
        # only rank 0 wrote: no temp file of another process is left, nothing but the run files
        assert sorted(p.name for p in (ref2 / name).iterdir()) == [
            "config.json", "metrics.jsonl", "sae.safetensors", "trainer_state.prev.pt",
            "trainer_state.pt"]
    assert worst < 1e-5
    print(f"max |2 ranks - 1 process| over all weights: {worst:.3g}")


def test_kill_9_mid_run_then_resume_on_two_nodes_is_bitwise_equal(ref2, acts, tmp_path):
    out = tmp_path / "run"
    p = standalone(out, acts)
    first = out / "poly" / "trainer_state.pt"
    t0 = time.monotonic()
    try:
        while not first.exists():  # the first checkpoint (step 2); 19 more follow
            assert p.poll() is None, p.communicate()[0]
            assert time.monotonic() - t0 < 600, "no checkpoint after 600 s"
            time.sleep(0.002)
    finally:
        kill_tree(p)
    assert p.returncode == -signal.SIGKILL
    killed_at = torch.load(first, weights_only=True)["step"]
    assert killed_at < STEPS  # it really was interrupted
    # restart as 2 nodes x 1 process: multi-node flags, same world size
    port = str(_free_port())
    nodes = [torchrun(["--nnodes", "2", "--node_rank", str(r), "--nproc_per_node", "1",
                       "--master_addr", "127.0.0.1", "--master_port", port],
                      ["--out", str(out), "--resume", "--no-progress"]) for r in (0, 1)]
    logs = [finish(n) for n in nodes]
    assert "resumed at step" in logs[0], logs[0]
    for name in NAMES:
        assert trajectory(out / name) == trajectory(ref2 / name), name  # floats compared exactly
        a, b = polysae.load(ref2 / name).tensors(), polysae.load(out / name).tensors()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    print(f"killed after the checkpoint of step {killed_at}, resumed on 2 nodes")
