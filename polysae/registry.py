"""The registry of pretrained dictionaries: which public SAEs ``polysae list`` shows, where each
lives (a Hub repo pinned to a commit, or a folder URL) and the sha256 of its files where one is
published. Data only, no network: :mod:`polysae.cache` downloads what an entry names.

The registry is the packaged data file ``polysae/registry.json`` (:data:`REGISTRY_FILE`), read
and checked once at import into :data:`REGISTRY`:

- every Hub entry pins ``revision`` to a full 40-hex commit (a branch such as ``main`` could change
  under the same name);
- ``sha256`` values are 64-hex digests of files the entry lists; those are checked on download,
  and an entry lacking one for any file is shown as unverified (``PretrainedEntry.verified``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

REGISTRY_FILE = "registry.json"
"""The registry's data file inside the package (``polysae/registry.json``)."""
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class PretrainedEntry:
    """One public dictionary the registry knows."""

    name: str
    """Registry name (``polysae download NAME``)."""
    description: str
    """One line for ``polysae list``."""
    model: str
    """Model the SAE reads (transformer-lens / Hugging Face name)."""
    hook: str
    """transformer-lens hook name of the activations it encodes."""
    architecture: str
    """Sparsifier family: ``relu`` (SAELens standard), ``topk``, ``jumprelu``, ``poly``..."""
    format: str
    """Checkpoint layout (see :mod:`polysae.formats`)."""
    files: tuple[str, ...]
    """File names inside the folder."""
    repo: str | None = None
    """Hugging Face repo id, or None for a plain URL."""
    path: str = ""
    """Folder inside the repo."""
    revision: str = "main"
    """Git revision of the repo; registry entries pin a full commit hash."""
    url: str | None = None
    """Base URL of the folder for non-Hub entries."""
    sha256: Mapping[str, str] = field(default_factory=dict)
    """Known sha256 per file; files not listed are recorded (not checked) on first download."""
    d_in: int | None = None
    """Input width, for display."""
    d_sae: int | None = None
    """Number of latents, for display."""

    @property
    def verified(self) -> bool:
        """Whether every file has a known sha256 (checked on download)."""
        return bool(self.files) and all(self.sha256.get(f) for f in self.files)

    @property
    def source(self) -> str:
        """The entry as a source string: ``hf://repo/path@revision``, or its folder URL."""
        if self.repo:
            return f"hf://{self.repo}/{self.path}@{self.revision}".replace("/@", "@")
        return str(self.url)


def load_registry(path: str | os.PathLike | None = None) -> dict[str, PretrainedEntry]:
    """Read and check a registry file (default: the bundled ``registry.json``).

    Every Hub entry must pin ``revision`` to a full 40-hex commit (a branch such as ``main``
    could change under the same name); ``sha256`` values must be 64-hex digests of files the
    entry lists. Errors are ``ValueError`` naming the file and the entry."""
    if path is None:
        from importlib import resources

        where = f"polysae/{REGISTRY_FILE}"
        text = resources.files("polysae").joinpath(REGISTRY_FILE).read_text("utf-8")
    else:
        where = str(path)
        text = Path(path).read_text("utf-8")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise ValueError(f"{where}: expected an object with a list 'entries'")
    out: dict[str, PretrainedEntry] = {}
    fields = {f for f in PretrainedEntry.__dataclass_fields__}
    for n, raw in enumerate(doc["entries"]):
        name = raw.get("name") if isinstance(raw, dict) else repr(raw)
        label = f"{where}: entry {n} ({name})"
        if not isinstance(raw, dict):
            raise ValueError(f"{label}: expected an object")
        unknown = sorted(set(raw) - fields)
        if unknown:
            raise ValueError(f"{label}: unknown fields {unknown}")
        try:
            e = PretrainedEntry(**{**raw, "files": tuple(raw.get("files", ())),
                                   "sha256": dict(raw.get("sha256") or {})})
        except TypeError as err:
            raise ValueError(f"{label}: {err}") from None
        if not e.files:
            raise ValueError(f"{label}: lists no files")
        if e.repo and not _COMMIT.fullmatch(e.revision):
            raise ValueError(f"{label}: revision {e.revision!r} is not a 40-hex commit; pin "
                             "every Hub entry to the commit its files were checked at")
        if not e.repo and not e.url:
            raise ValueError(f"{label}: needs a repo or a url")
        for f, h in e.sha256.items():
            if f not in e.files:
                raise ValueError(f"{label}: sha256 given for {f!r}, which is not in its files")
            if not isinstance(h, str) or not _SHA256.fullmatch(h):
                raise ValueError(f"{label}: sha256 of {f!r} must be 64 lowercase hex digits")
        if e.name in out:
            raise ValueError(f"{label}: duplicate name {e.name!r}")
        out[e.name] = e
    return out


# Public releases checked by name against code that loads them (SAELens loaders, sparsify's
# load_from_hub users, Gemma Scope tutorials), each pinned to a commit of its repo. Where a
# file's sha256 is published it is listed and checked on download; the other entries show as
# unverified in `polysae list`; their first download records the hash and size it saw in the
# cache marker (later loads from the cache check the sizes against it).
REGISTRY: dict[str, PretrainedEntry] = load_registry()
"""The bundled registry, name -> entry (one dict, shared by every module that reads it)."""


def list_entries() -> list[PretrainedEntry]:
    """Every registry entry, sorted by name."""
    return sorted(REGISTRY.values(), key=lambda e: e.name)


__all__ = ["REGISTRY", "REGISTRY_FILE", "load_registry", "PretrainedEntry", "list_entries"]
