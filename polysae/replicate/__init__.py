"""``polysae replicate``: vanilla vs PolySAE over seeds, with paired confidence intervals.

- :mod:`~polysae.replicate.config`: ``ReplicateConfig``, ``CellResult``, ``ReplicateResult``;
- :mod:`~polysae.replicate.run`: ``replicate`` and ``run_cell`` (train and evaluate the cells);
- :mod:`~polysae.replicate.compare`: the compared metrics and the paired comparison
  (``replicate.json``);
- :mod:`~polysae.replicate.report`: ``replicate.md`` and ``paired_f1.png``;
- :mod:`~polysae.replicate.paired`: paired differences, t and bootstrap intervals;
- :mod:`~polysae.replicate.codescale`: the code-scale statistics that read a W1 difference.

``from polysae.replicate import ReplicateConfig, replicate`` is the entry point; the comparison
function stays ``polysae.replicate.compare.compare`` (a name re-exported here must never be one of
the submodules').
"""

from polysae.replicate.config import (
    REPLICATE_SPARSIFIERS,
    CellResult,
    ReplicateConfig,
    ReplicateResult,
)
from polysae.replicate.run import replicate, run_cell

__all__ = ["REPLICATE_SPARSIFIERS", "CellResult", "ReplicateConfig", "ReplicateResult",
           "replicate", "run_cell"]
