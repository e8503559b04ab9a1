"""ActivationStore: every row exactly once per epoch, seeded determinism, exact resume, ranks,
train/val split, corrupt shards, and the live (no-disk) mode."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from polysae.data.harvesting import HarvestConfig, harvest
from polysae.data.store import ActivationStore, LiveActivations, ShardError, split_shards

HOOK = "blocks.0.hook_resid_post"
N_CTX, CTX = 30, 10  # 300 rows in 7 shards of 45 (last one 30)


@pytest.fixture(scope="module")
def model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    return HookedTransformer(HookedTransformerConfig(
        n_layers=1, d_model=32, n_ctx=32, d_head=8, n_heads=4, d_vocab=500, act_fn="gelu")).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 500, (N_CTX, CTX), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def folder(model, tokens, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("store")
    np.save(d / "t.npy", tokens.numpy())
    harvest(HarvestConfig(model="tiny", hooks=[HOOK, "blocks.0.hook_mlp_out"],
                          dataset=str(d / "t.npy"), tokens=N_CTX * CTX, ctx=CTX,
                          out=str(d / "acts"), batch_size=7, shard_size=45, dtype="float32",
                          progress=False), model=model)
    return d / "acts"


def as_counter(rows: torch.Tensor) -> Counter:
    return Counter(r.numpy().tobytes() for r in rows)


def store(folder, **kw) -> ActivationStore:
    kw.setdefault("split", "all")
    kw.setdefault("batch_size", 32)
    kw.setdefault("buffer_rows", 100)  # windows of 100 rows: batches straddle window edges
    return ActivationStore(folder, HOOK, **kw)


def test_every_row_exactly_once_per_epoch_and_seeded(folder):
    s = store(folder, seed=5)
    everything = as_counter(s.read_rows(0, s.n_rows))
    assert s.n_rows == N_CTX * CTX and sum(everything.values()) == s.n_rows
    e0, e1 = list(s), list(s)  # iter() twice = epochs 0 and 1
    assert len(e0) == len(s) == -(-300 // 32) and e0[-1].shape == (300 % 32, 32)
    for epoch in (e0, e1):
        assert as_counter(torch.cat(epoch)) == everything
    assert not torch.equal(torch.cat(e0), torch.cat(e1))  # a new order each epoch
    assert not torch.equal(torch.cat(e0), s.read_rows(0, s.n_rows))  # and actually shuffled
    again = list(store(folder, seed=5).batches(epoch=0))
    assert all(torch.equal(a, b) for a, b in zip(again, e0))
    other = torch.cat(list(store(folder, seed=6).batches(0)))
    assert not torch.equal(other, torch.cat(e0))
    # Mixing reaches across shards: the first batch draws rows from more than one shard.
    first = e0[0]
    all_rows = s.read_rows(0, s.n_rows)
    src = {int(torch.nonzero((all_rows == r).all(1))[0]) // 45 for r in first}
    assert len(src) >= 2


def test_resume_mid_epoch_matches_uninterrupted(folder):
    s = store(folder, seed=1)
    full = list(s.batches(epoch=2))
    tail = list(s.batches(epoch=2, start=4))
    assert len(tail) == len(full) - 4
    assert all(torch.equal(a, b) for a, b in zip(tail, full[4:]))


def test_ranks_get_disjoint_equal_parts(folder):
    r0 = list(store(folder, rank=0, world_size=2, batch_size=16).batches(0))
    r1 = list(store(folder, rank=1, world_size=2, batch_size=16).batches(0))
    assert len(r0) == len(r1)
    assert all(a.shape == b.shape == (16, 32) for a, b in zip(r0[:-1], r1[:-1]))
    s = store(folder)
    assert as_counter(torch.cat(r0 + r1)) == as_counter(s.read_rows(0, s.n_rows))
    # Same global stream as a single process with batch 32: rank r takes every 2nd row.
    single = torch.cat(list(store(folder, batch_size=32).batches(0)))
    assert torch.equal(torch.cat(r0), single[0::2]) and torch.equal(torch.cat(r1), single[1::2])


def test_train_val_split_by_shard(folder):
    tr, va = store(folder, split="train"), store(folder, split="val")
    assert tr.n_rows + va.n_rows == 300 and va.n_rows > 0
    assert set(split_shards(7, "train")).isdisjoint(split_shards(7, "val"))
    assert sorted(split_shards(7, "train") + split_shards(7, "val")) == list(range(7))
    assert split_shards(100, "val", 0.1) == split_shards(100, "val", 0.1) and \
        len(split_shards(100, "val", 0.1)) == 10
    all_rows = as_counter(store(folder).read_rows(0, 300))
    parts = as_counter(tr.read_rows(0, tr.n_rows)) + as_counter(va.read_rows(0, va.n_rows))
    assert parts == all_rows
    assert as_counter(torch.cat(list(va))) == as_counter(va.read_rows(0, va.n_rows))
    with pytest.raises(ValueError, match="at least 2 shards"):
        split_shards(1, "val")


def test_tokens_aligned_and_output_dtype_device(folder, model, tokens):
    s = store(folder, split="val", dtype=torch.float64)
    info = s.tokens()
    assert info.token_ids.dtype == torch.int64 and len(info.token_ids) == s.n_rows
    rows = s.read_rows(0, s.n_rows)
    assert rows.dtype == torch.float64
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens)
    ref = cache[HOOK]  # [ctx index, pos, d]
    ctx_idx = info.doc_ids  # .npy rows: document id = context index
    torch.testing.assert_close(rows, ref[ctx_idx, info.positions].double(), atol=1e-5, rtol=1e-5)
    assert torch.equal(info.token_ids, tokens[ctx_idx, info.positions])


def _copy(folder: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(folder, dst)
    return dst


def test_truncated_and_corrupt_shards_name_the_file(folder, tmp_path):
    man = json.loads((folder / "manifest.json").read_text())
    rel = man["shards"][1]["files"][HOOK]["path"]
    bad = _copy(folder, tmp_path / "trunc")
    f = bad / rel
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ShardError, match=f"{f}: truncated"):
        list(store(bad, shuffle=False))
    bad = _copy(folder, tmp_path / "flip")
    f = bad / rel
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0xFF  # one flipped bit pattern in the data: only the checksum can tell
    f.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=f"{f}: corrupt shard \\(sha256"):
        store(bad).read_rows(0, 300)
    assert store(bad, verify=False).read_rows(0, 300).shape == (300, 32)
    bad = _copy(folder, tmp_path / "head")
    f = bad / rel
    raw = bytearray(f.read_bytes())
    raw[10:20] = b"\x00" * 10
    f.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=f"{f}: corrupt shard header"):
        store(bad, verify=False).read_rows(0, 300)
    (bad / rel).unlink()
    with pytest.raises(ShardError, match="shard file missing"):
        store(bad).read_rows(0, 300)


def test_store_arguments_checked(folder, tmp_path):
    with pytest.raises(ValueError, match=r"holds hooks \['blocks.0.hook_resid_post', "):
        ActivationStore(folder)
    with pytest.raises(ValueError, match="hook 'nope' is not in"):
        ActivationStore(folder, "nope")
    with pytest.raises(FileNotFoundError, match="no activation manifest"):
        ActivationStore(tmp_path, HOOK)


def test_live_mode_serves_model_rows_once(model, tokens):
    live = LiveActivations(model, HOOK, tokens.split(4), batch_size=32, buffer_rows=70, seed=0)
    got = list(live)
    assert all(b.shape == (32, 32) for b in got[:-1])
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens)
    ref = cache[HOOK].reshape(-1, 32)
    assert torch.cat(got).shape == ref.shape
    # Same rows as the full forward (up to batch-size rounding), each exactly once. Contexts that
    # start with the same token have identical position-0 rows, so compare as multisets: every
    # reference row has as many served copies as reference copies.
    exact = "donot_use_mm_for_euclid_dist"  # the matmul shortcut loses ~1e-4 here
    near_got = torch.cdist(ref, torch.cat(got), compute_mode=exact) < 1e-4
    near_ref = torch.cdist(ref, ref, compute_mode=exact) < 1e-4
    assert torch.equal(near_got.sum(1), near_ref.sum(1))
    assert near_got.any(0).all()
    assert not torch.allclose(torch.cat(got), ref)  # shuffled
    drop = int(tokens[0, 0])
    n_drop = int((tokens == drop).sum())
    kept = torch.cat(list(LiveActivations(model, HOOK, tokens.split(4), batch_size=32,
                                          exclude_ids=[drop])))
    assert kept.shape[0] == ref.shape[0] - n_drop
    with pytest.raises(ValueError, match="unknown hook"):
        LiveActivations(model, "blocks.9.hook_resid_post", [])
