"""Training data sources: anything with ``batches(epoch=0, start=0)`` yielding [B, d_in] tensors.

:class:`polysae.data.store.ActivationStore` is one; :class:`TensorSource` serves an in-memory
tensor; :func:`as_source` wraps a plain iterable (:class:`IterableSource`). Exact resume needs a
source that replays: ``batches(epoch, start)`` is called with the saved position.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor


class TensorSource:
    """An in-memory [N, d_in] tensor served in shuffled batches, resumable and shardable.

    Global batch ``i`` of epoch ``e`` is rows ``perm_e[i*B:(i+1)*B]`` of a permutation seeded by
    ``(seed, e)``; rank ``r`` of ``W`` gets its ``r``-th contiguous slice of ``B/W`` rows, so the
    ranks' batches concatenated are exactly the 1-process batch (what the DDP test relies on).
    The incomplete last global batch of an epoch is dropped so every rank sees equal batches."""

    def __init__(self, data: Tensor, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if data.ndim != 2:
            raise ValueError(f"TensorSource: data must be [N, d_in], got shape {tuple(data.shape)}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"TensorSource: batch_size={batch_size} must be a positive multiple "
                             f"of world_size={world_size}")
        if batch_size > data.shape[0]:
            raise ValueError(f"TensorSource: batch_size={batch_size} exceeds the {data.shape[0]} "
                             "rows available")
        self.data, self.batch_size, self.seed, self.shuffle = data, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.d_in = data.shape[1]

    def __len__(self) -> int:
        return self.data.shape[0] // self.batch_size

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Tensor]:
        n = self.data.shape[0]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        per = self.batch_size // self.world_size
        for i in range(start, len(self)):
            lo = i * self.batch_size + self.rank * per
            yield self.data[perm[lo:lo + per]]

    def __iter__(self) -> Iterator[Tensor]:
        return self.batches(0, 0)


class IterableSource:
    """Adapter for a plain iterable: re-iterated each epoch when it can be (a single-use
    iterator gives one epoch); ``start`` batches are skipped by reading them."""

    def __init__(self, it: Iterable[Tensor]):
        self.it = it
        self.once = iter(it) is it

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Tensor]:
        if self.once and epoch > 0:
            return iter(())
        return itertools.islice(iter(self.it), start, None)


def as_source(source: Any):
    """Anything with ``batches(epoch, start)`` is used as is; an iterable is wrapped."""
    if hasattr(source, "batches"):
        return source
    if isinstance(source, Tensor):
        raise TypeError("pass a tensor of activations as TensorSource(data, batch_size)")
    if isinstance(source, Iterable):
        return IterableSource(source)
    raise TypeError(f"training data must be an iterable of [B, d_in] tensors or have "
                    f"batches(epoch, start); got {type(source).__name__}")
