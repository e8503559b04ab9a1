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

import json
import math
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

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


def load_concepts(path: str | Path) -> tuple[Concept, ...]:
    """Steering concepts from a ``.jsonl`` file, one object per line with the :class:`Concept`
    fields ``name``, ``word_i``, ``word_j``, ``target`` and ``prompt`` (leading spaces matter:
    ``"word_i": " Canada"``, ``"target": " Keystone"``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"steering concepts file {p} not found")
    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: line {n} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{p}: line {n} is not a JSON object")
            missing = [k for k in Concept._fields if not isinstance(row.get(k), str)
                       or not row[k].strip()]
            if missing:
                raise ValueError(f"{p}: line {n} lacks the non-empty string field(s) {missing} "
                                 f"(needs {list(Concept._fields)})")
            out.append(Concept(*(row[k] for k in Concept._fields)))
    if not out:
        raise ValueError(f"{p}: no steering concepts")
    return tuple(out)


def target_rank(logits: Tensor, target: int) -> int:
    """1-based rank of ``target`` in a logit vector [V] (ties count in the target's favour)."""
    return 1 + int((logits > logits[target]).sum())


def _pad(prompts: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D token tensors -> tokens [n, T] and last-real-position index [n]. A causal
    model never lets padding affect earlier positions, so padded rows give exact results."""
    T = max(len(p) for p in prompts)
    tok = torch.zeros(len(prompts), T, dtype=torch.long)
    for r, p in enumerate(prompts):
        tok[r, :len(p)] = p
    return tok, torch.tensor([len(p) - 1 for p in prompts])


def ranks_for_additions(model: Any, hook: str, prompts: Sequence[Tensor], target: int,
                        additions: Sequence[Tensor | None], *, max_rows: int = 64
                        ) -> list[list[int]]:
    """Rank of ``target`` after each prompt with each vector of ``additions`` (None: nothing)
    added at every position but 0 -> [n_additions][n_prompts].

    All (addition, prompt) rows go through the model together, ``max_rows`` per forward: on CPU a
    forward's cost is dominated by streaming the weights, not by the number of rows.
    """
    dev = next(model.parameters()).device
    tok1, last1 = _pad(prompts)
    n_p = len(prompts)
    d_model = None
    for a in additions:
        if a is not None:
            d_model = a.shape[-1]
    rows_tok = tok1.repeat(len(additions), 1)
    rows_last = last1.repeat(len(additions))
    ranks: list[int] = []
    with torch.inference_mode():
        for s in range(0, rows_tok.shape[0], max_rows):
            sl = slice(s, s + max_rows)
            tok = rows_tok[sl].to(dev)
            fwd_hooks = []
            if d_model is not None:
                add = torch.stack([
                    (additions[r // n_p] if additions[r // n_p] is not None
                     else torch.zeros(d_model)).float().cpu()
                    for r in range(s, min(s + max_rows, rows_tok.shape[0]))]).to(dev)

                def fn(act, hook, add=add):
                    act = act.clone()
                    act[:, 1:] += add[:, None, :].to(act.dtype)
                    return act
                fwd_hooks = [(hook, fn)]
            logits = model.run_with_hooks(tok, return_type="logits", fwd_hooks=fwd_hooks)
            last = rows_last[sl].to(dev)
            final = logits[torch.arange(tok.shape[0], device=dev), last].float()
            ranks += [target_rank(final[r], target) for r in range(final.shape[0])]
    return [ranks[k * n_p:(k + 1) * n_p] for k in range(len(additions))]


def steer_ranks(model: Any, hook: str, prompts: Sequence[Tensor], target: int,
                direction: Tensor | None, alphas: Sequence[float]) -> list[list[int]]:
    """Rank of ``target`` after each prompt (1-D token tensors incl. BOS) for each absolute
    ``alpha`` with ``alpha * direction`` added at every position but 0 -> [n_prompts][n_alphas].
    ``direction=None`` gives the unsteered rank for every alpha."""
    adds = [None if direction is None or a == 0 else a * direction for a in alphas]
    per_add = ranks_for_additions(model, hook, prompts, target, adds)
    return [[per_add[k][p] for k in range(len(alphas))] for p in range(len(prompts))]


def _last_acts(model: Any, hook: str, prompts: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """Hook activations of padded prompts in one forward: ([n, d] at each last real token,
    per-prompt [len-1, d] of the non-BOS positions)."""
    from polysae.models import capture

    tok, last = _pad(prompts)
    with torch.inference_mode():
        a = capture(model, tok.to(next(model.parameters()).device), [hook])[hook].float().cpu()
    return a[torch.arange(len(prompts)), last], [a[r, 1:len(p)] for r, p in enumerate(prompts)]


def hook_norm(model: Any, hook: str, prompts: Sequence[Tensor]) -> float:
    """Median L2 norm of the hook activation over the prompts' non-BOS positions."""
    _, per = _last_acts(model, hook, prompts)
    return float(torch.cat(per).norm(dim=-1).median())


def word_latent(model: Any, hook: str, sae: Any, word_tokens: Tensor) -> int:
    """The SAE latent most active at the last token of ``word_tokens`` (BOS + word)."""
    return word_latents(model, hook, sae, [word_tokens])[0]


def word_latents(model: Any, hook: str, sae: Any, words: Sequence[Tensor],
                 acts: Tensor | None = None) -> list[int]:
    """:func:`word_latent` for many words in one forward (or from precomputed ``acts`` [n, d])."""
    if acts is None:
        acts, _ = _last_acts(model, hook, words)
    with torch.inference_mode():
        z = sae.encode(acts.to(sae.W_enc.device, sae.W_enc.dtype))
    return [int(i) for i in z.argmax(dim=-1)]


def _tokens(model: Any, text: str, bos: bool) -> Tensor:
    return model.to_tokens(text, prepend_bos=bos)[0].cpu()


def steering_eval(model: Any, hook: str, saes: dict[str, Any],
                  concepts: Sequence[Concept] = DEFAULT_CONCEPTS,
                  neutral_prompts: Sequence[str] = NEUTRAL_PROMPTS,
                  alpha_scales: Sequence[float] = (0.25, 0.5, 1.0, 2.0),
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the protocol above for every SAE in ``saes`` (name -> SAE) on a HookedTransformer with
    a tokenizer. Returns a JSON-ready dict (keys documented in README.md, section
    ``metrics.json``). ``progress(1)`` is called after each concept."""
    all_prompts = [_tokens(model, c.prompt, True) for c in concepts] + \
        [_tokens(model, p, True) for p in neutral_prompts]
    scale = hook_norm(model, hook, all_prompts)
    alphas = [s * scale for s in alpha_scales]
    out: dict[str, Any] = {"alpha_scales": list(alpha_scales), "hook_norm": scale,
                           "alphas": alphas, "concepts": []}
    words = [w for c in concepts for w in (c.word_i, c.word_j)]
    word_acts, _ = _last_acts(model, hook, [_tokens(model, w, True) for w in words])
    latents = {n: word_latents(model, hook, s, [], acts=word_acts) for n, s in saes.items()}
    dirs = {n: s.decoder_directions().detach().float().cpu() for n, s in saes.items()}
    per_sae_cases: dict[str, list[list[int]]] = {n: [] for n in saes}
    base_cases: list[int] = []
    for ci, c in enumerate(concepts):
        prompts = [_tokens(model, c.prompt, True)] + [_tokens(model, p, True)
                                                      for p in neutral_prompts]
        target = int(_tokens(model, c.target, False)[0])
        adds: list[Tensor | None] = [None]
        for name in saes:
            li, lj = latents[name][2 * ci], latents[name][2 * ci + 1]
            d = dirs[name][li] + dirs[name][lj]
            adds += [a * d for a in alphas]
        ranks = ranks_for_additions(model, hook, prompts, target, adds)
        base = ranks[0]
        entry: dict[str, Any] = {"name": c.name, "target": c.target, "target_id": target,
                                 "prompts": [c.prompt, *neutral_prompts], "rank_none": base,
                                 "saes": {}}
        base_cases += base
        for si, name in enumerate(saes):
            block = ranks[1 + si * len(alphas): 1 + (si + 1) * len(alphas)]   # [alpha][prompt]
            per_prompt = [[block[k][p] for k in range(len(alphas))] for p in range(len(prompts))]
            entry["saes"][name] = {"latents": [latents[name][2 * ci], latents[name][2 * ci + 1]],
                                   "ranks": per_prompt}
            per_sae_cases[name] += per_prompt
        out["concepts"].append(entry)
        if progress is not None:
            progress(1)
    summary: dict[str, Any] = {"none": {"mean_log2_rank": _mlog(base_cases)}}
    for name, cases in per_sae_cases.items():
        per_alpha = []
        for k in range(len(alphas)):
            ranks_k = [c[k] for c in cases]
            per_alpha.append({"alpha_scale": alpha_scales[k], "mean_log2_rank": _mlog(ranks_k),
                              "frac_improved": sum(r < b for r, b in zip(ranks_k, base_cases))
                              / len(ranks_k)})
        best = min(per_alpha, key=lambda r: r["mean_log2_rank"])
        summary[name] = {"per_alpha": per_alpha, "best_alpha_scale": best["alpha_scale"],
                         "best_mean_log2_rank": best["mean_log2_rank"],
                         "best_frac_improved": best["frac_improved"]}
    out["summary"] = summary
    return out


def _mlog(ranks: Sequence[int]) -> float:
    return float(sum(math.log2(r) for r in ranks) / max(1, len(ranks)))
