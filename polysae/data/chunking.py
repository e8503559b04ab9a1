"""Text -> fixed-length token contexts for harvesting, with a documented BOS policy.

The readers of files and ``hf:`` datasets live in :mod:`polysae.data.sources` (shared with
:mod:`polysae.data.corpora`); this module picks a source by name and tokenizes it.

Sources (``DatasetSpec.name``):

- ``bbc`` / ``tweets`` / ``fortunes``: the bundled corpora (:mod:`polysae.data.corpora`);
- a local ``.txt`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file (``text_column`` picks the column,
  default ``text``; parquet is read in record batches, never whole);
- a pre-tokenized ``.npy`` integer array: 2-D ``[n, ctx]`` rows are used as contexts unchanged
  (document id = row), 1-D is a token stream cut into ``ctx``-long contexts (document id 0); no
  special tokens are added to pre-tokenized data;
- ``hf:NAME[:config][@split]``: a Hugging Face ``datasets`` dataset, streamed
  (``load_dataset(NAME, config, split=split, streaming=True)``, split default ``train``). NAME
  may be a hub id (needs the hub, or its cache with ``HF_HUB_OFFLINE=1``), a local folder of
  data files (parquet/jsonl/csv/txt, read offline by ``datasets``' packaged builders) or a folder
  written by ``Dataset.save_to_disk`` (``load_from_disk``, then streamed as an iterable dataset);
- anything else is tried as a Hugging Face dataset name (``hf:`` without the prefix).

A missing text column is a ``ValueError`` naming the column and the columns there are.

BOS policy (``bos``), applied to text sources. Documents are tokenized without special tokens and
each is followed by a separator (EOS; ``[SEP]`` for encoders; BOS if the tokenizer has no EOS):

- ``"chunk"`` (default): every context starts with BOS (``[CLS]`` for encoders; encoders also end
  with ``[SEP]``), then ``ctx - 1`` tokens of the concatenated document stream. Position 0 of a
  decoder is an attention sink whose activations are huge and content-free; starting every context
  the same way makes that position uniform, and ``exclude_special`` drops it from the store.
- ``"doc"``: BOS before every document, stream concatenated and cut into ``ctx``-long contexts
  (contexts may start mid-document, without BOS). This is what the model saw in pre-training.
- ``"none"``: nothing is prepended (documents still separated by EOS).

A final partial context is dropped, so every context is exactly ``ctx`` tokens.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch

from polysae.data.corpora import CORPORA, load_corpus
from polysae.data.sources import (
    HF_PREFIX,
    LOCAL_TEXT_SUFFIXES,
    iter_hf_texts,
    iter_parquet_texts,
)

BOS_POLICIES = ("chunk", "doc", "none")
_TOKENIZE_GROUP = 64  # documents per tokenizer call: enough to batch, few enough to stop early


class Chunks(NamedTuple):
    """Token contexts ready to forward."""

    tokens: torch.Tensor
    """[n, ctx] int64 token ids."""
    doc_ids: torch.Tensor
    """[n, ctx] int64 index of the source document each token came from (dataset order)."""


class SpecialTokens(NamedTuple):
    prefix: list[int]
    """Ids put at the start of every context ("chunk") or document ("doc")."""
    suffix: list[int]
    """Ids put at the end of every context (encoders: ``[SEP]``)."""
    separator: list[int]
    """Ids after every document."""
    all_ids: frozenset
    """Every special id (BOS/EOS/PAD/CLS/SEP/...) for ``exclude_special``."""


def special_tokens(tokenizer: Any, kind: str) -> SpecialTokens:
    if tokenizer is None:
        return SpecialTokens([], [], [], frozenset())

    def tid(attr: str) -> int | None:
        v = getattr(tokenizer, attr, None)
        return int(v) if v is not None else None

    bos, eos, cls, sep, pad = (tid(a) for a in ("bos_token_id", "eos_token_id", "cls_token_id",
                                                "sep_token_id", "pad_token_id"))
    ids = {i for i in (bos, eos, cls, sep, pad) if i is not None}
    ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    if kind == "encoder":
        start, end = (cls if cls is not None else bos), (sep if sep is not None else eos)
        prefix, suffix = ([start] if start is not None else []), ([end] if end is not None else [])
        separator = suffix
    else:
        prefix = [bos] if bos is not None else []
        suffix = []
        separator = [eos] if eos is not None else prefix
    return SpecialTokens(prefix, suffix, separator, frozenset(ids))


def iter_texts(name: str, *, text_column: str | None = None, max_docs: int | None = None,
               seed: int = 0, split: str = "train", encoding: str | None = None
               ) -> Iterator[str]:
    """Document texts of a dataset, in a deterministic order (see the module docstring for the
    sources; ``split`` is the default split of ``hf:`` sources that name none; ``encoding`` that
    of a local text file, default strict UTF-8)."""
    if name.startswith(HF_PREFIX):
        yield from iter_hf_texts(name, text_column, max_docs, split)
        return
    p = Path(name)
    suffix = p.suffix.lower()
    if suffix == ".parquet" and p.is_file():
        yield from iter_parquet_texts(p, text_column, max_docs)
        return
    local = suffix in (".txt", ".jsonl", ".csv") and p.exists()
    if name in CORPORA or local:
        kw = {"text_column": text_column} if text_column else {}
        docs = load_corpus(name, max_docs=max_docs, seed=seed, encoding=encoding, **kw)
        order = range(len(docs))
        if name in CORPORA:
            # Bundled corpora come grouped by label (BBC by topic); a seeded document order keeps a
            # small --tokens budget from being all one class. Local files keep their own order.
            order = np.random.default_rng(seed).permutation(len(docs)).tolist()
        for i in order:
            yield docs[i].text
        return
    if suffix in (*LOCAL_TEXT_SUFFIXES, ".npy"):
        raise FileNotFoundError(f"dataset file {name} does not exist")
    try:
        yield from iter_hf_texts(name, text_column, max_docs, split)
    except ValueError as e:
        if "cannot stream" not in str(e):
            raise
        raise ValueError(f"dataset {name!r} is not a bundled corpus "
                         f"({', '.join(CORPORA)}), a local .txt/.jsonl/.csv/.parquet/"
                         f".npy file, or a loadable Hugging Face dataset ({e}); write "
                         "hf:NAME[:config][@split] for a dataset") from None


def build_chunks(name: str, tokenizer: Any, ctx: int, n_chunks: int, *, kind: str = "decoder",
                 bos: str = "chunk", text_column: str | None = None, seed: int = 0,
                 encoding: str | None = None) -> Chunks:
    """The first ``n_chunks`` contexts of ``ctx`` tokens from dataset ``name`` (fewer if it runs
    out; an empty result raises ``ValueError`` naming the dataset)."""
    if bos not in BOS_POLICIES:
        raise ValueError(f"bos policy {bos!r}: expected one of {BOS_POLICIES}")
    if ctx < 2:
        raise ValueError(f"ctx must be >= 2, got {ctx}")
    if name.lower().endswith(".npy"):
        out = _npy_chunks(Path(name), ctx, n_chunks)
    else:
        if tokenizer is None:
            raise ValueError(f"dataset {name!r} is text but the model has no tokenizer; pass a "
                             f"pre-tokenized .npy file")
        out = _text_chunks(iter_texts(name, text_column=text_column, seed=seed,
                                      encoding=encoding), tokenizer, ctx, n_chunks,
                           special_tokens(tokenizer, kind), bos)
    if out.tokens.shape[0] == 0:
        raise ValueError(f"dataset {name!r} gave no complete context of {ctx} tokens (empty or too "
                         f"short); use more text or a smaller --ctx")
    return out


def _npy_chunks(path: Path, ctx: int, n_chunks: int) -> Chunks:
    if not path.exists():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path}: not a plain numpy array ({e})") from None
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path}: token ids must be integers, got dtype {arr.dtype}")
    if arr.ndim == 2:
        if arr.shape[1] != ctx:
            raise ValueError(f"{path}: rows are {arr.shape[1]} tokens long but --ctx is {ctx}; "
                             f"pre-tokenized 2-D data is used as-is, so pass --ctx {arr.shape[1]}")
        toks = torch.from_numpy(np.array(arr[:n_chunks], dtype=np.int64))
        docs = torch.arange(toks.shape[0], dtype=torch.int64)[:, None].expand_as(toks).clone()
    elif arr.ndim == 1:
        n = min(n_chunks, arr.shape[0] // ctx)
        toks = torch.from_numpy(np.array(arr[: n * ctx], dtype=np.int64)).reshape(n, ctx)
        docs = torch.zeros_like(toks)
    else:
        raise ValueError(f"{path}: expected a 1-D token stream or 2-D [n, ctx] array, got shape "
                         f"{arr.shape}")
    if toks.numel() and int(toks.min()) < 0:
        raise ValueError(f"{path}: negative token id {int(toks.min())}")
    return Chunks(toks, docs)


def _text_chunks(texts: Iterator[str], tokenizer: Any, ctx: int, n_chunks: int,
                 sp: SpecialTokens, bos: str) -> Chunks:
    if bos == "chunk":
        head, tail = sp.prefix, sp.suffix
    else:
        head, tail = [], sp.suffix if bos == "doc" else []
    body = ctx - len(head) - len(tail)
    if body < 1:
        raise ValueError(f"ctx {ctx} leaves no room for text after the special tokens")
    tok_buf: list[int] = []
    doc_buf: list[int] = []
    chunks_t: list[list[int]] = []
    chunks_d: list[list[int]] = []
    doc_index = 0

    def drain() -> None:
        while len(tok_buf) >= body and len(chunks_t) < n_chunks:
            t, d = tok_buf[:body], doc_buf[:body]
            del tok_buf[:body], doc_buf[:body]
            # Specials take the document id of their neighbouring text, so contexts stay readable.
            chunks_t.append(head + t + tail)
            chunks_d.append([d[0]] * len(head) + d + [d[-1]] * len(tail))

    group: list[str] = []
    for text in texts:
        group.append(text)
        if len(group) < _TOKENIZE_GROUP:
            continue
        doc_index = _extend(group, doc_index, tokenizer, sp, bos, tok_buf, doc_buf)
        group = []
        drain()
        if len(chunks_t) >= n_chunks:
            break
    if group and len(chunks_t) < n_chunks:
        _extend(group, doc_index, tokenizer, sp, bos, tok_buf, doc_buf)
        drain()
    if not chunks_t:
        empty = torch.zeros(0, ctx, dtype=torch.int64)
        return Chunks(empty, empty.clone())
    return Chunks(torch.tensor(chunks_t, dtype=torch.int64),
                  torch.tensor(chunks_d, dtype=torch.int64))


def _extend(group: list[str], doc_index: int, tokenizer: Any, sp: SpecialTokens, bos: str,
            tok_buf: list[int], doc_buf: list[int]) -> int:
    enc = tokenizer(group, add_special_tokens=False)["input_ids"]
    for ids in enc:
        if not ids:  # blank documents add nothing, not even a separator
            doc_index += 1
            continue
        pre = sp.prefix if bos == "doc" else []
        seq = pre + list(ids) + sp.separator
        tok_buf.extend(seq)
        doc_buf.extend([doc_index] * len(seq))
        doc_index += 1
    return doc_index


def chunks_needed(tokens: int, ctx: int) -> int:
    """Contexts needed to forward at least ``tokens`` tokens."""
    if tokens < 1:
        raise ValueError(f"--tokens must be positive, got {tokens}")
    return math.ceil(tokens / ctx)
