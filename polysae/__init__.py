"""polysae: sparse autoencoders with low-rank polynomial decoders (PolySAE, arXiv 2602.01322).

Light to import: torch and the model core only. Heavy parts (transformer-lens, the harvester, the
trainer, evaluators) load on first use of their names below.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from polysae.config import SAEConfig  # noqa: E402
from polysae.sae import SAE, LossOutput, ParamCounts, SparseCodes, count_params  # noqa: E402

# name -> module that defines it; imported on first access (PEP 562).
_LAZY = {
    "load": "polysae.loader",
    "ActivationStore": "polysae.store",
    "harvest": "polysae.harvest",
    "HarvestConfig": "polysae.harvest",
    "Trainer": "polysae.train",
    "TrainConfig": "polysae.train",
    "train": "polysae.train",
    "evaluate": "polysae.evaluate",
    "download": "polysae.cache",
}


class _FunctionModule(type(importlib)):
    """A module whose call runs its namesake function (``polysae.train(...)``).

    ``polysae.harvest``, ``polysae.train`` and ``polysae.evaluate`` are both submodules and the
    functions they define. Once a submodule is imported, the import system binds the *module* as
    the package attribute, shadowing the lazy function; a callable module keeps
    ``polysae.train(...)`` working whatever was imported first."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


def _callable_module(module_name: str) -> None:
    """Make ``sys.modules[module_name]`` callable as its namesake function (see above)."""
    import sys

    sys.modules[module_name].__class__ = _FunctionModule


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'polysae' has no attribute {name!r}")


__all__ = ["SAEConfig", "SAE", "SparseCodes", "LossOutput", "ParamCounts", "count_params",
           "__version__", *_LAZY]
