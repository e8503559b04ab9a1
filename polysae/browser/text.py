"""Token text of context windows, as the feature browser and the Neuronpedia export show them.

A window is the ``left + 1 + right`` tokens around a row, cut at the row's document and forward
context. :class:`TokenText` turns token ids into display strings that stay correct when a
character's UTF-8 bytes are split across tokens (byte-level BPE).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class TokenText:
    """Display strings of tokens, correct when a character's bytes are split across tokens.

    A token decoded alone normally gives its text; one holding an incomplete UTF-8 sequence
    decodes to U+FFFD. For windows with such a token the pieces come from decoding growing spans:
    a token whose prefix still ends mid-character gets "" and the completed character appears on
    the token that finishes it, so the pieces concatenate to the window's true text."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[int, str] = {}
        self.span_all: bool | None = None
        """True when solo pieces do not concatenate to the decoded text (SentencePiece-style
        leading spaces, word-level tokenizers): then every window is span-decoded (slower)."""

    def check_concat(self, windows: list[list[int]]) -> bool:
        """Decide ``span_all`` from sample windows: do solo pieces join to the decoded span?"""
        if self.span_all is None:
            ok = True
            for ids in windows:
                ids = [t for t in ids if t >= 0]
                if ids and not any(self.broken(t) for t in ids):
                    if "".join(self.piece(t) for t in ids) != self._decode(ids):
                        ok = False
                        break
            self.span_all = not ok
            if self.span_all:
                log.info("browser: the tokenizer's single-token pieces do not concatenate to its "
                         "decoded text; span-decoding every context window")
        return bool(self.span_all)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def piece(self, t: int) -> str:
        """The text of token ``t`` decoded alone (cached)."""
        s = self.cache.get(t)
        if s is None:
            s = self.cache[t] = self._decode([t])
        return s

    def broken(self, t: int) -> bool:
        """Whether token ``t`` alone decodes to an incomplete character (U+FFFD)."""
        return "\ufffd" in self.piece(t)

    def span_pieces(self, ids: list[int]) -> list[str]:
        """Pieces of a window of ids (-1 = masked, given "")."""
        out: list[str] = []
        run: list[int] = []
        done = ""
        for t in ids:
            if t < 0:
                out.append("")
                run, done = [], ""
                continue
            run.append(t)
            cur = self._decode(run)
            if cur.endswith("\ufffd"):  # incomplete character: wait for the next token
                out.append("")
                continue
            k = len(os.path.commonprefix([done, cur]))
            out.append(cur[k:])
            done = cur
        return out


def context_windows(rows: Tensor, token_ids: Tensor | None, doc_ids: Tensor | None, left: int,
                    right: int, text: TokenText | None = None, positions: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, dict]:
    """Token windows around ``rows`` [...] as the site shows them: ``(ids [..., W], valid
    [..., W], overrides)``, ids -1 outside the row's document / forward context (and for rows
    -1), ``overrides`` {flat window index: pieces} for windows whose pieces need span decoding
    (split characters; see :class:`TokenText`). Without ``token_ids`` every id is -1.

    With ``positions`` a window also stops where the context position does not advance by one per
    row (a new forward context, e.g. after a chunk's BOS), since tokens there were not seen by the
    model together with the peak token."""
    shape = rows.shape
    rows = rows.reshape(-1)
    offs = torch.arange(-left, right + 1)
    if token_ids is None:
        return (torch.full((*shape, left + right + 1), -1, dtype=torch.int64),
                torch.zeros((*shape, left + right + 1), dtype=torch.bool), {})
    n = token_ids.numel()
    w = rows[:, None] + offs
    ok = (rows[:, None] >= 0) & (w >= 0) & (w < n)
    wc = w.clamp(0, n - 1)
    if doc_ids is not None:
        ok &= doc_ids[wc] == doc_ids[rows.clamp(0, n - 1)][:, None]
    if positions is not None:
        ok &= (positions[wc] - positions[rows.clamp(0, n - 1)][:, None]) == offs
    toks = torch.where(ok, token_ids[wc], torch.full_like(wc, -1))
    ov: dict[int, list[str]] = {}
    if text is not None:
        uniq = torch.unique(toks[toks >= 0]).tolist()
        bad = {t for t in uniq if text.broken(t)}
        if text.check_concat(toks[:64].tolist()):
            for c in range(toks.shape[0]):
                if bool((toks[c] >= 0).any()):
                    ov[c] = text.span_pieces(toks[c].tolist())
        elif bad:
            bad_t = torch.tensor(sorted(bad))
            hit = torch.isin(toks, bad_t).any(1).nonzero().flatten().tolist()
            for c in hit:
                ov[c] = text.span_pieces(toks[c].tolist())
    return toks.view(*shape, -1), ok.view(*shape, -1), ov


def peak_strings(toks: Tensor, valid: Tensor, ov: dict, left: int,
                 vocab: dict | None) -> list[list[str]]:
    """Per latent of a shard (``toks`` [S, T, W] windows from :func:`context_windows`, ``valid``
    [S, T] live contexts, ``ov`` its overrides): the distinct texts of its peak tokens, most
    frequent first (at most 5). The span-decoded piece is used where the window holds a split
    character, so a latent that fires on the byte completing "é" is listed as "é", not as U+FFFD.
    ``vocab`` maps ids to pieces; without it a token is shown as ``[id]``."""
    out = []
    T = toks.shape[1]
    tl = toks[:, :, left].tolist()
    vl = valid.tolist()
    for r, (row, ok) in enumerate(zip(tl, vl)):
        seen: dict[str, int] = {}
        for t, (tok, good) in enumerate(zip(row, ok)):
            if not good or tok < 0:
                continue
            o = ov.get(r * T + t)
            txt = o[left] if o is not None else (vocab[tok] if vocab is not None else f"[{tok}]")
            seen[txt] = seen.get(txt, 0) + 1
        out.append([k for k, _ in sorted(seen.items(), key=lambda kv: -kv[1])][:5])
    return out
