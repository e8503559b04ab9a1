"""Steering with pairs of SAE directions: polysae's own protocol (the paper gives no code,
method.md §3.6).

For a concept made of two words (e.g. "canada" x "oil" -> target " Keystone"):

1. **Latent per word** (:func:`word_latent`): run the model on BOS + the word, take the hook
   activation at the word's last token, encode it with the SAE, keep the most active latent.
2. **Direction**: d_i + d_j, with d the SAE's unit-norm linear decoder directions
   (``SAE.decoder_directions()``: rows of W_dec, or of U C1^T for PolySAE).
3. **Steering**: add alpha * (d_i + d_j) to the hook activation at every position except
   position 0 (BOS: an attention sink whose norm is unlike other positions); alpha is given as a
   multiple of the median activation norm at the hook over the prompts' non-BOS positions, so the
   same sweep means the same relative push for every model.
4. **Metric**: rank of the target's first token in the next-token logits after the prompt
   (1 = top). Reported: rank with no steering, with the vanilla SAE's and with the PolySAE's
   directions, per alpha; summaries per alpha are the mean log2 rank and the fraction of
   (concept, prompt) cases whose rank improves on no steering.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor


class Concept(NamedTuple):
    name: str
    word_i: str
    word_j: str
    target: str
    """Target continuation; its first token is ranked (leading space matters)."""
    prompt: str
    """A prompt written for this concept; neutral prompts are added to it."""


#: The paper's published examples (method.md §3.6); the other 22 concepts were not released.
DEFAULT_CONCEPTS = (
    Concept("canada x oil", " Canada", " oil", " Keystone",
            "The controversial cross-border pipeline project is called the"),
    Concept("surgery x trans", " surgery", " trans", " gender",
            "The procedure that helps individuals align their body with their identity is"),
    Concept("economic x times", " economic", " times", " Economist",
            "The magazine with coverage of world politics and business is The"),
    Concept("star x coffee", " star", " coffee", " Starbucks",
            "I bought a latte this morning at"),
    Concept("genetic x mod", " genetic", " mod", " modification",
            "Scientists changed the crop's DNA through genetic"),
)

#: Neutral prompts added to every concept's own prompt (our choice; the paper used 12).
NEUTRAL_PROMPTS = ("I think that the", "Yesterday we talked about", "The best thing about it is",
                   "She told me about")


def target_rank(logits: Tensor, target: int) -> int:
    """1-based rank of ``target`` in a logit vector [V] (ties count in the target's favour)."""
    return 1 + int((logits > logits[target]).sum())


def steer_ranks(model: Any, hook: str, prompts: Sequence[Tensor], target: int,
                direction: Tensor | None, alphas: Sequence[float]) -> list[list[int]]:
    """Rank of ``target`` after each prompt (1-D token tensors incl. BOS) for each absolute
    ``alpha`` with ``alpha * direction`` added at every position but 0 -> [n_prompts][n_alphas].
    ``direction=None`` gives the unsteered rank for every alpha."""
    dev = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for p in prompts:
            tok = p.to(dev)[None]
            row = []
            for a in alphas:
                if direction is None or a == 0:
                    logits = model(tok, return_type="logits")
                else:
                    add = (a * direction).to(dev)

                    def fn(act, hook, add=add):
                        act = act.clone()
                        act[:, 1:] += add.to(act.dtype)
                        return act
                    logits = model.run_with_hooks(tok, return_type="logits", fwd_hooks=[(hook, fn)])
                row.append(target_rank(logits[0, -1].float(), target))
            out.append(row)
    return out


def hook_norm(model: Any, hook: str, prompts: Sequence[Tensor]) -> float:
    """Median L2 norm of the hook activation over the prompts' non-BOS positions."""
    from polysae.models import capture

    norms = []
    with torch.inference_mode():
        for p in prompts:
            a = capture(model, p[None].to(next(model.parameters()).device), [hook])[hook]
            norms.append(a[0, 1:].float().norm(dim=-1).cpu())
    return float(torch.cat(norms).median())


def word_latent(model: Any, hook: str, sae: Any, word_tokens: Tensor) -> int:
    """The SAE latent most active at the last token of ``word_tokens`` (BOS + word)."""
    from polysae.models import capture

    with torch.inference_mode():
        a = capture(model, word_tokens[None].to(next(model.parameters()).device), [hook])[hook]
        z = sae.encode(a[0, -1:].to(sae.W_enc.dtype))
    return int(z[0].argmax())


def _tokens(model: Any, text: str, bos: bool) -> Tensor:
    return model.to_tokens(text, prepend_bos=bos)[0].cpu()


def steering_eval(model: Any, hook: str, saes: dict[str, Any],
                  concepts: Sequence[Concept] = DEFAULT_CONCEPTS,
                  neutral_prompts: Sequence[str] = NEUTRAL_PROMPTS,
                  alpha_scales: Sequence[float] = (0.25, 0.5, 1.0, 2.0)) -> dict[str, Any]:
    """Run the protocol above for every SAE in ``saes`` (name -> SAE) on a HookedTransformer with
    a tokenizer. Returns a JSON-ready dict (keys documented in docs/readme/50-eval.md)."""
    all_prompts = [_tokens(model, c.prompt, True) for c in concepts] + \
        [_tokens(model, p, True) for p in neutral_prompts]
    scale = hook_norm(model, hook, all_prompts)
    alphas = [s * scale for s in alpha_scales]
    out: dict[str, Any] = {"alpha_scales": list(alpha_scales), "hook_norm": scale,
                           "alphas": alphas, "concepts": []}
    per_sae_cases: dict[str, list[list[int]]] = {n: [] for n in saes}
    base_cases: list[int] = []
    for c in concepts:
        prompts = [_tokens(model, c.prompt, True)] + [_tokens(model, p, True)
                                                      for p in neutral_prompts]
        target = int(_tokens(model, c.target, False)[0])
        base = [r[0] for r in steer_ranks(model, hook, prompts, target, None, [0.0])]
        entry: dict[str, Any] = {"name": c.name, "target": c.target, "target_id": target,
                                 "prompts": [c.prompt, *neutral_prompts], "rank_none": base,
                                 "saes": {}}
        base_cases += base
        for name, sae in saes.items():
            li = word_latent(model, hook, sae, _tokens(model, c.word_i, True))
            lj = word_latent(model, hook, sae, _tokens(model, c.word_j, True))
            dirs = sae.decoder_directions().detach()
            d = (dirs[li] + dirs[lj]).float()
            ranks = steer_ranks(model, hook, prompts, target, d, alphas)  # [prompt][alpha]
            entry["saes"][name] = {"latents": [li, lj], "ranks": ranks}
            per_sae_cases[name] += ranks
        out["concepts"].append(entry)
    summary: dict[str, Any] = {"none": {"mean_log2_rank": _mlog(base_cases)}}
    for name, cases in per_sae_cases.items():
        per_alpha = []
        for k in range(len(alphas)):
            ranks = [c[k] for c in cases]
            per_alpha.append({"alpha_scale": alpha_scales[k], "mean_log2_rank": _mlog(ranks),
                              "frac_improved": sum(r < b for r, b in zip(ranks, base_cases))
                              / len(ranks)})
        best = min(per_alpha, key=lambda r: r["mean_log2_rank"])
        summary[name] = {"per_alpha": per_alpha, "best_alpha_scale": best["alpha_scale"],
                         "best_mean_log2_rank": best["mean_log2_rank"],
                         "best_frac_improved": best["frac_improved"]}
    out["summary"] = summary
    return out


def _mlog(ranks: Sequence[int]) -> float:
    return float(sum(math.log2(r) for r in ranks) / max(1, len(ranks)))
