"""The SAEBench metrics of ``polysae eval`` that read the decoder as a dictionary (feature
absorption, TPP), each in the variants ``linear`` (SAEBench's definition on the raw linear atoms)
and ``full`` (through the whole decoder), for every SAE: :func:`run`.

Results go into ``metrics["saes"][name]["absorption"]`` and ``["tpp"]`` (docs/evaluation.md);
what every SAE shares (words, ground-truth probe, TPP probes and clean accuracies) into
``metrics["absorption_setup"]`` and ``metrics["tpp_setup"]``. A part that cannot run for an SAE
or a dataset is ``{"skipped": reason}`` in its place, never a zero. SCR is not computed: no
bundled corpus carries two independently labelled attributes (docs/method.md).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def run(models: dict[str, Any], model: Any, tokenizer: Any, hook: str, cfg: Any,
        probing_acts: dict[str, tuple], result: dict[str, Any]) -> None:
    """Absorption (``cfg.absorption``) and TPP (``cfg.tpp``) for every SAE in ``models`` into
    ``result``. ``probing_acts``: dataset -> (PooledText, labels, Split) of the probing stage."""
    if cfg.absorption:
        absorption_all(models, model, tokenizer, hook, cfg, result)
    if cfg.tpp:
        tpp_all(models, cfg, probing_acts, result)


def _skip_all(models, result, key: str, why: str) -> None:
    log.warning("%s skipped: %s", key, why)
    for name in models:
        result["saes"][name][key] = {"skipped": why}


def absorption_all(models, model, tokenizer, hook, cfg, result) -> None:
    from polysae.evaluation.absorption import (
        LETTERS,
        TEMPLATE,
        absorption_eval,
        first_letter,
        ground_truth_probe,
        task_words,
        word_acts,
    )

    if tokenizer is None:
        return _skip_all(models, result, "absorption", "no tokenizer: the first-letter task "
                         "needs one")
    t0 = time.perf_counter()
    try:
        words = task_words(tokenizer, cfg.absorption_train_words, cfg.absorption_test_words,
                           seed=cfg.seed)
    except ValueError as e:
        return _skip_all(models, result, "absorption", str(e))
    if not words.train or not words.test:
        return _skip_all(models, result, "absorption", "the tokenizer gives no single-token "
                         "alphabetic words for the first-letter prompts")
    print(f"[eval] absorption: {len(words.train)} train / {len(words.test)} test words",
          file=sys.stderr)
    xs, ys = [], []
    for part, pool, off in ((words.train, words.train_pool, 0), (words.test, words.test_pool, 1)):
        x, kept = word_acts(model, tokenizer, hook, part, pool, words.token_ids,
                            cfg.absorption_icl, seed=cfg.seed + off, batch_size=cfg.batch_size)
        xs.append(x)
        ys.append(np.array([LETTERS.index(first_letter(w)) for w in kept], dtype=np.int64))
    gt = ground_truth_probe(xs[0], ys[0], xs[1], ys[1], seed=cfg.seed)
    result["absorption_setup"] = {
        "template": TEMPLATE, "icl_examples": cfg.absorption_icl,
        "vocabulary_words": len(words.token_ids), "train_words": len(ys[0]),
        "test_words": len(ys[1]), "missing_letters": words.missing_letters,
        "probe_f1": gt.f1, "seconds_shared": round(time.perf_counter() - t0, 2)}
    for name, sae in models.items():
        print(f"[eval] {name}: absorption", file=sys.stderr)
        t = time.perf_counter()
        try:
            block = absorption_eval(sae, gt, xs[0], ys[0], xs[1], ys[1], seed=cfg.seed,
                                    missing=words.missing_letters)
        except ValueError as e:
            block = {"skipped": str(e)}
        block["seconds"] = round(time.perf_counter() - t, 2)
        result["saes"][name]["absorption"] = block


def tpp_all(models, cfg, probing_acts, result) -> None:
    from polysae.evaluation.tpp import make_setup, tpp_eval

    if not probing_acts:
        return _skip_all(models, result, "tpp", "no probing dataset was evaluated (TPP uses the "
                         "probing texts; set datasets)")
    t0 = time.perf_counter()
    setups, skipped = {}, {}
    for ds, (pooled, labels, split) in probing_acts.items():
        try:
            setups[ds] = make_setup(pooled.acts, labels, split.train, split.test, seed=cfg.seed)
        except ValueError as e:
            skipped[ds] = str(e)
    result["tpp_setup"] = {
        "n_values": list(cfg.tpp_n_values),
        "datasets": {ds: {"classes": s.classes, "clean_accuracy": s.clean,
                          "train_docs": {c: len(t.docs) for c, t in s.train.items()},
                          "test_docs": {c: len(t.docs) for c, t in s.test.items()}}
                     for ds, s in setups.items()},
        "skipped": skipped, "seconds_shared": round(time.perf_counter() - t0, 2)}
    if not setups:
        return _skip_all(models, result, "tpp", "; ".join(f"{d}: {w}" for d, w in
                                                          skipped.items()))
    for name, sae in models.items():
        print(f"[eval] {name}: TPP", file=sys.stderr)
        t = time.perf_counter()
        per: dict[str, Any] = {}
        try:
            for ds, s in setups.items():
                per[ds] = tpp_eval(sae, s, cfg.tpp_n_values)
        except ValueError as e:
            result["saes"][name]["tpp"] = {"skipped": str(e),
                                           "seconds": round(time.perf_counter() - t, 2)}
            continue
        block = combine(per)
        block["seconds"] = round(time.perf_counter() - t, 2)
        result["saes"][name]["tpp"] = block


def combine(per: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-dataset TPP results -> per variant the means over datasets (``total``, ``intended``,
    ``unintended`` per N) with the datasets kept, plus ``difference``: ``full - linear`` of the
    mean total per N and the mean Jaccard overlap of the two variants' ablated sets."""
    out: dict[str, Any] = {}
    for variant in ("linear", "full"):
        blocks = {ds: r[variant] for ds, r in per.items() if variant in r}
        if not blocks:
            continue
        if any("skipped" in b for b in blocks.values()):
            out[variant] = next(b for b in blocks.values() if "skipped" in b)
            continue
        ns = list(next(iter(blocks.values()))["total"])
        v: dict[str, Any] = {key: {n: float(np.mean([b[key][n] for b in blocks.values()]))
                                   for n in ns} for key in ("total", "intended", "unintended")}
        v["datasets"] = {ds: {k: b[k] for k in ("total", "intended", "unintended", "classes")}
                         for ds, b in blocks.items()}
        out[variant] = v
    skipped_n = {n: w for r in per.values() for n, w in r.get("skipped_n", {}).items()}
    if skipped_n:
        out["skipped_n"] = skipped_n
    lin, full = out.get("linear", {}), out.get("full", {})
    if "total" in lin and "total" in full:
        overlap: dict[str, list[float]] = {}
        for ds, r in per.items():
            for c, by_n in r["linear"]["selected"].items():
                for n, a in by_n.items():
                    b = r["full"]["selected"][c][n]
                    u = len(set(a) | set(b))
                    overlap.setdefault(n, []).append(len(set(a) & set(b)) / u if u else 1.0)
        out["difference"] = {
            "total": {n: full["total"][n] - lin["total"][n] for n in lin["total"]},
            "max_abs_total": max(abs(full["total"][n] - lin["total"][n]) for n in lin["total"]),
            "selection_jaccard": {n: float(np.mean(v)) for n, v in overlap.items()}}
    return out


__all__ = ["absorption_all", "combine", "run", "tpp_all"]
