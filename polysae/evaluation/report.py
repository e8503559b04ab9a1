"""Write an evaluation's ``metrics.json``, ``report.md`` (SAEs side by side, every metric with its
definition) and PNG plots (matplotlib, Agg backend). Every file is written to a temporary name,
fsynced and renamed, so an interrupted run never leaves a valid-looking partial file.

``metrics.json`` keys (schema_version 1) are documented in docs/evaluation.md (section "The
``metrics.json`` schema"); the ``DEFINITIONS`` below are the text the report prints. The protocol
behind them is described in docs/method.md ("Evaluation protocol").
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from polysae.fileio import atomic_write_text

#: Printed above the definitions: where the protocol and its rationale are written down.
METHOD_NOTE = ("The evaluation protocol, its rationale and where polysae departs from the PolySAE "
               "reference are described in polysae's docs/method.md (section \"Evaluation "
               "protocol\"); the metrics.json schema is in docs/evaluation.md.")

DEFINITIONS = {
    "mse_per_token": "mean over held-out tokens of ||x - x_hat||^2 (sum over d_in).",
    "mse_saebench": "SAEBench core `mse`: each token's ||x - x_hat||^2 divided by the tokens in "
                    "its evaluation batch (saebench_batch_tokens), averaged over tokens; likely "
                    "the paper's MSE column (an inference, not confirmed).",
    "fvu": "fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean x||^2; "
           "explained_variance = 1 - fvu.",
    "explained_variance": "1 - fvu (plain formula, not SAEBench's variant).",
    "l0": "mean number of active latents per token.",
    "dead_fraction": "share of latents never active on the held-out tokens.",
    "dense_fraction": "share of latents active on more than dense_threshold of the tokens.",
    "density": "per latent, the fraction of held-out tokens it is active on; `density.png` and "
               "`density_histogram` bin log10(density) of live latents (dead ones counted apart).",
    "ce_clean": "mean next-token cross-entropy of the unmodified model on the CE contexts "
                "(scored positions: targets that are not special tokens).",
    "ce_sae": "the same with the SAE's x_hat spliced in at the hook.",
    "ce_zero": "the same with the hook activation replaced by zeros (zero-ablation).",
    "ce_loss_recovered": "(CE_zero - CE_sae) / (CE_zero - CE_clean): x_hat spliced in at the hook "
                         "vs the clean run and zero-ablation; special-token positions keep their "
                         "clean activation and are not scored.",
    "kl_sae": "mean over scored positions of KL(clean || spliced) of the next-token "
              "distributions (KL_zero: the same for zero-ablation).",
    "kl_recovered": "(KL_zero - KL_sae) / KL_zero with KL(clean || spliced) per position.",
    "f1": "k-sparse probe (SAEBench sparse probing as the PolySAE paper ran it): mean-pool "
          "codes over non-special tokens; balanced one-vs-rest tasks; top-k latents by |mean "
          "difference| on the train split; sklearn LogisticRegression (C=1, lbfgs); binary F1 on "
          "the test split; macro over classes, then mean over datasets. BatchTopK/Matryoshka SAEs "
          "run in eval mode (learned threshold), not with the paper's batch-level top-k over "
          "evaluation batches.",
    "w1": "Wasserstein separation (the PolySAE paper's metric): exact 1-D W1 between positive "
          "and negative pooled values of every latent on the train split, averaged over all "
          "latents; median over classes, then over datasets. Raw: grows with activation scale.",
    "w1_std": "as w1 with every latent divided by its standard deviation over the task's train "
              "texts (scale-free; zero-spread latents count 0). polysae's normalisation.",
    "w1_l2": "raw mean W1 divided by the mean L2 norm of the pooled vectors (removes one global "
             "scale). polysae's normalisation.",
    "interactions": "polysae's own definitions (the paper publishes no code): "
                    "strength = |lambda2|*||B_ij|| (PolySAE); N_ij = held-out tokens with both "
                    "latents active; cov = Cov(z_i, z_j); Pearson r over pairs with N_ij >= 1, "
                    "raw and log counts. Paper: r = 0.06 (strength) vs 0.82 (vanilla cov).",
    "n_pairs": "co-active latent pairs (N_ij >= 1) over the held-out tokens.",
    "r_strength_count": "Pearson r between |lambda2|*||B_ij|| and N_ij over co-active pairs "
                        "(PolySAE only).",
    "r_strength_logcount": "as r_strength_count with log N_ij.",
    "r_cov_count": "Pearson r between Cov(z_i, z_j) and N_ij over co-active pairs (any SAE; the "
                   "paper's vanilla statistic).",
    "r_cov_logcount": "as r_cov_count with log N_ij.",
    "decoder_norms": "L2 norms of the W_dec rows SAEBench sees (the SAE's raw linear atoms: "
                     "W_dec, or U C1^T for a PolySAE; docs/method.md, \"What SAEBench sees\"); "
                     "metrics that read W_dec (absorption, SCR, TPP, RAVEL) get a warning when "
                     "they are not unit norm.",
    "steering": "polysae's own protocol (the paper publishes no code): latent per concept word = "
                "most active latent at that word; add alpha x a unit direction (linear: d_i + d_j; "
                "pair: lambda2 (B_ij + B_ji); linear+pair: A_i + A_j + lambda2 (B_ij + B_ji)) at "
                "every non-BOS position; alpha = scale x median hook-activation norm, chosen per "
                "SAE and direction on held-out selection prompts; metric = rank of the target's "
                "first token after the prompt (1 = top), on the other prompts only, as mean log2 "
                "rank, fraction of cases improved vs no steering and concepts won.",
}


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.{digits}f}"
    return str(v)


def _atomic_png(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in rows]]


def render_markdown(m: dict[str, Any]) -> str:
    names = list(m["saes"])
    L = [f"# PolySAE evaluation: {' vs '.join(names)}", "",
         f"Model `{m.get('model')}`, hook `{m['hook']}`, {m['date']}, polysae "
         f"{m['polysae_version']}, torch {m['torch_version']}, device {m['device']}.",
         f"Held-out set: {m['held_out']['source']}, {m['held_out']['n_tokens']} tokens.", ""]
    if m.get("warnings"):
        L += ["## Warnings", "", *[f"- {w}" for w in m["warnings"]], ""]
    L += ["## SAEs", ""]
    rows = []
    for key in ("decoder", "sparsifier", "d_sae", "k", "ranks", "order", "tokens_trained", "path"):
        rows.append([key] + [_fmt(m["saes"][n]["info"].get(key)) for n in names])
    rows.append(["parameters"] + [_fmt(m["saes"][n]["info"]["params"].get("total"))
                                  for n in names])
    if any("decoder_norms" in m["saes"][n] for n in names):
        rows.append(["W_dec row norms (min-max)"] + [_norms(m["saes"][n].get("decoder_norms"))
                                                     for n in names])
    L += markdown_table(["", *names], rows)

    L += ["", "## Reconstruction (held-out)", ""]
    rec_keys = ["mse_per_token", "mse_saebench", "fvu", "explained_variance", "l0",
                "dead_fraction", "dense_fraction"]
    rows = [[k] + [_fmt(m["saes"][n].get("reconstruction", {}).get(k)) for n in names]
            for k in rec_keys]
    for k in ("ce_clean", "ce_sae", "ce_zero", "ce_loss_recovered", "kl_sae", "kl_recovered"):
        rows.append([k] + [_fmt(m["saes"][n].get("reconstruction", {}).get("ce", {}).get(k))
                           for n in names])
    L += markdown_table(["metric", *names], rows)
    L += ["", "Density histograms: `density.png`.", ""]

    if any("probing" in m["saes"][n] for n in names):
        cols = [*names, "model activations"]
        blocks = [m["saes"][n]["probing"] for n in names] + [m["activations_baseline"]["probing"]]
        ks = list(blocks[0]["f1"])
        L += ["## Probing F1 (k-sparse)", ""]
        rows = [[f"**mean over datasets**, k={k}"] + [_fmt(b["f1"][k], 3) for b in blocks]
                for k in ks]
        for ds in blocks[0]["datasets"]:
            rows += [[f"{ds}, k={k}"] + [_fmt(b["datasets"][ds]["f1"][k], 3) for b in blocks]
                     for k in ks]
        L += markdown_table(["", *cols], rows)
        sizes = m.get("probing_sizes", {})
        L += ["", "Split sizes (documents): " + "; ".join(
            f"{ds}: {s['train_docs']} train / {s['test_docs']} test, "
            f"classes {', '.join(s['classes'])}"
            for ds, s in sizes.items()) + ". Plot: `f1.png`.", ""]
        L += ["## Wasserstein separation", ""]
        rows = []
        for key in ("w1", "w1_std", "w1_l2"):
            rows.append([f"**{key}** (median over datasets)"] + [_fmt(b.get(key)) for b in blocks])
            for ds in blocks[0]["datasets"]:
                rows.append([f"{key}, {ds}"] + [_fmt(b["datasets"][ds].get(key)) for b in blocks])
        L += markdown_table(["", *cols], rows)
        if len(names) == 2:
            # Paper direction: PolySAE over vanilla (2-10x raw W1 reported).
            kinds = [m["saes"][n]["info"]["decoder"] for n in names]
            ia, ib = (1, 0) if kinds == ["poly", "linear"] else (0, 1)
            a, b = blocks[ia], blocks[ib]
            L += ["", f"Ratio {names[ib]}/{names[ia]}: raw W1 {_ratio(b.get('w1'), a.get('w1'))}, "
                      f"std-normalised {_ratio(b.get('w1_std'), a.get('w1_std'))}, "
                      f"L2-normalised {_ratio(b.get('w1_l2'), a.get('w1_l2'))}."]
        L += ["", "Plot: `w1.png`.", ""]

    if any("interactions" in m["saes"][n] for n in names):
        L += ["## Interactions (polysae's definitions)", ""]
        keys = ["n_pairs", "r_strength_count", "r_strength_logcount", "r_cov_count",
                "r_cov_logcount"]
        inter = {n: m["saes"][n].get("interactions", {}) for n in names}
        L += markdown_table(["", *names], [[k] + [_fmt(inter[n].get(k), 3) for n in names]
                                          for k in keys])
        for n in names:
            tp = m["saes"][n].get("interactions", {}).get("top_pairs", [])
            if not tp:
                continue
            L += ["", f"Top pairs of `{n}` (by strength; by count for a linear decoder):", ""]
            L += markdown_table(["i", "j", "strength", "N_ij", "top contexts"], [
                [str(p["i"]), str(p["j"]), _fmt(p["strength"]), str(p["count"]),
                 " / ".join(_md_escape(c) for c in p["contexts"])] for p in tp])
        L += ["", "Plot: `interactions.png`.", ""]

    if "steering" in m:
        L += _steering_section(m["steering"])

    from polysae.evaluation.saebench_report import DEFINITIONS as SAEBENCH_DEFINITIONS, section

    L += section(m)
    L += ["## Definitions", "", METHOD_NOTE, ""]
    L += [f"- **{k}**: {v}" for k, v in {**DEFINITIONS, **SAEBENCH_DEFINITIONS}.items()] + [""]
    return "\n".join(L)


def _steering_section(s: dict[str, Any]) -> list[str]:
    """Markdown for ``metrics["steering"]``: alpha chosen on the selection prompts, every other
    number on the reported prompts only; the in-sample best alpha is shown as optimistic."""
    sm = s["summary"]
    n_sel = len(s.get("select_prompts", []))
    n_pr = len(s["concepts"][0]["prompts"])
    L = ["## Steering (polysae's protocol)", "",
         f"{len(s['concepts'])} concepts x {n_pr} prompts; alpha scales {s['alpha_scales']} x "
         f"median hook norm {s['hook_norm']:.2f}. alpha is chosen per SAE and direction on the "
         f"first {n_sel} neutral prompts; the numbers are measured on the other "
         f"{n_pr - n_sel} prompts of every concept (its own prompt included). Directions: "
         "`linear` = d_i + d_j (unit linear decoder directions); `pair` = unit "
         "lambda2 (B_ij + B_ji); `linear+pair` = unit (A_i + A_j + lambda2 (B_ij + B_ji)).", ""]
    rows = [["no steering", "–", "–", _fmt(sm["none"]["report_mean_log2_rank"], 2), "–", "–",
             "–"]]
    for n, by_mode in sm["saes"].items():
        for mode, r in by_mode.items():
            ins = r["best_alpha_in_sample"]
            rows.append([f"`{n}`", mode, f"{r['alpha_scale']:g}",
                         _fmt(r["report_mean_log2_rank"], 2), _fmt(r["report_frac_improved"], 2),
                         f"{r['concept_wins']}/{r['n_concepts']}",
                         f"{_fmt(ins['mean_log2_rank'], 2)} (alpha {ins['alpha_scale']:g})"])
    L += markdown_table(["SAE", "direction", "alpha scale (selected)", "mean log2 rank",
                 "fraction improved", "concepts won vs none",
                 "in-sample best alpha, all prompts (optimistic)"], rows)
    if sm.get("poly_vs_vanilla"):
        L += ["", "PolySAE vs vanilla, per concept (reported prompts, each at its own alpha):", ""]
        L += markdown_table(["poly", "direction", "vanilla (linear)", "concepts poly better",
                     "worse", "tied", "mean log2 rank difference", "fraction of cases better"],
                    [[f"`{r['poly']}`", r["mode"], f"`{r['vanilla']}`", str(r["concept_wins"]),
                      str(r["concept_losses"]), str(r["concept_ties"]),
                      _fmt(r["report_mean_log2_rank_diff"], 2),
                      _fmt(r["report_frac_cases_better"], 2)] for r in sm["poly_vs_vanilla"]])
    return L + [""]


def _norms(d: dict[str, Any] | None) -> str:
    if not d:
        return "–"
    return f"{_fmt(d['min'], 3)}-{_fmt(d['max'], 3)}" + (" (unit)" if d["unit_norm"] else "")


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "–"


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", "⏎")


def write_plots(m: dict[str, Any], out: Path, plots: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(m["saes"])
    written = []
    if any("probing" in m["saes"][n] for n in names):
        blocks = {n: m["saes"][n]["probing"] for n in names}
        blocks["activations"] = m["activations_baseline"]["probing"]
        dss = list(next(iter(blocks.values()))["datasets"]) + ["mean"]
        ks = list(next(iter(blocks.values()))["f1"])
        fig, axes = plt.subplots(1, len(ks), figsize=(4.5 * len(ks), 3.4), squeeze=False)
        w = 0.8 / len(blocks)
        for ax, k in zip(axes[0], ks):
            for bi, (n, b) in enumerate(blocks.items()):
                vals = [b["datasets"][d]["f1"][k] for d in dss[:-1]] + [b["f1"][k]]
                ax.bar([x + bi * w for x in range(len(dss))], vals, w, label=n)
            ax.set_xticks([x + 0.4 - w / 2 for x in range(len(dss))], dss)
            ax.set_ylim(0, 1)
            ax.set_title(f"probe F1, k={k}")
        axes[0][0].legend(fontsize=8)
        _atomic_png(fig, out / "f1.png")
        plt.close(fig)
        written.append("f1.png")

        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        for ax, key in zip(axes, ("w1", "w1_std", "w1_l2")):
            for bi, (n, b) in enumerate(blocks.items()):
                vals = [b["datasets"][d].get(key) or 0 for d in dss[:-1]] + [b.get(key) or 0]
                ax.bar([x + bi * w for x in range(len(dss))], vals, w, label=n)
            ax.set_xticks([x + 0.4 - w / 2 for x in range(len(dss))],
                          dss[:-1] + ["median"])
            ax.set_title({"w1": "W1 (raw)", "w1_std": "W1 / latent std",
                          "w1_l2": "W1 / mean code norm"}[key])
        axes[0].legend(fontsize=8)
        _atomic_png(fig, out / "w1.png")
        plt.close(fig)
        written.append("w1.png")

    if plots.get("density"):
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        for n, d in plots["density"].items():
            live = d[d > 0].double().log10().numpy()
            ax.hist(live, bins=40, range=(-7, 0), histtype="step", label=f"{n} "
                    f"({int((d == 0).sum())} dead)")
        ax.set_xlabel("log10 latent density (held-out)")
        ax.set_ylabel("latents")
        ax.legend(fontsize=8)
        _atomic_png(fig, out / "density.png")
        plt.close(fig)
        written.append("density.png")

    if plots.get("pairs"):
        items = list(plots["pairs"].items())
        fig, axes = plt.subplots(1, len(items), figsize=(4.5 * len(items), 3.4), squeeze=False)
        g = torch.Generator().manual_seed(0)
        for ax, (n, (cnt, y, kind)) in zip(axes[0], items):
            sel = torch.randperm(len(cnt), generator=g)[:5000]
            ax.scatter(cnt[sel].numpy(), y[sel].numpy(), s=3, alpha=0.4)
            ax.set_xscale("log")
            ax.set_xlabel("co-occurrence N_ij")
            ax.set_ylabel("|lambda2| ||B_ij||" if kind == "strength" else "Cov(z_i, z_j)")
            r = m["saes"][n]["interactions"].get(
                "r_strength_count" if kind == "strength" else "r_cov_count")
            ax.set_title(f"{n}: r = {_fmt(r, 3)}")
        _atomic_png(fig, out / "interactions.png")
        plt.close(fig)
        written.append("interactions.png")
    from polysae.evaluation.saebench_report import plots as saebench_plots

    return written + saebench_plots(m, out, _atomic_png)


def write_report(metrics: dict[str, Any], out: str | os.PathLike,
                 plots: dict[str, Any] | None = None) -> Path:
    """Write ``metrics.json``, ``report.md`` and the PNG plots into ``out``; returns ``out``."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    metrics = dict(metrics, plots=write_plots(metrics, d, plots or {}))
    atomic_write_text(d / "metrics.json", json.dumps(metrics, indent=1, allow_nan=False) + "\n")
    atomic_write_text(d / "report.md", render_markdown(metrics))
    return d
