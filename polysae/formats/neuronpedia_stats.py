"""The per-feature figures of the Neuronpedia export (:mod:`polysae.formats.neuronpedia`): logit
effects of a direction through the unembedding, each feature's activation range and its
SAEDashboard-style histogram, the special tokens masked by default, the token windows, and the
layer / prompt counts of the batch files."""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import torch
from torch import Tensor

from polysae.browser.text import TokenText, context_windows


def hook_layer(hook: str | None) -> int | None:
    """Layer number of a transformer-lens hook name (``blocks.6.hook_resid_post`` -> 6)."""
    m = re.match(r"blocks\.(\d+)\.", hook or "")
    return int(m.group(1)) if m else None


def round_list(x: Tensor, nd: int) -> list:
    """Values rounded to ``nd`` decimals for the JSON (non-finite -> 0). Plain Python: the lists
    are short, and per-call tensor overhead would dominate."""
    return [round(v, nd) if math.isfinite(v) else 0.0 for v in x.tolist()]


def count_prompts(positions: Tensor | None, n_rows: int) -> int:
    """Forward contexts among the rows: a new one starts wherever the context position does not
    advance by exactly one from the previous row."""
    if positions is None or positions.numel() == 0:
        return 0
    starts = torch.ones(positions.numel(), dtype=torch.bool)
    starts[1:] = positions[1:] != positions[:-1] + 1
    return int(starts.sum())


class LogitEffects(NamedTuple):
    """Per direction: the strongest promoted / suppressed tokens and a histogram of all logits."""

    up_ids: Tensor
    """[M, n] token ids with the largest logits, largest first."""
    up_vals: Tensor
    """[M, n] their logits."""
    down_ids: Tensor
    """[M, n] token ids with the smallest logits, smallest first."""
    down_vals: Tensor
    """[M, n] their logits."""
    hist_heights: Tensor
    """[M, B] counts of the vocabulary's logits per bin."""
    hist_values: Tensor
    """[M, B] bin centres (each row spans its own [min, max])."""


@torch.no_grad()
def logit_effects(directions: Tensor, W_U: Tensor, n: int, bins: int,
                  block: int = 256) -> LogitEffects:
    """Logits ``directions [M, D] @ W_U [D, vocab]`` of each direction, in blocks of rows."""
    W = W_U.detach().float().cpu()
    n = min(n, W.shape[1])
    out: list[list[Tensor]] = [[] for _ in range(6)]
    for s in range(0, directions.shape[0], block):
        lg = directions[s:s + block].detach().float().cpu() @ W
        uv, ui = lg.topk(n, dim=1)
        dv, di = lg.topk(n, dim=1, largest=False)
        lo, hi = lg.min(1, keepdim=True).values, lg.max(1, keepdim=True).values
        width = (hi - lo).clamp_min(1e-12) / bins
        b = ((lg - lo) / width).floor().clamp(0, bins - 1).long()
        heights = torch.zeros(lg.shape[0], bins).scatter_add_(1, b, torch.ones_like(lg))
        centres = lo + width * (torch.arange(bins) + 0.5)
        for lst, t in zip(out, (ui, uv, di, dv, heights, centres)):
            lst.append(t)
    return LogitEffects(*(torch.cat(t) for t in out))


def special_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokenizer's BOS, EOS and PAD tokens (those it defines), sorted."""
    ids = {getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return sorted(int(i) for i in ids if i is not None)


class TokenWindows:
    """Token strings and per-token values of context windows, trimmed to their valid span."""

    def __init__(self, token_ids: Tensor, doc_ids: Tensor | None, positions: Tensor | None,
                 tokenizer: Any, left: int, right: int):
        self.token_ids, self.doc_ids, self.positions = token_ids, doc_ids, positions
        self.text = TokenText(tokenizer)
        self.left, self.right = left, right

    def get(self, rows: Tensor) -> tuple[Tensor, Tensor, list[list[str]]]:
        """rows [M] -> (ids [M, W], valid [M, W], pieces per window)."""
        ids, ok, ov = context_windows(rows, self.token_ids, self.doc_ids, self.left, self.right,
                                      self.text, self.positions)
        pieces = []
        for c, row in enumerate(ids.tolist()):
            p = ov.get(c)
            pieces.append(p if p is not None else
                          [self.text.piece(t) if t >= 0 else "" for t in row])
        return ids, ok, pieces

    def entries(self, rows: Tensor, vals: Tensor) -> list[list[tuple[list[str], list[int], int]]]:
        """For top rows [S, T] with values [S, T] (-inf / row -1 where a slot has fewer than T):
        per slot, best first, (tokens, kept window offsets, index of the peak token in them)."""
        S, T = rows.shape
        flat = rows.reshape(-1)
        live = (flat >= 0) & torch.isfinite(vals.reshape(-1))
        ids, ok, pieces = self.get(flat.clamp_min(0))
        out: list[list[tuple[list[str], list[int], int]]] = [[] for _ in range(S)]
        for n in range(flat.numel()):
            if not bool(live[n]):
                continue
            keep = ok[n].nonzero().flatten().tolist()
            toks = [pieces[n][w] for w in keep]
            out[n // T].append((toks, keep, keep.index(self.left)))
        return out


def kept_batches(read_rows: Callable[[int, int], Tensor], n_rows: int, size: int,
                  skip: Tensor | None) -> Iterator[Tensor]:
    """Row batches with the skipped rows left out (batches left empty are not yielded)."""
    for s in range(0, n_rows, size):
        e = min(n_rows, s + size)
        x = read_rows(s, e)
        if skip is not None:
            x = x[~skip[s:e].to(x.device)]
        if x.shape[0]:
            yield x


@torch.no_grad()
def activation_range(sae, batches: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """(lo [F], hi [F]) float32: each latent's smallest and largest nonzero activation over the
    rows of ``batches`` ([rows, d_in] each); +inf / -inf for a latent that never fires."""
    F_ = sae.cfg.d_sae
    lo = torch.full((F_,), float("inf"))
    hi = torch.full((F_,), float("-inf"))
    dev = sae.W_enc.device
    for x in batches:
        codes = sae.encode_sparse(x.to(dev))
        v = codes.values.detach().float().cpu()
        i = codes.indices.detach().cpu()
        on = v > 0
        lat, v = i[on], v[on]
        lo.scatter_reduce_(0, lat, v, "amin")
        hi.scatter_reduce_(0, lat, v, "amax")
    return lo, hi


def activation_histogram(heights: Tensor, lo: float, hi: float, nd: int) -> tuple[list, list]:
    """(bar_values, bar_heights) of one feature as SAEDashboard writes them: bin centres
    ``lo + (i + 1/2) (hi - lo) / bins`` (float32, rounded), and the counts; both empty for a
    feature that never fired (``lo > hi``)."""
    if not lo <= hi:
        return [], []
    bins = heights.numel()
    edges = torch.linspace(lo, hi, bins + 1)
    centres = edges[:-1] + (hi - lo) / bins / 2
    return round_list(centres, nd), heights.tolist()


__all__ = ["LogitEffects", "TokenWindows", "activation_histogram", "activation_range",
           "count_prompts", "hook_layer", "kept_batches", "logit_effects", "round_list",
           "special_token_ids"]
