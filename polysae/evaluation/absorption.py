"""Feature absorption on the first-letter task (Chanin et al.; SAEBench ``evals/absorption``), in
two variants side by side (docs/method.md, "SAEBench metrics"):

- ``linear``: SAEBench's definition with the raw linear atoms as ``W_dec`` (the view of
  :class:`polysae.evaluation.saebench.SAEBenchSAE`): latent ``i``'s probe projection on a word is
  ``z_i * cos(p, W_dec[i])``;
- ``full``: the same with ``W_dec[i]`` replaced by latent ``i``'s contribution through the whole
  decoder on that word, ``c_i(x) = z_i d_i(x)`` (:mod:`polysae.evaluation.contributions`):
  ``z_i * cos(p, c_i(x))``. For a linear decoder ``d_i(x) = W_dec[i]``, so the variants are equal.

Pipeline (SAEBench's, on the bundled model's vocabulary):

1. **Words**: vocabulary tokens made only of ASCII letters (a leading space allowed), kept when
   ``"\\n" + word + " has the first letter:"`` puts the word in one token at position -6.
   80/20 train/test split of the shuffled words; ``absorption_train_words`` /
   ``absorption_test_words`` of each are used (SAEBench: all of them).
2. **Prompts**: ``absorption_icl`` in-context examples ``"{word} has the first letter: X"`` drawn
   from the same split, newline-separated (one leading newline), then ``"{word} has the first
   letter:"``; the hook activation at the word token (position -6) is read (:func:`word_acts`).
3. **Ground-truth probe**: a 26-way one-vs-rest logistic probe on the activations (Adam, 50
   epochs, batch 64, lr 1e-2, weight decay 1e-4, positive-class weighting); its test F1 per
   letter decides which letters count (F1 > 0.6).
4. **k-sparse probes** on the codes for k = 1..10 (an L1 probe picks the latents); the main
   ("split") latents of a letter are those of the last k whose test F1 still rose by > 0.03.
5. **Absorption** on the test words the ground-truth probe gets right (probe score > 0):
   absorption fraction and full absorption per word (:func:`absorption_per_word`), summed per
   letter and divided by the letter's true positives; the mean over counted letters is reported.

The word activations are those of step 2's test prompts; SAEBench re-prompts the same words with
a fresh random draw of examples for step 5 (one forward fewer here, same distribution).
"""

from __future__ import annotations

import math
import random
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE = "{word} has the first letter:"
WORD_POS = -6
"""Position of the word token in a prompt ending in the template (SAEBench)."""
EPS = 1e-8
FULL_COS = 0.025
"""Full absorption: the top-projecting latent's cosine with the probe must reach this."""
FRACTION_COS = 0.1
"""Absorption fraction: each candidate absorbing latent's cosine must reach this."""
PROJ_SHARE = 0.4
"""Both: the absorbing latents must supply this share of the probe projection."""
MAX_ABSORBERS = 3
"""Absorption fraction: at most this many absorbing latents are summed."""
F1_JUMP = 0.03
MAX_K = 10
MIN_PROBE_F1 = 0.6
MIN_LETTERS = 20
"""SAEBench refuses to report absorption with fewer letters whose probe F1 exceeds 0.6."""


class Words(NamedTuple):
    """The words of the task: single-token alphabetic vocabulary entries."""

    train: list[str]
    """The training words used (the first ``n_train`` of the 80% split)."""
    test: list[str]
    """The test words used (the first ``n_test`` of the 20% split)."""
    train_pool: list[str]
    """The whole 80% split: in-context examples of training prompts."""
    test_pool: list[str]
    """The whole 20% split: in-context examples of test prompts."""
    token_ids: dict[str, int]
    """word -> its token id (checked to be the token at position -6 of a prompt)."""
    missing_letters: dict[str, str]
    """letter -> why it has no word (no single-token vocabulary word starts with it)."""


def first_letter(word: str) -> str:
    """SAEBench ``first_letter``: the first alphabetic character, lower-case."""
    return next(c for c in word.strip() if c.isalpha()).lower()


def _vocab_words(tokenizer: Any) -> list[tuple[str, int]]:
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else getattr(
        tokenizer, "vocab", None)
    if not isinstance(vocab, dict) or not hasattr(tokenizer, "convert_tokens_to_string"):
        raise ValueError(f"absorption needs a tokenizer with a vocabulary (get_vocab and "
                         f"convert_tokens_to_string); {type(tokenizer).__name__} has none")
    out = []
    for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        word = tokenizer.convert_tokens_to_string([tok])
        body = word[1:] if word.startswith(" ") else word
        if body and all(c.isascii() and c.isalpha() for c in body):
            out.append((word, int(i)))
    return out


def task_words(tokenizer: Any, n_train: int, n_test: int, seed: int = 0) -> Words:
    """SAEBench's vocabulary (``get_alpha_tokens``) kept to the words that stay one token at the
    template's word position, shuffled with ``seed``, split 80/20, then cut to the sizes."""
    cands = _vocab_words(tokenizer)
    if not cands:
        raise ValueError("absorption: the tokenizer's vocabulary has no alphabetic tokens")
    texts = ["\n" + TEMPLATE.format(word=w) for w, _ in cands]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    suffix = tokenizer(["\n" + TEMPLATE.format(word="x")], add_special_tokens=False)[
        "input_ids"][0][WORD_POS + 1:]
    ok = {w: i for (w, i), t in zip(cands, ids)
          if len(t) >= -WORD_POS and t[WORD_POS] == i and list(t[WORD_POS + 1:]) == suffix}
    words = sorted(ok)
    random.Random(seed).shuffle(words)
    cut = int(len(words) * 0.8)
    train, test = words[:cut], words[cut:]
    have = {first_letter(w) for w in words}
    missing = {c: f"no vocabulary token made of letters starting with {c!r} stays a single token "
                  f"in the prompt {TEMPLATE!r}" for c in LETTERS if c not in have}
    return Words(train[:n_train], test[:n_test], train, test, ok, missing)


def make_prompt(word: str, examples: Sequence[str], n_icl: int, rng: random.Random) -> str:
    """SAEBench ``create_icl_prompt`` (examples without the word itself, newline separator
    prepended to the first example): ``"\\n" + examples + "\\n" + "{word} has the first
    letter:"``, each example followed by ``" X"`` (its capitalised first letter)."""
    n = min(n_icl, len(examples))
    for _ in range(1000):
        ex = rng.sample(list(examples), n)
        if word not in ex:
            break
    else:
        raise ValueError(f"absorption: no example set without {word!r}")
    parts = [TEMPLATE.format(word=e) + " " + first_letter(e).upper() for e in ex]
    return "\n" + "\n".join(parts + [TEMPLATE.format(word=word)])


def word_acts(model: Any, tokenizer: Any, hook: str, words: Sequence[str], examples: Sequence[str],
              token_ids: dict[str, int], n_icl: int, seed: int, batch_size: int = 32
              ) -> tuple[Tensor, list[str]]:
    """Hook activations [n, D] at the word token of each word's prompt (float32, CPU) and the
    words kept (a prompt whose tokenisation moves the word off position -6 is dropped). Only the
    tokens up to the word are run: the model is causal, so the rest cannot change them. The
    forward is answered from :mod:`polysae.evaluation.textcache` when the same model, hook and
    prompts ran before in this process."""
    from polysae.evaluation.textcache import cached, token_digest

    rng = random.Random(seed)
    prompts = [make_prompt(w, examples, n_icl, rng) for w in words]
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    seqs, kept = [], []
    for w, t in zip(words, ids):
        if len(t) >= -WORD_POS and t[WORD_POS] == token_ids[w]:
            seqs.append(([bos] if bos is not None else []) + list(t[:len(t) + WORD_POS + 1]))
            kept.append(w)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    key = ("absorption_words", hook, token_digest(seqs), int(pad), int(batch_size))
    acts = cached(model, key, lambda: _last_token_acts(model, hook, seqs, pad, batch_size))
    return acts, kept


def _last_token_acts(model: Any, hook: str, seqs: list[list[int]], pad: int,
                     batch_size: int) -> Tensor:
    """Hook activations [n, D] (float32, CPU) at the last token of each sequence, run in batches
    of similar length (right padding: a causal model's last real token never sees the pad)."""
    from polysae.data.models import capture

    dev = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    rows: list[Tensor | None] = [None] * len(seqs)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            b = order[s:s + batch_size]
            T = max(len(seqs[i]) for i in b)
            toks = torch.full((len(b), T), pad, dtype=torch.long)
            for r, i in enumerate(b):
                toks[r, :len(seqs[i])] = torch.tensor(seqs[i])
            a = capture(model, toks.to(dev), [hook])[hook].float().cpu()
            for r, i in enumerate(b):
                rows[i] = a[r, len(seqs[i]) - 1]
    out = [r for r in rows if r is not None]
    d = out[0].shape[-1] if out else 0
    return torch.stack(out) if out else torch.zeros(0, d)


class PerWord(NamedTuple):
    """Absorption of each evaluated word (one letter's true positives)."""

    fraction: Tensor
    """[n] absorption fraction in [0, 1]."""
    full: Tensor
    """[n] bool: full absorption."""


def absorption_per_word(x: Tensor, values: Tensor, indices: Tensor, dirs: Tensor,
                        probe: Tensor, main: Sequence[int]) -> PerWord:
    """SAEBench ``FeatureAbsorptionCalculator.calculate_absorption`` for ``n`` words at once.

    ``x`` [n, D] activations, ``values``/``indices`` [n, K] their sparse codes, ``dirs``
    [n, K, D] each active latent's direction (``W_dec`` rows for ``linear``, ``d_i(x)`` for
    ``full``), ``probe`` [D] the letter's probe, ``main`` the letter's split latents. A latent's
    probe projection is ``z_i cos(p, dir_i)`` (zero when inactive); ``P = x . p/|p|``.

    - fraction: 0 if the main latents' projection reaches ``P`` or the top 3 other latents with
      cosine >= 0.1 and positive projection supply under 40% of ``P``; else 1 if the main
      latents' projection is <= 0; else ``min(top3, P - main) / (min(top3, P - main) + main)``.
    - full: no main latent fires (``z < 1e-8``), the top-projecting latent has cosine >= 0.025,
      ``P >= 0`` and that latent supplies >= 40% of ``P``.
    """
    f64 = torch.float64
    p = probe.to(f64)
    p = p / p.norm()
    z = values.to(f64)
    cos = torch.nn.functional.cosine_similarity(p.expand_as(dirs.to(f64)), dirs.to(f64), dim=-1)
    proj = z * cos
    P = x.to(f64) @ p
    main_t = torch.as_tensor(list(main), dtype=torch.long)
    is_main = (indices[..., None] == main_t).any(-1) & (z != 0) if len(main_t) else \
        torch.zeros_like(z, dtype=torch.bool)
    main_proj = (proj * is_main).sum(-1)
    cand = (~is_main) & (cos >= FRACTION_COS) & (proj > 0) & (z != 0)
    top = torch.where(cand, proj, torch.zeros_like(proj))
    kk = min(MAX_ABSORBERS, top.shape[-1]) if top.shape[-1] else 0
    top3 = top.topk(kk, dim=-1).values.sum(-1) if kk else torch.zeros_like(P)
    share = top3 / P
    absorbed = torch.minimum(top3, P - main_proj)
    frac = (absorbed / (absorbed + main_proj)).clamp(0, 1)
    frac = torch.where(main_proj <= 0, torch.ones_like(frac), frac)
    frac = torch.where((main_proj >= P) | (share < PROJ_SHARE), torch.zeros_like(frac), frac)
    # full absorption: the top projecting latent over all latents (inactive ones project 0)
    act = torch.where(z != 0, proj, torch.full_like(proj, -math.inf))
    best, arg = act.max(-1) if act.shape[-1] else (torch.full_like(P, -math.inf),
                                                   torch.zeros_like(P, dtype=torch.long))
    best_cos = cos.gather(-1, arg[:, None])[:, 0] if cos.shape[-1] else torch.zeros_like(P)
    main_fires = ((z >= EPS) & is_main).any(-1)
    full = (~main_fires) & (best > 0) & (best_cos >= FULL_COS) & (P >= 0) & (P != 0) & \
        (best / P.where(P != 0, torch.ones_like(P)) >= PROJ_SHARE)
    return PerWord(frac, full)


def f1_binary(y: np.ndarray, pred: np.ndarray) -> float:
    """Binary F1 (sklearn's, 0 when undefined)."""
    tp = int((y & pred).sum())
    fp, fn = int((~y & pred).sum()), int((y & ~pred).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def split_features(f1_by_k: dict[int, float], feats_by_k: dict[int, np.ndarray]) -> list[int]:
    """SAEBench ``add_feature_splits_to_metrics_df``: walk k = 1, 2, ...; keep k's latents while
    F1 rises by more than ``F1_JUMP`` over the best so far, stop at the first k that does not."""
    prev, split = -100.0, []
    for k in sorted(f1_by_k):
        if f1_by_k[k] > prev + F1_JUMP:
            prev, split = f1_by_k[k], [int(i) for i in feats_by_k[k]]
        else:
            break
    return split


def summarize(letters: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Means (and sample standard deviations) over the counted letters, SAEBench's headline
    numbers: ``mean_absorption_fraction``, ``mean_full_absorption_rate``,
    ``mean_num_split_features``."""
    rows = [r for r in letters.values() if r.get("counted")]
    out: dict[str, Any] = {"n_letters": len(rows)}
    for key, src in (("mean_absorption_fraction", "absorption_fraction"),
                     ("mean_full_absorption_rate", "full_absorption_rate"),
                     ("mean_num_split_features", "num_split_features")):
        vals = [float(r[src]) for r in rows]
        out[key] = float(np.mean(vals)) if vals else None
        out["std_" + key.removeprefix("mean_")] = float(np.std(vals, ddof=1)) \
            if len(vals) > 1 else None
    return out


class GroundTruth(NamedTuple):
    """The 26-way ground-truth probe on model activations (shared by every SAE)."""

    weight: Tensor
    """[26, D]."""
    bias: Tensor
    """[26]."""
    test_scores: Tensor
    """[n_test, 26] probe logits of the test words."""
    f1: dict[str, float]
    """letter -> test F1 of ``score > 0``."""


def ground_truth_probe(x_train: Tensor, y_train: np.ndarray, x_test: Tensor, y_test: np.ndarray,
                       seed: int = 0) -> GroundTruth:
    """SAEBench's first-letter probe (``train_linear_probe_for_task``: Adam, 50 epochs, batch 64,
    lr 1e-2 decaying to 1e-5, weight decay 1e-4, positive-class weights) and its test F1."""
    from polysae.evaluation.saebench_probes import train_multi_probe

    y = torch.nn.functional.one_hot(torch.as_tensor(y_train), len(LETTERS))
    w, b = train_multi_probe(x_train, y, epochs=50, lr=1e-2, end_lr=1e-5, weight_decay=1e-4,
                             batch_size=64, seed=seed)
    return ground_truth_from(w, b, x_test, y_test)


def ground_truth_from(weight: Tensor, bias: Tensor, x_test: Tensor,
                      y_test: np.ndarray) -> GroundTruth:
    """A :class:`GroundTruth` from given probe weights [26, D] and biases [26]."""
    scores = x_test.float() @ weight.float().T + bias.float()
    f1 = {c: f1_binary(y_test == i, (scores[:, i] > 0).numpy()) for i, c in enumerate(LETTERS)}
    return GroundTruth(weight, bias, scores, f1)


def directions(sae: Any, variant: str, values: Tensor, indices: Tensor) -> Tensor:
    """[n, K, D] the direction each active latent stands for: raw linear atoms (``linear``) or
    the whole decoder's per-unit contribution ``d_i(x)`` (``full``)."""
    from polysae.evaluation.contributions import (
        NotSplittable,
        linear_directions,
        unit_directions,
    )

    if variant == "linear":
        try:
            A = linear_directions(sae).to(torch.float64)
        except Exception as e:  # noqa: BLE001 - any failure: the SAE has no W_dec to read
            raise NotSplittable(f"the SAE has no linear atoms to read as W_dec "
                                f"({type(e).__name__}: {str(e)[:200]})") from None
        return A[indices.to(A.device)].cpu()
    if variant == "full":
        return unit_directions(sae, values, indices).cpu()
    raise ValueError(f"unknown absorption variant {variant!r} (linear, full)")


def absorption_eval(sae: Any, gt: GroundTruth, x_train: Tensor, y_train: np.ndarray,
                    x_test: Tensor, y_test: np.ndarray, *, variants: Sequence[str] = (
                        "linear", "full"), seed: int = 0,
                    missing: dict[str, str] | None = None,
                    probes: dict | None = None) -> dict[str, Any]:
    """Feature absorption of one SAE in each variant (SAEBench's steps 4-5; see the module
    docstring). Returns ``{"k_sparse": ..., "linear": ..., "full": ..., "difference": ...}``; a
    variant the SAE cannot give is ``{"skipped": reason}``. ``probes``: given k-sparse probes
    (``{k: {letter index: KSparseProbe}}``) instead of training them."""
    from polysae.evaluation.contributions import NotSplittable
    from polysae.evaluation.saebench_probes import k_sparse_probes

    with torch.no_grad():
        z_train = sae.encode(x_train).float().cpu()
        sp = sae.encode_sparse(x_test)
        z_test = torch.zeros(len(x_test), z_train.shape[1]).scatter_add(
            1, sp.indices.cpu(), sp.values.float().cpu())
    ks = range(1, MAX_K + 1)
    if probes is None:
        probes = k_sparse_probes(z_train, y_train, len(LETTERS), ks, seed=seed)
    letters: dict[str, dict[str, Any]] = {}
    tp_masks: dict[str, np.ndarray] = {}
    sparse_f1: dict[int, list[float]] = {k: [] for k in ks}
    for i, c in enumerate(LETTERS):
        row: dict[str, Any] = {"probe_f1": gt.f1[c]}
        pos = y_test == i
        tp = pos & (gt.test_scores[:, i] > 0).numpy()
        tp_masks[c] = tp
        row["num_probe_true_positives"] = int(tp.sum())
        if (missing or {}).get(c):
            row["why_not_counted"] = missing[c]
        elif i not in probes[1]:
            row["why_not_counted"] = f"no training word starts with {c!r}"
        else:
            f1k, feats = {}, {}
            for k in ks:
                pr = probes[k][i]
                score = z_test[:, pr.feature_ids].numpy() @ pr.weight + pr.bias
                f1k[k] = f1_binary(pos, score > 0)
                feats[k] = pr.feature_ids
                sparse_f1[k].append(f1k[k])
            row["sparse_f1"] = {str(k): v for k, v in f1k.items()}
            row["split_features"] = split_features(f1k, feats)
            row["num_split_features"] = len(row["split_features"])
            if gt.f1[c] <= MIN_PROBE_F1:
                row["why_not_counted"] = (f"ground-truth probe F1 {gt.f1[c]:.3f} <= "
                                          f"{MIN_PROBE_F1} (SAEBench's bar)")
            elif not tp.any():
                row["why_not_counted"] = "no test word of this letter is a probe true positive"
        row["counted"] = "why_not_counted" not in row
        letters[c] = row
    out: dict[str, Any] = {"k_sparse": {
        "mean_sparse_f1": {str(k): float(np.mean(v)) if v else None
                           for k, v in sparse_f1.items()},
        "probe_f1": {c: letters[c]["probe_f1"] for c in LETTERS},
        "sparse_f1": {c: r["sparse_f1"] for c, r in letters.items() if "sparse_f1" in r},
        "split_features": {c: r["split_features"] for c, r in letters.items()
                           if "split_features" in r}}}
    n_counted = sum(r["counted"] for r in letters.values())
    for variant in variants:
        try:
            out[variant] = _variant(sae, variant, x_test, sp, gt, letters, tp_masks)
        except NotSplittable as e:
            out[variant] = {"skipped": str(e)}
            continue
        out[variant]["valid"] = n_counted >= MIN_LETTERS
        if n_counted < MIN_LETTERS:
            out[variant]["note"] = (f"only {n_counted} letters have a ground-truth probe F1 > "
                                    f"{MIN_PROBE_F1} and a true positive; SAEBench reports "
                                    f"absorption only with >= {MIN_LETTERS}")
    if all("skipped" not in out.get(v, {"skipped": 1}) for v in ("linear", "full")):
        out["difference"] = difference(out["linear"], out["full"])
    return out


def _variant(sae, variant, x_test, sp, gt, letters, tp_masks) -> dict[str, Any]:
    per: dict[str, dict[str, Any]] = {}
    any_tp = np.zeros(len(x_test), dtype=bool)
    for m in tp_masks.values():
        any_tp |= m
    rows = torch.as_tensor(np.flatnonzero(any_tp))
    vals, idx = sp.values[rows].cpu(), sp.indices[rows].cpu()
    dirs = directions(sae, variant, vals, idx) if len(rows) else torch.zeros(0, 1, 1)
    where = {int(r): n for n, r in enumerate(rows.tolist())}
    for i, c in enumerate(LETTERS):
        base = letters[c]
        r: dict[str, Any] = {"counted": base["counted"]}
        n_tp = base["num_probe_true_positives"]
        if "split_features" in base and n_tp:
            sel = torch.as_tensor([where[int(j)] for j in np.flatnonzero(tp_masks[c])])
            pw = absorption_per_word(x_test[rows[sel]], vals[sel], idx[sel], dirs[sel],
                                     gt.weight[i], base["split_features"])
            r["absorption_fraction"] = float(pw.fraction.sum()) / n_tp
            r["num_full_absorption"] = int(pw.full.sum())
            r["full_absorption_rate"] = r["num_full_absorption"] / n_tp
            r["num_split_features"] = base["num_split_features"]
        per[c] = r
    return {**summarize(per), "letters": per}


def difference(lin: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """``full - linear`` of the headline numbers and per letter, with the largest per-letter
    change and how many counted letters changed at all."""
    out: dict[str, Any] = {}
    for key in ("mean_absorption_fraction", "mean_full_absorption_rate"):
        a, b = lin.get(key), full.get(key)
        out[key] = None if a is None or b is None else b - a
    per, changed = {}, 0
    for c, r in lin["letters"].items():
        f = full["letters"][c]
        if r.get("counted") and "absorption_fraction" in r:
            d = f["absorption_fraction"] - r["absorption_fraction"]
            per[c] = d
            changed += d != 0 or f["num_full_absorption"] != r["num_full_absorption"]
    out["per_letter_absorption_fraction"] = per
    out["max_abs_letter_change"] = max((abs(v) for v in per.values()), default=None)
    out["letters_changed"] = changed
    return out


__all__ = ["LETTERS", "TEMPLATE", "WORD_POS", "GroundTruth", "PerWord", "Words",
           "absorption_eval", "absorption_per_word", "difference", "directions", "f1_binary",
           "first_letter", "ground_truth_from", "ground_truth_probe", "make_prompt",
           "split_features", "summarize", "task_words", "word_acts"]
