"""Checkpoint formats other tools use: detection, converters into polysae, writers out of it.

Layouts read (``detect_format`` looks only at file names and ``cfg.json``'s keys):

- ``polysae``: ``config.json`` + ``sae.safetensors`` (polysae's own;
  :func:`polysae.sae.load_checkpoint`).
- ``saelens``: ``cfg.json`` + ``sae_weights.safetensors`` with ``architecture`` in standard / topk /
  batchtopk / jumprelu (SAELens 3-6, old top-level ``hook_name`` or new ``metadata`` block).
  Tensors ``W_enc`` [D, F], ``b_enc`` [F], ``W_dec`` [F, D], ``b_dec`` [D], ``threshold`` [F]
  (jumprelu), ``topk_threshold`` scalar (batchtopk training checkpoints).
- ``polysae-ref``: the reference PolySAE code (a SAELens fork): the SAELens layout with
  ``architecture`` poly_topk / poly_batchtopk / poly_jumprelu / poly_matryoshka, fields
  ``poly_rank`` / ``poly_ranks`` / ``poly_order`` / ``shared_u``, tensors ``U_shared`` (shared) or
  ``U1``/``U2``/``U3`` (separate), ``C1``..``C3``, ``lambda2``, ``lambda3`` and an unused ``W_dec``.
  In shared mode the reference also stores zero placeholder buffers ``U1``..``U3`` (and zero
  ``C_k``, ``lambda_k`` above ``poly_order``); they are ignored here.
- ``sparsify``: EleutherAI sparsify, ``cfg.json`` + ``sae.safetensors`` with ``encoder.weight``
  [F, D], ``encoder.bias``, ``W_dec`` [F, D], ``b_dec``; TopK on ReLU'd pre-activations.
- ``gemmascope``: Gemma Scope ``params.npz`` (``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``,
  ``threshold``), JumpReLU, no input-side ``b_dec`` subtraction; read with ``allow_pickle=False``.

Writers: :func:`write_saelens` (linear decoders), :func:`write_reference` (poly decoders) and
:func:`write_sparsify` (linear TopK SAEs, the layout ``sparsify.Sae.load_from_disk`` reads), all
atomic (weights first via temp name + fsync + rename, the config last), so an interrupted export
never leaves a folder a tool would take for complete. A folder holding another layout's checkpoint
is refused rather than mixed with a second one.

Modules: :mod:`.dispatch` (detection, :func:`read_checkpoint`, :func:`export`), one per layout
(:mod:`.saelens`, :mod:`.reference`, :mod:`.sparsify`, :mod:`.gemmascope`; polysae's own layout is
:mod:`polysae.sae`), :mod:`.files` (JSON / safetensors reading and the atomic weights writer),
:mod:`.roundtrip` (polysae's config carried inside other layouts) and :mod:`.neuronpedia` (feature
dashboards for Neuronpedia, built from an activation store; not re-exported here, so reading a
checkpoint never imports the browser's statistics).

Every import maps the source's equations onto an *exactly* equivalent polysae config: e.g. SAELens
JumpReLU ``relu(pre) * (pre > t)`` equals polysae's ``pre * (pre > max(t, 0))``, so thresholds are
clamped at 0 on import. Features polysae cannot express exactly (activation normalisation computed
at run time, decoder-norm rescaling in an unfolded training checkpoint, sparsify skip connections or
transcoders, gated SAEs) raise a ``ValueError`` naming the file and field instead of loading
something subtly different.
"""

from __future__ import annotations

from polysae.formats.dispatch import (
    EXPORT_FORMATS,
    FORMATS,
    LAYOUT_FILES,
    ImportedSAE,
    detect_format,
    export,
    read_checkpoint,
)
from polysae.formats.reference import write_reference
from polysae.formats.saelens import REFERENCE_ARCHS, SAELENS_ARCHS, write_saelens
from polysae.formats.sparsify import (
    SPARSIFY_CFG_KEYS,
    sparsify_hook,
    sparsify_hookpoint,
    write_sparsify,
)

__all__ = ["FORMATS", "EXPORT_FORMATS", "LAYOUT_FILES", "SPARSIFY_CFG_KEYS", "SAELENS_ARCHS",
           "REFERENCE_ARCHS", "ImportedSAE", "detect_format", "read_checkpoint", "write_saelens",
           "write_reference", "write_sparsify", "sparsify_hook", "sparsify_hookpoint", "export"]
