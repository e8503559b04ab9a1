"""An SAEBench-compatible view of a polysae SAE: :class:`SAEBenchSAE`.

SAEBench (``adamkarvonen/SAEBench``) evaluates any ``nn.Module`` that has ``encode(x)`` (dense
codes), ``decode(f)``, ``forward(x)``, ``W_enc`` [D, F], ``b_enc``, ``b_dec``, a ``W_dec`` [F, D]
with unit-norm rows, ``dtype``/``device`` attributes and a SAELens-like ``cfg`` (``d_in``,
``d_sae``, ``hook_name``, ``hook_layer``, ``model_name``, ``context_size``, ``architecture``,
``dtype``, ``device``, ``prepend_bos``, ``normalize_activations``, ``hook_head_index``...).

``encode``/``decode``/``forward`` are the SAE's own (the polynomial decoder included), so
reconstruction metrics (``core``: MSE, CE/KL loss recovered, L0) and sparse probing (which reads
only the codes) are exact. ``W_dec`` holds the *unit-norm linear atoms* (rows of ``U C1^T``
normalised for a poly decoder, normalised ``W_dec`` rows for a linear one): metrics that read
``W_dec`` as the dictionary (absorption, SCR, TPP, RAVEL, the cosine-similarity parts of ``core``)
therefore assume a linear decoder and ignore PolySAE's pairwise and triple atoms (docs/sharing.md).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from polysae.sae import SAE

LINEAR_DECODER_METRICS = ("absorption", "scr", "tpp", "ravel", "unlearning")
"""SAEBench evals that read ``W_dec`` as the dictionary: for a PolySAE they see only the
normalised linear atoms (the paper's README flags SCR, TPP, absorption and RAVEL)."""

EXACT_METRICS = ("core", "sparse_probing", "autointerp")
"""SAEBench evals that only call ``encode``/``decode``/``forward`` (exact for any decoder)."""


@dataclass
class SAEBenchConfig:
    """The ``cfg`` fields SAEBench reads (SAELens names)."""

    model_name: str
    """transformer-lens name of the model."""
    d_in: int
    """Input width."""
    d_sae: int
    """Number of latents."""
    hook_layer: int
    """Layer index of the hook (SAEBench runs the model up to here)."""
    hook_name: str
    """transformer-lens hook name."""
    context_size: int = 128
    """Tokens per prompt SAEBench uses."""
    hook_head_index: int | None = None
    """Per-head hooks are not used."""
    architecture: str = "topk"
    """SAELens architecture name; ``poly_*`` for polynomial decoders (as the reference)."""
    apply_b_dec_to_input: bool = True
    """Whether encode subtracts b_dec first."""
    finetuning_scaling_factor: bool = False
    """SAELens legacy field, always False."""
    activation_fn_str: str = "relu"
    """SAELens legacy field."""
    prepend_bos: bool = True
    """Whether prompts get a BOS token."""
    normalize_activations: str = "none"
    """No activation normalisation (the weights are used as they are)."""
    dtype: str = "float32"
    """Parameter dtype name."""
    device: str = "cpu"
    """Device name."""
    dataset_path: str = ""
    """Training dataset, if known."""
    dataset_trust_remote_code: bool = True
    """SAEBench passes this through to datasets."""
    seqpos_slice: tuple[int | None, ...] = (None,)
    """Token positions the SAE was trained on (all)."""
    training_tokens: int = -100_000
    """Unknown (SAEBench's placeholder)."""
    sae_lens_training_version: str | None = None
    """Not trained with SAELens."""
    neuronpedia_id: str | None = None
    """No Neuronpedia id."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _architecture(sae: SAE) -> str:
    sp = {"relu": "standard", "topk": "topk", "batchtopk": "batchtopk", "jumprelu": "jumprelu",
          "matryoshka": "matryoshka_batchtopk"}[sae.cfg.sparsifier]
    return f"poly_{sp}" if sae.cfg.decoder == "poly" else sp


class SAEBenchSAE(nn.Module):
    """Wrap ``sae`` for SAEBench; see the module docstring. ``hook_layer`` defaults to the
    number in ``hook_name`` (``blocks.L.*``)."""

    def __init__(self, sae: SAE, model_name: str, hook_name: str, hook_layer: int | None = None,
                 context_size: int = 128, prepend_bos: bool = True):
        super().__init__()
        if hook_layer is None:
            m = re.search(r"(?:blocks|layers)\.(\d+)\.", hook_name)
            if m is None:
                raise ValueError(f"SAEBenchSAE: cannot infer hook_layer from hook_name "
                                 f"{hook_name!r}; pass hook_layer=")
            hook_layer = int(m.group(1))
        self.sae = sae
        p = sae.W_enc
        self.cfg = SAEBenchConfig(
            model_name=model_name, d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, hook_layer=hook_layer,
            hook_name=hook_name, context_size=context_size, architecture=_architecture(sae),
            apply_b_dec_to_input=sae.cfg.apply_b_dec_to_input, prepend_bos=prepend_bos,
            dtype=str(p.dtype).removeprefix("torch."), device=str(p.device))
        self.dtype = p.dtype
        self.device = p.device
        # A buffer (not recomputed per access) so .to() moves it and SAEBench can index it.
        self.register_buffer("W_dec", sae.decoder_directions().detach().clone())

    @classmethod
    def from_source(cls, source: str, device: str | torch.device | None = None,
                    **kwargs: Any) -> SAEBenchSAE:
        """Load any :func:`polysae.load` source; model/hook default to what the source records."""
        from polysae.loader import load_with_metadata

        out = load_with_metadata(source, device)
        model = kwargs.pop("model_name", None) or out.metadata.get("model")
        hook = kwargs.pop("hook_name", None) or out.metadata.get("hook")
        if not model or not hook:
            raise ValueError(f"{source}: the checkpoint records no model/hook; pass model_name= "
                             "and hook_name=")
        return cls(out.sae, model, hook, **kwargs)

    # parameters SAEBench reads directly
    @property
    def W_enc(self) -> Tensor:
        return self.sae.W_enc

    @property
    def b_enc(self) -> Tensor:
        return self.sae.b_enc

    @property
    def b_dec(self) -> Tensor:
        return self.sae.b_dec

    def encode(self, x: Tensor) -> Tensor:
        """[..., D] -> dense codes [..., F]."""
        return self.sae.encode(x.to(self.sae.W_enc.dtype))

    def decode(self, feature_acts: Tensor) -> Tensor:
        """Dense codes [..., F] -> [..., D] through the SAE's own (possibly polynomial) decoder."""
        return self.sae.decode(feature_acts.to(self.sae.W_enc.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def to(self, *args: Any, **kwargs: Any) -> SAEBenchSAE:
        out = super().to(*args, **kwargs)
        p = self.sae.W_enc
        self.dtype, self.device = p.dtype, p.device
        self.cfg.dtype, self.cfg.device = str(p.dtype).removeprefix("torch."), str(p.device)
        return out

    @torch.no_grad()
    def check_decoder_norms(self) -> bool:
        """SAEBench's sanity check: every W_dec row has unit norm."""
        norms = self.W_dec.norm(dim=-1)
        return bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-5))


__all__ = ["SAEBenchSAE", "SAEBenchConfig", "LINEAR_DECODER_METRICS", "EXACT_METRICS"]
