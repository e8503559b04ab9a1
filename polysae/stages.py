"""Which stages of a resumable job finished, and with which inputs (``stages.json``).

A stage is skipped on a re-run only when the key it was marked with (a hash of everything it
read) is unchanged, so editing a setting or retraining a checkpoint reruns exactly the stages that
depend on it. The file is rewritten atomically after every stage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from polysae.fileio import atomic_write_text


def config_key(*parts: Any) -> str:
    """sha256 of JSON-serialised ``parts`` (sorted keys; non-JSON values by ``str``)."""
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True, default=str).encode()
                          ).hexdigest()


def checkpoint_key(*paths: Path) -> str:
    """sha256 over checkpoint configs (which record their weights' sha256)."""
    h = hashlib.sha256()
    for p in paths:
        h.update((Path(p) / "config.json").read_bytes())
    return h.hexdigest()


class Stages:
    """The ``stages.json`` of one job folder: ``{stage name: key}``."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / "stages.json"
        self.doc = json.loads(self.path.read_text()) if self.path.exists() else {}

    def done(self, name: str, key: str) -> bool:
        """Whether ``name`` finished with exactly this key."""
        return self.doc.get(name) == key

    def mark(self, name: str, key: str) -> None:
        """Record ``name`` as finished with ``key`` (atomic write)."""
        self.doc[name] = key
        atomic_write_text(self.path, json.dumps(self.doc, indent=2, sort_keys=True))


__all__ = ["Stages", "checkpoint_key", "config_key"]
