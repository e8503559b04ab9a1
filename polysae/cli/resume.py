"""``polysae train --resume``: the recorded run, checked, and checked against what was asked.

A resumed run continues exactly the run recorded in ``RUN/run.json``: same SAEs, same training
settings, same data. So:

- ``run.json`` is validated (types of every field it is read for) before anything is used;
- the data folder is the recorded one, stored as an absolute path (a relative path of an older
  run is resolved against the current folder, with a warning), or the ``--acts`` given; either
  way it must be the *same store*: the manifest's identity (:func:`store_identity`, a sha256 of
  the manifest) recorded at the start must match;
- a flag given with ``--resume`` whose value differs from the run's is an error listing every
  such flag, except the fields of :data:`MAY_CHANGE` (extending ``--steps``/``--tokens``,
  logging and checkpoint cadence), which the resumed run takes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from polysae.cli import CLIError

log = logging.getLogger("polysae.train")

MAY_CHANGE = ("steps", "tokens", "progress", "log_every", "checkpoint_every", "log_to",
              "wandb_project")
"""TrainConfig fields ``--resume`` may change: run longer, log and checkpoint differently."""

RUN_FIELDS = {"format": str, "train_config": dict, "saes": dict, "metadata": (dict, None),
              "single": (bool,)}
META_FIELDS = {"acts": (str, None), "hook": (str, None), "batch_size": (int,), "split": (str,),
               "acts_identity": (str, None)}


def store_identity(manifest: dict[str, Any]) -> str:
    """sha256 of an activation manifest (canonical JSON, ``complete`` aside): the same harvest
    gives the same value wherever the folder lives; another one, or one that grew, does not."""
    doc = {k: v for k, v in manifest.items() if k != "complete"}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def read_run(run_file: Path) -> tuple[dict | None, str | None]:
    """``(run, None)`` for a valid ``run.json``, else ``(None, message)`` (rank 0 reads it and
    broadcasts the pair)."""
    from polysae.validate import check_fields, read_json_object

    if not run_file.is_file():
        return None, f"--resume: {run_file} not found (is --out a polysae training run?)"
    try:
        run = read_json_object(run_file, "run file")
        if run.get("format") != "polysae-train-run":
            raise ValueError("not a polysae-train-run document")
        missing = [k for k in ("train_config", "saes") if not isinstance(run.get(k), dict)]
        if missing:
            raise ValueError(f"missing {missing}")
        check_fields(run_file, run, RUN_FIELDS)
        run["metadata"] = run.get("metadata") or {}
        check_fields(run_file, run["metadata"], META_FIELDS, "metadata: ")
        bad = [n for n, c in run["saes"].items() if not isinstance(c, dict)]
        if bad or not run["saes"]:
            raise ValueError(f"saes {bad} are not objects" if bad else "it lists no SAE")
    except ValueError as e:
        return None, f"--resume: {run_file} is not a polysae run file ({e})"
    return run, None


def recorded_acts(args: argparse.Namespace, meta: dict[str, Any], run_file: Path) -> str:
    """The data folder to resume on: ``--acts`` if given, else the recorded one (an older run's
    relative path resolved against the current folder, with a warning)."""
    if args.acts:
        return args.acts
    acts = meta.get("acts")
    if acts is None:
        raise CLIError(f"--resume: {run_file} records no data folder; pass --acts")
    if not os.path.isabs(acts):
        log.warning("%s records the relative data folder %r (written by an older polysae); "
                    "resolving it against the current folder: %s", run_file, acts,
                    Path(acts).resolve())
    return acts


def check_same_store(manifest: dict[str, Any], acts: str, meta: dict[str, Any],
                     run_file: Path) -> None:
    """A ``ValueError`` (bad data, exit 1) when the store at ``acts`` is not the one the run
    started on."""
    want = meta.get("acts_identity")
    if want is not None and store_identity(manifest) != want:
        raise ValueError(f"--resume: {acts} is not the harvest this run was trained on (its "
                         f"manifest differs from the one recorded in {run_file}, from "
                         f"{meta.get('acts')}; a harvest that was continued or redone counts as "
                         "different); resume on the same data or start a new --out")


def _shown(v: Any) -> str:
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def resume_settings(args: argparse.Namespace, run: dict[str, Any], run_file: Path,
                    default_k: list[int]):
    """``(TrainConfig, {name: SAEConfig})`` of the recorded run with the :data:`MAY_CHANGE`
    flags applied; a :class:`CLIError` listing every other flag whose value differs from the
    run's."""
    import dataclasses

    from polysae.cli.flags import flag_name, overrides_from_args, typed_dests
    from polysae.config import SAEConfig
    from polysae.training import TrainConfig

    try:
        tcfg = TrainConfig.from_dict(run["train_config"])
        cfgs = {n: SAEConfig.from_dict(c) for n, c in run["saes"].items()}
    except (ValueError, TypeError) as e:
        raise CLIError(f"--resume: {run_file} holds an invalid config ({e})") from None
    meta, typed = run["metadata"], typed_dests(args)
    conflicts, changes = [], {}
    for f in dataclasses.fields(TrainConfig):
        if f.name not in typed:
            continue
        new, old = getattr(args, f.name), getattr(tcfg, f.name)
        new = tuple(new) if isinstance(old, tuple) and isinstance(new, list) else new
        if new == old:
            continue
        if f.name in MAY_CHANGE:
            changes[f.name] = new
        else:
            conflicts.append(f"{typed[f.name]} {_shown(new)} (the run has {_shown(old)})")
    over = overrides_from_args(args, SAEConfig, prefix="", exclude=("d_in", "k"))
    for name, new in over.items():
        olds = sorted({_shown(getattr(c, name)) for c in cfgs.values()})
        if olds == [_shown(new)] or name == "decoder" and args.decoders:
            continue
        conflicts.append(f"{typed.get(name, flag_name(name))} {_shown(new)} (the run has "
                         f"{', '.join(olds)})")
    ks = sorted({c.k for c in cfgs.values()})
    if args.k != default_k and sorted(set(args.k)) != ks:
        conflicts.append(f"--k {_shown(args.k)} (the run has {_shown(ks)})")
    decs = sorted({c.decoder for c in cfgs.values()})
    if args.decoders and sorted(set(args.decoders)) != decs:
        conflicts.append(f"--decoders {_shown(args.decoders)} (the run has {_shown(decs)})")
    for flag, given, default, key in (("--hook", args.hook, None, "hook"),
                                      ("--split", args.split, "train", "split"),
                                      ("--batch-size", args.batch_size, 4096, "batch_size")):
        rec = meta.get(key)
        if given != default and rec is not None and given != rec:
            conflicts.append(f"{flag} {given} (the run has {rec})")
    if conflicts:
        raise CLIError(f"--resume continues the run in {run_file.parent} as recorded; these "
                       f"flags differ from it: {'; '.join(conflicts)}. Leave them out, or start "
                       f"a new --out (with --resume only {', '.join(map(flag_name, MAY_CHANGE))} "
                       "may change)")
    if changes:
        log.info("resume: taking %s", ", ".join(f"{flag_name(k)} {_shown(v)}"
                                                for k, v in changes.items()))
    return dataclasses.replace(tcfg, **changes), cfgs


__all__ = ["MAY_CHANGE", "check_same_store", "read_run", "recorded_acts", "resume_settings",
           "store_identity"]
