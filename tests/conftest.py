"""Shared test set-up. CPU only unless marked ``gpu``.

- ``TRITON_INTERPRET=1`` is set here, before any kernel module is imported, when CUDA is absent, so
  the Triton kernels run (slowly, exactly) on CPU tensors.
- Every test runs the plain-torch decode path unless it is marked ``triton`` (the interpreter is
  ~1000x slower than eager torch, so only the kernel tests pay for it).
- Nothing here or in any test reaches a model hub: ``HF_HUB_OFFLINE`` is forced on.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import polysae.kernels as pk  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs the Triton decode path (interpreter on CPU)")


@pytest.fixture(autouse=True)
def _decode_backend(request):
    """Torch reference decode for ordinary tests; the resolved backend for ``triton`` tests."""
    saved = pk.BACKEND
    if request.node.get_closest_marker("triton") is None:
        pk.set_backend("torch")
    yield
    pk.BACKEND = saved


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def make_tiny_hooked():
    """Factory for tiny random frozen HookedTransformers (no tokenizer): ``make(n_layers, d_model,
    d_vocab, n_ctx=32, seed=0)``."""
    def make(n_layers: int = 2, d_model: int = 16, d_vocab: int = 50, n_ctx: int = 32,
             seed: int = 0):
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, n_ctx=n_ctx, d_head=8,
                                      n_heads=d_model // 8, d_vocab=d_vocab, act_fn="gelu",
                                      normalization_type="LN", seed=seed)
        m = HookedTransformer(cfg).eval()
        m.requires_grad_(False)
        return m
    return make
