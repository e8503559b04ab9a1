"""CLI flags generated from the config dataclasses (polysae.cli.flags) for harvest, train, eval,
run, replicate, browse and export --format neuronpedia. CPU only, no model except a tiny random
HookedTransformer for the device check.

Checks: every config field (minus each command's declared exclude list) has a flag with help;
parsing no flags gives the config's defaults; old flag spellings parse to the same config as the
new ones; config errors name the flag the user typed; ``polysae run`` with no flags derives
exactly the stage configs the pipeline built by hand before its settings were nested; the one
device rule; the one sparsifier list."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import numpy as np
import pytest
import torch

from polysae.__main__ import build_parser
from polysae.browser import BrowseConfig, StatsConfig
from polysae.cli import CLIError
from polysae.cli import browse as browse_cli
from polysae.cli import eval as eval_cli
from polysae.cli import export as export_cli
from polysae.cli import harvest as harvest_cli
from polysae.cli import replicate as replicate_cli
from polysae.cli import run as run_cli
from polysae.cli import train as train_cli
from polysae.cli.flags import config_from_args, field_docs, flag_name, overrides_from_args
from polysae.config import SPARSIFIERS, SAEConfig
from polysae.data.harvesting import HarvestConfig, HarvestError
from polysae.evaluation import EvalConfig
from polysae.formats.neuronpedia import NeuronpediaConfig
from polysae.pipeline import RunConfig, stage_configs
from polysae.replicate import ReplicateConfig
from polysae.training import TrainConfig

NESTED = ("sae", "harvest", "train", "eval")

# (module, [(config class, flag prefix, excluded fields)]) for every config-driven subcommand.
COMMANDS = {
    "harvest": (harvest_cli, [(HarvestConfig, "", ())]),
    "eval": (eval_cli, [(EvalConfig, "", ())]),
    "train": (train_cli, [(TrainConfig, "", ()), (SAEConfig, "", train_cli.SAE_EXCLUDE)]),
    "run": (run_cli, [(RunConfig, "", ()), (SAEConfig, "sae", run_cli.SAE_EXCLUDE),
                      (HarvestConfig, "harvest", run_cli.HARVEST_EXCLUDE),
                      (TrainConfig, "train", run_cli.TRAIN_EXCLUDE),
                      (EvalConfig, "eval", run_cli.EVAL_EXCLUDE)]),
    "replicate": (replicate_cli, [(ReplicateConfig, "", ()),
                                  (SAEConfig, "sae", replicate_cli.SAE_EXCLUDE),
                                  (HarvestConfig, "harvest", replicate_cli.HARVEST_EXCLUDE),
                                  (TrainConfig, "train", replicate_cli.TRAIN_EXCLUDE),
                                  (EvalConfig, "eval", replicate_cli.EVAL_EXCLUDE)]),
}
# The viewers (their --device stays "cpu", outside the one device rule's commands above).
VIEWERS = {
    "browse": (browse_cli, [(BrowseConfig, "", browse_cli.EXCLUDE), (StatsConfig, "", ())]),
    "export": (export_cli, [(NeuronpediaConfig, "", ()), (StatsConfig, "", ())]),
}


def _parser(module) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p


@pytest.mark.parametrize("command", [*COMMANDS, *VIEWERS])
def test_every_config_field_has_a_flag_with_help(command):
    module, groups = {**COMMANDS, **VIEWERS}[command]
    flags = {s: a for a in _parser(module)._actions for s in a.option_strings}
    n = 0
    for cls, prefix, exclude in groups:
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(exclude) <= names, (cls.__name__, set(exclude) - names)  # no stale excludes
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            nested = dataclasses.is_dataclass(hints[f.name])  # flags of its own class
            if (f.name in exclude or nested
                    or f.name in NESTED and cls in (RunConfig, ReplicateConfig)):
                assert not nested or docs.get(f.name, "").strip(), (cls.__name__, f.name)
                continue
            name = flag_name(f.name, prefix)
            assert name in flags, (command, name)
            assert docs.get(f.name, "").strip(), (command, cls.__name__, f.name)
            assert flags[name].help and flags[name].help.strip(), (command, name)
            if typing.get_type_hints(cls)[f.name] is bool:  # --x and --no-x
                no = "--no-" + name[2:]
                assert no in flags and flags[no] is flags[name], (command, no)
            n += 1
    assert n >= {"harvest": 15, "eval": 24, "train": 40, "run": 80, "replicate": 80,
                 "browse": 12, "export": 16}[command]


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args([str(a) for a in argv])


def test_no_flags_give_the_config_defaults(tmp_path):
    a = _parse("harvest", "--out", tmp_path)
    assert config_from_args(a, HarvestConfig) == HarvestConfig(out=str(tmp_path))
    a = _parse("eval", "--sae", "x", "--out", "y")
    assert config_from_args(a, EvalConfig) == EvalConfig()
    a = _parse("train", "--out", "y")
    assert config_from_args(a, TrainConfig) == TrainConfig()
    assert overrides_from_args(a, SAEConfig, prefix="", exclude=train_cli.SAE_EXCLUDE) == {}
    assert a.k == [SAEConfig(8, 128).k]
    assert run_cli.build_config(_parse("run")) == RunConfig()


def test_harvest_flags_build_the_config(tmp_path):
    a = _parse("harvest", "--out", tmp_path, "--hooks", "blocks.0.hook_resid_post",
               "blocks.1.hook_mlp_out", "--tokens", 640, "--dtype", "float32", "--bos", "doc",
               "--exclude-special", "--no-progress", "--device", "cpu", "--text-column", "body")
    cfg = config_from_args(a, HarvestConfig)
    assert cfg == HarvestConfig(out=str(tmp_path), hooks=["blocks.0.hook_resid_post",
                                                          "blocks.1.hook_mlp_out"],
                                tokens=640, dtype="float32", bos="doc", exclude_special=True,
                                progress=False, device="cpu", text_column="body")
    with pytest.raises(SystemExit):  # --out is required by the command
        _parse("harvest")


def test_eval_old_spellings_parse_like_the_new_ones(capsys):
    base = ("eval", "--sae", "x", "--out", "y")
    old = _parse(*base, "--train-per-class", 6, "--test-per-class", 4, "--tokens", 512,
                 "--pairs", 3, "--alphas", "0.5,1", "--datasets", "bbc,tweets", "--ks", "1,3")
    assert "--tokens is deprecated, use --recon-tokens" in capsys.readouterr().err
    new = _parse(*base, "--probe-train-per-class", 6, "--probe-test-per-class", 4,
                 "--recon-tokens", 512, "--n-pairs", 3, "--alpha-scales", 0.5, 1,
                 "--datasets", "bbc", "tweets", "--ks", 1, 3)
    want = EvalConfig(probe_train_per_class=6, probe_test_per_class=4, recon_tokens=512,
                      n_pairs=3, alpha_scales=(0.5, 1.0), datasets=("bbc", "tweets"), ks=(1, 3))
    assert config_from_args(old, EvalConfig) == config_from_args(new, EvalConfig) == want
    # '' still means "no probing datasets"
    assert config_from_args(_parse(*base, "--datasets", ""), EvalConfig).datasets == ()


def test_run_old_spellings_parse_like_the_new_ones():
    old = ("--model m --hooks a b --dataset d --tokens 6000 --ctx 64 --model-dtype bfloat16 "
           "--store-dtype float32 --shard-size 1024 --d-sae 256 --k 8 --sparsifier batchtopk "
           "--ranks 16 8 8 --lr 0.01 --train-tokens 5000 --no-normalize "
           "--eval-recon-tokens 1024 --eval-probe-train-per-class 6 "
           "--eval-probe-test-per-class 3 --eval-ce-contexts 2")
    new = ("--harvest.model m --harvest.hooks a b --harvest.dataset d --harvest.tokens 6000 "
           "--harvest.ctx 64 --harvest.model-dtype bfloat16 --harvest.dtype float32 "
           "--harvest.shard-size 1024 --sae.d-sae 256 --sae.k 8 --sae.sparsifier batchtopk "
           "--sae.ranks 16 8 8 --train.lr 0.01 --train.tokens 5000 --no-train.normalize "
           "--eval.recon-tokens 1024 --eval.probe-train-per-class 6 "
           "--eval.probe-test-per-class 3 --eval.ce-contexts 2")
    common = "--batch-size 256 --epochs 1 --seed 3 --device cpu --no-browser --no-progress"
    a = run_cli.build_config(_parse("run", *old.split(), *common.split()))
    b = run_cli.build_config(_parse("run", *new.split(), *common.split()))
    d = RunConfig()
    want = RunConfig(
        batch_size=256, epochs=1, seed=3, device="cpu", browser=False, progress=False,
        sae={"d_sae": 256, "k": 8, "sparsifier": "batchtopk", "ranks": (16, 8, 8)},
        harvest=dataclasses.replace(d.harvest, model="m", hooks=["a", "b"], dataset="d",
                                    tokens=6000, ctx=64, model_dtype="bfloat16",
                                    dtype="float32", shard_size=1024),
        train=dataclasses.replace(d.train, lr=0.01, tokens=5000, normalize=False),
        eval=dataclasses.replace(d.eval, recon_tokens=1024, probe_train_per_class=6,
                                 probe_test_per_class=3, ce_contexts=2))
    assert a == b == want


VIEWER_BASE = {"browse": ("browse", "--sae", "x", "--acts", "a", "--out", "o"),
               "export": ("export", "x", "o", "--format", "neuronpedia", "--acts", "a")}


def _viewer_config(command: str, *argv):
    cls = BrowseConfig if command == "browse" else NeuronpediaConfig
    return browse_cli.viewer_config(_parse(*VIEWER_BASE[command], *argv), cls)


def test_viewer_defaults_are_the_hand_written_ones_of_before():
    """The defaults the browse / export flags had when they were declared by hand."""
    b = _viewer_config("browse")
    assert b == BrowseConfig(stats=StatsConfig(chunk_rows=2048))
    assert (b.stats.n_contexts, b.n_pairs, b.pair_candidates, b.stats.left, b.stats.right,
            b.stats.chunk_rows) == (20, 200, 2000, 8, 4, 2048)
    e = _viewer_config("export")
    assert e == NeuronpediaConfig()
    assert (e.features_per_batch, e.stats.n_contexts, e.stats.left, e.stats.right, e.n_pairs,
            e.min_pair_count, e.sae_set, e.stats.chunk_rows) == (128, 20, 16, 8, 100, 2, None, 512)


def test_viewer_old_spellings_parse_like_the_new_ones(capsys):
    old = _viewer_config("browse", "--contexts", 7, "--pairs", 30, "--pair-candidates", 300,
                         "--left", 5, "--right", 3, "--chunk-rows", 97)
    assert "--contexts is deprecated, use --n-contexts" in capsys.readouterr().err
    new = _viewer_config("browse", "--n-contexts", 7, "--n-pairs", 30, "--pair-candidates", 300,
                         "--left", 5, "--right", 3, "--chunk-rows", 97)
    assert old == new == BrowseConfig(n_pairs=30, pair_candidates=300, stats=StatsConfig(
        n_contexts=7, left=5, right=3, chunk_rows=97))
    old = _viewer_config("export", "--features-per-batch", 64, "--contexts", 5, "--left", 6,
                         "--right", 2, "--pairs", 40, "--min-pair-count", 3, "--sae-set", "s")
    assert "--pairs is deprecated, use --n-pairs" in capsys.readouterr().err
    new = _viewer_config("export", "--features-per-batch", 64, "--n-contexts", 5, "--left", 6,
                         "--right", 2, "--n-pairs", 40, "--min-pair-count", 3, "--sae-set", "s")
    assert old == new == NeuronpediaConfig(
        features_per_batch=64, n_pairs=40, min_pair_count=3, sae_set="s",
        stats=StatsConfig(n_contexts=5, left=6, right=2, hist_bins=50))  # SAEDashboard's 50
    with pytest.raises(CLIError, match="--contexts must be >= 1, got 0"):
        _viewer_config("browse", "--contexts", 0)
    with pytest.raises(CLIError, match="--hist-lo 2.0 must be < hist_hi 1.0"):
        _viewer_config("export", "--hist-lo", 2, "--hist-hi", 1)
    with pytest.raises(CLIError, match="--features-per-batch must be >= 1, got 0"):
        _viewer_config("export", "--features-per-batch", 0)


def test_config_errors_name_the_flag_typed(capsys):
    for argv, msg in ((["--k", "5000"], "--k: k=5000 exceeds d_sae=2048"),
                      (["--sae.k", "5000"], "--sae.k: k=5000 exceeds d_sae=2048"),
                      (["--tokens", "0"], "--tokens must be positive, got 0"),
                      (["--harvest.tokens", "0"], "--harvest.tokens must be positive, got 0"),
                      (["--eval.probe-ctx", "1"], "--eval.probe-ctx must be >= 2"),
                      (["--train.lr", "-1"], "--train.lr: must be a positive number")):
        with pytest.raises(CLIError) as e:
            run_cli.build_config(_parse("run", *argv))
        assert msg in str(e.value), (argv, str(e.value))
    base = ["--sae", "x", "--out", "y"]
    for flag in ("--tokens", "--recon-tokens"):
        args = _parse("eval", *base, flag, 0)
        with pytest.raises(ValueError) as e:
            config_from_args(args, EvalConfig)
        from polysae.cli.flags import config_error

        assert config_error(e.value, args, EvalConfig="") == f"{flag} must be >= 1, got 0"


def test_config_post_init_validates_and_names_the_field():
    for kw, msg in (({"shard_size": 0}, "HarvestConfig.shard_size must be positive, got 0"),
                    ({"dtype": "int8"}, "HarvestConfig.dtype 'int8': expected one of"),
                    ({"bos": "sometimes"}, "HarvestConfig.bos 'sometimes'")):
        with pytest.raises(HarvestError, match=msg):
            HarvestConfig(**kw)
    for kw, msg in (({"ks": (0, 1)}, "EvalConfig.ks must be positive integers"),
                    ({"probe_ctx": 1}, "EvalConfig.probe_ctx must be >= 2"),
                    ({"recon_tokens": 0}, "EvalConfig.recon_tokens must be >= 1"),
                    ({"ce_contexts": -1}, "EvalConfig.ce_contexts must be >= 0"),
                    ({"alpha_scales": (float("nan"),)}, "EvalConfig.alpha_scales"),
                    ({"dense_threshold": 0.0}, "EvalConfig.dense_threshold")):
        with pytest.raises(ValueError, match=msg):
            EvalConfig(**kw)
    for kw, msg in (({"sae": {"decoder": "linear"}}, r"RunConfig.sae: overrides \['decoder'\]"),
                    ({"sae": {"d_sea": 3}}, r"unknown SAEConfig fields \['d_sea'\]"),
                    ({"sae": {"d_sae": 16, "k": 32}}, "k=32 exceeds d_sae=16"),
                    ({"epochs": 0}, "RunConfig.epochs must be >= 1")):
        with pytest.raises(ValueError, match=msg):
            RunConfig(**kw)


def test_run_defaults_give_the_stage_configs_of_before():
    """The literal settings the pipeline built by hand before RunConfig nested the stage
    configs (the reference): `polysae run` without flags must train exactly that."""
    d_in, n_rows = 576, 95_000
    st = stage_configs(RunConfig(), device="cpu", d_in=d_in, n_rows=n_rows)
    steps = max(1, 3 * n_rows // 1024)
    assert st.harvest == HarvestConfig(
        model="smollm2-135m", hooks=["blocks.9.hook_resid_post"], dataset="bbc",
        tokens=100_000, ctx=128, out="polysae-run/acts", dtype="float16", model_dtype="float32",
        shard_size=8192, device="cpu", seed=42, progress=True)
    common = dict(d_in=d_in, d_sae=2048, k=32, sparsifier="topk")
    assert st.saes == {"vanilla": SAEConfig(decoder="linear", **common),
                       "poly": SAEConfig(decoder="poly", ranks=None, **common)}
    assert st.train == TrainConfig(lr=1e-3, steps=steps, seed=42, progress=True, normalize=True,
                                   dead_window=max(10, steps // 8),
                                   checkpoint_every=max(1, steps // 4),
                                   log_every=max(1, steps // 50))
    assert st.eval == EvalConfig(recon_tokens=8192, probe_train_per_class=32,
                                 probe_test_per_class=16, ce_contexts=16, device="cpu",
                                 progress=True)
    # train.tokens / train.steps set the length; scale_cadence off keeps train's cadences
    cfg = RunConfig(batch_size=100, train=TrainConfig(tokens=5000, dead_window=7))
    assert stage_configs(cfg, device="cpu", d_in=8, n_rows=10).train.steps == 50
    cfg = RunConfig(train=TrainConfig(steps=9, dead_window=7, checkpoint_every=3),
                    scale_cadence=False)
    t = stage_configs(cfg, device="cpu", d_in=8, n_rows=10).train
    assert (t.steps, t.dead_window, t.checkpoint_every, t.log_every) == (9, 7, 3, 10)
    # run_config.json round-trips
    cfg = RunConfig(sae={"d_sae": 64, "k": 4, "ranks": (8, 4, 4)}, epochs=2)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_one_device_rule(monkeypatch):
    from polysae.device import resolve_device

    for avail, want in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda avail=avail: avail)
        assert resolve_device(None) == want
        assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"
        # a model passed in decides for None (an API call with a preloaded model)
        meta = torch.nn.Linear(2, 2, device="meta")
        assert resolve_device(None, meta) == "meta" and resolve_device("cpu", meta) == "cpu"
    for cfg in (HarvestConfig(), EvalConfig(), RunConfig(), ReplicateConfig()):
        assert cfg.device is None, type(cfg).__name__
    flags = {c: {s: a for a in _parser(m)._actions for s in a.option_strings}["--device"]
             for c, (m, _) in COMMANDS.items()}
    for name, mod in (("train", train_cli), ("browse", browse_cli), ("export", export_cli)):
        flags[name] = {s: a for a in _parser(mod)._actions for s in a.option_strings}["--device"]
    assert all(a.default is None for a in flags.values()), {c: a.default for c, a in
                                                           flags.items()}


def test_harvest_with_default_device_resumes_a_cpu_folder(tmp_path, monkeypatch):
    """device=None resolves before the folder's identity is compared: a folder harvested with
    device='cpu' is complete, not incompatible, for device=None on a machine without a GPU."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from polysae.data.harvesting import harvest

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=16, d_head=8, n_heads=2, d_vocab=60, act_fn="gelu")).eval()
    np.save(tmp_path / "t.npy", np.random.default_rng(0).integers(0, 60, (40, 16)))
    base = dict(model="tiny", hooks=["blocks.0.hook_resid_post"], dataset=str(tmp_path / "t.npy"),
                tokens=160, ctx=16, out=str(tmp_path / "acts"), dtype="float32",
                progress=False)
    first = harvest(HarvestConfig(device="cpu", **base), model=model)
    again = harvest(HarvestConfig(device=None, **base), model=model)
    assert first.n_rows == again.n_rows == 160 and again.seconds == 0.0
    with pytest.raises(HarvestError, match="device: folder has 'cpu', asked 'meta'"):
        harvest(HarvestConfig(device="meta", **base), model=model)


def test_one_sparsifier_list():
    assert SPARSIFIERS == typing.get_args(typing.get_type_hints(SAEConfig)["sparsifier"])
    for cmd, flag in (("train", "--sparsifier"), ("run", "--sae.sparsifier")):
        action = {s: a for a in _parser(COMMANDS[cmd][0])._actions
                  for s in a.option_strings}[flag]
        assert tuple(action.choices) == SPARSIFIERS, cmd
