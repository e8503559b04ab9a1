"""The Neuronpedia client's upload path for an export of :mod:`polysae.formats.neuronpedia`: the
request bodies ``neuronpedia.requests.feature_request.FeatureRequest.upload_batch`` (client
1.2.1) POSTs to ``/api/feature/upload-batch``, built from the export's ``batch-N.json`` files and
cut to the endpoint's limits (docs/exports.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from polysae.fileio import atomic_write_text

UPLOAD_MAX_FEATURES = 128
"""Features per upload request (the client's ``MAX_FEATURES_PER_BATCH``, the server's limit)."""
UPLOAD_MAX_LOGITS = 20
"""Top / bottom logits per feature the upload endpoint accepts."""
UPLOAD_MAX_TOKENS = 1024
"""Tokens per activation window the upload endpoint accepts."""


def source_id(layer: int | None, sae_set: str, sae_id_suffix: str | None = None) -> str:
    """The Neuronpedia source a batch lands in, named as Neuronpedia's converter names it:
    ``<layer>-<set>``, plus ``__<suffix>`` when the batch has a ``sae_id_suffix``."""
    return f"{layer if layer is not None else 0}-{sae_set}" + (
        f"__{sae_id_suffix}" if sae_id_suffix else "")


class UploadPlan(NamedTuple):
    """The request bodies of the Neuronpedia client's feature upload for one export."""

    model_id: str
    """``modelId`` of every request (lower case, as the server stores it)."""
    source: str
    """``source`` of every request: ``<layer>-<sae_set>[__<sae_id_suffix>]`` (:func:`source_id`),
    lower case."""
    payloads: list
    """One JSON body per request, as ``FeatureRequest.upload_batch`` builds it: ``{"modelId",
    "source", "features": [...]}`` with 1 .. 128 features."""
    skipped: list
    """Indices of the dead features left out (the endpoint wants at least one activation)."""


def _clip(tokens: list, values: list, q: int, n: int) -> tuple[list, list]:
    """At most ``n`` tokens of a window, keeping position ``q`` inside."""
    if len(tokens) <= n:
        return tokens, values
    a = min(max(0, q - n // 2), len(tokens) - n)
    return tokens[a:a + n], values[a:a + n]


def upload_plan(batches: Iterable[dict] | str | os.PathLike, *,
                max_features: int = UPLOAD_MAX_FEATURES) -> UploadPlan:
    """The upload request bodies for feature ``batches`` (dicts as in ``batch-N.json``, or an
    export folder to read them from).

    Per feature, what ``neuronpedia.requests.feature_request.FeatureRequest.upload_batch`` sends:
    ``index``; ``density`` (``frac_nonzero``); ``activations`` (each window's ``tokens`` and
    ``values``, at most 1024 tokens, with ``quantileMin`` / ``quantileMax`` / ``quantileFraction``
    from ``bin_min`` / ``bin_max`` / ``bin_contains``, where the top-activations group's
    ``bin_contains`` of -1 becomes null: the endpoint takes a fraction in [0, 1] or none, and
    ``quantileMin`` -1 still marks the group); ``explanations`` (none); ``topLogits`` /
    ``bottomLogits`` (``pos_*`` / ``neg_*``, at most 20 each). Dead features (no activations)
    are skipped and listed in :attr:`UploadPlan.skipped`."""
    if isinstance(batches, (str, os.PathLike)):
        batches = read_batches(batches)
    if not 1 <= max_features <= UPLOAD_MAX_FEATURES:
        raise ValueError(f"neuronpedia upload: max_features must be in 1 .. "
                         f"{UPLOAD_MAX_FEATURES}, got {max_features}")
    feats: list[dict] = []
    skipped: list[int] = []
    names: set[tuple[str, str]] = set()
    for b in batches:
        names.add((str(b["model_id"]).lower(),
                   source_id(b["layer"], b["sae_set"], b.get("sae_id_suffix")).lower()))
        for f in b["features"]:
            if not f["activations"]:
                skipped.append(int(f["feature_index"]))
                continue
            acts = []
            for a in f["activations"]:
                toks, vals = _clip(a["tokens"], a["values"], a["qualifying_token_index"],
                                   UPLOAD_MAX_TOKENS)
                frac = a["bin_contains"]
                acts.append({"tokens": toks, "values": vals, "quantileMax": a["bin_max"],
                             "quantileMin": a["bin_min"],
                             "quantileFraction": frac if 0 <= frac <= 1 else None})
            feats.append({
                "index": int(f["feature_index"]), "density": f["frac_nonzero"],
                "activations": acts, "explanations": [],
                "topLogits": [{"token": t, "value": v} for t, v in
                              zip(f["pos_str"][:UPLOAD_MAX_LOGITS], f["pos_values"])],
                "bottomLogits": [{"token": t, "value": v} for t, v in
                                 zip(f["neg_str"][:UPLOAD_MAX_LOGITS], f["neg_values"])]})
    if len(names) > 1:
        raise ValueError(f"neuronpedia upload: the batches name several model/source pairs "
                         f"{sorted(names)}; one upload goes to one source")
    if not names:
        raise ValueError("neuronpedia upload: no feature batches")
    model_id, source = names.pop()
    payloads = [{"modelId": model_id, "source": source, "features": feats[s:s + max_features]}
                for s in range(0, len(feats), max_features)]
    return UploadPlan(model_id, source, payloads, skipped)


def read_batches(export_dir: str | os.PathLike) -> Iterator[dict]:
    """The ``batch-N.json`` files of an export folder, in N order."""
    files = sorted(Path(export_dir).glob("batch-*.json"),
                   key=lambda p: int(p.stem.split("-")[1]) if p.stem.split("-")[1].isdigit()
                   else -1)
    if not files:
        raise ValueError(f"neuronpedia: {export_dir} holds no batch-N.json files")
    for path in files:
        yield json.loads(path.read_text())


def write_upload(plan: UploadPlan, folder: str | os.PathLike) -> int:
    """Write ``plan`` as ``upload-batch-N.json`` request bodies and an ``upload.json`` index
    (model, source, files, skipped dead features) into ``folder``; returns the bodies written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for n, body in enumerate(plan.payloads):
        files.append(f"upload-batch-{n}.json")
        _dump(folder / files[-1], body)
    _dump(folder / "upload.json", {
        "format": "polysae-neuronpedia-upload", "format_version": 1,
        "endpoint": "POST /api/feature/upload-batch (neuronpedia FeatureRequest.upload_batch)",
        "modelId": plan.model_id, "source": plan.source, "files": files,
        "n_features": sum(len(b["features"]) for b in plan.payloads),
        "skipped_dead": plan.skipped,
        "skipped_reason": "never fired on a counted token: no activations to upload (the "
                          "endpoint requires at least one per feature)"})
    return len(files)


def _dump(path: Path, doc: object) -> None:
    atomic_write_text(path, json.dumps(doc, ensure_ascii=False, allow_nan=False,
                                       separators=(",", ":")))


__all__ = ["UPLOAD_MAX_FEATURES", "UPLOAD_MAX_LOGITS", "UPLOAD_MAX_TOKENS", "UploadPlan",
           "read_batches", "source_id", "upload_plan", "write_upload"]
