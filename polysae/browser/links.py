"""An eval report on the feature browser's report page: every metric as a row with a link into
the site (a latent list, a pair, or the latents table sorted by the column it is about)."""

from __future__ import annotations

import math
from typing import Any

_SKIP_KEYS = {"info", "config", "contexts", "definition", "path", "date",
              # per-letter / per-class detail of absorption and TPP: drawn, not listed
              "letters", "classes", "sparse_f1", "split_features",
              "per_letter_absorption_fraction"}


def select_report(report: dict, sae) -> tuple[dict, str | None]:
    """From a polysae eval report (``metrics.json``: ``{"saes": {name: {...}}, ...}``) keep the
    block of the SAE this site shows: the one whose ``info`` matches its decoder and width (the
    report compares several SAEs; only one is browsed here). Other reports pass through.
    Returns ``(report, name of the chosen block or None)``."""
    saes = report.get("saes") if isinstance(report, dict) else None
    if not isinstance(saes, dict):
        return report, None
    match = [n for n, b in saes.items() if isinstance(b, dict) and isinstance(b.get("info"), dict)
             and b["info"].get("decoder") == sae.cfg.decoder
             and b["info"].get("d_sae") == sae.cfg.d_sae and b["info"].get("d_in") == sae.cfg.d_in]
    if len(match) != 1:
        return report, None
    top = {k: v for k, v in report.items() if k != "saes" and isinstance(v, (int, float, dict))}
    top.pop("config", None)
    top.update({k: v for k, v in saes[match[0]].items() if k != "info"})
    return top, match[0]


def report_entries(report: dict | None, d_sae: int) -> tuple[list[dict], dict[str, list]]:
    """Eval report -> (metric rows with a link each, per-latent columns for the latents table).

    Convention: a metric whose value is a list of length d_sae becomes a sortable column and links
    to the table sorted by it; a dict holding a "latents" list of ids links to those latents; a
    dict with integer "i" and "j" (a listed pair) links to the pair page; any other numeric metric
    links to the latents table sorted by the column it is about (density for
    dead/dense/L0/sparsity metrics, the interaction table for pair metrics, else max activation).
    Text fields, configuration and rendered contexts are not metrics and are left out."""
    rows: list[dict] = []
    cols: dict[str, list] = {}
    if not report:
        return rows, cols

    def about(name: str) -> str:
        low = name.lower()
        if any(w in low for w in ("pair", "interaction", "lambda", "strength", "cooccur")):
            return "#pairs"
        if any(w in low for w in ("dead", "dense", "density", "l0", "sparsity", "fire")):
            return "#latents/sort=density"
        return "#latents/sort=max"

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            if isinstance(obj.get("latents"), list):
                ids = [int(i) for i in obj["latents"] if 0 <= int(i) < d_sae][:500]
                val = obj.get("value", obj.get("score", ""))
                rows.append({"name": prefix, "value": _fmt(val),
                             "link": "#ids/" + ",".join(map(str, ids))})
            if isinstance(obj.get("i"), int) and isinstance(obj.get("j"), int):
                i, j = sorted((obj["i"], obj["j"]))
                val = obj.get("strength", obj.get("count", ""))
                rows.append({"name": prefix, "value": _fmt(val), "link": f"#pair/{i}-{j}"})
                return
            for k, v in obj.items():
                if k != "latents" and k not in _SKIP_KEYS:
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, list) and obj and all(isinstance(v, (int, float)) and
                                                   not isinstance(v, bool) for v in obj):
            if len(obj) == d_sae:
                cols[prefix] = [v if isinstance(v, int) or math.isfinite(v) else None
                                for v in obj]
                rows.append({"name": prefix, "value": f"per-latent ({d_sae})",
                             "link": "#latents/sort=" + prefix})
            else:
                rows.append({"name": prefix, "value": f"[{len(obj)} values]",
                             "link": about(prefix)})
        elif isinstance(obj, list):
            for n, v in enumerate(obj):
                if isinstance(v, (dict, list)):
                    walk(f"{prefix}[{n}]", v)
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and prefix:
            rows.append({"name": prefix, "value": _fmt(obj), "link": about(prefix)})

    walk("", report)
    return rows, cols


def saebench_plots(report: dict | None) -> dict | None:
    """From the browsed SAE's report block: absorption per letter and TPP total per N, variants
    ``linear`` and ``full`` (the SAE page draws them), or None when the report has neither."""
    if not isinstance(report, dict):
        return None
    out: dict[str, Any] = {}
    ab = report.get("absorption") or {}
    lin = ab.get("linear") or {}
    if isinstance(lin.get("letters"), dict):
        letters = list(lin["letters"])
        out["absorption"] = {"letters": letters,
                             "counted": [bool(lin["letters"][c].get("counted")) for c in letters]}
        for v in ("linear", "full"):
            per = (ab.get(v) or {}).get("letters") or {}
            out["absorption"][v] = [per.get(c, {}).get("absorption_fraction") for c in letters]
            out["absorption"]["mean_" + v] = (ab.get(v) or {}).get("mean_absorption_fraction")
    tp = report.get("tpp") or {}
    if isinstance((tp.get("linear") or {}).get("total"), dict):
        ns = list(tp["linear"]["total"])
        out["tpp"] = {"n": [int(n) for n in ns]}
        for v in ("linear", "full"):
            tot = (tp.get(v) or {}).get("total") or {}
            out["tpp"][v] = [tot.get(n) for n in ns]
    return out or None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
