"""polysae: sparse autoencoders with low-rank polynomial decoders (PolySAE, arXiv 2602.01322).

Light to import: torch and the model core only. Heavy parts (transformer-lens, the harvester, the
trainer, evaluators) load on first use of their names below.
"""

from __future__ import annotations

import importlib

from polysae.config import ParamCounts, SAEConfig, count_params
from polysae.sae import SAE, LossOutput, SparseCodes
from polysae.version import __version__

# name -> module (or the stage package re-exporting it) that provides it; imported on first access
# (PEP 562). The modules are named for their concept (data.harvesting, training, evaluation), so
# importing one never rebinds the functions polysae.harvest / polysae.train / polysae.evaluate.
_LAZY = {
    "load": "polysae.loader",
    "ActivationStore": "polysae.data.store",
    "harvest": "polysae.data.harvesting",
    "HarvestConfig": "polysae.data.harvesting",
    "Trainer": "polysae.training",
    "TrainConfig": "polysae.training",
    "train": "polysae.training",
    "evaluate": "polysae.evaluation",
    "EvalConfig": "polysae.evaluation",
    "download": "polysae.cache",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'polysae' has no attribute {name!r}")


__all__ = ["SAEConfig", "SAE", "SparseCodes", "LossOutput", "ParamCounts", "count_params",
           "__version__", *_LAZY]
