"""Checks of the files polysae reads, before anything in them is used or allocated.

Every reader of a file a user (or a crash, or a hostile party) can change goes through here: a
wrong type, a missing key, an absurd size or a non-finite number is a ``ValueError`` whose message
starts with the file's path and names the field; nothing is allocated from an unchecked size.

- :func:`read_json_object`: a JSON file that must hold an object (config.json, run.json ...);
- :func:`check_fields`: types (and presence) of a document's fields, by a small schema;
- :func:`safetensors_header`: a safetensors file's header parsed by hand (8-byte length, capped
  JSON) and checked against the file's size, without reading the data;
- :func:`check_manifest`: every field of an activation manifest (:mod:`polysae.data.actformat`);
- :func:`check_finite_tensors` / :func:`nonfinite_at`: NaN/inf in weights or activations.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MAX_HEADER_BYTES = 100 << 20
"""Largest safetensors JSON header read (the format's own limit is 100 MB)."""
MAX_WIDTH = 1 << 20
"""Largest activation width (d_in) a manifest may record: no model has a million-wide stream, and
a bigger number is damage that would otherwise turn into an out-of-memory error."""
ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
"""safetensors dtype names -> bytes per element."""

_INT = "int"
_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true/false",
          list: "a list", dict: "an object", type(None): "null"}


def kind(v: Any) -> str:
    """``v``'s JSON kind for a message (``a string``, ``null`` ...)."""
    return _NAMES.get(type(v), type(v).__name__)


def read_json_object(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """The JSON object in ``path``. ``FileNotFoundError`` when absent; ``ValueError`` naming the
    file when unreadable, not JSON, not an object or holding NaN/Infinity literals."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such {what}" if not p.exists()
                                else f"{p}: not a file (a {what} was expected)")

    def no_constants(c: str) -> Any:
        raise ValueError(f"non-standard JSON constant {c}")

    try:
        doc = json.loads(p.read_text(encoding="utf-8"), parse_constant=no_constants)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{p}: unreadable {what} ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{p}: unreadable {what} (expected a JSON object, got {kind(doc)})")
    return doc


def _is(v: Any, t: Any) -> bool:
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return isinstance(v, t)


def check_fields(path: Any, doc: Mapping[str, Any], schema: Mapping[str, Any],
                 where: str = "") -> None:
    """Check ``doc[field]`` against ``schema[field]``: a type (or tuple of types, ``None`` in it
    meaning the field may be null or absent) or a 1-tuple ``(type,)`` for "may be absent". ``int``
    excludes bools; ``float`` takes ints and needs a finite value. Raises ``ValueError``
    ``"<path>: field 'x' must be an integer, got a string"``."""
    for name, want in schema.items():
        types = want if isinstance(want, tuple) else (want,)
        nullable = None in types
        optional = nullable or len(types) == 1 and isinstance(want, tuple)
        types = tuple(t for t in types if t is not None)
        label = f"{where}field {name!r}"
        if name not in doc:
            if optional:
                continue
            raise ValueError(f"{path}: {label} is missing")
        v = doc[name]
        if v is None and nullable:
            continue
        if not any(_is(v, t) for t in types):
            need = " or ".join(_NAMES.get(t, t.__name__) for t in types) + (
                " or null" if nullable else "")
            raise ValueError(f"{path}: {label} must be {need}, got {kind(v)} {_short(v)}")


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


# -- safetensors ----------------------------------------------------------------------------------
def safetensors_header(path: str | os.PathLike, what: str = "shard",
                       max_header: int = MAX_HEADER_BYTES) -> tuple[dict[str, Any], int, int]:
    """``(header, data_start, file_size)`` of a safetensors file, read and checked by hand: the
    8-byte length (capped at ``max_header``), a JSON object whose tensor entries have a known
    dtype, a shape of non-negative integers and ``data_offsets`` [a, b] matching the shape, and a
    file exactly as long as the header describes. ``__metadata__`` is dropped. Nothing but the
    header is read. ``FileNotFoundError`` / ``ValueError`` naming the file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: {what} file missing")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{p}: truncated {what} ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > max_header:
            raise ValueError(f"{p}: corrupt or truncated {what} (header length {n}, file {size} "
                             "bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{p}: corrupt {what} header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{p}: corrupt {what} header (not a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        raise ValueError(f"{p}: corrupt {what} header (__metadata__ is {kind(meta)})")
    end = 0
    for name, e in header.items():
        bad = f"{p}: corrupt {what} header (tensor {name!r}"
        if not isinstance(e, dict):
            raise ValueError(f"{bad} is {kind(e)}, not an object)")
        dt, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dt, str) or dt not in ST_DTYPES:
            raise ValueError(f"{bad}: unknown dtype {_short(dt)})")
        if not (isinstance(shape, list) and all(_is(s, int) and s >= 0 for s in shape)):
            raise ValueError(f"{bad}: shape {_short(shape)} is not a list of sizes)")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is(o, int) for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise ValueError(f"{bad}: data_offsets {_short(offs)} is not [start, end])")
        if offs[1] - offs[0] != math.prod(shape) * ST_DTYPES[dt]:
            raise ValueError(f"{bad}: {offs[1] - offs[0]} bytes for shape {tuple(shape)} of "
                             f"{dt})")
        end = max(end, offs[1])
    if size != 8 + n + end:
        raise ValueError(f"{p}: truncated or padded {what}: {size} bytes, header describes "
                         f"{8 + n + end}")
    return header, 8 + n, size


# -- activation manifests -------------------------------------------------------------------------
MANIFEST_FIELDS = {
    "hooks": list, "d_in": dict, "shards": list, "dtype": str, "n_rows": (int,),
    "complete": (bool,), "model": (str, None), "dataset": (str, None), "ctx": (int, None),
    "config": (dict, None), "hook_dirs": (dict,), "bos_policy": (str, None),
    "special_token_ids": (list,), "bos_token_ids": (list,), "tokens_sha256": (str,),
    "shard_size": (int,), "n_contexts": (int,), "n_tokens": (int,), "model_kind": (str,),
    "exclude_special": (bool,)}
"""Types of an activation manifest's fields (1-tuples: optional; ``None``: may be null)."""
SHARD_FIELDS = {"rows": int, "files": dict, "index": (int,), "next": (list,)}


def check_manifest(f: Any, m: Mapping[str, Any]) -> None:
    """Every field of activation manifest ``m`` (read from file ``f``) has its type and a sane
    value: hooks unique strings, each with a ``d_in`` in 1..:data:`MAX_WIDTH`, shard entries with
    ``rows >= 0``, ``files`` mapping names to ``{"path": str, "sha256": str}`` and ``next`` a pair
    of integers. ``ValueError`` naming the file and the field."""
    check_fields(f, m, MANIFEST_FIELDS)
    hooks, d_in = m["hooks"], m["d_in"]
    if not all(isinstance(h, str) and h for h in hooks) or len(set(hooks)) != len(hooks):
        raise ValueError(f"{f}: field 'hooks' must be distinct hook names, got {_short(hooks)}")
    for h in hooks:
        w = d_in.get(h)
        if not (_is(w, int) and 1 <= w <= MAX_WIDTH):
            raise ValueError(f"{f}: field 'd_in' of hook {h!r} is {_short(w)}, expected an "
                             f"integer in 1..{MAX_WIDTH}")
    if not all(isinstance(v, str) for v in (m.get("hook_dirs") or {}).values()):
        raise ValueError(f"{f}: field 'hook_dirs' must map hooks to folder names")
    for name in ("special_token_ids", "bos_token_ids"):
        if not all(_is(t, int) for t in m.get(name) or []):
            raise ValueError(f"{f}: field {name!r} must be a list of integers")
    for i, e in enumerate(m["shards"]):
        where = f"shard entry {i}: "
        if not isinstance(e, dict):
            raise ValueError(f"{f}: {where}expected an object, got {kind(e)}")
        check_fields(f, e, SHARD_FIELDS, where)
        if e["rows"] < 0:
            raise ValueError(f"{f}: {where}field 'rows' is negative ({e['rows']})")
        for key, fe in e["files"].items():
            if not (isinstance(fe, dict) and isinstance(fe.get("path"), str)
                    and isinstance(fe.get("sha256", ""), (str, type(None)))):
                raise ValueError(f"{f}: {where}file {key!r} must be {{\"path\": str, "
                                 f"\"sha256\": str}}, got {_short(fe)}")
        nxt = e.get("next", [0, 0])
        if not (len(nxt) == 2 and all(_is(v, int) and v >= 0 for v in nxt)):
            raise ValueError(f"{f}: {where}field 'next' must be two integers >= 0, got "
                             f"{_short(nxt)}")
    if "n_rows" in m and m["n_rows"] != sum(e["rows"] for e in m["shards"]):
        raise ValueError(f"{f}: field 'n_rows' ({m['n_rows']}) is not the sum of the shards' "
                         f"rows ({sum(e['rows'] for e in m['shards'])})")


# -- polysae checkpoints ---------------------------------------------------------------------------
CHECKPOINT_FIELDS = {"config": dict, "weights_sha256": (str, None), "metadata": (dict, None),
                     "polysae_version": (str, None)}
"""Types of a checkpoint config.json's fields (``format_version`` is checked first)."""


def read_checkpoint_doc(cfg_path: Path, folder: Path, newest: int) -> dict[str, Any]:
    """A polysae checkpoint's config.json, checked: a JSON object whose ``format_version`` is an
    integer no newer than ``newest`` (checked before anything else: a newer writer may use other
    fields) and whose fields have their types (``"metadata": null`` reads as ``{}``)."""
    try:
        doc = read_json_object(cfg_path, "polysae config")
        version = doc.get("format_version", 0)
        if not _is(version, int):
            raise ValueError(f"format_version {version!r} is not an integer")
    except ValueError as e:
        raise ValueError(f"checkpoint {folder}: {cfg_path} is not a valid polysae config ("
                         f"{str(e).removeprefix(f'{cfg_path}: ')})") from None
    if version > newest:
        raise ValueError(f"{cfg_path}: format_version {version} is newer than this polysae "
                         f"reads ({newest}); upgrade polysae")
    try:
        check_fields(cfg_path, doc, CHECKPOINT_FIELDS)
    except ValueError as e:
        raise ValueError(f"checkpoint {folder}: {cfg_path} is not a valid polysae config ("
                         f"{str(e).removeprefix(f'{cfg_path}: ')})") from None
    doc["metadata"] = doc.get("metadata") or {}
    return doc


def check_save_target(folder: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Refuse (``FileExistsError``) to save an SAE of config ``config`` into ``folder`` when it
    already holds something else under ``config.json``: a file that is not a polysae checkpoint,
    or a checkpoint of a different SAE config. The same SAE (a newer checkpoint of a run) and
    ``overwrite=True`` pass."""
    f = Path(folder) / "config.json"
    if overwrite or not f.exists():
        return
    try:
        doc = read_json_object(f, "polysae config")
        have = doc.get("config") if doc.get("format") == "polysae" else None
    except ValueError:
        have = None
    if not isinstance(have, dict):
        raise FileExistsError(f"{folder} already holds a config.json that is not a polysae "
                              "checkpoint; save elsewhere, or pass overwrite=True / --overwrite "
                              "to replace it")
    from polysae.config import SAEConfig  # an older writer's config lacks newer fields

    try:
        have = SAEConfig.from_dict(have).to_dict()
    except (ValueError, TypeError):
        pass
    if have != config:
        diff = sorted(k for k in set(have) | set(config) if have.get(k) != config.get(k))
        shown = ", ".join(f"{k} {have.get(k)!r} there vs {config.get(k)!r}" for k in diff[:4])
        raise FileExistsError(f"{folder} already holds a different SAE ({shown}); save "
                              "elsewhere, or pass overwrite=True / --overwrite to replace it")


# -- text files -----------------------------------------------------------------------------------
def decode_text(path: Any, raw: bytes, encoding: str | None = None) -> str:
    """The text of file ``path`` (bytes ``raw``): strict UTF-8 (a BOM is dropped) unless
    ``encoding`` names another codec. Binary data (a NUL byte) or bytes invalid in the encoding
    are a ``ValueError`` naming the file, the offset and the line, never replaced silently."""
    import codecs

    if encoding is not None:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"--encoding {encoding!r} is not a text encoding Python knows "
                             "(e.g. utf-8, latin-1, cp1252, utf-16)") from None
    elif raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ValueError(f"{path}: UTF-16 text (byte-order mark); pass --encoding utf-16")
    elif (nul := raw.find(b"\x00")) >= 0:
        line = raw.count(b"\n", 0, nul) + 1
        raise ValueError(f"{path}: binary data, not text (NUL byte at offset {nul}, line {line}); "
                         "harvest text files (.txt, .jsonl, .csv), .parquet or pre-tokenized .npy")
    try:
        return raw.decode(encoding or "utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}: not {encoding or 'UTF-8'} text (byte 0x{raw[e.start]:02x} at "
                         f"offset {e.start}, line {line}); convert the file, or pass its encoding "
                         "(--encoding latin-1, cp1252 ...)") from None


def check_token_ids(tokens: Any, module: Any, dataset: str, error: type = ValueError) -> None:
    """An ``error`` (a ``ValueError`` class) naming ``dataset``, the id and where it is when a
    token id of ``tokens`` [n, ctx] is negative or beyond the vocabulary of ``module``
    (TransformerLens ``cfg.d_vocab`` or a transformers model's input embeddings; unknown
    vocabularies are not checked)."""
    vocab = getattr(getattr(module, "cfg", None), "d_vocab", None)
    emb = getattr(module, "get_input_embeddings", None)
    if not vocab and callable(emb):
        vocab = getattr(emb(), "num_embeddings", None)
    if not (isinstance(vocab, int) and tokens.numel()):
        return
    bad = ((tokens < 0) | (tokens >= vocab)).nonzero()
    if len(bad):
        i, j = (int(v) for v in bad[0])
        raise error(f"dataset {dataset}: token id {int(tokens[i, j])} (context {i}, "
                    f"position {j}) is outside the model's vocabulary of {vocab} ids "
                    f"(0..{vocab - 1}); was it tokenized for another model?")


# -- non-finite numbers ---------------------------------------------------------------------------
def nonfinite_at(t: Any) -> tuple[int, ...] | None:
    """Index of the first NaN/inf in tensor or array ``t`` (bfloat16 stored as uint16 is not
    handled here: convert first), or None when every value is finite."""
    import numpy as np
    import torch

    if isinstance(t, torch.Tensor):
        if not t.is_floating_point() or bool(torch.isfinite(t).all()):
            return None
        return tuple(int(i) for i in (~torch.isfinite(t)).nonzero()[0])
    a = np.asarray(t)
    if a.dtype.kind != "f":
        return None
    ok = np.isfinite(a)
    if ok.all():
        return None
    return tuple(int(i) for i in np.argwhere(~ok)[0])


def check_finite_tensors(tensors: Mapping[str, Any], where: Any, action: str = "") -> None:
    """``ValueError`` ``"<where>: tensor 'W_enc' holds NaN/inf (first at [i, j])<action>"`` when
    any floating tensor of ``tensors`` has a non-finite value."""
    for name, t in tensors.items():
        at = nonfinite_at(t)
        if at is not None:
            raise ValueError(f"{where}: tensor {name!r} holds NaN/inf (first at index "
                             f"{list(at)}){action}")


__all__ = ["MAX_HEADER_BYTES", "MAX_WIDTH", "MANIFEST_FIELDS", "ST_DTYPES", "check_fields",
           "check_finite_tensors", "check_manifest", "check_save_target", "check_token_ids",
           "decode_text", "kind", "nonfinite_at", "read_checkpoint_doc", "read_json_object",
           "safetensors_header"]
