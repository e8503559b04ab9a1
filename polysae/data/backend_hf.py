"""The ``hf`` backend: a plain ``transformers`` model run with PyTorch forward hooks.

Hook names are TransformerLens's where :mod:`polysae.data.hookmap` knows the architecture
(``blocks.3.hook_resid_post``), then every named submodule (``model.layers.3.mlp``: the module's
output, the first element of a tuple). Capture registers one hook per wanted activation and raises
from the last one, so the forward stops inside the deepest hooked block; an edit is a hook that
returns the replacement (a forward hook for outputs, a forward pre-hook for inputs).
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Mapping, NamedTuple

import torch

from polysae.data.backend import Backend, BackendError, Edit, Recorder
from polysae.data.hookmap import INPUT, HookSite, n_layers_of, tl_sites


def first_input(args: tuple, kwargs: dict) -> Any:
    """A module's first input: its first positional argument, else ``hidden_states=``, else the
    first keyword argument."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(iter(kwargs.values()), None)


def replace_input(args: tuple, kwargs: dict, value: Any) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
    return args, {**kwargs, key: value}


def replace_output(out: Any, value: torch.Tensor, hook: str) -> Any:
    """``out`` with its activation (itself, or a tuple's first element) replaced by ``value``."""
    if isinstance(out, torch.Tensor):
        return value
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return (value, *out[1:])
    raise ValueError(f"hook {hook!r}: cannot edit a module output of type {type(out).__name__}")


def activation(value: Any) -> Any:
    """The activation in a module's output (the first element of a tuple)."""
    return value[0] if isinstance(value, tuple) else value


def model_kind(hf: torch.nn.Module) -> str:
    """``decoder`` for a causal LM (it has an LM head and masks attention causally),
    ``encoder`` for a BERT-like model, ``hf`` otherwise."""
    cfg = getattr(hf, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        return "hf"
    name = type(hf).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")) and (
            getattr(cfg, "is_decoder", False) or getattr(cfg, "model_type", "") not in ENCODERS):
        return "decoder"
    if getattr(cfg, "model_type", None) in ENCODERS:
        return "encoder"
    return "hf"


#: ``model_type`` of encoder-only architectures (bidirectional attention: no next-token logits).
ENCODERS = ("bert", "roberta", "distilbert", "albert", "electra", "xlm-roberta", "deberta",
            "deberta-v2", "mpnet", "camembert", "modernbert")


class EditStep(NamedTuple):
    """One hook edit as the ``hf`` and ``nnsight`` backends apply it."""

    hook: str
    """The hook being edited."""
    fn: Edit
    """The edit."""
    site: HookSite
    """Where the replacement is written."""
    base: HookSite | None = None
    """For ``hook_resid_mid``: the block input added to the attention output before ``fn``
    (see :meth:`HFBackend.edit_plan`)."""


class HFBackend(Backend):
    """A Hugging Face ``transformers`` model (``AutoModelForCausalLM`` for causal LMs,
    ``AutoModel`` for encoders) hooked with PyTorch hooks."""

    name = "hf"

    def __init__(self, hf: torch.nn.Module, tokenizer: Any = None, model_name: str | None = None,
                 kind: str | None = None):
        hf = hf.eval()
        cfg = getattr(hf, "config", None)
        n_ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        super().__init__(hf, tokenizer, kind=kind or model_kind(hf), model_name=model_name,
                         n_ctx=int(n_ctx) if n_ctx else None, n_layers=n_layers_of(cfg))
        self.hf = hf
        """The ``transformers`` model."""
        self.sites = tl_sites(hf)
        """TransformerLens-style hook name -> :class:`~polysae.data.hookmap.HookSite`."""
        self.modules_by_name = {n: m for n, m in hf.named_modules() if n}
        params = inspect.signature(hf.forward).parameters
        self._no_cache = {"use_cache": False} if "use_cache" in params else {}

    def hook_names(self) -> list[str]:
        return [*self.sites, *(n for n in self.modules_by_name if n not in self.sites)]

    def site(self, hook: str) -> HookSite:
        """Where ``hook`` lives (a raw module name is that module's output)."""
        if hook in self.sites:
            return self.sites[hook]
        if hook in self.modules_by_name:
            return HookSite(hook, "output")
        self.check_hooks([hook])  # raises, listing the valid names
        raise AssertionError(hook)

    def edit_plan(self, edits: Mapping[str, Edit]) -> list[EditStep]:
        """The steps that replace each hook of ``edits`` (direct ones first). A read-only
        ``blocks.L.hook_resid_mid`` is edited through the attention output: with x the block's
        input, the attention output a becomes ``edit(x + a) - x``, so the stream after it is
        ``edit(resid_mid)`` on both the residual branch and the norm."""
        steps = []
        for h, fn in edits.items():
            s = self.site(h)
            if s.editable:
                steps.append(EditStep(h, fn, s))
                continue
            m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_mid", h)
            pre = self.sites.get(f"blocks.{m[1]}.hook_resid_pre") if m else None
            attn = self.sites.get(f"blocks.{m[1]}.hook_attn_out") if m else None
            if pre is None or attn is None:
                raise BackendError(f"hook {h!r} can be read but not edited through the "
                                   f"{self.name} backend; use --backend transformer_lens")
            steps.append(EditStep(h, fn, attn, pre))
        return sorted(steps, key=lambda st: st.base is not None)

    def module_at(self, path: str) -> torch.nn.Module:
        return self.hf if path == "" else self.modules_by_name[path]

    @property
    def W_U(self) -> torch.Tensor | None:
        head = self.hf.get_output_embeddings() if self.kind == "decoder" else None
        w = getattr(head, "weight", None)
        return None if w is None else w.detach().T

    def forward_kwargs(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None
                       ) -> dict[str, Any]:
        kw: dict[str, Any] = {"input_ids": tokens, **self._no_cache}
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        return kw

    def run_capture(self, tokens: torch.Tensor, rec: Recorder,
                    attention_mask: torch.Tensor | None) -> None:
        handles = []
        try:
            for h in rec.hooks:
                s = self.site(h)
                mod = self.module_at(s.module)
                if s.io == INPUT:
                    handles.append(mod.register_forward_pre_hook(
                        lambda m, a, k, h=h: rec.grab(h, first_input(a, k)), with_kwargs=True))
                else:
                    handles.append(mod.register_forward_hook(
                        lambda m, i, o, h=h: rec.grab(h, activation(o))))
            self.hf(**self.forward_kwargs(tokens, attention_mask))
        finally:
            for hd in handles:
                hd.remove()

    def logits(self, tokens: torch.Tensor, edits: Mapping[str, Edit] | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.require_causal("next-token logits", "load a causal LM")
        plan = self.edit_plan(edits or {})
        handles = []
        try:
            for st in plan:  # direct edits first, so a stashed block input is the edited one
                mod = self.module_at(st.site.module)
                if st.base is not None:
                    stash: dict[str, Any] = {}
                    handles.append(self.module_at(st.base.module).register_forward_pre_hook(
                        lambda m, a, k, stash=stash: stash.update(x=first_input(a, k)),
                        with_kwargs=True))
                    handles.append(mod.register_forward_hook(
                        lambda m, i, o, st=st, stash=stash: replace_output(
                            o, st.fn(stash["x"] + activation(o)) - stash["x"], st.hook)))
                elif st.site.io == INPUT:
                    handles.append(mod.register_forward_pre_hook(
                        lambda m, a, k, fn=st.fn: replace_input(a, k, fn(first_input(a, k))),
                        with_kwargs=True))
                else:
                    handles.append(mod.register_forward_hook(
                        lambda m, i, o, st=st: replace_output(o, st.fn(activation(o)), st.hook)))
            return self.hf(**self.forward_kwargs(tokens, attention_mask)).logits
        finally:
            for hd in handles:
                hd.remove()


__all__ = ["HFBackend", "EditStep", "first_input", "replace_input", "replace_output", "activation",
           "model_kind", "ENCODERS"]
