"""``replicate.md`` and ``paired_f1.png`` from a ``replicate.json`` table (see
:mod:`polysae.replicate.run`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from polysae.evaluation.report import markdown_table

MAIN_COLUMNS = ("mse_saebench", "fvu", "ce_recovered", "l0", "dead_fraction", "f1_k1", "f1_k2",
                "f1_k5", "w1", "w1_std")
SCALE_COLUMNS = ("code_l2", "active_mean", "atom_norm", "contribution", "share_higher", "fvu",
                 "fvu_linear_only")
R_COLUMNS = ("r_cov_count", "r_cov_logcount", "r_strength_count", "r_strength_logcount")

PROTOCOL_ROWS = (
    (
        "model, data",
        "GPT-2 small L8 (and Pythia, Gemma), OpenWebText/Pile, 300-500M tokens",
        "see the header: the store above, its train split",
    ),
    (
        "training",
        "Adam 3e-4 constant, batch 4096, 73k steps, raw activations, seed 42",
        "settings in `config.train` (CPU-scale defaults: 1e-3, batch 1024, activations normalised"
        " to E‖x‖² = d_in and folded back into the saved weights), one seed per row pair",
    ),
    (
        "F1@k (**paper-like**)",
        "SAEBench sparse probing: 8 dataset entries, 4000/1000 texts per class, 128 tokens, mean "
        "pooling over non-special tokens, top-k latents by \\|mean diff\\|, sklearn logistic "
        "regression, binary F1, macro over classes, **mean over datasets**",
        "the same procedure on the bundled probing sets and sizes in `probing_sizes`",
    ),
    (
        "W1 (**paper**)",
        "train split of each one-vs-rest task, every latent (dead ones count 0), post-sparsifier "
        "mean-pooled codes, raw (unnormalised), mean over latents, **median over classes, median "
        "over datasets**",
        "the same definition (`probing.w1`)",
    ),
    (
        "W1/std, W1/‖z‖ (**polysae**)",
        "not in the paper",
        "W1 per latent divided by the latent's pooled std (then averaged), or the mean W1 divided"
        " by the mean code L2 norm: scale-free variants, since raw W1 scales with the code",
    ),
    (
        "MSE (SAEBench) (**paper-like**)",
        "SAEBench core `mse`: per-token squared error divided by the tokens of its evaluation "
        "batch (2048)",
        "the same formula on the store's held-out split; MSE/token and FVU are plain definitions",
    ),
    (
        "CE rec. (**paper-like**)",
        "(CE_zero − CE_SAE) / (CE_zero − CE_clean), special tokens excluded",
        "the same on held-out contexts of the training corpus",
    ),
    (
        "BatchTopK/Matryoshka at eval",
        "batch-level top-k over each evaluation batch",
        "the SAEs' `batchtopk_inference` setting (default: the learned threshold per token)",
    ),
    (
        "interaction r (**polysae**)",
        "reported r = 0.06 (PolySAE B_ij vs co-occurrence) vs 0.82 (vanilla covariance vs co-"
        "occurrence); no code or definition published",
        "strength = \\|λ2\\|·‖B_ij‖, N_ij = held-out tokens where both latents fire, cov = "
        "Cov(z_i, z_j), Pearson r over pairs with N_ij ≥ 1, raw and log N",
    ),
    (
        "steering (**polysae**)",
        "27 concepts × 12 prompts, α and directions unpublished",
        "the concepts and α-selection rule recorded in each cell's `metrics.json` (`steering`)",
    ),
)
"""The protocol table: (quantity, the paper's reference code, this table)."""


def _f(v: Any, digits: int = 4) -> str:
    """``digits`` significant digits; scientific notation for very large or small values."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    av = abs(v)
    if av != 0 and (av >= 1e5 or av < 1e-3):
        return f"{v:.{max(1, digits - 1)}e}"
    return f"{v:#.{digits}g}".rstrip(".") if av != 0 else "0"


def _ms(s: dict[str, Any] | None) -> str:
    if not s or s.get("n", 0) == 0:
        return "–"
    if s.get("std") is None:
        return _f(s["mean"])
    return f"{_f(s['mean'])} ± {_f(s['std'], 2)}"


def _diff(d: dict[str, Any] | None) -> str:
    if not d or not d.get("n"):
        return "–"
    txt = f"{_f(d['mean'], 3)} [{_f(d['t_low'], 3)}, {_f(d['t_high'], 3)}]"
    return f"**{txt}**" if d.get("excludes_zero") else txt


def _rows(t: dict[str, Any], columns: tuple[str, ...], decoders=("vanilla", "poly")
          ) -> list[list[str]]:
    rows = []
    for sp, block in t["sparsifiers"].items():
        m = block["metrics"]
        for dec in decoders:
            rows.append([sp, dec, *(_ms(m.get(c, {}).get(dec)) for c in columns)])
        rows.append([sp, "Δ poly − vanilla", *(_diff(m.get(c, {}).get("diff"))
                                               for c in columns)])
    return rows


def _label(t: dict[str, Any], key: str) -> str:
    m = t["metrics"].get(key, {})
    proto = m.get("protocol")
    tag = {"paper": " (paper)", "paper-like": "", "polysae": " †"}.get(proto, "")
    label = m.get("label", key)
    return label if label.endswith("(paper)") else label + tag


def render_markdown(t: dict[str, Any]) -> str:
    """The replicate table and its reading notes as markdown."""
    cfg = t.get("config", {})
    seeds = cfg.get("seeds")
    conf = int(round(100 * t.get("confidence", 0.95)))
    lines = [
        "# polysae replicate: vanilla vs PolySAE over seeds",
        "",
        f"Model `{t.get('model')}`, hook `{t.get('hook')}`, store `{t.get('acts')}`; "
        f"{seeds} seeds per sparsifier (seeds {cfg.get('seed_base')}–"
        f"{(cfg.get('seed_base') or 0) + (seeds or 1) - 1}); SAE overrides `{cfg.get('sae')}`; "
        f"held out: {(t.get('held_out') or {}).get('source')}. Date {t.get('date')}, polysae "
        f"{t.get('polysae_version')}, torch {t.get('torch_version')}; "
        f"{t.get('seconds', '–')} s in this call.",
        "",
        f"Cells: mean ± std over seeds. Δ rows: mean paired difference poly − vanilla over seeds "
        f"(same data order and evaluation texts per seed) with its {conf}% t interval; **bold** "
        f"when the interval excludes 0. † = polysae's own definition (the paper publishes none, "
        f"or it is our scale-free variant); (paper) = the paper's definition; other columns use "
        f"the paper's formula on our data and sizes (see *Protocol* below).",
        "",
        "## Main table (rows = sparsifier × decoder, as the paper's Table 1)",
        "",
        *markdown_table(["sparsifier", "decoder", *(_label(t, c) for c in MAIN_COLUMNS)],
                _rows(t, MAIN_COLUMNS)),
        "",
    ]
    ds = t.get("datasets") or []
    if ds:
        cols = tuple(f"f1_k1:{d}" for d in ds)
        lines += ["## Probing F1@1 per dataset", "",
                  *markdown_table(["sparsifier", "decoder", *ds], _rows(t, cols)), ""]
    lines += ["## Code scale and the W1 confound", "",
              "Raw W1 is scale-equivariant and an SAE's code scale is free (vanilla trades it "
              "against ‖W_dec_i‖, PolySAE against C). These columns measure it on the held-out "
              "rows: ‖z‖ mean code norm, mean z>0 mean active value, ‖atom‖ median linear atom "
              "norm of latents that fired, z·‖atom‖ their product (scale-free), higher-order "
              "share E‖λ2y2+λ3y3‖²/E‖x̂−b‖², FVU with and without the higher-order terms.", "",
              *markdown_table(["sparsifier", "decoder", *(_label(t, c) for c in SCALE_COLUMNS)],
                      _rows(t, SCALE_COLUMNS)), ""]
    reading = []
    for sp, block in t["sparsifiers"].items():
        r = block.get("w1_scale_reading")
        if r:
            reading.append(
                f"- **{sp}**: raw W1 poly/vanilla = {_f(r.get('w1_ratio'), 3)}×; mean active "
                f"code value poly/vanilla = {_f(r.get('active_mean_ratio'), 3)}×, so W1 per unit "
                f"of code scale = {_f(r.get('w1_ratio_per_active_scale'), 3)}×; scale-free "
                f"W1/std ratio {_f(r.get('w1_std_ratio'), 3)}×, W1/‖z‖ ratio "
                f"{_f(r.get('w1_l2_ratio'), 3)}×.")
    if reading:
        lines += ["Reading of the W1 ratio:", "", *reading, ""]
    lines += _saebench_section(t)
    lines += ["## Interaction strength vs co-occurrence (Pearson r over pairs)", "",
              "Paper: r = 0.06 for PolySAE's interaction strength vs 0.82 for the vanilla SAE's "
              "activation covariance (definitions unpublished; ours are marked †). The Δ rows of "
              "`r(strength,N)` compare PolySAE's strength r with the vanilla covariance r "
              "(`r_contrast_*` in replicate.json).", ""]
    rrows = []
    for sp, block in t["sparsifiers"].items():
        m = block["metrics"]
        rrows.append([sp, "vanilla", _ms(m.get("r_cov_count", {}).get("vanilla")),
                      _ms(m.get("r_cov_logcount", {}).get("vanilla")), "–", "–"])
        rrows.append([sp, "poly", _ms(m.get("r_cov_count", {}).get("poly")),
                      _ms(m.get("r_cov_logcount", {}).get("poly")),
                      _ms(m.get("r_strength_count", {}).get("poly")),
                      _ms(m.get("r_strength_logcount", {}).get("poly"))])
        rrows.append([sp, "poly strength − vanilla cov", "–", "–",
                      _diff(m.get("r_contrast_count", {}).get("diff")),
                      _diff(m.get("r_contrast_logcount", {}).get("diff"))])
    lines += markdown_table(["sparsifier", "decoder", "r(cov,N) †", "r(cov,logN) †",
                     "r(strength,N) †", "r(strength,logN) †"], rrows) + [""]
    srows = []
    for sp, block in t["sparsifiers"].items():
        st = block.get("steering") or {}
        none = st.get("none", {}).get("report_mean_log2_rank")
        if none:
            srows.append([sp, "no steering", "–", _ms(none), "–", "–", "–"])
        diffs = st.get("poly_minus_vanilla_linear", {})
        for key, nums in st.items():
            if ":" not in key:
                continue
            name, mode = key.split(":", 1)
            alphas = sorted({v for v in nums["alpha_scale"]["values"] if v is not None})
            srows.append([sp, key, " / ".join(f"{a:g}" for a in alphas),
                          _ms(nums["report_mean_log2_rank"]), _ms(nums["report_frac_improved"]),
                          _ms(nums["concept_wins"]),
                          _diff(diffs.get(mode)) if name == "poly" else "–"])
    if srows:
        lines += ["## Steering † (rank of the target token; lower log2 rank is better)", "",
                  "α (as a multiple of the median hook norm) is chosen per SAE, mode and seed on "
                  "the selection prompts; the numbers are on the other (reported) prompts only. "
                  "Δ = PolySAE mode − vanilla linear steering, paired over seeds (negative = "
                  "PolySAE better).", "",
                  *markdown_table(["sparsifier", "SAE:mode", "α chosen", "mean log2 rank",
                           "frac. improved", "concept wins vs none", "Δ vs vanilla linear"],
                          srows), ""]
    inference = (cfg.get("sae") or {}).get("batchtopk_inference", "threshold")
    used = {"threshold": "the learned threshold per token (this run)",
            "batch": "batch-level top-k over each evaluation batch, as the paper (this run)"}
    rows = [[q, paper, used.get(inference, ours) if q.startswith("BatchTopK/") else ours]
            for q, paper, ours in PROTOCOL_ROWS]
    lines += ["## Protocol: the paper's and ours, named apart", "",
              *markdown_table(["quantity", "paper (reference code)", "this table"], rows), ""]
    return "\n".join(lines) + "\n"


def _saebench_section(t: dict[str, Any]) -> list[str]:
    """SAEBench absorption and TPP, variants linear and full, with their paired intervals."""
    ns = t.get("tpp_n_values") or []
    cols = ("absorption:linear", "absorption:full", "full_absorption:linear",
            "full_absorption:full", *(f"tpp_{n}:{v}" for n in ns for v in ("linear", "full")))
    if not any(c in b["metrics"] for b in t["sparsifiers"].values() for c in cols):
        return []
    return ["## SAEBench absorption and TPP: `linear` vs `full` decoder", "",
            "`linear` = SAEBench's definition with the raw linear atoms as W_dec; `(full)` = "
            "each latent's exact Shapley contribution through the whole decoder instead (†, "
            "docs/method.md). Absorption: lower is better; TPP (accuracy drop intended − "
            "unintended after ablating N latents): higher is better.", "",
            *markdown_table(["sparsifier", "decoder", *(_label(t, c) for c in cols)],
                            _rows(t, cols)), ""]


def plot_paired_f1(t: dict[str, Any], path: Path) -> None:
    """Per sparsifier and k: each seed's F1 difference poly − vanilla (dots) and the mean with
    its t interval (bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = t.get("ks") or [1, 2, 5]
    sps = list(t["sparsifiers"])
    fig, ax = plt.subplots(figsize=(1.6 + 1.6 * len(sps) * len(ks) / 3, 3.4))
    x = 0
    ticks, labels, groups = [], [], []
    for si, sp in enumerate(sps):
        start = x
        for k in ks:
            e = t["sparsifiers"][sp]["metrics"].get(f"f1_k{k}")
            if e and e.get("diff"):
                d = e["diff"]
                va, vb = e["values"]["vanilla"], e["values"]["poly"]
                pts = [b - a for a, b in zip(va, vb) if a is not None and b is not None]
                ax.scatter([x] * len(pts), pts, s=14, color=f"C{si}", alpha=0.6, zorder=3)
                if d.get("t_low") is not None:
                    ax.errorbar([x + 0.15], [d["mean"]],
                                yerr=[[d["mean"] - d["t_low"]], [d["t_high"] - d["mean"]]],
                                fmt="o", color=f"C{si}", capsize=3, zorder=4)
            ticks.append(x)
            labels.append(f"k={k}")
            x += 1
        groups.append(((start + x - 1) / 2, sp))
        x += 0.5
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xticks(ticks, labels, fontsize=7)
    # One sparsifier name per group, under its k ticks (a name per tick overlaps at 3 groups).
    for centre, sp in groups:
        ax.annotate(sp, (centre, 0), xycoords=("data", "axes fraction"), xytext=(0, -20),
                    textcoords="offset points", ha="center", va="top", fontsize=8)
    conf = int(round(100 * t.get("confidence", 0.95)))
    ax.set_ylabel("F1 poly − vanilla")
    ax.set_title(f"Paired probing-F1 differences per seed (dots), mean and {conf}% t interval",
                 fontsize=8)
    fig.tight_layout()
    import io

    from polysae.fileio import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


__all__ = ["plot_paired_f1", "render_markdown"]
