"""``polysae replicate``: vanilla vs PolySAE for each sparsifier over N seeds on one activation
store, with paired confidence intervals (:mod:`polysae.replicate.run`). Flags are generated from
:class:`polysae.replicate.config.ReplicateConfig` and its nested configs (``--train.lr``,
``--eval.probe-train-per-class``, ``--sae.d-sae``, ``--harvest.tokens`` ...).

Examples::

    polysae replicate --acts runs/acts --sparsifiers topk batchtopk --seeds 3 --out runs/rep
    # the paper's GPT-2 recipe (needs the weights and a GPU): see docs/replicate.md
"""

from __future__ import annotations

import argparse

HELP = ("vanilla vs PolySAE over seeds for each sparsifier: the paper's Table 1 with paired "
        "confidence intervals")

# Fields replicate sets itself (per cell, or from its own top-level settings).
TRAIN_EXCLUDE = ("seed", "progress")
EVAL_EXCLUDE = ("device", "progress", "backend")
HARVEST_EXCLUDE = ("out", "device", "progress", "model", "backend")
SAE_EXCLUDE = ("d_in", "sparsifier", "decoder")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from polysae.cli.flags import add_config_flags, add_override_flags, field_values
    from polysae.config import SAEConfig
    from polysae.data.harvesting import HarvestConfig
    from polysae.evaluation import EvalConfig
    from polysae.replicate.config import ReplicateConfig
    from polysae.training import TrainConfig

    d = ReplicateConfig()
    add_config_flags(p, ReplicateConfig)
    add_override_flags(p, SAEConfig, prefix="sae", exclude=SAE_EXCLUDE, defaults=d.sae)
    add_config_flags(p, TrainConfig, prefix="train", exclude=TRAIN_EXCLUDE,
                     defaults=field_values(d.train))
    add_config_flags(p, EvalConfig, prefix="eval", exclude=EVAL_EXCLUDE,
                     defaults=field_values(d.eval))
    add_config_flags(p, HarvestConfig, prefix="harvest", exclude=HARVEST_EXCLUDE,
                     defaults=field_values(d.harvest))


def build_config(args: argparse.Namespace):
    from polysae.cli.flags import config_from_args, overrides_from_args
    from polysae.config import SAEConfig
    from polysae.data.harvesting import HarvestConfig
    from polysae.evaluation import EvalConfig
    from polysae.replicate.config import ReplicateConfig
    from polysae.training import TrainConfig

    d = ReplicateConfig()
    sae = dict(d.sae, **overrides_from_args(args, SAEConfig, prefix="sae"))
    return config_from_args(
        args, ReplicateConfig, sae=sae,
        train=config_from_args(args, TrainConfig, prefix="train", seed=d.train.seed),
        eval=config_from_args(args, EvalConfig, prefix="eval"),
        harvest=config_from_args(args, HarvestConfig, prefix="harvest"))


def main(args: argparse.Namespace) -> int:
    from polysae.replicate.run import replicate

    cfg = build_config(args)
    res = replicate(cfg)
    print(f"\npolysae replicate: {len(res.cells)} cells "
          f"({sum(c.skipped for c in res.cells)} already complete) in {res.table['seconds']} s")
    print(f"  table: {res.out / 'replicate.md'}")
    print(f"  json:  {res.out / 'replicate.json'}")
    print(f"  plot:  {res.out / 'paired_f1.png'}")
    for sp, block in res.table["sparsifiers"].items():
        e = block["metrics"].get("f1_k1")
        if e and e.get("diff"):
            dd = e["diff"]
            print(f"  {sp}: F1@1 vanilla {e['vanilla']['mean']:.4f} -> poly {e['poly']['mean']:.4f}"
                  f", paired diff {dd['mean']:+.4f} [{dd['t_low']:+.4f}, {dd['t_high']:+.4f}]")
    return 0
