"""TransformerLens hook names on plain Hugging Face models: which module input or output each
name is, per architecture.

The ``hf`` and ``nnsight`` backends (:mod:`polysae.data.backend_hf`,
:mod:`polysae.data.backend_nnsight`) accept the hook names TransformerLens gives the same model
(``blocks.3.hook_resid_post``), so a harvest, an SAE checkpoint or an eval command reads the same
whichever backend ran it. A name is a :class:`HookSite`: the input or the output of one named
submodule (the first element when the module returns a tuple, as attention modules do). The
activations equal TransformerLens's *unprocessed* model (no LayerNorm folding, no centring), the
way polysae loads every TransformerLens model.

Architectures with a full table (:data:`LAYOUTS`, by ``config.model_type``):

- Llama family (llama, mistral, qwen2, qwen3: pre-norm, sequential attention then MLP)::

      blocks.L.hook_resid_pre    input of  model.layers.L
      blocks.L.attn.hook_z       input of  model.layers.L.self_attn.o_proj  [B, T, heads*d_head]
      blocks.L.hook_attn_out     output of model.layers.L.self_attn (first element)
      blocks.L.hook_resid_mid    input of  model.layers.L.post_attention_layernorm
      blocks.L.mlp.hook_post     input of  model.layers.L.mlp.down_proj
      blocks.L.hook_mlp_out      output of model.layers.L.mlp
      blocks.L.hook_resid_post   output of model.layers.L
      hook_embed                 output of model.embed_tokens

- GPT-2 (``transformer.h.L``, ``attn``/``attn.c_proj``, ``ln_2``, ``mlp``/``mlp.c_proj``,
  ``transformer.wte`` / ``transformer.wpe`` for ``hook_embed`` / ``hook_pos_embed``);
- GPT-NeoX / Pythia (``gpt_neox.layers.L``, ``attention``/``attention.dense``,
  ``mlp``/``mlp.dense_4h_to_h``; no ``hook_resid_mid``: attention and MLP run in parallel);
- BERT (post-LayerNorm, TransformerLens's ``HookedEncoder`` names: ``hook_resid_post`` is the sum
  before the block's second LayerNorm, ``hook_normalized_resid_post`` the block's output).

Any other model whose blocks sit in a ``ModuleList`` of ``num_hidden_layers`` entries gets
``blocks.L.hook_resid_pre`` / ``blocks.L.hook_resid_post`` (the block's input and output), and
every model accepts its raw module names (``model.layers.3.mlp.act_fn``: the module's output).

``hook_resid_mid`` of the Llama family and GPT-2 is read as the input of the block's second norm,
which the residual branch bypasses, so it is marked not ``editable`` there: the backends edit it
through the attention output instead (:meth:`polysae.data.backend_hf.HFBackend.edit_plan`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

INPUT, OUTPUT = "input", "output"


class HookSite(NamedTuple):
    """Where a hook's activation lives in a Hugging Face model."""

    module: str
    """Dotted module name (``model.layers.3.mlp``; ``""`` is the root module)."""
    io: str
    """``"input"`` (the module's first argument) or ``"output"`` (its return value, the first
    element of a tuple)."""
    editable: bool = True
    """False where replacing the value would not replace the activation: a pre-norm block's
    ``hook_resid_mid`` is read as the input of its second norm, but the residual branch keeps
    its own copy of it, so writing there would reach the MLP only."""


class Layout(NamedTuple):
    """An architecture's hook table."""

    layers: str
    """The ``ModuleList`` of blocks, relative to the causal-LM class (``model.layers``)."""
    block: dict[str, tuple[str, str]]
    """TransformerLens hook suffix -> (child of a block, ``input``/``output``), in forward order;
    child ``""`` is the block itself."""
    top: dict[str, tuple[str, str]]
    """Hooks outside the blocks -> (module, ``input``/``output``)."""
    read_only: tuple[str, ...] = ()
    """Block hook suffixes whose site cannot be written directly (:attr:`HookSite.editable`)."""


_RESID = {"hook_resid_pre": ("", INPUT), "hook_resid_post": ("", OUTPUT)}

LLAMA = Layout("model.layers", {
    "hook_resid_pre": ("", INPUT),
    "attn.hook_z": ("self_attn.o_proj", INPUT),
    "hook_attn_out": ("self_attn", OUTPUT),
    "hook_resid_mid": ("post_attention_layernorm", INPUT),
    "mlp.hook_post": ("mlp.down_proj", INPUT),
    "hook_mlp_out": ("mlp", OUTPUT),
    "hook_resid_post": ("", OUTPUT)}, {"hook_embed": ("model.embed_tokens", OUTPUT)},
    ("hook_resid_mid",))

GPT2 = Layout("transformer.h", {
    "hook_resid_pre": ("", INPUT),
    "attn.hook_z": ("attn.c_proj", INPUT),
    "hook_attn_out": ("attn", OUTPUT),
    "hook_resid_mid": ("ln_2", INPUT),
    "mlp.hook_post": ("mlp.c_proj", INPUT),
    "hook_mlp_out": ("mlp", OUTPUT),
    "hook_resid_post": ("", OUTPUT)},
    {"hook_embed": ("transformer.wte", OUTPUT), "hook_pos_embed": ("transformer.wpe", OUTPUT)},
    ("hook_resid_mid",))

NEOX = Layout("gpt_neox.layers", {
    "hook_resid_pre": ("", INPUT),
    "attn.hook_z": ("attention.dense", INPUT),
    "hook_attn_out": ("attention", OUTPUT),
    "mlp.hook_post": ("mlp.dense_4h_to_h", INPUT),
    "hook_mlp_out": ("mlp", OUTPUT),
    "hook_resid_post": ("", OUTPUT)}, {"hook_embed": ("gpt_neox.embed_in", OUTPUT)})

BERT = Layout("encoder.layer", {
    "hook_resid_pre": ("", INPUT),
    "hook_attn_out": ("attention.output.dense", OUTPUT),
    "hook_resid_mid": ("attention.output.LayerNorm", INPUT),
    "mlp.hook_post": ("output.dense", INPUT),
    "hook_mlp_out": ("output.dense", OUTPUT),
    "hook_resid_post": ("output.LayerNorm", INPUT),
    "hook_normalized_resid_post": ("", OUTPUT)}, {})

#: ``config.model_type`` -> its hook table.
LAYOUTS = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "gpt2": GPT2,
           "gpt_neox": NEOX, "bert": BERT}

#: Names of a block list in architectures without a table (searched in this order).
BLOCK_LISTS = ("layers", "h", "layer", "blocks")


def _resolve(path: str, names: set[str], prefix: str) -> str | None:
    """``path`` as it is named in this model: as given, without its first component (a base
    model, e.g. ``LlamaModel`` holds ``layers`` not ``model.layers``), or under the base-model
    prefix (``BertForMaskedLM`` holds ``bert.encoder.layer``)."""
    cands = [path, path.split(".", 1)[1] if "." in path else None,
             f"{prefix}.{path}" if prefix else None]
    return next((c for c in cands if c is not None and c in names), None)


def n_layers_of(config: Any) -> int | None:
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(config, attr, None)
        if isinstance(v, int):
            return v
    return None


def tl_sites(model: Any) -> dict[str, HookSite]:
    """TransformerLens-style hook names of a Hugging Face ``model`` -> :class:`HookSite`, in
    forward order (see the module docstring); ``{}`` when no block list is found."""
    import torch

    mods = dict(model.named_modules())
    names = set(mods)
    cfg = getattr(model, "config", None)
    prefix = getattr(model, "base_model_prefix", "") or ""
    n = n_layers_of(cfg)
    layout = LAYOUTS.get(getattr(cfg, "model_type", None))
    layers = _resolve(layout.layers, names, prefix) if layout else None
    if layers is None:  # unknown architecture: the block list's input and output only
        layout = None
        lists = [k for k, m in mods.items() if isinstance(m, torch.nn.ModuleList)
                 and k.rsplit(".", 1)[-1] in BLOCK_LISTS and (n is None or len(m) == n)]
        lists.sort(key=lambda k: (BLOCK_LISTS.index(k.rsplit(".", 1)[-1]), k.count(".")))
        if not lists:
            return {}
        layers = lists[0]
    out: dict[str, HookSite] = {}
    block = layout.block if layout else _RESID
    for name, (path, io) in (layout.top.items() if layout else ()):
        found = _resolve(path, names, prefix)
        if found is not None:
            out[name] = HookSite(found, io)
    for i in range(len(mods[layers])):
        for suffix, (child, io) in block.items():
            path = f"{layers}.{i}" + (f".{child}" if child else "")
            if path in names:
                out[f"blocks.{i}.{suffix}"] = HookSite(
                    path, io, suffix not in (layout.read_only if layout else ()))
    return out


__all__ = ["HookSite", "Layout", "LAYOUTS", "tl_sites", "n_layers_of", "INPUT", "OUTPUT"]
