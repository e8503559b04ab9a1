"""The on-disk activation format: layout, constants, and the one manifest reader and writer.

Written by :mod:`polysae.data.harvesting`, read by :mod:`polysae.data.store` (and everything that
opens a harvest folder through it). Layout of a harvest folder ``OUT``::

    manifest.json                       # config, hooks, d_in per hook, shard list with sha256
    <hook>/shard_00000.safetensors      # one tensor "acts" [rows, d_in] in the storage dtype
    tokens/shard_00000.safetensors      # "token_ids", "doc_ids", "positions" int32 [rows]

Row ``r`` of every hook's shard ``k`` and of ``tokens/shard_k`` describe the same token.
``positions`` is the token's position in its model context (0 = first token fed), so a context is
a run of rows with increasing positions; ``doc_ids`` index the dataset's documents.

The manifest is a JSON object with ``format = "polysae-activations"`` and an integer
``format_version`` (currently 1). A shard's entry ``{"index", "rows", "files": {hook or "tokens":
{"path", "sha256"}}, "next"}`` is appended only after all of its files are in place, and the
manifest is rewritten atomically (:mod:`polysae.fileio`), so a folder never lists a shard that is
not complete on disk. ``complete`` becomes true when the harvest has finished. The full field list
is in ``docs/harvest.md``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from polysae.fileio import atomic_write_bytes
from polysae.validate import check_manifest

FORMAT = "polysae-activations"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENS_DIR = "tokens"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Storage dtype names a manifest may record -> torch dtypes."""
HEADER_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
"""Storage dtype names -> the dtype names in a shard's safetensors header."""


class ManifestError(ValueError):
    """A manifest that is unreadable, not ours, of an unknown version or inconsistent."""


def hook_dir(hook: str) -> str:
    """Folder name of a hook's shards (hook names are dotted identifiers; '/' is replaced)."""
    return hook.replace("/", "_").replace(os.sep, "_")


def shard_name(index: int) -> str:
    """File name of shard ``index`` inside a hook's (or the tokens) folder."""
    return f"shard_{index:05d}.safetensors"


def manifest_path(folder: str | os.PathLike) -> Path:
    """Where a harvest folder keeps its manifest."""
    return Path(folder) / MANIFEST


def new_manifest(**fields: Any) -> dict[str, Any]:
    """A manifest for a harvest that has written nothing yet: the format tag and version, no
    shards, not complete, plus ``fields`` (config, hooks, d_in, ...)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **fields,
            "shards": [], "n_rows": 0, "complete": False}


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a harvest folder, checked.

    Raises ``FileNotFoundError`` when there is none and :class:`ManifestError` (a ``ValueError``)
    naming the file when it is unreadable, not a polysae activation manifest, of a
    ``format_version`` outside ``1..FORMAT_VERSION``, of an unknown storage dtype, or has
    malformed ``hooks`` / ``d_in`` / ``shards``."""
    f = manifest_path(folder)
    if not f.exists():
        raise FileNotFoundError(f"{f}: no activation manifest (is {folder} a `polysae harvest` "
                                f"output folder?)")
    try:
        m = json.loads(f.read_text())
    except (ValueError, OSError, RecursionError) as e:
        raise ManifestError(f"{f}: unreadable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ManifestError(f"{f}: not a polysae activation manifest")
    v = m.get("format_version")
    if not isinstance(v, int) or isinstance(v, bool) or v > FORMAT_VERSION or v < 1:
        raise ManifestError(f"{f}: format_version {v!r} is not one this polysae reads "
                            f"(1..{FORMAT_VERSION}); upgrade polysae or re-harvest")
    if m.get("dtype") not in STORAGE_DTYPES:
        raise ManifestError(f"{f}: dtype {m.get('dtype')!r} is not one of "
                            f"{sorted(STORAGE_DTYPES)}")
    try:  # every field's type and range (hooks, d_in, shard entries ...), naming the field
        check_manifest(f, m)
    except ValueError as e:
        raise ManifestError(str(e)) from None
    return m


def write_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Replace a folder's manifest crash-safely (temp name, fsync, rename, fsync the folder)."""
    atomic_write_bytes(manifest_path(folder), json.dumps(manifest, indent=1).encode())


def provenance(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint trained on this harvest records about its data: the model, the dataset
    and its text column (``polysae eval`` draws its held-out text from the same dataset), the
    context length and whether contexts start with BOS (the SAELens export's ``context_size`` and
    ``prepend_bos``)."""
    config = manifest.get("config") or {}
    bos = manifest.get("bos_policy", config.get("bos"))
    return {"model": manifest.get("model"), "dataset": manifest.get("dataset"),
            "text_column": config.get("text_column"),
            "context_size": manifest.get("ctx", config.get("ctx")),
            "prepend_bos": None if bos is None else bos != "none"}


def storage_dtype(manifest: dict[str, Any]) -> torch.dtype:
    """The torch dtype a (checked) manifest stores activations in."""
    return STORAGE_DTYPES[manifest["dtype"]]
