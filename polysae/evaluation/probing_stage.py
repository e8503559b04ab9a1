"""The probing stage of ``polysae.evaluate``: k-sparse probing F1 and W1 of every SAE (and of the
raw activations) on each labelled dataset, with the per-token activations of the probing texts
kept for TPP (:mod:`polysae.evaluation.tpp`). Definitions: :mod:`polysae.evaluation.probing`."""

from __future__ import annotations

import logging
import sys
from typing import Any


def run_probing(models: dict[str, Any], model: Any, tokenizer: Any, hook: str, cfg: Any,
                specials: list[int], result: dict[str, Any]) -> dict[str, tuple]:
    """Probe every dataset of ``cfg.datasets`` with every SAE and the raw activations (the
    ``probing``, ``activations_baseline`` and ``probing_sizes`` entries of ``result``); returns
    ``{dataset: (PooledText, labels, Split)}`` for the stages that reuse the texts (TPP)."""
    from tqdm.auto import tqdm

    from polysae.data.corpora import load_corpus
    from polysae.evaluation.probing import (
        aggregate,
        make_split,
        pool_texts,
        probe_dataset,
        sae_encoder,
        tokenize_texts,
    )
    from polysae.evaluation.textcache import cached_text_acts

    per: dict[str, dict[str, Any]] = {n: {} for n in [*models, "__acts__"]}
    sizes, kept = {}, {}
    for ds in cfg.datasets:
        try:
            docs = load_corpus(ds, text_column=cfg.text_column, label_column=cfg.label_column)
        except FileNotFoundError as e:
            if ds != "fortunes":  # user-named files must exist; the optional Debian set may not
                raise
            logging.getLogger(__name__).warning("probing: skipping %s (%s)", ds, e)
            continue
        labels_all = [d.label for d in docs]
        classes = sorted(set(labels_all))
        if len(classes) < 2:
            raise ValueError(
                f"probing dataset {ds!r}: needs at least two classes, found "
                f"{len(classes)} ({classes!r}) in {len(docs)} documents; a .csv/.jsonl/Hugging "
                f"Face dataset needs a label column (label_column={cfg.label_column!r}, "
                f"--label-column) and a text column (text_column={cfg.text_column!r}, "
                f"--text-column)")
        split = make_split(labels_all, cfg.probe_train_per_class, cfg.probe_test_per_class,
                           seed=cfg.seed)
        used = sorted(split.train + split.test)
        pos = {d: k for k, d in enumerate(used)}
        labels = [labels_all[i] for i in used]
        sub = type(split)([pos[i] for i in split.train], [pos[i] for i in split.test])
        toks = tokenize_texts(tokenizer, [docs[i].text for i in used], cfg.probe_ctx)
        bar = tqdm(total=len(toks), desc=f"probing texts ({ds})", disable=not cfg.progress,
                   file=sys.stderr, leave=False)
        pooled = cached_text_acts(model, hook, toks, specials, batch_size=cfg.batch_size,
                                  pad_id=getattr(tokenizer, "pad_token_id", None) or 0,
                                  progress=bar.update)
        bar.close()
        kept[ds] = (pooled, labels, sub)
        sizes[ds] = {"train_docs": len(sub.train), "test_docs": len(sub.test),
                     "classes": sorted(set(labels)), "tokens": pooled.n_tokens}
        print(f"[eval] probing {ds}: {len(used)} texts, {pooled.n_tokens} tokens", file=sys.stderr)
        for name, sae in [*models.items(), ("__acts__", None)]:
            enc = None if sae is None else sae_encoder(sae)
            feats = pool_texts(pooled, enc)
            per[name][ds] = probe_dataset(feats, labels, sub, ks=cfg.ks, seed=cfg.seed)
    for name in models:
        result["saes"][name]["probing"] = {"datasets": per[name], **aggregate(per[name], cfg.ks)}
    result["activations_baseline"] = {"probing": {"datasets": per["__acts__"],
                                                  **aggregate(per["__acts__"], cfg.ks)}}
    result["probing_sizes"] = sizes
    return kept


__all__ = ["run_probing"]
