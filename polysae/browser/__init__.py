"""Feature browser: a static, self-contained HTML site of an SAE's latents and interactions.

``build_site(sae, store, out_dir, model=None, tokenizer=None)`` streams once over held-out
activations (an :class:`polysae.data.store.ActivationStore`) and writes ``out_dir/`` with
``index.html`` + ``app.js`` + ``style.css`` (from ``polysae/browser_assets``) and ``data/*.js``.
``build_site_from_arrays(sae, acts, out_dir, token_ids=..., doc_ids=...)`` does the same for
in-memory tensors; both go through :func:`build_site_from_rows`.

Why the data files are ``.js`` and not ``.json``: a browser refuses ``fetch()`` of ``file://``
URLs, but it runs ``<script src>`` from them, so wrapping each JSON payload in one assignment keeps
the site usable straight from disk (no server), while a CSP ``default-src 'self'`` meta tag stops
any request from leaving the machine.

Candidate pairs are chosen *before* the pass by interaction strength |lambda2| * ||B_ij|| over
all i < j (:func:`polysae.evaluation.interactions.pair_candidates`, computed blockwise through the
decoder's factors, never the F x F x D tensor), and the site shows the strongest among those that
are actually co-active.

Modules: :mod:`~polysae.browser.stats` (``StatsConfig`` and the one streaming pass: per-latent
counts, histograms, top contexts, pair co-activation), :mod:`~polysae.browser.text` (token text
of context windows), :mod:`~polysae.browser.links` (eval-report metrics linked into the site),
:mod:`~polysae.browser.site` (``BrowseConfig`` and writing the site).
"""

from polysae.browser.links import report_entries, select_report
from polysae.browser.site import (
    ASSETS,
    SITE_MARKER,
    BrowseConfig,
    build_site,
    build_site_from_arrays,
    build_site_from_rows,
    check_site_target,
    logit_tops,
    residual_space,
)
from polysae.browser.stats import (
    FeatureSummary,
    StatsConfig,
    StreamStats,
    TopPool,
    feature_summary,
    hist_centres,
    stream_stats,
)
from polysae.browser.text import TokenText, context_windows, peak_strings
from polysae.evaluation.interactions import PairCandidates, pair_candidates

__all__ = [
    "ASSETS", "SITE_MARKER", "BrowseConfig", "FeatureSummary", "PairCandidates", "StatsConfig",
    "StreamStats", "TokenText", "TopPool", "build_site", "build_site_from_arrays",
    "build_site_from_rows", "check_site_target", "context_windows", "feature_summary",
    "hist_centres", "logit_tops", "pair_candidates", "peak_strings", "report_entries",
    "residual_space", "select_report", "stream_stats",
]
