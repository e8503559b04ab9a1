"""The backend contract: how polysae runs a language model, whatever library runs it.

Every stage that touches a model (harvest, live held-out activations, CE/KL recovered, probing,
steering, the browser's unembedding) goes through one :class:`Backend`:

- ``capture(tokens, hooks)``: one forward recording the activations at named hooks, stopped as
  soon as the last of them has fired (the rest of the model and the LM head never run);
- ``logits(tokens, edits)``: the model's logits with the activation at some hooks *replaced* by
  ``edit(activation)`` (the splice behind CE/KL recovered, the addition behind steering);
- ``hook_names()`` / ``check_hooks(hooks)``: what ``--hooks`` accepts, and a clear error listing
  it; ``tokenizer``, ``to_tokens``, ``W_U``, ``device``, ``n_ctx``, ``n_layers``, ``kind``.

Three implementations, picked by ``--backend``:

- ``transformer_lens`` (:mod:`polysae.data.backend_tl`, the default): a TransformerLens
  ``HookedTransformer`` / ``HookedEncoder``;
- ``hf`` (:mod:`polysae.data.backend_hf`): a plain ``transformers`` model with forward hooks;
- ``nnsight`` (:mod:`polysae.data.backend_nnsight`): the same model traced by nnsight 0.8
  (``pip install 'polysae[nnsight]'``).

All three accept TransformerLens hook names (:mod:`polysae.data.hookmap` maps them onto the
Hugging Face modules) and give the same numbers within float32 noise. ``kind`` is ``"decoder"``
(a causal LM: CE/KL and steering work), ``"encoder"`` (BERT-like: harvest and probing only) or
``"hf"`` (a model of unknown shape, hooked by module name).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

import torch

#: The ``--backend`` choices; the first is the default.
BACKENDS = ("transformer_lens", "hf", "nnsight")

#: Package each backend needs and the install line that provides it.
REQUIREMENTS = {"transformer_lens": ("transformer_lens", "pip install polysae"),
                "hf": ("transformers", "pip install polysae"),
                "nnsight": ("nnsight", "pip install 'polysae[nnsight]'")}

Edit = Callable[[torch.Tensor], torch.Tensor]
"""A hook edit: the activation as the hook sees it -> its replacement (same shape)."""


class BackendError(ValueError):
    """A backend that cannot run here or cannot do what was asked; the message names the flag,
    the package to install or the model."""


def check_backend(name: str) -> str:
    """``name`` if it is a known backend, else a :class:`BackendError` listing them."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} (--backend): choose from "
                           f"{', '.join(BACKENDS)}")
    return name


def require(name: str) -> Any:
    """Import and return the package backend ``name`` runs on; a missing package is a
    :class:`BackendError` naming the install command (``pip install 'polysae[nnsight]'``)."""
    package, install = REQUIREMENTS[check_backend(name)]
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise BackendError(f"--backend {name} needs the {package} package, which is not "
                           f"installed here ({e}); install it with `{install}`") from None


class StopForward(Exception):
    """Raised by the last wanted hook so the rest of the forward never runs."""


class Recorder:
    """Collects hook activations during one forward and stops it once all have fired.

    ``grab(name, act)`` checks that ``act`` is per position ([batch, pos, ...]), flattens the
    trailing dimensions (``hook_z`` [B, T, H, dh] -> [B, T, H*dh]) and raises
    :class:`StopForward` when the last wanted hook is in (with ``stop_early``)."""

    def __init__(self, hooks: list[str], shape: tuple[int, int], stop_early: bool):
        self.want, self.shape, self.stop_early = set(hooks), tuple(shape), stop_early
        self.hooks = list(hooks)
        self.out: dict[str, torch.Tensor] = {}

    def grab(self, name: str, act: Any) -> None:
        if isinstance(act, tuple):
            act = act[0]
        B, T = self.shape
        if isinstance(act, torch.Tensor) and act.dim() >= 3 and act.shape[0] == 1 and B > 1:
            act = act.expand(B, *act.shape[1:])  # shared over the batch (GPT-2's positions)
        if not isinstance(act, torch.Tensor) or act.dim() < 3 or tuple(act.shape[:2]) != (B, T):
            shape = tuple(act.shape) if isinstance(act, torch.Tensor) else type(act).__name__
            raise ValueError(f"hook {name!r} gives {shape}, not [batch={B}, pos={T}, ...]; only "
                             f"per-position activations can be harvested")
        self.out[name] = act.reshape(B, T, -1)
        if self.stop_early and self.want.issubset(self.out):
            raise StopForward

    def done(self) -> dict[str, torch.Tensor]:
        missing = self.want.difference(self.out)
        if missing:
            raise ValueError(f"hook(s) {sorted(missing)} never fired during the forward pass")
        return {h: self.out[h] for h in self.hooks}


class Backend:
    """A language model behind polysae's one interface (see the module docstring). Subclasses
    implement :meth:`hook_names`, :meth:`run_capture` and :meth:`logits`."""

    name = ""
    """The ``--backend`` value."""

    def __init__(self, module: torch.nn.Module, tokenizer: Any = None, *, kind: str = "decoder",
                 model_name: str | None = None, n_ctx: int | None = None,
                 n_layers: int | None = None):
        self.module = module
        """The ``torch.nn.Module`` that holds the weights."""
        self.tokenizer = tokenizer
        """A Hugging Face tokenizer, or None (feed token ids)."""
        self.kind = kind
        """``"decoder"``, ``"encoder"`` or ``"hf"`` (see the module docstring)."""
        self.model_name = model_name
        """The name the model was loaded by."""
        self.n_ctx = n_ctx
        """Longest context in tokens (None: unknown)."""
        self.n_layers = n_layers
        """Number of blocks (None: unknown)."""

    # -- to implement --------------------------------------------------------------------------
    def hook_names(self) -> list[str]:
        raise NotImplementedError

    def run_capture(self, tokens: torch.Tensor, rec: Recorder,
                    attention_mask: torch.Tensor | None) -> None:
        """Run the forward feeding every wanted activation to ``rec.grab``; may stop early by
        letting :class:`StopForward` end the forward."""
        raise NotImplementedError

    def logits(self, tokens: torch.Tensor, edits: Mapping[str, Edit] | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, pos, vocab] of ``tokens`` with each hook of ``edits`` replaced by
        ``edit(activation)``."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------
    @property
    def causal(self) -> bool:
        """True for a causal LM (next-token logits: CE/KL recovered and steering work)."""
        return self.kind == "decoder"

    def parameters(self):
        return self.module.parameters()

    @property
    def device(self) -> torch.device:
        p = next(self.module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def W_U(self) -> torch.Tensor | None:
        """Unembedding [d_model, vocab] (None when the model has no LM head)."""
        return None

    def check_hooks(self, hooks: list[str]) -> None:
        """Raise ``ValueError`` naming the unknown hooks and listing real ones."""
        if not hooks:
            raise ValueError("no hooks given")
        real = self.hook_names()
        known = set(real)
        bad = [h for h in hooks if h not in known]
        if bad:
            # Suggest names sharing the unknown name's suffix (e.g. hook_resid_post) first.
            tail = {h.rsplit(".", 1)[-1] for h in bad}
            near = [h for h in real if h.rsplit(".", 1)[-1] in tail][:12]
            shown = near or real[:40]
            model = self.model_name or "..."
            raise ValueError(f"unknown hook(s) {bad} for the {self.name} backend; this model has "
                             f"{len(real)} hooks, e.g. {', '.join(shown)} (run `polysae hooks "
                             f"--model {model} --backend {self.name}` for all)")

    def capture(self, tokens: torch.Tensor, hooks: list[str],
                attention_mask: torch.Tensor | None = None, stop_early: bool = True
                ) -> dict[str, torch.Tensor]:
        """One forward of ``tokens`` [B, T] recording ``hooks`` -> ``{hook: [B, T, d]}``,
        stopped after the last of them with ``stop_early``. Callers wrap it in inference mode."""
        rec = Recorder(list(hooks), tokens.shape, stop_early)
        try:
            self.run_capture(tokens, rec, attention_mask)
        except StopForward:
            pass
        return rec.done()

    def hook_width(self, hook: str) -> int:
        """Width of a hook's (flattened) activation, from a two-token probe forward."""
        tok = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            return int(self.capture(tok, [hook])[hook].shape[-1])

    def to_tokens(self, text: str, prepend_bos: bool = True) -> torch.Tensor:
        """1-D token ids of ``text`` (the tokenizer's BOS first with ``prepend_bos``), on CPU."""
        return text_tokens(self.tokenizer, text, prepend_bos)

    def require_causal(self, what: str, fix: str) -> None:
        """A :class:`BackendError` unless the model is a causal LM: ``what`` needs it, ``fix``
        says what to do instead."""
        if not self.causal:
            kind = ("encoder-only" if self.kind == "encoder"
                    else f"not a causal LM (kind {self.kind!r})")
            raise BackendError(f"{what} needs a causal language model's next-token logits, but "
                               f"{self.model_name or 'the model'} is {kind}; {fix}")


def text_tokens(tokenizer: Any, text: str, prepend_bos: bool = True) -> torch.Tensor:
    """``text`` -> 1-D int64 ids without the tokenizer's own special tokens, BOS prepended with
    ``prepend_bos`` (what TransformerLens's ``to_tokens`` gives)."""
    if tokenizer is None:
        raise BackendError("the model has no tokenizer: text cannot be turned into tokens")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos and bos is not None:
        ids = [int(bos), *ids]
    return torch.tensor(ids, dtype=torch.long)


__all__ = ["BACKENDS", "Backend", "BackendError", "Edit", "Recorder", "StopForward",
           "check_backend", "require", "text_tokens"]
