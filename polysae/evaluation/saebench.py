"""An SAEBench-compatible view of a polysae SAE: :class:`SAEBenchSAE`.

SAEBench (``adamkarvonen/SAEBench``) evaluates any ``nn.Module`` that has ``encode(x)`` (dense
codes), ``decode(f)``, ``forward(x)``, ``W_enc`` [D, F], ``b_enc``, ``b_dec``, ``W_dec`` [F, D],
``dtype``/``device`` attributes and a SAELens-like ``cfg`` (``d_in``, ``d_sae``, ``hook_name``,
``hook_layer``, ``model_name``, ``context_size``, ``architecture``, ``dtype``, ``device``,
``prepend_bos``, ``normalize_activations``, ``hook_head_index``...).

What SAEBench sees is defined once, by :func:`polysae.formats.saelens.saebench_view`, which the
SAELens export (:func:`polysae.formats.saelens.write_saelens`) uses too, so this wrapper and the
exported folder loaded by SAELens give SAEBench the same numbers (docs/method.md, "What SAEBench
sees"): exactly the model as it computes. ``encode``/``decode``/``forward`` are the SAE's own (the
polynomial decoder included) and ``W_dec`` holds the SAE's *raw* linear atoms (``W_dec``, or
``U C1^T`` for a PolySAE), not normalised: unit rows only for an SAE trained with
``unit_norm_decoder``, and a ``UserWarning`` otherwise. Metrics that read ``W_dec`` as the
dictionary (absorption, SCR, TPP, RAVEL, the cosine-similarity parts of ``core``) therefore see
the rows at their trained norms and, for a PolySAE, only its linear term, not the pairwise and
triple atoms its ``decode`` adds (docs/sharing.md). A TopK SAE cannot fold its decoder norms into
its encoder without changing which latents win, so no normalised variant is offered here.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from polysae.formats.saelens import SAEBenchView, saebench_view
from polysae.sae import SAE

LINEAR_DECODER_METRICS = ("absorption", "scr", "tpp", "ravel", "unlearning")
"""SAEBench evals that read ``W_dec`` as the dictionary: they see the raw linear atoms (only the
linear term of a PolySAE; the paper's README flags SCR, TPP, absorption and RAVEL). Also the
result keys under which ``polysae eval`` reports such metrics, which get a warning when the rows
are not unit norm (:func:`decoder_norm_warnings`)."""

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
    """SAELens name of the eval-mode encoder (:class:`SAEBenchView`); ``poly_*`` for polynomial
    decoders (as the reference)."""
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


class SAEBenchSAE(nn.Module):
    """Wrap ``sae`` for SAEBench; see the module docstring. ``model_name``, ``hook_name``,
    ``context_size`` and ``prepend_bos`` default to what ``metadata`` (a checkpoint's provenance:
    ``model``, ``hook``, ...) records; ``hook_layer`` to the number in ``hook_name``
    (``blocks.L.*``); ``context_size`` finally to 128. Warns when the ``W_dec`` rows are not unit
    norm."""

    def __init__(self, sae: SAE, model_name: str | None = None, hook_name: str | None = None,
                 hook_layer: int | None = None, context_size: int | None = None,
                 prepend_bos: bool | None = None, metadata: dict[str, Any] | None = None):
        super().__init__()
        given = {"model": model_name, "hook": hook_name, "context_size": context_size,
                 "prepend_bos": prepend_bos}
        meta = dict(metadata or {}, **{k: v for k, v in given.items() if v is not None})
        view = saebench_view(sae, meta)
        m = view.metadata
        if not m["model_name"] or not m["hook_name"]:
            raise ValueError("SAEBenchSAE: no model/hook name given or recorded; pass "
                             "model_name= and hook_name=")
        if hook_layer is None:
            hook_layer = m["hook_layer"]
            if hook_layer is None:
                raise ValueError(f"SAEBenchSAE: cannot infer hook_layer from hook_name "
                                 f"{m['hook_name']!r}; pass hook_layer=")
        self.sae = sae
        p = sae.W_enc
        self.cfg = SAEBenchConfig(
            model_name=m["model_name"], d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae,
            hook_layer=hook_layer, hook_name=m["hook_name"],
            context_size=m["context_size"] or 128, architecture=view.architecture,
            apply_b_dec_to_input=sae.cfg.apply_b_dec_to_input, prepend_bos=m["prepend_bos"],
            dtype=str(p.dtype).removeprefix("torch."), device=str(p.device),
            dataset_path=m["dataset_path"] or "")
        self.dtype = p.dtype
        self.device = p.device
        # A buffer (not recomputed per access) so .to() moves it and SAEBench can index it.
        self.register_buffer("W_dec", view.W_dec.clone())
        if view.norm_note:
            warnings.warn(f"SAEBenchSAE: {view.norm_note}", stacklevel=2)

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
        return cls(out.sae, model, hook, metadata=out.metadata, **kwargs)

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
        """SAEBench's sanity check: every W_dec row has unit norm (True only for an SAE trained
        with ``unit_norm_decoder``; the rows are never renormalised here)."""
        norms = self.W_dec.norm(dim=-1)
        return bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-5))


def decoder_norms(sae: SAE) -> dict[str, Any]:
    """Row-norm statistics of the ``W_dec`` SAEBench sees (:func:`saebench_view`): min, max, mean,
    whether every row is unit norm, and the warning text when not (else None)."""
    v = saebench_view(sae)
    n = v.row_norms
    return {"min": float(n.min()), "max": float(n.max()), "mean": float(n.mean()),
            "unit_norm": v.unit_norm, "warning": v.norm_note}


def decoder_norm_warnings(result: dict[str, Any], saes: dict[str, SAE]) -> list[str]:
    """For ``polysae eval``: record ``saes.<name>.decoder_norms`` in ``result`` and, for every SAE
    on which a W_dec-reading metric ran (a key of :data:`LINEAR_DECODER_METRICS` in its block,
    other than ``{"skipped": why}``) and whose rows are not unit norm, add a warning to
    ``result["warnings"]``; returns the new warnings."""
    new = []
    for name, sae in saes.items():
        block = result["saes"][name]
        block["decoder_norms"] = st = decoder_norms(sae)
        ran = [k for k in LINEAR_DECODER_METRICS if k in block and not (
            isinstance(block[k], dict) and set(block[k]) == {"skipped"})]
        if ran and not st["unit_norm"]:
            new.append(f"{name}: {', '.join(ran)} ran on W_dec rows that are not unit norm. "
                       f"{st['warning']}")
    if new:
        result["warnings"] = [*result.get("warnings", []), *new]
    return new


__all__ = ["SAEBenchSAE", "SAEBenchConfig", "SAEBenchView", "saebench_view", "decoder_norms",
           "decoder_norm_warnings", "LINEAR_DECODER_METRICS", "EXACT_METRICS"]
