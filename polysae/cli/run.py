"""``polysae run``: the whole job in one command (harvest -> train vanilla + PolySAE -> evaluate
-> report + feature browser). With no flags it runs offline on a CPU on the bundled SmolLM2-135M
and BBC News corpus; every size scales up by flag. Re-running the same command resumes.

Examples::

    polysae run                                        # defaults, ~5-10 min on 2 CPU cores
    polysae run --harvest.model gpt2 --harvest.hooks blocks.8.hook_resid_post \\
        --harvest.tokens 50_000_000 --sae.d-sae 16384 --sae.k 64 --sae.ranks 768 64 64 \\
        --batch-size 4096 --device cuda --out runs/gpt2

Flags are generated from :class:`polysae.pipeline.RunConfig` and its nested configs
(``--harvest.*``, ``--sae.*``, ``--train.*``, ``--eval.*``); the flags of before the nesting
(``--tokens``, ``--d-sae``, ``--eval-recon-tokens`` ...) remain as deprecated aliases.
"""

from __future__ import annotations

import argparse

HELP = "the whole job: harvest, train a vanilla and a PolySAE side by side, evaluate, report"

# Fields of the nested configs that `polysae run` sets itself (from its own out/device/seed/
# progress, or per SAE); every other field has a flag `--<config>.<field>`.
HARVEST_EXCLUDE = ("out", "device", "seed", "progress", "backend")
TRAIN_EXCLUDE = ("seed", "progress")
EVAL_EXCLUDE = ("device", "progress", "backend")
SAE_EXCLUDE = ("d_in", "decoder")
# The flags of `polysae run` before its settings were nested configs (deprecated, accepted).
ALIASES = {
    "harvest": {"model": ("--model",), "hooks": ("--hooks",), "dataset": ("--dataset",),
                "tokens": ("--tokens",), "ctx": ("--ctx",), "model_dtype": ("--model-dtype",),
                "dtype": ("--store-dtype",), "shard_size": ("--shard-size",)},
    "sae": {"d_sae": ("--d-sae",), "k": ("--k",), "sparsifier": ("--sparsifier",),
            "ranks": ("--ranks",)},
    "train": {"lr": ("--lr",), "tokens": ("--train-tokens",), "normalize": ("--normalize",)},
    "eval": {"recon_tokens": ("--eval-recon-tokens",),
             "probe_train_per_class": ("--eval-probe-train-per-class",),
             "probe_test_per_class": ("--eval-probe-test-per-class",),
             "ce_contexts": ("--eval-ce-contexts",)},
}


def _nested():
    from polysae.data.harvesting import HarvestConfig
    from polysae.evaluation import EvalConfig
    from polysae.training import TrainConfig

    return (("harvest", HarvestConfig, HARVEST_EXCLUDE), ("train", TrainConfig, TRAIN_EXCLUDE),
            ("eval", EvalConfig, EVAL_EXCLUDE))


def add_arguments(p: argparse.ArgumentParser) -> None:
    from polysae.cli.flags import add_config_flags, add_override_flags, field_values
    from polysae.config import SAEConfig
    from polysae.pipeline import RunConfig

    d = RunConfig()
    add_config_flags(p, RunConfig)
    add_override_flags(p, SAEConfig, prefix="sae", exclude=SAE_EXCLUDE, defaults=d.sae,
                       aliases=ALIASES["sae"])
    for name, cls, exclude in _nested():
        add_config_flags(p, cls, prefix=name, exclude=exclude,
                         defaults=field_values(getattr(d, name)), aliases=ALIASES[name])


def build_config(args: argparse.Namespace):
    from polysae.cli import CLIError
    from polysae.cli.flags import config_error, config_from_args, overrides_from_args
    from polysae.config import SAEConfig
    from polysae.pipeline import RunConfig

    names = {"RunConfig": "", "SAEConfig": "sae"}
    try:
        nested = {}
        for name, cls, _ in _nested():
            names[cls.__name__] = name
            nested[name] = config_from_args(args, cls, prefix=name)
        sae = dict(RunConfig().sae, **overrides_from_args(args, SAEConfig, prefix="sae"))
        return config_from_args(args, RunConfig, sae=sae, **nested)
    except ValueError as e:
        raise CLIError(config_error(e, args, **names)) from None


def main(args: argparse.Namespace) -> int:
    from polysae.pipeline import run

    cfg = build_config(args)
    res = run(cfg)
    m = res.metrics
    print(f"\npolysae run: done in {sum(res.seconds.values()):.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in res.seconds.items())})")
    print(f"  report:  {res.out / 'report' / 'report.md'}")
    if cfg.browser:
        print(f"  browser: {res.out / 'browser' / 'index.html'}")
    summary = m.get("summary") if isinstance(m, dict) else None
    if summary:
        print(f"  summary: {summary}")
    return 0
