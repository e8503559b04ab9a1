"""Trainer resume state: ``trainer_state.pt`` (and the one before) in each SAE's folder.

A state is self-contained: unfolded weights, optimiser moments, dead-latent counters, data
position and RNG, plain tensors and Python values only, so it loads with
``torch.load(..., weights_only=True)``. All SAEs' states of one checkpoint are published together
only once every one is on disk; the previous state is kept as ``trainer_state.prev.pt`` so a kill
between the renames of several SAEs still leaves a step common to all of them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polysae.config import SAEConfig
from polysae.fileio import fsync_dir, temp_name, write_error

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
PREV_STATE_FILE = "trainer_state.prev.pt"
STATE_FORMAT = 1
STATE_TAG = "polysae-trainer-state"


def to_cpu(obj: Any) -> Any:
    """A copy of ``obj`` with every tensor (in nested dicts, lists, tuples) on the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def has_state(folder: Path) -> bool:
    """Whether ``folder`` holds a trainer state (current or previous)."""
    return any((folder / fn).exists() for fn in (STATE_FILE, PREV_STATE_FILE))


def write_states(states: Mapping[Path, dict[str, Any]]) -> None:
    """Write ``{folder: state}`` so that either all new states are published or none is: each
    is written and fsynced under a temporary name first; on any error the temporaries are
    removed. Publishing moves the current state to ``trainer_state.prev.pt``."""
    tmps: list[tuple[Path, Path]] = []
    for folder, st in states.items():
        tmp = temp_name(folder / STATE_FILE)
        try:
            with open(tmp, "wb") as f:
                torch.save(st, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:  # e.g. out of space: drop this and the other unpublished
            for p in [tmp, *(t for _, t in tmps)]:  # states; an I/O error names the file
                p.unlink(missing_ok=True)
            err = write_error(folder / STATE_FILE, e)
            if err is e:
                raise
            raise err from e
        tmps.append((folder, tmp))
    for folder, tmp in tmps:
        if (folder / STATE_FILE).exists():
            os.replace(folder / STATE_FILE, folder / PREV_STATE_FILE)
        os.replace(tmp, folder / STATE_FILE)
        fsync_dir(folder)


def _normalised(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """An ``SAEConfig.to_dict()`` rebuilt through ``SAEConfig`` (a state saved before a field was
    added compares equal to one with that field at its default); None when it is not valid."""
    try:
        return SAEConfig.from_dict(cfg).to_dict()
    except (TypeError, ValueError):
        return None


def read_states(folders: Mapping[str, Path], sae_configs: Mapping[str, dict[str, Any]],
                out_dir: Path | None = None) -> dict[str, tuple[Path, dict[str, Any]]]:
    """name -> (path, state) at the newest step every SAE has saved, validated.

    ``folders`` maps SAE names to their folders and ``sae_configs`` to the ``SAEConfig.to_dict()``
    the state must have been saved for. A damaged state file is skipped (and named in a
    warning); an error names the folder when no readable state, no common step, a foreign or
    too-new file, or a different SAE config is found."""
    cands: dict[str, dict[int, Path]] = {}
    for name, folder in folders.items():
        found, bad = {}, []
        for fn in (STATE_FILE, PREV_STATE_FILE):
            p = folder / fn
            if p.exists():
                try:
                    st = torch.load(p, map_location="cpu", weights_only=True)
                    found[int(st["step"])] = p
                except Exception as e:  # noqa: BLE001 - a damaged file is skipped, named
                    log.warning("cannot read %s (%s); ignoring it", p, e)
                    bad.append(f"{p.name}: {str(e).splitlines()[0][:200]}")
        if not found:
            if bad:
                raise ValueError(f"resume: no readable trainer state in {folder} "
                                 f"({'; '.join(bad)})")
            raise FileNotFoundError(f"resume: no {STATE_FILE} in {folder}")
        cands[name] = found
    common = set.intersection(*(set(f) for f in cands.values()))
    if not common:
        raise ValueError(f"resume: the SAEs in {out_dir} have no checkpoint step in "
                         f"common ({ {n: sorted(f) for n, f in cands.items()} })")
    step = max(common)
    out = {}
    for name in folders:
        path = cands[name][step]
        st = torch.load(path, map_location="cpu", weights_only=True)
        if st.get("format") != STATE_TAG:
            raise ValueError(f"{path} is not a polysae trainer state")
        if int(st.get("format_version", 0)) > STATE_FORMAT:
            raise ValueError(f"{path}: trainer state format_version {st['format_version']} "
                             f"is newer than this polysae reads ({STATE_FORMAT}); upgrade "
                             "polysae")
        if _normalised(st["sae_config"]) != _normalised(sae_configs[name]):
            raise ValueError(f"resume: {path} was saved for a different SAE config than "
                             f"{name!r}'s")
        out[name] = (path, st)
    return out
