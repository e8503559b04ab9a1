"""The ``transformer_lens`` backend: a TransformerLens ``HookedTransformer`` (decoder) or
``HookedEncoder`` (encoder) behind :class:`polysae.data.backend.Backend`.

Hooks are TransformerLens's own (``model.hook_dict``); capture runs ``run_with_hooks`` with a hook
that stops the forward after the last wanted one; edits are ``run_with_hooks`` hooks returning the
replacement."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from polysae.data.backend import Backend, Edit, Recorder


def is_hooked(model: Any) -> bool:
    """True for a TransformerLens hooked model (anything with ``hook_dict`` and
    ``run_with_hooks``)."""
    return hasattr(model, "hook_dict") and hasattr(model, "run_with_hooks")


def is_encoder(model: Any) -> bool:
    from transformer_lens import HookedEncoder

    return isinstance(model, HookedEncoder)


class TLBackend(Backend):
    """A TransformerLens model; ``tokenizer`` defaults to the one attached to it."""

    name = "transformer_lens"

    def __init__(self, model: Any, tokenizer: Any = None, model_name: str | None = None):
        cfg = model.cfg
        super().__init__(model, tokenizer if tokenizer is not None else model.tokenizer,
                         kind="encoder" if is_encoder(model) else "decoder",
                         model_name=model_name or getattr(cfg, "model_name", None),
                         n_ctx=int(cfg.n_ctx), n_layers=int(cfg.n_layers))

    def hook_names(self) -> list[str]:
        return list(self.module.hook_dict)

    @property
    def W_U(self) -> torch.Tensor | None:
        return getattr(self.module, "W_U", None)

    def _mask_kwargs(self, attention_mask: torch.Tensor | None) -> dict[str, Any]:
        if attention_mask is None:
            return {}
        return {"one_zero_attention_mask" if self.kind == "encoder" else "attention_mask":
                attention_mask}

    def run_capture(self, tokens: torch.Tensor, rec: Recorder,
                    attention_mask: torch.Tensor | None) -> None:
        def fn(act, hook):
            rec.grab(hook.name, act)
            return act

        self.module.run_with_hooks(tokens, fwd_hooks=[(h, fn) for h in rec.hooks],
                                   return_type=None, **self._mask_kwargs(attention_mask))

    def logits(self, tokens: torch.Tensor, edits: Mapping[str, Edit] | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        kw = self._mask_kwargs(attention_mask)
        if not edits:
            return self.module(tokens, return_type="logits", **kw)
        hooks = [(h, lambda act, hook, fn=fn: fn(act)) for h, fn in edits.items()]
        return self.module.run_with_hooks(tokens, return_type="logits", fwd_hooks=hooks, **kw)

    def to_tokens(self, text: str, prepend_bos: bool = True) -> torch.Tensor:
        # TransformerLens's own tokenisation, so numbers stay what they were before backends.
        if getattr(self.module, "tokenizer", None) is not None and self.tokenizer is \
                self.module.tokenizer:
            return self.module.to_tokens(text, prepend_bos=prepend_bos)[0].cpu()
        return super().to_tokens(text, prepend_bos)


__all__ = ["TLBackend", "is_hooked", "is_encoder"]
