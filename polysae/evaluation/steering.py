"""Steering with pairs of SAE latents: polysae's own protocol (the paper publishes no code).

For a concept made of two words (e.g. "canada" x "oil" -> target " Keystone"):

1. **Latent per word** (:func:`word_latent`): run the model on BOS + the word, take the hook
   activation at the word's last token, encode it with the SAE, keep the most active latent
   (i for word_i, j for word_j).
2. **Directions** (:func:`steering_directions`), one per *mode*:

   - ``linear`` (every SAE): d_i + d_j, with d the SAE's unit-norm linear decoder directions
     (``SAE.decoder_directions()``: rows of W_dec, or of U C1^T for PolySAE); not re-normalised.
   - ``pair`` (PolySAE of order >= 2): the unit vector along the decoder's pairwise-interaction
     term P_ij = lambda2 (B_ij + B_ji) (``SAE.pair_terms``; 2 lambda2 B_ij with the paper's
     shared U), the part of x_hat that exists only when i and j fire together.
   - ``linear+pair`` (PolySAE of order >= 2): the unit vector along A_i + A_j + P_ij, with A the
     raw linear atoms (``SAE.linear_atoms()``): the linear and mixed (i-with-j) second-order
     terms of decode(e_i + e_j) - b_dec. The self terms lambda2 B_ii, lambda2 B_jj and the cubic
     terms are left out, so the mode is exactly "linear atoms plus the interaction".

   A direction of zero norm (e.g. lambda2 = 0) stays zero and steers nothing.
3. **Steering**: add alpha * direction to the hook activation at every position except
   position 0 (BOS: an attention sink whose norm is unlike other positions); alpha is given as a
   multiple of the median activation norm at the hook over all the prompts' non-BOS positions
   (a normalisation, not a fit to the metric), so the same sweep means the same relative push
   for every model.
4. **Metric**: rank of the target's first token in the next-token logits after the prompt
   (1 = top), for every (concept, prompt) case: each concept's own prompt plus the neutral
   prompts.
5. **alpha chosen on held-out cases**: the first ``select_prompts`` neutral prompts are the
   *selection* prompts; each (SAE, mode) gets the alpha scale with the lowest mean log2 rank over
   all concepts' selection cases (ties: the earlier scale in ``alpha_scales``). Every reported
   number is measured at that alpha on the *reported* cases only: each concept's own prompt and
   the remaining neutral prompts, none of which took part in the choice. The optimistic
   "best alpha over all cases, scored on the same cases" is kept apart as
   ``best_alpha_in_sample``.
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


#: The five examples the paper publishes; its other 22 concepts were not released.
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

#: Neutral prompts added to every concept's own prompt (our wording; the paper used 12 it did not
#: publish). The first :data:`SELECT_PROMPTS` choose alpha, the rest are reported.
NEUTRAL_PROMPTS = ("I think that the", "Yesterday we talked about", "The best thing about it is",
                   "She told me about", "In my opinion, the", "The main reason is",
                   "Let me tell you about", "We were surprised by", "The article was about",
                   "Everyone was talking about", "My favourite thing is", "He wrote a letter about")

#: Neutral prompts (from the front of the list) on which alpha is chosen.
SELECT_PROMPTS = 4

#: Steering modes of a PolySAE of order >= 2 (any other SAE has only ``linear``).
MODES = ("linear", "pair", "linear+pair")


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
    from polysae.data.models import as_backend

    model = as_backend(model)
    model.require_causal("steering", "evaluate a causal LM")
    dev = model.device
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
            edits = None
            if d_model is not None:
                add = torch.stack([
                    (additions[r // n_p] if additions[r // n_p] is not None
                     else torch.zeros(d_model)).float().cpu()
                    for r in range(s, min(s + max_rows, rows_tok.shape[0]))]).to(dev)

                def fn(act, add=add):
                    act = act.clone()
                    act[:, 1:] += add[:, None, :].to(act.dtype)
                    return act
                edits = {hook: fn}
            logits = model.logits(tok, edits)
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
    from polysae.data.models import as_backend, capture

    model = as_backend(model)
    tok, last = _pad(prompts)
    with torch.inference_mode():
        a = capture(model, tok.to(model.device), [hook])[hook].float().cpu()
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
    from polysae.data.models import as_backend

    return as_backend(model).to_tokens(text, prepend_bos=bos)


def sae_modes(sae: Any) -> tuple[str, ...]:
    """The steering modes an SAE supports: :data:`MODES` for a PolySAE of order >= 2, else
    ``("linear",)``."""
    cfg = getattr(sae, "cfg", None)
    if getattr(cfg, "decoder", "linear") == "poly" and getattr(cfg, "order", 1) >= 2:
        return MODES
    return ("linear",)


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def steering_directions(sae: Any, pairs: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
    """Steering direction of every latent pair (i, j) for each mode of :func:`sae_modes` ->
    ``{mode: [P, D] float32 on CPU}`` (definitions in the module docstring)."""
    i = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    j = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    with torch.no_grad():
        d = sae.decoder_directions().detach().float().cpu()
        out = {"linear": d[i] + d[j]}
        if "pair" in sae_modes(sae):
            dev = sae.W_enc.device
            P = sae.pair_terms(i.to(dev), j.to(dev)).detach().float().cpu()
            A = sae.linear_atoms().detach().float().cpu()
            out["pair"] = _unit(P)
            out["linear+pair"] = _unit(A[i] + A[j] + P)
    return out


def _sae_kind(sae: Any) -> str:
    return "poly" if getattr(getattr(sae, "cfg", None), "decoder", "linear") == "poly" else "linear"


def steering_eval(model: Any, hook: str, saes: dict[str, Any],
                  concepts: Sequence[Concept] = DEFAULT_CONCEPTS,
                  neutral_prompts: Sequence[str] = NEUTRAL_PROMPTS,
                  alpha_scales: Sequence[float] = (0.25, 0.5, 1.0, 2.0),
                  progress: Callable[[int], None] | None = None,
                  select_prompts: int = SELECT_PROMPTS) -> dict[str, Any]:
    """Run the protocol above for every SAE in ``saes`` (name -> SAE) and each of its modes on a
    causal LM with a tokenizer (any backend: :func:`polysae.data.models.as_backend`);
    ``progress(1)`` is called after each concept. alpha is chosen per (SAE, mode) on the first
    ``select_prompts`` neutral prompts (1 <= select_prompts <= len(neutral_prompts)) and
    everything under ``report_*`` is measured on the other cases.

    Returns a JSON-ready dict. ``ranks`` lists are [prompt][alpha]; prompts are in the order of
    ``concepts[c]["prompts"]`` (the concept's own prompt, then the neutral prompts);
    log2 ranks are averaged over cases; "improved" means a rank strictly better (smaller) than
    with no steering on the same case; a concept is *won* when its mean log2 rank over its
    reported prompts is strictly below the compared one (no steering, or the other SAE)::

        alpha_scales, alphas (absolute), hook_norm, select_prompts (the neutral prompts that
        choose alpha), modes{sae: [mode, ...]},
        concepts[{name, target, target_id, prompts, roles ("select"/"report" per prompt),
                  rank_none [prompt],
                  saes{sae: {latents [i, j], ranks (linear mode), ranks_by_mode{mode: ranks}}}}],
        summary{
          none{mean_log2_rank (all cases), select_mean_log2_rank, report_mean_log2_rank,
               report_per_concept_mean_log2_rank [concept]},
          saes{sae: {mode: {
              alpha_scale, alpha (chosen on the selection cases), select_mean_log2_rank,
              report_mean_log2_rank, report_frac_improved, report_frac_worsened,
              report_per_concept_mean_log2_rank [concept], concept_wins, concept_losses,
              n_concepts (wins/losses against no steering, reported cases),
              per_alpha[{alpha_scale, select_mean_log2_rank, report_mean_log2_rank,
                         report_frac_improved, all_mean_log2_rank, all_frac_improved}],
              best_alpha_in_sample{alpha_scale, mean_log2_rank, frac_improved} (alpha chosen
                  and scored on all cases: optimistic)}}},
          poly_vs_vanilla[{poly, mode, vanilla, vanilla_mode ("linear"), concept_wins,
              concept_losses, concept_ties, n_concepts, report_mean_log2_rank_diff (poly minus
              vanilla), report_frac_cases_better}]}

    ``poly_vs_vanilla`` has one row per (PolySAE, its mode, linear-decoder SAE), each SAE at its
    own chosen alpha (decoder kind from ``sae.cfg.decoder``)."""
    from polysae.data.models import as_backend

    model = as_backend(model)
    model.require_causal("steering", "evaluate a causal LM (or turn steering off)")
    n_sel = int(select_prompts)
    if not 1 <= n_sel <= len(neutral_prompts):
        raise ValueError(f"steering_eval: select_prompts={select_prompts} must be between 1 and "
                         f"the number of neutral prompts ({len(neutral_prompts)})")
    if not concepts:
        raise ValueError("steering_eval: no concepts")
    if not alpha_scales:
        raise ValueError("steering_eval: alpha_scales is empty")
    roles = ["report"] + ["select"] * n_sel + ["report"] * (len(neutral_prompts) - n_sel)
    neutral_tok = [_tokens(model, p, True) for p in neutral_prompts]
    concept_tok = [_tokens(model, c.prompt, True) for c in concepts]
    scale = hook_norm(model, hook, concept_tok + neutral_tok)
    alphas = [s * scale for s in alpha_scales]
    modes = {n: sae_modes(s) for n, s in saes.items()}
    out: dict[str, Any] = {"alpha_scales": list(alpha_scales), "hook_norm": scale,
                           "alphas": alphas, "select_prompts": list(neutral_prompts[:n_sel]),
                           "modes": {n: list(m) for n, m in modes.items()}, "concepts": []}
    words = [w for c in concepts for w in (c.word_i, c.word_j)]
    word_acts, _ = _last_acts(model, hook, [_tokens(model, w, True) for w in words])
    latents = {n: word_latents(model, hook, s, [], acts=word_acts) for n, s in saes.items()}
    dirs = {n: steering_directions(s, [(latents[n][2 * c], latents[n][2 * c + 1])
                                       for c in range(len(concepts))]) for n, s in saes.items()}
    cases: dict[str, dict[str, list[list[list[int]]]]] = {n: {m: [] for m in modes[n]}
                                                          for n in saes}
    base: list[list[int]] = []
    for ci, c in enumerate(concepts):
        prompts = [concept_tok[ci], *neutral_tok]
        target = int(_tokens(model, c.target, False)[0])
        adds: list[Tensor | None] = [None]
        for name in saes:
            for mode in modes[name]:
                adds += [a * dirs[name][mode][ci] for a in alphas]
        ranks = ranks_for_additions(model, hook, prompts, target, adds)
        base.append(ranks[0])
        entry: dict[str, Any] = {"name": c.name, "target": c.target, "target_id": target,
                                 "prompts": [c.prompt, *neutral_prompts], "roles": roles,
                                 "rank_none": ranks[0], "saes": {}}
        pos = 1
        for name in saes:
            by_mode = {}
            for mode in modes[name]:
                block = ranks[pos:pos + len(alphas)]                    # [alpha][prompt]
                pos += len(alphas)
                by_mode[mode] = [[block[k][p] for k in range(len(alphas))]
                                 for p in range(len(prompts))]
                cases[name][mode].append(by_mode[mode])
            entry["saes"][name] = {"latents": [latents[name][2 * ci], latents[name][2 * ci + 1]],
                                   "ranks": by_mode["linear"], "ranks_by_mode": by_mode}
        out["concepts"].append(entry)
        if progress is not None:
            progress(1)
    out["summary"] = summarise(base, cases, roles, list(alpha_scales), alphas,
                               {n: _sae_kind(s) for n, s in saes.items()})
    return out


def summarise(base: list[list[int]], cases: dict[str, dict[str, list[list[list[int]]]]],
              roles: Sequence[str], alpha_scales: Sequence[float], alphas: Sequence[float],
              kinds: dict[str, str]) -> dict[str, Any]:
    """The ``summary`` block of :func:`steering_eval` from its ranks: ``base[concept][prompt]``
    (no steering), ``cases[sae][mode][concept][prompt][alpha]``, ``roles[prompt]`` ("select" or
    "report"), and ``kinds[sae]`` ("poly" or "linear") for the poly-vs-vanilla rows."""
    sel = [p for p, r in enumerate(roles) if r == "select"]
    rep = [p for p, r in enumerate(roles) if r == "report"]
    if not sel or not rep:
        raise ValueError(f"steering summary: roles {list(roles)} need both 'select' and 'report'")

    def flat(rows: list[list[Any]], idx: list[int]) -> list[Any]:
        return [r[p] for r in rows for p in idx]

    def frac(a: Sequence[int], b: Sequence[int], better: bool = True) -> float:
        return sum((x < y) if better else (x > y) for x, y in zip(a, b)) / len(a)

    allp = list(range(len(roles)))
    base_rep = flat(base, rep)
    none_pc = [_mlog([b[p] for p in rep]) for b in base]
    summary: dict[str, Any] = {"none": {"mean_log2_rank": _mlog(flat(base, allp)),
                                        "select_mean_log2_rank": _mlog(flat(base, sel)),
                                        "report_mean_log2_rank": _mlog(base_rep),
                                        "report_per_concept_mean_log2_rank": none_pc},
                               "saes": {}, "poly_vs_vanilla": []}
    chosen: dict[tuple[str, str], list[list[int]]] = {}    # (sae, mode) -> [concept][prompt]
    for name, by_mode in cases.items():
        summary["saes"][name] = {}
        for mode, rows in by_mode.items():
            per_alpha = []
            for k, s in enumerate(alpha_scales):
                at_k = [[r[k] for r in concept] for concept in rows]   # [concept][prompt]
                per_alpha.append({
                    "alpha_scale": s, "select_mean_log2_rank": _mlog(flat(at_k, sel)),
                    "report_mean_log2_rank": _mlog(flat(at_k, rep)),
                    "report_frac_improved": frac(flat(at_k, rep), base_rep),
                    "all_mean_log2_rank": _mlog(flat(at_k, allp)),
                    "all_frac_improved": frac(flat(at_k, allp), flat(base, allp))})
            k_sel = min(range(len(alpha_scales)),
                        key=lambda k: (per_alpha[k]["select_mean_log2_rank"], k))
            k_in = min(range(len(alpha_scales)),
                       key=lambda k: (per_alpha[k]["all_mean_log2_rank"], k))
            at = [[r[k_sel] for r in concept] for concept in rows]
            chosen[name, mode] = at
            pc = [_mlog([a[p] for p in rep]) for a in at]
            summary["saes"][name][mode] = {
                "alpha_scale": alpha_scales[k_sel], "alpha": alphas[k_sel],
                "select_mean_log2_rank": per_alpha[k_sel]["select_mean_log2_rank"],
                "report_mean_log2_rank": per_alpha[k_sel]["report_mean_log2_rank"],
                "report_frac_improved": per_alpha[k_sel]["report_frac_improved"],
                "report_frac_worsened": frac(flat(at, rep), base_rep, better=False),
                "report_per_concept_mean_log2_rank": pc,
                "concept_wins": sum(a < b for a, b in zip(pc, none_pc)),
                "concept_losses": sum(a > b for a, b in zip(pc, none_pc)),
                "n_concepts": len(pc), "per_alpha": per_alpha,
                "best_alpha_in_sample": {
                    "alpha_scale": alpha_scales[k_in],
                    "mean_log2_rank": per_alpha[k_in]["all_mean_log2_rank"],
                    "frac_improved": per_alpha[k_in]["all_frac_improved"]}}
    for p_name in (n for n in cases if kinds.get(n) == "poly"):
        for mode in cases[p_name]:
            for v_name in (n for n in cases if kinds.get(n) == "linear"):
                a, b = chosen[p_name, mode], chosen[v_name, "linear"]
                pa = summary["saes"][p_name][mode]["report_per_concept_mean_log2_rank"]
                pb = summary["saes"][v_name]["linear"]["report_per_concept_mean_log2_rank"]
                summary["poly_vs_vanilla"].append({
                    "poly": p_name, "mode": mode, "vanilla": v_name, "vanilla_mode": "linear",
                    "concept_wins": sum(x < y for x, y in zip(pa, pb)),
                    "concept_losses": sum(x > y for x, y in zip(pa, pb)),
                    "concept_ties": sum(x == y for x, y in zip(pa, pb)), "n_concepts": len(pa),
                    "report_mean_log2_rank_diff": _mlog(flat(a, rep)) - _mlog(flat(b, rep)),
                    "report_frac_cases_better": frac(flat(a, rep), flat(b, rep))})
    return summary


def _mlog(ranks: Sequence[int]) -> float:
    return float(sum(math.log2(r) for r in ranks) / max(1, len(ranks)))
