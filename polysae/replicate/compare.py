"""What ``polysae replicate`` compares: the metrics read from each cell, and the paired comparison.

For each sparsifier, each :class:`Metric` is read from the vanilla and the PolySAE metrics.json
of every seed; :func:`compare` gives mean ± std per decoder and the paired poly − vanilla
difference over seeds (:mod:`polysae.replicate.paired`), plus the interaction contrast, a steering
summary and a reading of the W1 difference against the code scale. The result is ``replicate.json``.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any, Callable, NamedTuple

import torch

from polysae.evaluation import jsonable
from polysae.replicate.config import CellResult, ReplicateConfig
from polysae.replicate.paired import paired_diff, summarize

DECODERS = ("vanilla", "poly")
"""The two SAEs of every cell."""


class Metric(NamedTuple):
    """One number read from a cell's metrics.json for one SAE."""

    key: str
    """Stable name in replicate.json."""
    label: str
    """Column label in replicate.md."""
    get: Callable[[dict], Any]
    """metrics.json ``saes.<name>`` block -> value (None if absent)."""
    protocol: str
    """``paper`` (the paper's definition), ``paper-like`` (the paper's formula on our data and
    sizes) or ``polysae`` (our own definition; the paper publishes none or we add a variant)."""
    higher_is_better: bool | None
    """Direction of improvement (None: neither)."""


def dig(*path: str) -> Callable[[dict], Any]:
    """A getter of the value at ``path`` in a nested dict (None when any key is missing)."""
    def get(d: dict) -> Any:
        for p in path:
            if not isinstance(d, dict) or p not in d:
                return None
            d = d[p]
        return d
    return get


VARIANT_PROTOCOL = {"linear": "paper-like", "full": "polysae"}
"""SAEBench's absorption and TPP: ``linear`` is SAEBench's definition on our data (its W_dec =
the raw linear atoms), ``full`` ours (through the whole decoder; docs/method.md)."""


def saebench_metrics(tpp_ns: list[str]) -> list[Metric]:
    """Absorption (mean fraction, full-absorption rate) and TPP (total drop per N), in the
    variants ``linear`` and ``full``."""
    out = []
    for v in ("linear", "full"):
        tag = "" if v == "linear" else " (full)"
        out += [Metric(f"absorption:{v}", f"absorption{tag}",
                       dig("absorption", v, "mean_absorption_fraction"), VARIANT_PROTOCOL[v],
                       False),
                Metric(f"full_absorption:{v}", f"full abs.{tag}",
                       dig("absorption", v, "mean_full_absorption_rate"), VARIANT_PROTOCOL[v],
                       False)]
        out += [Metric(f"tpp_{n}:{v}", f"TPP@{n}{tag}", dig("tpp", v, "total", n),
                       VARIANT_PROTOCOL[v], True) for n in tpp_ns]
    return out


def metrics_for(datasets: list[str], ks: tuple[int, ...],
                tpp_ns: list[str] | None = None) -> list[Metric]:
    """The compared metrics (per-dataset F1 for each probing dataset; absorption and TPP at
    ``tpp_ns`` in both variants)."""
    m = [Metric(f"f1_k{k}", f"F1@{k}", dig("probing", "f1", str(k)), "paper-like", True)
         for k in ks]
    m += [
        Metric("mse_per_token", "MSE/token", dig("reconstruction", "mse_per_token"), "polysae",
               False),
        Metric("mse_saebench", "MSE (SAEBench)", dig("reconstruction", "mse_saebench"),
               "paper-like", False),
        Metric("fvu", "FVU", dig("reconstruction", "fvu"), "polysae", False),
        Metric("ce_recovered", "CE rec.", dig("reconstruction", "ce", "ce_loss_recovered"),
               "paper-like", True),
        Metric("kl_recovered", "KL rec.", dig("reconstruction", "ce", "kl_recovered"),
               "polysae", True),
        Metric("l0", "L0", dig("reconstruction", "l0"), "paper-like", None),
        Metric("dead_fraction", "dead", dig("reconstruction", "dead_fraction"), "polysae",
               False),
        Metric("w1", "W1 (paper)", dig("probing", "w1"), "paper", None),
        Metric("w1_std", "W1/std", dig("probing", "w1_std"), "polysae", True),
        Metric("w1_l2", "W1/‖z‖", dig("probing", "w1_l2"), "polysae", True),
        Metric("r_cov_count", "r(cov,N)", dig("interactions", "r_cov_count"), "polysae", None),
        Metric("r_cov_logcount", "r(cov,logN)", dig("interactions", "r_cov_logcount"),
               "polysae", None),
        Metric("r_strength_count", "r(strength,N)", dig("interactions", "r_strength_count"),
               "polysae", None),
        Metric("r_strength_logcount", "r(strength,logN)",
               dig("interactions", "r_strength_logcount"), "polysae", None),
        Metric("code_l2", "‖z‖", dig("scale", "code_l2"), "polysae", None),
        Metric("active_mean", "mean z>0", dig("scale", "active_mean"), "polysae", None),
        Metric("atom_norm", "‖atom‖", dig("scale", "atom_norm"), "polysae", None),
        Metric("contribution", "z·‖atom‖", dig("scale", "contribution"), "polysae", None),
        Metric("share_higher", "higher-order share", dig("scale", "share_higher"), "polysae",
               None),
        Metric("fvu_linear_only", "FVU linear only", dig("scale", "fvu_linear_only"),
               "polysae", False),
    ]
    for ds in datasets:
        for k in ks:
            m.append(Metric(f"f1_k{k}:{ds}", f"F1@{k} {ds}",
                            dig("probing", "datasets", ds, "f1", str(k)), "paper-like", True))
    return m + saebench_metrics(list(tpp_ns or []))


def finite(v: Any) -> float | None:
    """``v`` as a float when it is a finite number, else None (missing or NaN metrics)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
        return float(v)
    return None


def compare(cells: list[CellResult], cfg: ReplicateConfig) -> dict[str, Any]:
    """The paired comparison over seeds from the cells' metrics (``replicate.json``)."""
    from polysae.version import __version__

    first = cells[0].metrics
    datasets = sorted(first["saes"]["poly"].get("probing", {}).get("datasets", {}))
    ks = tuple(int(k) for k in first["saes"]["poly"].get("probing", {}).get("f1", {})) or \
        tuple(cfg.eval.ks)
    tpp_ns = list(dig("tpp", "linear", "total")(first["saes"]["poly"]) or {})
    mets = metrics_for(datasets, ks, tpp_ns)
    out: dict[str, Any] = {
        "schema_version": 1,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "polysae_version": __version__, "torch_version": torch.__version__,
        "model": first.get("model"), "config": cfg.to_dict(),
        "confidence": cfg.confidence, "datasets": datasets, "ks": list(ks),
        "tpp_n_values": tpp_ns,
        "metrics": {m.key: {"label": m.label, "protocol": m.protocol,
                            "higher_is_better": m.higher_is_better} for m in mets},
        "held_out": first.get("held_out"), "probing_sizes": first.get("probing_sizes"),
        "sparsifiers": {}}
    for sp in cfg.sparsifiers:
        cs = sorted((c for c in cells if c.sparsifier == sp), key=lambda c: c.seed)
        block: dict[str, Any] = {"seeds": [c.seed for c in cs],
                                 "cells": [str(c.folder) for c in cs], "metrics": {}}
        for m in mets:
            vals = {d: [finite(m.get(c.metrics["saes"][d])) for c in cs] for d in DECODERS}
            if all(v is None for v in vals["vanilla"] + vals["poly"]):
                continue
            entry: dict[str, Any] = {"values": vals,
                                     "vanilla": summarize(vals["vanilla"])._asdict(),
                                     "poly": summarize(vals["poly"])._asdict()}
            if any(v is not None for v in vals["vanilla"]) and any(
                    v is not None for v in vals["poly"]):
                entry["diff"] = paired_diff(vals["vanilla"], vals["poly"],
                                            confidence=cfg.confidence, n_boot=cfg.n_boot
                                            ).to_dict()
            block["metrics"][m.key] = entry
        # The paper's interaction contrast: PolySAE's strength vs co-occurrence against the
        # vanilla SAE's covariance vs co-occurrence (one r per model and seed).
        for a, b, key in (("r_cov_count", "r_strength_count", "r_contrast_count"),
                          ("r_cov_logcount", "r_strength_logcount", "r_contrast_logcount")):
            va = [finite(dig("interactions", a)(c.metrics["saes"]["vanilla"])) for c in cs]
            vb = [finite(dig("interactions", b)(c.metrics["saes"]["poly"])) for c in cs]
            if any(v is not None for v in va) and any(v is not None for v in vb):
                block["metrics"][key] = {
                    "values": {"vanilla": va, "poly": vb},
                    "vanilla": summarize(va)._asdict(), "poly": summarize(vb)._asdict(),
                    "diff": paired_diff(va, vb, confidence=cfg.confidence,
                                        n_boot=cfg.n_boot).to_dict()}
        block["steering"] = steering_summary(cs, cfg)
        block["w1_scale_reading"] = w1_scale_reading(block["metrics"])
        out["sparsifiers"][sp] = block
    out["metrics"]["r_contrast_count"] = {
        "label": "r: poly strength vs vanilla cov (N)", "protocol": "polysae",
        "higher_is_better": None}
    out["metrics"]["r_contrast_logcount"] = {
        "label": "r: poly strength vs vanilla cov (log N)", "protocol": "polysae",
        "higher_is_better": None}
    return jsonable(out)


def w1_scale_reading(block: dict[str, Any]) -> dict[str, Any] | None:
    """Ratio of mean raw W1 (poly / vanilla) next to the ratio of code scales: if the W1 ratio is
    about the code-scale ratio, the raw W1 difference is a scale effect, not separation."""
    def ratio(key: str) -> float | None:
        e = block.get(key)
        if not e:
            return None
        a, b = e["vanilla"]["mean"], e["poly"]["mean"]
        return b / a if a and math.isfinite(a) and math.isfinite(b) and a != 0 else None

    r = {"w1_ratio": ratio("w1"), "w1_std_ratio": ratio("w1_std"), "w1_l2_ratio": ratio("w1_l2"),
         "code_l2_ratio": ratio("code_l2"), "active_mean_ratio": ratio("active_mean"),
         "contribution_ratio": ratio("contribution")}
    if r["w1_ratio"] is None:
        return None
    if r["active_mean_ratio"]:
        r["w1_ratio_per_active_scale"] = r["w1_ratio"] / r["active_mean_ratio"]
    return r


STEERING_NUMBERS = ("report_mean_log2_rank", "report_frac_improved", "concept_wins",
                    "alpha_scale")
"""Per-(SAE, mode) steering numbers carried over seeds (reported cases, alpha chosen on the
selection cases; see :func:`polysae.evaluation.steering.steering_eval`)."""


def steering_summary(cells: list[CellResult], cfg: ReplicateConfig) -> dict[str, Any] | None:
    """Steering over seeds: for each SAE and mode the per-seed numbers of ``STEERING_NUMBERS``
    with mean ± std, and the paired difference of each PolySAE mode's reported mean log2 rank
    against the vanilla SAE's linear steering (negative = PolySAE steers better)."""
    sums = [(c.metrics.get("steering") or {}).get("summary") for c in cells]
    if not all(isinstance(s, dict) and "saes" in s for s in sums):
        return None
    out: dict[str, Any] = {"none": {"report_mean_log2_rank": summarize(
        [finite(s["none"].get("report_mean_log2_rank")) for s in sums])._asdict()}}
    modes = sorted({(n, m) for s in sums for n in DECODERS for m in s["saes"].get(n, {})})
    for name, mode in modes:
        entry = {}
        for key in STEERING_NUMBERS:
            vals = [finite(s["saes"].get(name, {}).get(mode, {}).get(key)) for s in sums]
            entry[key] = summarize(vals)._asdict() | {"values": vals}
        out[f"{name}:{mode}"] = entry
    base = [finite(s["saes"].get("vanilla", {}).get("linear", {}).get("report_mean_log2_rank"))
            for s in sums]
    out["poly_minus_vanilla_linear"] = {}
    for name, mode in modes:
        if name != "poly":
            continue
        vals = [finite(s["saes"]["poly"].get(mode, {}).get("report_mean_log2_rank"))
                for s in sums]
        out["poly_minus_vanilla_linear"][mode] = paired_diff(
            base, vals, confidence=cfg.confidence, n_boot=cfg.n_boot).to_dict()
    return out


__all__ = ["DECODERS", "Metric", "STEERING_NUMBERS", "VARIANT_PROTOCOL", "compare", "finite",
           "dig", "metrics_for", "saebench_metrics", "steering_summary", "w1_scale_reading"]
