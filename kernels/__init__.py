"""Sparse decode ops with one dispatch seam: Triton kernels or the plain-torch reference.

Public ops (same signatures as their ``reference.*_ref`` specs):

- ``poly_decode(values, indices, U, C1, C2, C3, lambda2, lambda3, bias, U2=None, U3=None)``
- ``linear_decode(values, indices, W_dec, bias)``
- ``topk_encode(x, W_enc, b_enc, k, b_dec=None)`` -> (values, indices, pre): the TopK encoder
  (pre = (x - b_dec) W_enc + b_enc) with a backward that touches only the k selected latents per row
- ``batchtopk_encode(x, W_enc, b_enc, k, b_dec=None)`` -> the same for BatchTopK (k*N kept over the
  batch, rows padded with zero values)

The encoders' backward stays sparse on both paths (Triton kernels, or ``torch_ops``: gathers and
``embedding_bag``); only a dense gradient of ``pre`` itself selects the dense formulas.

``BACKEND`` names the active path, resolved once at import: ``"triton"`` when triton imports and
CUDA is present or ``TRITON_INTERPRET=1`` is set, and ``POLYSAE_DISABLE_TRITON`` is not set;
otherwise ``"torch"``. ``set_backend(name)`` overrides it (tests). ``set_deterministic(flag)``
picks the weight-gradient reduction of the Triton path: sorted reverse index with one writer per
row (the default, bitwise reproducible) or token-major fp32 atomics (no sort, order-dependent
sums); ``torch.use_deterministic_algorithms(True)`` forces the former. This package imports nothing
from the rest of polysae, and never needs triton or a GPU to import.
"""

from __future__ import annotations

import sys

if __name__ != "polysae.kernels":
    # Started in the repository root (``python -m pytest``, ``python -c``, a REPL or notebook),
    # ``import kernels`` finds this folder before site-packages. The name belongs to Hugging Face's
    # ``kernels`` distribution (which transformers imports), so hand the import over to it, or fail
    # exactly as if this folder did not exist. Why this and not a rename: docs/development.md.
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec
    from pathlib import Path

    _root = Path(__file__).resolve().parent.parent
    _rest = [p for p in sys.path if Path(p or ".").resolve() != _root]
    _spec = PathFinder.find_spec(__name__, _rest)
    if _spec is None or _spec.loader is None:
        del sys.modules[__name__]
        raise ModuleNotFoundError(f"No module named {__name__!r} (the repository's kernels/ folder "
                                  "is polysae's own, importable only as polysae.kernels)",
                                  name=__name__)
    _real = module_from_spec(_spec)
    sys.modules[__name__] = _real  # the import statement returns whatever sits here afterwards
    try:
        _spec.loader.exec_module(_real)
    except BaseException:
        del sys.modules[__name__]
        raise
else:
    import importlib
    import logging
    import os

    import torch

    from . import torch_ops
    from .reference import linear_decode_ref, poly_decode_ref

    log = logging.getLogger("polysae.kernels")


    def _triton_module():
        """The Triton implementation module, or None when it cannot be used here."""
        if os.environ.get("POLYSAE_DISABLE_TRITON", "") not in ("", "0"):
            return None
        if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "") == "1"):
            return None
        try:
            importlib.import_module("triton")
            return importlib.import_module(".triton_ops", __name__)
        except ImportError as e:  # triton missing, or kernels not built into this install
            log.debug("Triton path unavailable: %s", e)
            return None
        except Exception as e:  # a broken triton install must not break `import polysae`
            log.warning("Triton failed to import (%s: %s); using the torch decode path",
                        type(e).__name__, e)
            return None


    _TRITON = _triton_module()
    BACKEND = "triton" if _TRITON is not None else "torch"
    log.debug("polysae.kernels: using the %s decode path", BACKEND)


    def set_backend(name: str) -> None:
        """Force ``"torch"`` or ``"triton"`` (raises if Triton is unavailable here)."""
        global BACKEND
        if name not in ("torch", "triton"):
            raise ValueError(f"backend must be 'torch' or 'triton', got {name!r}")
        if name == "triton" and _TRITON is None:
            raise RuntimeError("the Triton decode path is unavailable (no triton, no CUDA and "
                               "TRITON_INTERPRET unset, or POLYSAE_DISABLE_TRITON=1)")
        BACKEND = name


    def set_deterministic(flag: bool) -> None:
        """Deterministic (sorted, default) or atomic weight gradients on the Triton path."""
        if _TRITON is not None:
            _TRITON.DETERMINISTIC = bool(flag)


    def poly_decode(values, indices, U, C1, C2, C3, lambda2, lambda3, bias, U2=None, U3=None):
        if BACKEND == "triton":
            return _TRITON.poly_decode(values, indices, U, C1, C2, C3, lambda2, lambda3, bias, U2, U3)
        return poly_decode_ref(values, indices, U, C1, C2, C3, lambda2, lambda3, bias, U2, U3)


    def linear_decode(values, indices, W_dec, bias):
        if BACKEND == "triton":
            return _TRITON.linear_decode(values, indices, W_dec, bias)
        return linear_decode_ref(values, indices, W_dec, bias)


    def topk_encode(x, W_enc, b_enc, k, b_dec=None):
        if BACKEND == "triton":
            return _TRITON.topk_encode(x, W_enc, b_enc, k, b_dec)
        return torch_ops.topk_encode(x, W_enc, b_enc, k, b_dec)


    def batchtopk_encode(x, W_enc, b_enc, k, b_dec=None):
        if BACKEND == "triton":
            return _TRITON.batchtopk_encode(x, W_enc, b_enc, k, b_dec)
        return torch_ops.batchtopk_encode(x, W_enc, b_enc, k, b_dec)


    __all__ = ["BACKEND", "set_backend", "set_deterministic", "poly_decode", "linear_decode",
               "topk_encode", "batchtopk_encode"]
