"""Data parallel on CPU: 2 gloo ranks == 1 process on the same global batch, and the checks that
keep ranks together (bitwise sync check, NaN stop on every rank, rank slices of the store).

Two processes (``torch.multiprocessing.spawn``, gloo backend) each read their disjoint half of
every global batch of 64 rows (``TensorSource(rank=, world_size=2)``); one process reads the
whole 64-row batch. Both train a TopK vanilla SAE and a TopK PolySAE for 25 steps with AuxK
active (dead window 3), so gradients, clipping, the retraction and the dead-latent counters must
all agree. Each rank trains through ``torch.nn.parallel.DistributedDataParallel``
(``polysae.training.distributed.wrap``); tests/test_torchrun.py does the same through torchrun and
the CLI.

Tolerance: the only difference is float32 reassociation (per-rank mean losses averaged by an
all-reduce instead of one mean over 64 rows), so parameters must agree to rtol 1e-5 / atol 1e-5
after 25 steps and the logged losses to rel 1e-5. Measured with DDP (CPU, torch 2.13): max abs
parameter difference 2.2e-8 (vanilla) and 1.5e-7 (poly); max relative loss difference 2.1e-7.
Only rank 0 writes the checkpoint folder.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import polysae
from polysae import SAE, SAEConfig
from polysae.training import distributed as pdist
from polysae.training import TensorSource, TrainConfig, Trainer, TrainingDiverged

STEPS, GLOBAL_BATCH = 25, 64


def data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(32, 16, generator=g), dim=-1)
    amp = (0.5 + torch.rand(2048, 32, generator=g)) * (torch.rand(2048, 32, generator=g) < 0.08)
    return amp @ dirs


def build() -> dict[str, SAE]:
    torch.manual_seed(5)
    return {"vanilla": SAE(SAEConfig(16, 48, k=4, decoder="linear")),
            "poly": SAE(SAEConfig(16, 48, k=4, ranks=(16, 8, 8)))}


def config() -> TrainConfig:
    return TrainConfig(steps=STEPS, lr=3e-3, dead_window=3, log_every=1, checkpoint_every=10,
                       progress=False)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import polysae.kernels as pk

    pk.set_backend("torch")
    info = pdist.init_from_env("gloo")
    try:
        src = TensorSource(data(), GLOBAL_BATCH, seed=1, rank=info.rank,
                           world_size=info.world_size)
        trainer = Trainer(build(), config(), out)
        assert all(isinstance(s.ddp, DDP) for s in trainer.slots.values())
        trainer.fit(src)
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(folder):
    return [json.loads(x)["loss"] for x in (folder / "metrics.jsonl").open()]


def test_two_gloo_ranks_match_one_process(tmp_path):
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    one = Trainer(build(), config(), tmp_path / "one").fit(TensorSource(data(), GLOBAL_BATCH,
                                                                         seed=1))
    for name in ("vanilla", "poly"):
        ddp = polysae.load(tmp_path / "ddp" / name)
        ref = one.saes[name]
        for k, v in ref.tensors().items():
            torch.testing.assert_close(ddp.tensors()[k], v, rtol=1e-5, atol=1e-5, msg=k)
        a, b = losses(tmp_path / "ddp" / name), losses(tmp_path / "one" / name)
        assert len(a) == len(b) == STEPS
        assert a == pytest.approx(b, rel=1e-5)
        st = torch.load(tmp_path / "ddp" / name / "trainer_state.pt", weights_only=True)
        assert st["world_size"] == 2 and st["tokens"] == STEPS * GLOBAL_BATCH


def test_rank_shards_are_disjoint_and_cover_the_global_batch():
    x = data()
    full = list(TensorSource(x, GLOBAL_BATCH, seed=1).batches())
    parts = [list(TensorSource(x, GLOBAL_BATCH, seed=1, rank=r, world_size=2).batches())
             for r in range(2)]
    for b, whole in enumerate(full):
        assert torch.equal(torch.cat([parts[0][b], parts[1][b]]), whole)


def _join(ctx, timeout=120):
    """Wait for spawned ranks with a deadline (a rank stuck in a collective fails the test)."""
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("ranks did not finish: one is waiting in a collective")


def _sync_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    pdist.init_from_env("gloo")
    try:
        torch.manual_seed(rank)  # different initial weights on purpose
        sae = SAE(SAEConfig(16, 48, k=4, ranks=(16, 8, 8)))
        wrapped = pdist.wrap(sae)  # DDP broadcasts rank 0's weights
        res = {"digest": pdist.state_digest(sae)}
        pdist.assert_in_sync({"poly": sae})  # in sync: no error
        if rank == 1:
            with torch.no_grad():
                sae.decoder.U[0, 0] = torch.nextafter(sae.decoder.U[0, 0], torch.tensor(2.0))
        try:
            pdist.assert_in_sync({"poly": sae})
            res["error"] = None
        except RuntimeError as e:
            res["error"] = str(e)
        res["ddp"] = isinstance(wrapped, DDP)
        Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_start_equal_and_a_one_ulp_divergence_is_caught(tmp_path):
    """DDP gives every rank rank 0's initial weights; the checkpoint-time sync check compares a
    sha256 of every tensor, so even a 1-ulp change of one entry of U on one rank is reported on
    every rank, naming the SAE and the rank."""
    ctx = mp.spawn(_sync_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False)
    _join(ctx)
    r = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert r[0]["ddp"] and r[1]["ddp"]
    assert r[0]["digest"] == r[1]["digest"]
    torch.manual_seed(0)
    assert r[0]["digest"] == pdist.state_digest(SAE(SAEConfig(16, 48, k=4, ranks=(16, 8, 8))))
    for res in r:
        assert res["error"] is not None and "out of sync" in res["error"]
        assert "'poly': [1]" in res["error"]


NAN_STEP, NAN_ROW = 3, 5  # rank 1's 6th row of step 3 is NaN


def _nan_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import polysae.kernels as pk

    pk.set_backend("torch")
    info = pdist.init_from_env("gloo")
    try:
        x = data()
        src = TensorSource(x, GLOBAL_BATCH, seed=1, shuffle=False, rank=info.rank,
                           world_size=info.world_size)
        per = GLOBAL_BATCH // world
        x[(NAN_STEP - 1) * GLOBAL_BATCH + per + NAN_ROW, 2] = math.nan  # rank 1's slice
        cfg = TrainConfig(steps=10, lr=3e-3, checkpoint_every=2, progress=False)
        try:
            Trainer(build(), cfg, out).fit(src)
            msg = None
        except TrainingDiverged as e:
            msg = str(e)
        Path(out, f"rank{rank}.txt").write_text(json.dumps(msg))
    finally:
        torch.distributed.destroy_process_group()


def test_nan_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    """A NaN in one rank's slice must stop all ranks at the same step (decided by an all-reduce,
    so no rank is left waiting in DDP's gradient all-reduce), with the rank that saw it naming the
    position; the checkpoint on disk stays the last good one (step 2), finite."""
    ctx = mp.spawn(_nan_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False)
    _join(ctx)
    m0, m1 = (json.loads((tmp_path / f"rank{i}.txt").read_text()) for i in range(2))
    assert m0 is not None and m1 is not None
    assert m0.startswith(f"step {NAN_STEP}: ") and "another rank" in m0
    assert m1.startswith(f"step {NAN_STEP}: NaN/inf in input activation batch of shape (32, 16)")
    assert f"first at index [{NAN_ROW}, 2]" in m1
    for name in ("vanilla", "poly"):
        st = torch.load(tmp_path / name / "trainer_state.pt", weights_only=True)
        assert st["step"] == 2
        assert all(torch.isfinite(t).all() for t in polysae.load(tmp_path / name).tensors()
                   .values())


def test_store_ranks_read_only_their_rows(tmp_path):
    """With 3 ranks each ActivationStore reads from disk only the rows it serves (1/3 of every
    window), and the three streams interleaved are the 1-process stream of 3x the batch."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from polysae.data.harvesting import HarvestConfig, harvest
    from polysae.data.store import ActivationStore

    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=16, d_head=8, n_heads=2, d_vocab=50)).eval()
    toks = torch.randint(0, 50, (24, 10), generator=torch.Generator().manual_seed(2))
    np.save(tmp_path / "t.npy", toks.numpy())
    hook = "blocks.0.hook_resid_post"
    harvest(HarvestConfig(model="tiny", hooks=[hook], dataset=str(tmp_path / "t.npy"),
                          tokens=240, ctx=10, out=str(tmp_path / "acts"), batch_size=5,
                          shard_size=35, dtype="float32", progress=False), model=model)
    kw = dict(split="all", seed=4, buffer_rows=90, drop_last=True)
    single = ActivationStore(tmp_path / "acts", hook, batch_size=30, **kw)
    read = {}
    streams = []
    for r in range(3):
        s = ActivationStore(tmp_path / "acts", hook, batch_size=10, rank=r, world_size=3, **kw)
        orig = s._gather_rows

        def spy(order, idx, orig=orig, r=r):
            read[r] = read.get(r, 0) + len(idx)
            return orig(order, idx)

        s._gather_rows = spy
        s._gather = None  # the whole-window read must not be used with several ranks
        streams.append(list(s.batches(1)))
    whole = list(single.batches(1))
    assert len(whole) == len(streams[0]) == 240 // 30
    for b, batch in enumerate(whole):
        for r in range(3):
            assert torch.equal(streams[r][b], batch[r::3])
    assert sum(read.values()) == 240 and all(v == 80 for v in read.values())
