"""Bad inputs: every case names the offending file / flag / shape, fails (exit != 0 through the
CLI, an exception through the API), and leaves no output that passes as valid.

CLI cases call ``polysae.__main__.main(argv)`` in-process (the real parser and exit-code mapping:
``CLIError`` -> 2, ``ValueError``/``OSError`` -> 1) and read its stderr. The cases are summarised
in docs/bad-inputs.md (one row per test here). Shapes are tiny: a 1-layer random
HookedTransformer (d_model 16) harvested into five float32 shards of 64 rows per hook; no model
hub, no internet (HTTP cases use a loopback server in a thread).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import polysae
from polysae import SAE, SAEConfig
from polysae.__main__ import main as cli_main
from polysae.data.harvesting import HarvestConfig, HarvestError, harvest
from polysae.data.store import ActivationStore
from polysae.training import TensorSource, TrainConfig, Trainer, TrainingDiverged

HOOK, HOOK2 = "blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"
SHARD0 = f"{HOOK}/shard_00000.safetensors"
TRAIN = ["--hook", HOOK, "--split", "all", "--d-sae", "32", "--k", "4", "--ranks", "16", "8",
         "8", "--steps", "4", "--batch-size", "32", "--checkpoint-every", "1", "--no-progress"]


# -- helpers -------------------------------------------------------------------------------------
def cli(capsys, *argv: str) -> tuple[int, str]:
    """Run ``polysae ARGV`` in-process -> (exit code, stderr)."""
    capsys.readouterr()
    try:
        code = cli_main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    return code, capsys.readouterr().err


def _tiny_model(d_model: int = 16, seed: int = 0):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    return HookedTransformer(HookedTransformerConfig(
        n_layers=1, d_model=d_model, n_ctx=16, d_head=8, n_heads=d_model // 8, d_vocab=60,
        act_fn="gelu")).eval()


def _harvest(d: Path, hooks, d_model: int = 16) -> Path:
    toks = torch.randint(0, 60, (32, 10), generator=torch.Generator().manual_seed(1))
    np.save(d / "t.npy", toks.numpy())
    harvest(HarvestConfig(model="tiny", hooks=hooks, dataset=str(d / "t.npy"), tokens=320,
                          ctx=10, out=str(d / "acts"), batch_size=8, shard_size=64,
                          dtype="float32", progress=False), model=_tiny_model(d_model))
    return d / "acts"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return _harvest(tmp_path_factory.mktemp("pristine"), [HOOK, HOOK2])


@pytest.fixture
def acts(pristine, tmp_path) -> Path:
    """A private copy of the harvest that a test may damage."""
    return Path(shutil.copytree(pristine, tmp_path / "acts"))


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def edit_manifest(folder: Path, fn) -> None:
    m = manifest(folder)
    fn(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def reseal(folder: Path, rel: str) -> None:
    """Record a deliberately rewritten shard's sha256 in the manifest (so only the content is
    wrong, not the checksum)."""
    sha = hashlib.sha256((folder / rel).read_bytes()).hexdigest()

    def fix(m):
        for e in m["shards"]:
            for f in e["files"].values():
                if f["path"] == rel:
                    f["sha256"] = sha
    edit_manifest(folder, fix)


def no_checkpoint(out: Path) -> None:
    """Nothing under ``out`` that a loader or ``--resume`` could take for a trained SAE."""
    if out.exists():
        names = {p.name for p in out.rglob("*")}
        assert not names & {"sae.safetensors", "config.json", "trainer_state.pt"}, names


def train(capsys, acts: Path, out: Path, *extra: str) -> tuple[int, str]:
    return cli(capsys, "train", "--acts", acts, "--out", out, *TRAIN, *extra)


# -- activation store: shards and manifest (through `polysae train`) ----------------------------
def test_truncated_shard(acts, tmp_path, capsys):
    p = acts / SHARD0
    p.write_bytes(p.read_bytes()[:-100])
    code, err = train(capsys, acts, tmp_path / "run")
    assert code == 1 and str(p) in err and "truncated" in err
    no_checkpoint(tmp_path / "run")


def test_bit_flipped_shard(acts, tmp_path, capsys):
    p = acts / SHARD0
    raw = bytearray(p.read_bytes())
    raw[-7] ^= 0x10  # one bit of one activation
    p.write_bytes(bytes(raw))
    code, err = train(capsys, acts, tmp_path / "run")
    assert code == 1 and str(p) in err and "corrupt shard (sha256" in err
    no_checkpoint(tmp_path / "run")


def test_shard_file_missing(acts, tmp_path, capsys):
    (acts / SHARD0).unlink()
    code, err = train(capsys, acts, tmp_path / "run")
    assert code == 1 and f"{acts / SHARD0}: shard file missing" in err
    no_checkpoint(tmp_path / "run")


def test_manifest_from_a_newer_format_version(acts, tmp_path, capsys):
    edit_manifest(acts, lambda m: m.update(format_version=99))
    code, err = train(capsys, acts, tmp_path / "run")
    assert code == 1 and f"{acts / 'manifest.json'}: format_version 99" in err
    assert "upgrade polysae" in err
    assert not (tmp_path / "run").exists()


def test_manifest_shape_disagrees_with_shards(acts, tmp_path, capsys):
    edit_manifest(acts, lambda m: m["d_in"].update({HOOK: 24}))
    code, err = train(capsys, acts, tmp_path / "run")
    assert code == 1 and "corrupt shard (shape (64, 16), manifest says (64, 24))" in err
    assert str(acts / HOOK) in err
    no_checkpoint(tmp_path / "run")


def test_manifest_unknown_dtype(acts, tmp_path, capsys):
    edit_manifest(acts, lambda m: m.update(dtype="float64"))
    code, err = train(capsys, acts, tmp_path / "run")
    assert code == 1 and "manifest.json: dtype 'float64' is not one of" in err
    assert not (tmp_path / "run").exists()


def test_manifest_dtype_disagrees_with_shards(acts, tmp_path, capsys):
    edit_manifest(acts, lambda m: m.update(dtype="float16"))
    code, err = train(capsys, acts, tmp_path / "run")
    assert code == 1 and "corrupt shard (dtype F32, manifest says float16)" in err
    no_checkpoint(tmp_path / "run")


def test_manifest_not_json(acts, tmp_path, capsys):
    (acts / "manifest.json").write_text('{"format": "polysae-activations", "shards": [')
    code, err = train(capsys, acts, tmp_path / "run")
    assert code == 1 and f"{acts / 'manifest.json'}: unreadable manifest" in err


def test_manifest_unreadable_path(acts, tmp_path, capsys):
    """A path that exists but cannot be read as a file (as root, chmod 000 would not stop us)."""
    (acts / "manifest.json").unlink()
    (acts / "manifest.json").mkdir()
    code, err = train(capsys, acts, tmp_path / "run")
    assert code == 1 and f"{acts / 'manifest.json'}: unreadable manifest" in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads files whatever their mode")
def test_shard_without_read_permission(acts, tmp_path, capsys):
    (acts / SHARD0).chmod(0)
    code, err = train(capsys, acts, tmp_path / "run")
    assert code == 1 and "Permission denied" in err and str(acts / SHARD0) in err
    no_checkpoint(tmp_path / "run")


def test_acts_folder_without_manifest(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = train(capsys, tmp_path / "empty", tmp_path / "run")
    assert code == 1 and "manifest.json: no activation manifest" in err


def test_acts_is_not_a_folder(tmp_path, capsys):
    (tmp_path / "f.txt").write_text("x")
    code, err = train(capsys, tmp_path / "f.txt", tmp_path / "run")
    assert code == 2 and f"--acts: {tmp_path / 'f.txt'} is not a folder" in err


def test_store_hook_missing(acts, tmp_path, capsys):
    argv = [a if a != HOOK else "blocks.7.hook_resid_post" for a in TRAIN]
    code, err = cli(capsys, "train", "--acts", acts, "--out", tmp_path / "run", *argv)
    assert code == 1 and "hook 'blocks.7.hook_resid_post' is not in" in err
    assert HOOK in err and HOOK2 in err  # it lists what the folder holds


def test_store_with_two_hooks_needs_hook_flag(acts, tmp_path, capsys):
    argv = TRAIN[2:]  # no --hook
    code, err = cli(capsys, "train", "--acts", acts, "--out", tmp_path / "run", *argv)
    assert code == 1 and "pass one of them (--hook)" in err


def test_manifest_shard_path_escapes_the_folder(acts, tmp_path, capsys):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(acts / SHARD0, outside)

    def evil(m):
        m["shards"][0]["files"][HOOK]["path"] = "../outside.safetensors"
    edit_manifest(acts, evil)
    code, err = train(capsys, acts, tmp_path / "run")
    assert code == 1 and "refusing shard path '../outside.safetensors'" in err
    no_checkpoint(tmp_path / "run")


# -- SAE vs store, NaN/inf, SAE config flags --------------------------------------------------
def test_d_in_mismatch_between_sae_and_store_api(pristine):
    store = ActivationStore(pristine, HOOK, batch_size=32, split="all")
    sae = SAE(SAEConfig(8, 32, k=4, decoder="linear"))
    with pytest.raises(ValueError, match=rf"{pristine} {HOOK} has d_in=16 but the SAEs take "
                                         r"d_in=8"):
        Trainer(sae, TrainConfig(steps=2, progress=False)).fit(store)


def test_d_in_mismatch_on_resume_with_another_store(pristine, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(capsys, pristine, run)[0] == 0
    other = _harvest(Path(tmp_path), [HOOK], d_model=24)
    code, err = cli(capsys, "train", "--out", run, "--resume", "--acts", other)
    assert code == 1 and f"{other} {HOOK} has d_in=24 but the SAEs take d_in=16" in err
    st = torch.load(run / "poly" / "trainer_state.pt", weights_only=True)
    assert st["step"] == 4  # the finished run is untouched


def test_nan_activation_stops_training_cleanly(acts, tmp_path, capsys):
    """One NaN row (checksum resealed): training stops when the shard is first read, naming the
    shard, row and column; every checkpoint on disk is from an earlier step and finite. (Before
    issue #29 it was caught later, in the batch: ``Trainer.step``, still checked by the next
    case.)"""
    p = acts / f"{HOOK}/shard_00002.safetensors"
    t = load_file(str(p))
    t["acts"][10, 3] = float("nan")
    save_file(t, str(p), metadata={"hook": HOOK})
    reseal(acts, f"{HOOK}/shard_00002.safetensors")
    out = tmp_path / "run"
    code, err = cli(capsys, "train", "--acts", acts, "--out", out, *TRAIN[:-7], "--steps", "10",
                    "--batch-size", "32", "--checkpoint-every", "1", "--no-progress")
    assert code == 1 and f"{p}: NaN/inf in the stored activations (row 10, column 3)" in err
    if (out / "poly" / "trainer_state.pt").exists():
        st = torch.load(out / "poly" / "trainer_state.pt", weights_only=True)
        assert 1 <= st["step"] < 10
        assert all(torch.isfinite(v).all() for v in polysae.load(out / "poly").tensors()
                   .values())
    else:
        no_checkpoint(out)


def test_inf_activation_api(tmp_path):
    x = torch.randn(256, 8)
    x[40, 1] = float("inf")
    sae = SAE(SAEConfig(8, 16, k=2, decoder="linear"))
    with pytest.raises(TrainingDiverged, match=r"NaN/inf in input activation batch of shape "
                                               r"\(64, 8\) \(first at index \[40, 1\]\)"):
        Trainer(sae, TrainConfig(steps=4, checkpoint_every=1, progress=False),
                tmp_path / "run").fit(TensorSource(x, 64, shuffle=False))
    no_checkpoint(tmp_path / "run")


def test_k_larger_than_d_sae(pristine, tmp_path, capsys):
    code, err = train(capsys, pristine, tmp_path / "run", "--k", "64")
    assert code == 2 and "--k: k=64 exceeds d_sae=32" in err
    assert not (tmp_path / "run").exists()


def test_poly_ranks_out_of_range_cli(pristine, tmp_path, capsys):
    code, err = train(capsys, pristine, tmp_path / "run", "--ranks", "32", "8", "8")
    assert code == 2 and "--ranks: R1=32 exceeds d_in=16" in err
    assert not (tmp_path / "run").exists()


def test_poly_ranks_out_of_order_api():
    with pytest.raises(ValueError, match=r"SAEConfig.ranks: R1=8 < R2=16"):
        SAEConfig(16, 64, ranks=(8, 16, 4))


def test_unknown_sparsifier_flag(pristine, tmp_path, capsys):
    code, err = train(capsys, pristine, tmp_path / "run", "--sparsifier", "sparsemax")
    assert code == 2 and "--sparsifier: invalid choice: 'sparsemax'" in err
    assert not (tmp_path / "run").exists()


def test_unknown_sparsifier_in_checkpoint_config(tmp_path):
    folder = SAE(SAEConfig(8, 24, k=3, decoder="linear")).save(tmp_path / "sae")
    doc = json.loads((folder / "config.json").read_text())
    doc["config"]["sparsifier"] = "sparsemax"
    (folder / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"config.json is not a valid polysae config "
                                         r"\(SAEConfig.sparsifier: must be one of"):
        polysae.load(folder)


def test_batch_size_zero(pristine, tmp_path, capsys):
    code, err = train(capsys, pristine, tmp_path / "run", "--batch-size", "0")
    assert code == 2 and "--batch-size must be positive, got 0" in err


# -- training runs: resume ----------------------------------------------------------------------
def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    code, err = cli(capsys, "train", "--out", tmp_path / "nothing", "--resume")
    assert code == 2 and "run.json not found" in err


def test_resume_with_a_corrupt_run_file(pristine, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(capsys, pristine, run)[0] == 0
    (run / "run.json").write_text('{"format": "polysae-train-run", "saes": {}}')
    code, err = cli(capsys, "train", "--out", run, "--resume")
    assert code == 2 and f"{run / 'run.json'} is not a polysae run file" in err
    assert "train_config" in err


def test_training_into_an_existing_run_without_resume(pristine, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(capsys, pristine, run)[0] == 0
    before = (run / "poly" / "sae.safetensors").read_bytes()
    code, err = train(capsys, pristine, run)
    assert code == 2 and "already holds a training run" in err
    assert (run / "poly" / "sae.safetensors").read_bytes() == before


def test_resume_from_unreadable_trainer_states(pristine, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(capsys, pristine, run)[0] == 0
    for fn in ("trainer_state.pt", "trainer_state.prev.pt"):
        (run / "poly" / fn).write_bytes(b"PK\x03\x04 not a torch file")
    code, err = cli(capsys, "train", "--out", run, "--resume")
    assert code == 1 and f"no readable trainer state in {run / 'poly'}" in err


def test_resume_from_a_newer_trainer_state_format(pristine, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(capsys, pristine, run)[0] == 0
    for name in ("poly",):
        for fn in ("trainer_state.pt", "trainer_state.prev.pt"):
            p = run / name / fn
            st = torch.load(p, weights_only=True)
            st["format_version"] = 7
            torch.save(st, p)
    code, err = cli(capsys, "train", "--out", run, "--resume")
    assert code == 1 and "trainer state format_version 7 is newer" in err


# -- corpora and harvest ------------------------------------------------------------------------
def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate("hello world".split())}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", unk_token="<unk>")


@pytest.mark.parametrize("text", ["", "hello\n"], ids=["empty", "one-token"])
def test_empty_and_one_token_corpus(tmp_path, text):
    from polysae.data.models import LoadedModel

    f = tmp_path / "corpus.txt"
    f.write_text(text)
    lm = LoadedModel(_tiny_model(), _word_tokenizer(), "tiny", "decoder")
    cfg = HarvestConfig(model="tiny", hooks=[HOOK], dataset=str(f), tokens=100, ctx=8,
                        out=str(tmp_path / "acts"), progress=False)
    with pytest.raises(ValueError, match=rf"dataset '{f}' gave no complete context of 8 tokens"):
        harvest(cfg, model=lm)
    assert not (tmp_path / "acts").exists()


def test_empty_token_file(tmp_path):
    np.save(tmp_path / "t.npy", np.zeros((0,), dtype=np.int64))
    cfg = HarvestConfig(model="tiny", hooks=[HOOK], dataset=str(tmp_path / "t.npy"), tokens=100,
                        ctx=8, out=str(tmp_path / "acts"), progress=False)
    with pytest.raises(ValueError, match="gave no complete context"):
        harvest(cfg, model=_tiny_model())
    assert not (tmp_path / "acts").exists()


def test_harvest_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch):
    import polysae.data.harvesting as H

    np.save(tmp_path / "t.npy", np.arange(400) % 60)
    monkeypatch.setattr(H.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 1000))
    cfg = HarvestConfig(model="tiny", hooks=[HOOK], dataset=str(tmp_path / "t.npy"), tokens=400,
                        ctx=10, out=str(tmp_path / "acts"), dtype="float32", progress=False)
    with pytest.raises(HarvestError, match=rf"not enough disk space at {tmp_path / 'acts'}"):
        harvest(cfg, model=_tiny_model())
    assert not (tmp_path / "acts" / "manifest.json").exists()


def test_harvest_out_of_space_mid_run(tmp_path, monkeypatch):
    """ENOSPC while the second shard is flushed to disk: a clear error naming the folder, the
    manifest still lists only the whole first shard (not complete), the half-written temp file is
    removed, and what is listed reads back."""
    np.save(tmp_path / "t.npy", (np.arange(320) * 7) % 60)
    real = os.fsync
    seen = Counter()

    def full_disk(fd):
        if "shard_00001" in os.readlink(f"/proc/self/fd/{fd}"):
            seen["enospc"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    out = tmp_path / "acts"
    cfg = HarvestConfig(model="tiny", hooks=[HOOK], dataset=str(tmp_path / "t.npy"), tokens=320,
                        ctx=10, out=str(out), batch_size=8, shard_size=64, dtype="float32",
                        progress=False)
    with pytest.raises(HarvestError, match=rf"writing shards to {out} failed: .*No space left"):
        harvest(cfg, model=_tiny_model())
    assert seen["enospc"] == 1
    m = manifest(out)
    assert m["complete"] is False and [e["index"] for e in m["shards"]] == [0]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert not (out / HOOK / "shard_00001.safetensors").exists()
    s = ActivationStore(out, HOOK, batch_size=16, split="all")  # warns: incomplete
    assert s.n_rows == 64 and s.read_rows(0, 64).shape == (64, 16)
    # space freed: the same command resumes and finishes with every row
    monkeypatch.setattr(os, "fsync", real)
    assert harvest(cfg, model=_tiny_model()).n_rows == 320
    done = ActivationStore(out, HOOK, batch_size=16, split="all")
    assert manifest(out)["complete"] and done.read_rows(0, 320).shape == (320, 16)
    assert torch.equal(done.read_rows(0, 64), s.read_rows(0, 64))


def test_atomic_write_leaves_no_temp_file_when_the_disk_is_full(tmp_path, monkeypatch):
    from polysae.fileio import atomic_write_bytes

    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def fail(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_harvest_cli_flags_and_foreign_out_folder(tmp_path, capsys):
    code, err = cli(capsys, "harvest", "--model", "tiny", "--out", tmp_path / "a",
                    "--shard-size", "0", "--no-progress")
    assert code == 2 and "--shard-size must be positive, got 0" in err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    code, err = cli(capsys, "harvest", "--model", "tiny", "--out", tmp_path / "b",
                    "--no-progress")
    assert code == 2 and f"--out {tmp_path / 'b'} is not empty and holds no polysae harvest" in err
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["notes.txt"]


def test_harvest_into_a_folder_from_a_newer_format(acts, capsys):
    edit_manifest(acts, lambda m: m.update(format_version=5))
    code, err = cli(capsys, "harvest", "--model", "tiny", "--out", acts, "--no-progress")
    want = f"{acts / 'manifest.json'}: format_version 5 is not one this polysae reads"
    assert code == 2 and want in err


# -- checkpoints (through `polysae export` and polysae.load) -------------------------------------
def _ckpt(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return SAE(SAEConfig(8, 24, k=3, ranks=(8, 4, 4))).save(tmp_path / "sae")


def _retensor(folder: Path, fn) -> None:
    """Rewrite sae.safetensors through ``fn`` and record its new sha256 (only the names/shapes
    are wrong, not the checksum)."""
    w = folder / "sae.safetensors"
    t = load_file(str(w))
    fn(t)
    save_file(t, str(w))
    doc = json.loads((folder / "config.json").read_text())
    doc["weights_sha256"] = hashlib.sha256(w.read_bytes()).hexdigest()
    (folder / "config.json").write_text(json.dumps(doc))


def export(capsys, src: Path, out: Path) -> tuple[int, str]:
    return cli(capsys, "export", src, out, "--format", "polysae")


def test_checkpoint_missing_tensor(tmp_path, capsys):
    src = _ckpt(tmp_path)
    _retensor(src, lambda t: t.pop("C3"))
    code, err = export(capsys, src, tmp_path / "out")
    assert code == 1 and str(src / "sae.safetensors") in err and "missing ['C3']" in err
    no_checkpoint(tmp_path / "out")


def test_checkpoint_extra_tensor(tmp_path, capsys):
    src = _ckpt(tmp_path)
    _retensor(src, lambda t: t.update(extra=torch.zeros(3)))
    code, err = export(capsys, src, tmp_path / "out")
    assert code == 1 and "unexpected ['extra']" in err
    no_checkpoint(tmp_path / "out")


def test_checkpoint_tensor_of_the_wrong_shape(tmp_path):
    src = _ckpt(tmp_path)
    _retensor(src, lambda t: t.update(W_enc=torch.zeros(8, 25)))
    with pytest.raises(ValueError, match=r"tensor 'W_enc' has shape \(8, 25\), expected "
                                         r"\(8, 24\)"):
        polysae.load(src)


def test_checkpoint_config_from_a_newer_format_version(tmp_path, capsys):
    src = _ckpt(tmp_path)
    doc = json.loads((src / "config.json").read_text())
    doc["format_version"] = 2
    doc["config"]["new_field_of_v2"] = {"x": 1}
    (src / "config.json").write_text(json.dumps(doc))
    code, err = export(capsys, src, tmp_path / "out")
    assert code == 1 and f"{src / 'config.json'}: format_version 2 is newer" in err
    no_checkpoint(tmp_path / "out")


def test_checkpoint_weights_replaced(tmp_path):
    src = _ckpt(tmp_path)
    save_file({k: v + 1 for k, v in load_file(str(src / "sae.safetensors")).items()},
              str(src / "sae.safetensors"))
    with pytest.raises(ValueError, match="sae.safetensors is corrupt or was replaced"):
        polysae.load(src)


def test_checkpoint_config_not_json(tmp_path, capsys):
    src = _ckpt(tmp_path)
    (src / "config.json").write_text("{ nope")
    code, err = export(capsys, src, tmp_path / "out")
    assert code == 1 and f"{src / 'config.json'}" in err
    no_checkpoint(tmp_path / "out")


def test_checkpoint_truncated_weights_without_checksum(tmp_path):
    src = _ckpt(tmp_path)
    doc = json.loads((src / "config.json").read_text())
    del doc["weights_sha256"]
    (src / "config.json").write_text(json.dumps(doc))
    w = src / "sae.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    with pytest.raises(ValueError, match=rf"cannot read {w}"):
        polysae.load(src)


def test_checkpoint_weights_path_is_not_a_file(tmp_path, capsys):
    src = _ckpt(tmp_path)
    (src / "sae.safetensors").unlink()
    (src / "sae.safetensors").mkdir()
    code, err = export(capsys, src, tmp_path / "out")
    assert code == 1 and f"missing file {src / 'sae.safetensors'}" in err


# -- downloads (loopback HTTP server) -------------------------------------------------------------
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, code, body=b"", headers=None, length=None, head=False):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _serve(self, head):
        srv, path = self.server, self.path.split("?")[0]
        srv.hits[path] += 1
        if "/resolve/" in path:  # Hub: /{owner}/{repo}/resolve/{rev}/{file}
            repo, _, tail = path.lstrip("/").partition("/resolve/")
            body = srv.files.get(f"hub/{repo}/{tail.partition('/')[2]}")
            if body is None:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head=head)
            return self._send(200, body, {"ETag": f'"{hashlib.sha256(body).hexdigest()}"',
                                          "X-Repo-Commit": COMMIT}, head=head)
        mode, _, rest = path.lstrip("/").partition("/")
        body = srv.files.get(rest)
        if mode == "e404" or body is None:
            return self._send(404, b"not found", head=head)
        if mode == "e500":
            return self._send(500, b"boom", head=head)
        if mode == "slow":
            time.sleep(1.5)
        if mode == "partial":  # promise the whole body, send half, hang up
            self.close_connection = True
            return self._send(200, body[: len(body) // 2], length=len(body), head=head)
        return self._send(200, body, head=head)

    def do_GET(self):
        try:
            self._serve(False)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_HEAD(self):
        try:
            self._serve(True)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


@pytest.fixture
def server(tmp_path):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.hits = {}, Counter()
    folder = _ckpt(tmp_path / "served")
    for p in folder.iterdir():
        srv.files[f"ckpt/{p.name}"] = p.read_bytes()
        srv.files[f"hub/org/saes/layer0/{p.name}"] = p.read_bytes()
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hfc

    root = tmp_path / "cache"
    monkeypatch.setenv("POLYSAE_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("POLYSAE_OFFLINE", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", False)
    return root


def nothing_valid_in(cache: Path) -> None:
    """No file outside the partial/lock areas, so no finished download is faked."""
    done = [p for p in cache.rglob("*") if p.is_file()
            and p.relative_to(cache).parts[0] not in (".partial", ".locks")]
    assert done == []


def _registry_entry(monkeypatch, server, name, **kw):
    from polysae.registry import REGISTRY, PretrainedEntry

    monkeypatch.setenv("HF_ENDPOINT", server.url)
    base = dict(name=name, description="t", model="tiny", hook="blocks.0.x", architecture="topk",
                format="polysae", files=("config.json", "sae.safetensors"), repo="org/saes",
                path="layer0")
    base.update(kw)
    e = PretrainedEntry(**base)
    monkeypatch.setitem(REGISTRY, name, e)
    return e


def test_download_checksum_mismatch(server, cache, monkeypatch, capsys):
    sha = {n[len("ckpt/"):]: hashlib.sha256(b).hexdigest() for n, b in server.files.items()
           if n.startswith("ckpt/")}
    _registry_entry(monkeypatch, server, "test-bad-sha",
                    sha256={**sha, "sae.safetensors": "0" * 64})
    code, err = cli(capsys, "download", "test-bad-sha")
    assert code == 1 and "test-bad-sha" in err and "checksum mismatch for sae.safetensors" in err
    nothing_valid_in(cache)


@pytest.mark.parametrize("mode,message", [("e404", "no checkpoint found there"),
                                          ("e500", "failed with HTTP 500"),
                                          ("slow", "timed out after 0.3s"),
                                          ("partial", "truncated body")])
def test_download_http_failures(server, cache, capsys, mode, message):
    """A folder URL is probed file by file: a 404 on every probe means no checkpoint there."""
    url = f"{server.url}/{mode}/ckpt"
    code, err = cli(capsys, "download", url, "--timeout", "0.3")
    assert code == 1 and message in err and url in err
    nothing_valid_in(cache)


def test_download_registry_file_missing_on_the_hub(server, cache, monkeypatch, capsys):
    _registry_entry(monkeypatch, server, "test-missing", path="nope")
    code, err = cli(capsys, "download", "test-missing")
    assert code == 1 and "test-missing" in err and "not found in org/saes@main" in err
    nothing_valid_in(cache)


def test_download_offline_and_not_cached(server, cache, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = cli(capsys, "download", f"{server.url}/files/ckpt")
    assert code == 1 and "offline" in err
    assert sum(server.hits.values()) == 0


def test_download_registry_name_with_path_traversal(cache, capsys):
    code, err = cli(capsys, "download", "../../etc/passwd")
    assert code == 2 and "'../../etc/passwd' is not a registry name" in err
    assert not cache.exists() or list(cache.rglob("*")) == []


def test_download_registry_entry_with_traversing_file_names(server, cache, monkeypatch, capsys,
                                                          tmp_path):
    _registry_entry(monkeypatch, server, "test-evil", files=("../../../outside.json",))
    code, err = cli(capsys, "download", "test-evil")
    assert code == 1 and "refusing path '../../../outside.json'" in err
    assert not (tmp_path / "outside.json").exists()
    assert sum(server.hits.values()) == 0


def test_download_hf_source_with_path_traversal(cache, capsys):
    code, err = cli(capsys, "download", "hf://org/repo/../../etc@main")
    assert code == 1 and "refusing" in err and "../../etc" in err


def test_download_symlink_escape_of_the_cache(server, cache, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    cache.mkdir(parents=True)
    (cache / "url").symlink_to(outside)
    code, err = cli(capsys, "download", f"{server.url}/files/ckpt")
    assert code == 1 and "symlink" in err and str(cache / "url") in err
    assert list(outside.iterdir()) == [] and sum(server.hits.values()) == 0


def test_download_unknown_registry_name_suggests_the_list(capsys):
    code, err = cli(capsys, "download", "no-such-sae")
    assert code == 2 and "'no-such-sae' is not a registry name (see `polysae list`)" in err


def test_registry_entry_replaced_after_download_is_not_trusted(server, cache, monkeypatch):
    """A cached download whose file was swapped afterwards fails its recorded checksum."""
    from polysae.cache import download

    url = f"{server.url}/files/ckpt"
    folder = download(url)
    w = folder / "sae.safetensors"
    w.write_bytes(w.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="corrupt or was replaced"):
        polysae.load(url)


def test_api_bad_inputs_name_their_shape():
    """Library-level shape errors name the offending shape."""
    sae = SAE(SAEConfig(8, 24, k=3, decoder="linear"))
    with pytest.raises(ValueError, match=r"expected last dimension d_in=8, got shape \(4, 9\)"):
        sae.encode(torch.zeros(4, 9))
    with pytest.raises(ValueError, match=r"TensorSource: data must be \[N, d_in\], got shape "
                                         r"\(4, 2, 8\)"):
        TensorSource(torch.zeros(4, 2, 8), 2)
    with pytest.raises(ValueError, match="batch_size=3 must be a positive multiple of "
                                         "world_size=2"):
        TensorSource(torch.zeros(8, 8), 3, world_size=2)
