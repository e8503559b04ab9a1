"""The ``nnsight`` backend: a ``transformers`` model traced by nnsight 0.8.

The model is wrapped in ``nnsight.NNsight`` and every capture or edit is one ``model.trace``
block: activations are read as ``envoy.output`` / ``envoy.input`` of the module each hook names
(the same :class:`~polysae.data.hookmap.HookSite` table as the ``hf`` backend), edits assign the
replacement back, and a capture ends with ``tracer.stop()`` so nothing after the deepest hook runs.
nnsight serves a trace's reads in the order the model reaches them, so hooks are visited in the
model's own module order (measured once with a two-token probe forward).

nnsight is an optional extra, imported only when this backend is used
(``pip install 'polysae[nnsight]'``).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Mapping

import torch

from polysae.data.backend import Edit, Recorder, require
from polysae.data.backend_hf import HFBackend, activation, replace_output
from polysae.data.hookmap import INPUT, OUTPUT, HookSite


class NNsightBackend(HFBackend):
    """A Hugging Face model driven through ``nnsight.NNsight`` traces."""

    name = "nnsight"

    def __init__(self, hf: torch.nn.Module, tokenizer: Any = None, model_name: str | None = None,
                 kind: str | None = None):
        nnsight = require("nnsight")
        super().__init__(hf, tokenizer, model_name, kind)
        with warnings.catch_warnings():  # "submodule named 'output' is '.E_output' here"
            warnings.simplefilter("ignore")
            self.envoy = nnsight.NNsight(self.hf)
        """The nnsight root envoy wrapping :attr:`hf`."""
        self.event_order: dict[tuple[str, str], int] | None = None
        """Position of every (module, input/output) event in one forward (lazily measured)."""

    def envoy_at(self, path: str) -> Any:
        """The envoy of module ``path``. nnsight files a submodule named like one of its own
        attributes (BERT's ``output``) under ``E_<name>``, so the path is walked part by part."""
        env = self.envoy
        for part in path.split(".") if path else ():
            if not part.startswith("_") and inspect.isdatadescriptor(
                    getattr(type(env), part, None)):
                part = env.OVERLOAD_PREFIX + part
            env = getattr(env, part)
        return env

    def measure_order(self) -> dict[tuple[str, str], int]:
        """The order in which a forward reaches each module's input and output."""
        if self.event_order is None:
            events: list[tuple[str, str]] = []
            handles = []
            for name, mod in [("", self.hf), *self.modules_by_name.items()]:
                handles.append(mod.register_forward_pre_hook(
                    lambda m, a, name=name: events.append((name, INPUT))))
                handles.append(mod.register_forward_hook(
                    lambda m, i, o, name=name: events.append((name, OUTPUT))))
            try:
                probe = torch.zeros(1, 2, dtype=torch.long, device=self.device)
                with torch.inference_mode():
                    self.hf(**self.forward_kwargs(probe, None))
            finally:
                for hd in handles:
                    hd.remove()
            order: dict[tuple[str, str], int] = {}
            for k, e in enumerate(events):
                order.setdefault(e, k)  # a module called twice counts at its first call
            self.event_order = order
        return self.event_order

    def ordered_sites(self, hooks: list[str]) -> list[HookSite]:
        """The distinct sites of ``hooks`` in forward order."""
        return self.ordered_sites_of([self.site(h) for h in hooks])

    def ordered_sites_of(self, sites: list[HookSite]) -> list[HookSite]:
        """Distinct ``sites`` in the order a forward reaches them."""
        sites = list({s[:2]: s for s in sites}.values())
        if len(sites) > 1:
            order = self.measure_order()
            missing = [s.module for s in sites if s[:2] not in order]
            if missing:
                raise ValueError(f"module(s) {missing} never run in a forward of "
                                 f"{self.model_name or 'the model'}")
            sites.sort(key=lambda s: order[s[:2]])
        return sites

    def run_capture(self, tokens: torch.Tensor, rec: Recorder,
                    attention_mask: torch.Tensor | None) -> None:
        sites = self.ordered_sites(rec.hooks)
        targets = [(self.envoy_at(s.module), s.io) for s in sites]
        got: list[Any] = []
        with self.envoy.trace(**self.forward_kwargs(tokens, attention_mask)) as tracer:
            for env, io in targets:
                got.append(env.input if io == INPUT else env.output)
            if rec.stop_early:
                tracer.stop()
        values = {s[:2]: activation(v) for s, v in zip(sites, got)}
        for h in rec.hooks:
            rec.grab(h, values[self.site(h)[:2]])

    def logits(self, tokens: torch.Tensor, edits: Mapping[str, Edit] | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.require_causal("next-token logits", "load a causal LM")
        nns = require("nnsight")
        plan = self.edit_plan(edits or {})
        used = {s[:2]: s for st in plan for s in (st.site, st.base) if s is not None}
        sites = self.ordered_sites_of(list(used.values()))
        # (envoy, io, steps writing here, whether a later step needs this block input)
        ops = [(self.envoy_at(s.module), s.io, [st for st in plan if st.site[:2] == s[:2]],
                any(st.base is not None and st.base[:2] == s[:2] for st in plan))
               for s in sites]
        stash: dict[str, Any] = {}
        with self.envoy.trace(**self.forward_kwargs(tokens, attention_mask)):
            for env, io, steps, is_base in ops:
                if io == INPUT:
                    x = env.input
                    for st in steps:
                        x = st.fn(x)
                    if steps:
                        env.input = x
                    if is_base:
                        stash["x"] = x
                else:
                    out = env.output
                    x = activation(out)
                    for st in steps:
                        x = st.fn(x) if st.base is None else st.fn(stash["x"] + x) - stash["x"]
                    env.output = replace_output(out, x, steps[0].hook)
            result = nns.save(self.envoy.output)
        return result.logits


__all__ = ["NNsightBackend"]
