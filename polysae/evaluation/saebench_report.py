"""The absorption and TPP part of ``report.md`` (variants ``linear`` and ``full`` side by side, and
by how much they differ) and its two pictures: ``absorption.png`` (absorption fraction per
letter) and ``tpp.png`` (TPP accuracy drop against the number of ablated latents)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

VARIANTS = ("linear", "full")

DEFINITIONS = {
    "absorption": "SAEBench feature absorption on the first-letter task (Chanin et al.): per "
                  "letter, the share of the ground-truth probe's true positives whose probe "
                  "projection is carried by latents other than the letter's k-sparse-probe "
                  "(split) latents; `fraction` partial, `full rate` all of it by one latent; mean "
                  "over letters whose probe F1 > 0.6. `linear`: latent directions = raw linear "
                  "atoms (SAEBench's W_dec); `full`: each latent's Shapley contribution through "
                  "the whole decoder on that word (docs/method.md).",
    "tpp": "SAEBench targeted probe perturbation: per class, zero-ablate the top-N latents by "
           "score (x' = decode(z ablated) + error), drop in that class's probe accuracy minus the "
           "mean drop of the other classes' probes; mean over classes, then datasets. `linear`: "
           "score = max(0, mean code difference) x probe . W_dec row; `full`: the probe's "
           "response to the latent's contribution through the whole decoder (same ablation).",
}


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _d(v: Any) -> str:
    return "–" if v is None else f"{v:+.3f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in rows]]


def section(m: dict[str, Any]) -> list[str]:
    """Markdown for ``saes.*.absorption`` and ``saes.*.tpp`` (empty when neither ran)."""
    names = [n for n in m["saes"] if "absorption" in m["saes"][n] or "tpp" in m["saes"][n]]
    if not names:
        return []
    L = ["## SAEBench absorption and TPP: `linear` vs `full` decoder", "",
         "`linear` is SAEBench's definition with the raw linear atoms as W_dec; `full` replaces "
         "each latent's W_dec row by its contribution through the whole decoder (exact Shapley "
         "split of the polynomial terms; docs/method.md). For a linear decoder both are equal.",
         ""]
    setup = m.get("absorption_setup")
    if any("absorption" in m["saes"][n] for n in names):
        L += ["### Feature absorption (first letter)", ""]
        if setup:
            L += [f"{setup['train_words']} train / {setup['test_words']} test words of "
                  f"{setup['vocabulary_words']} single-token vocabulary words; prompt "
                  f"`{setup['template']}` with {setup['icl_examples']} in-context examples. "
                  f"Letters without a word: {', '.join(setup['missing_letters']) or 'none'}.", ""]
        rows, notes = [], []
        for n in names:
            a = m["saes"][n].get("absorption", {})
            if "skipped" in a:
                notes.append(f"- `{n}`: skipped: {a['skipped']}")
                continue
            lin, full = a.get("linear", {}), a.get("full", {})
            diff = a.get("difference", {})
            for key, label in (("mean_absorption_fraction", "mean absorption fraction"),
                               ("mean_full_absorption_rate", "mean full-absorption rate")):
                rows.append([f"`{n}`", label, _f(lin.get(key)), _f(full.get(key)),
                             _d(diff.get(key))])
            split = _f(lin.get("mean_num_split_features"), 2)
            rows.append([f"`{n}`", "letters counted / split latents",
                         f"{lin.get('n_letters', '–')} / {split}", "same",
                         f"{diff.get('letters_changed', '–')} letters changed"])
            for v, b in (("linear", lin), ("full", full)):
                if "skipped" in b:
                    notes.append(f"- `{n}` {v}: skipped: {b['skipped']}")
                elif b.get("note"):
                    notes.append(f"- `{n}` {v}: {b['note']}")
        if rows:
            L += markdown_table(["SAE", "", "linear", "full", "full − linear"], rows)
        L += ["", *sorted(set(notes)), "", "Per letter: `absorption.png`.", ""]
    if any("tpp" in m["saes"][n] for n in names):
        L += ["### TPP (accuracy drop: intended − unintended)", ""]
        ts = m.get("tpp_setup", {})
        for ds, s in ts.get("datasets", {}).items():
            acc = ", ".join(f"{c} {v:.2f}" for c, v in s["clean_accuracy"].items())
            L.append(f"- {ds}: clean probe accuracy {acc}")
        for ds, why in ts.get("skipped", {}).items():
            L.append(f"- {ds}: skipped: {why}")
        L.append("")
        rows, notes = [], []
        for n in names:
            t = m["saes"][n].get("tpp", {})
            if "skipped" in t:
                notes.append(f"- `{n}`: skipped: {t['skipped']}")
                continue
            lin, full = t.get("linear", {}), t.get("full", {})
            if "skipped" in full:
                notes.append(f"- `{n}` full: skipped: {full['skipped']}")
            jac = t.get("difference", {}).get("selection_jaccard", {})
            for N in lin.get("total", {}):
                rows.append([f"`{n}`", N, _f(lin["total"][N]), _f(full.get("total", {}).get(N)),
                             _d(t.get("difference", {}).get("total", {}).get(N)),
                             _f(jac.get(N), 2)])
            for N, why in t.get("skipped_n", {}).items():
                notes.append(f"- `{n}`: N={N} skipped: {why}")
        if rows:
            L += markdown_table(["SAE", "N", "linear", "full", "full − linear",
                                 "ablated-set overlap (Jaccard)"], rows)
        L += ["", *sorted(set(notes)), "", "Plot: `tpp.png`.", ""]
    return L


def plots(m: dict[str, Any], out: Path, save) -> list[str]:
    """Write ``absorption.png`` and ``tpp.png`` with ``save(fig, path)``; returns the names."""
    import matplotlib.pyplot as plt

    names = list(m["saes"])
    written = []
    ab = {n: m["saes"][n]["absorption"] for n in names
          if "linear" in m["saes"][n].get("absorption", {})
          and "letters" in m["saes"][n]["absorption"]["linear"]}
    if ab:
        fig, axes = plt.subplots(len(ab), 1, figsize=(11, 2.8 * len(ab)), squeeze=False)
        for ax, (n, a) in zip(axes[:, 0], ab.items()):
            letters = list(a["linear"]["letters"])
            w = 0.4
            for vi, v in enumerate(VARIANTS):
                per = a.get(v, {}).get("letters", {})
                vals = [per.get(c, {}).get("absorption_fraction") for c in letters]
                ax.bar([i + vi * w for i in range(len(letters))],
                       [x if x is not None else 0 for x in vals], w, label=v)
            counted = [a["linear"]["letters"][c].get("counted") for c in letters]
            ax.set_xticks([i + w / 2 for i in range(len(letters))],
                          [c if ok else f"({c})" for c, ok in zip(letters, counted)])
            ax.set_ylabel("absorption fraction")
            ax.set_title(f"{n}: mean {_f(a['linear'].get('mean_absorption_fraction'))} (linear) "
                         f"vs {_f(a.get('full', {}).get('mean_absorption_fraction'))} (full); "
                         "(letter) = not counted")
            ax.legend(fontsize=8)
        save(fig, out / "absorption.png")
        plt.close(fig)
        written.append("absorption.png")
    tp = {n: m["saes"][n]["tpp"] for n in names if "total" in m["saes"][n].get("tpp", {}).get(
        "linear", {})}
    if tp:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for n, t in tp.items():
            for v, style in zip(VARIANTS, ("-o", "--s")):
                tot = t.get(v, {}).get("total")
                if tot:
                    ax.plot([int(k) for k in tot], list(tot.values()), style, label=f"{n} {v}")
        ax.set_xscale("log")
        ax.set_xlabel("N ablated latents")
        ax.set_ylabel("TPP accuracy drop (intended − unintended)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=8)
        save(fig, out / "tpp.png")
        plt.close(fig)
        written.append("tpp.png")
    return written


__all__ = ["DEFINITIONS", "plots", "section"]
