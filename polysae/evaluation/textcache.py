"""Hook activations of the probing texts and of the absorption task's word prompts, kept between
``evaluate`` calls in one process.

Every SAE evaluated on the same model, hook and labelled texts needs the same language-model
activations: only the SAE's encoding of them differs. ``polysae replicate`` evaluates a dozen or
more SAE pairs on one model, and the language-model forward over the probing texts (thousands of
texts at the larger probing sizes) was most of each cell's evaluation on a CPU. This cache keeps the
last few :class:`~polysae.evaluation.probing.PooledText` results per model, so that forward runs
once per process instead of once per cell. The absorption task's word prompts (4,096 at the
default sizes, ~70 s on a 2-core CPU) go through the same cache (:func:`cached`).

The key is exact: the hook, the token ids of every text (a SHA-256 over their bytes and lengths),
the special ids dropped, the padding id and the batch size (batch composition can change the last
bits of a GEMM). The model is the key's owner (a weak reference to its ``torch.nn.Module``, so the
cache dies with the model) together with a fingerprint of its parameters: their storage and
in-place version counters, so training or editing the model in place between calls is a miss, not
a stale hit. A model that cannot be weakly referenced is never cached.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import Tensor

MAX_ENTRIES = 8
"""Entries kept per model (one per probing dataset, the bundled defaults use three; two for the
absorption task's train and test words)."""

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""module -> OrderedDict[key, value], least recently used first."""


def _fingerprint(module: Any) -> tuple:
    """Parameters' and buffers' (storage pointer, version counter): changes when the model's
    weights are replaced or modified in place."""
    out = []
    for t in (*module.parameters(), *module.buffers()):
        out.append((t.data_ptr(), t._version))
    return tuple(out)


def _owner(model: Any) -> Any:
    """The ``torch.nn.Module`` that owns the cache entries of ``model``, or ``None`` when it cannot
    be weakly referenced (then nothing is cached)."""
    from polysae.data.backend import BackendError
    from polysae.data.models import as_backend

    try:
        module = getattr(as_backend(model), "module", None)
    except BackendError:
        return None
    try:
        _CACHE.get(module)
    except TypeError:
        return None
    return module


def cached(model: Any, key: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()``, or the value an earlier call with the same ``model`` and ``key`` returned in
    this process. ``key`` must hold everything besides the model's weights that decides the
    result (its first item names the kind of entry); the weights' fingerprint is added here. The
    returned value is shared with the cache: do not modify it."""
    module = _owner(model)
    if module is None:
        return compute()
    full = (*key, _fingerprint(module))
    entries = _CACHE.get(module)
    if entries is not None and full in entries:
        entries.move_to_end(full)
        return entries[full]
    value = compute()
    entries = _CACHE.setdefault(module, OrderedDict())
    entries[full] = value
    while len(entries) > MAX_ENTRIES:
        entries.popitem(last=False)
    return value


def token_digest(token_lists: Sequence[Any]) -> str:
    """SHA-256 over the bytes and lengths of token-id sequences (tensors or lists of ints)."""
    import torch

    h = hashlib.sha256()
    for t in token_lists:
        t = torch.as_tensor(t, dtype=torch.long) if not isinstance(t, Tensor) else t
        b = t.detach().cpu().contiguous().numpy().tobytes()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def cached_text_acts(model: Any, hook: str, token_lists: Sequence[Tensor],
                     special_ids: Iterable[int] = (), *, batch_size: int = 16, pad_id: int = 0,
                     progress: Callable[[int], None] | None = None):
    """:func:`~polysae.evaluation.probing.collect_text_acts`, answered from the cache when the
    same model, hook and texts were run before in this process (``progress`` then jumps to the
    end at once). The returned tensors are shared with the cache: do not modify them."""
    from polysae.data.models import as_backend
    from polysae.evaluation.probing import collect_text_acts

    backend = as_backend(model)
    special_ids = list(special_ids)
    key = ("probing_texts", hook, token_digest(token_lists),
           tuple(sorted(set(int(i) for i in special_ids))), int(pad_id), int(batch_size))
    hit = True

    def compute():
        nonlocal hit
        hit = False
        return collect_text_acts(backend, hook, token_lists, special_ids, batch_size=batch_size,
                                 pad_id=pad_id, progress=progress)

    pooled = cached(backend, key, compute)
    if hit and progress is not None:
        progress(len(token_lists))
    return pooled


def clear() -> None:
    """Forget every cached activation."""
    _CACHE.clear()


__all__ = ["MAX_ENTRIES", "cached", "cached_text_acts", "clear", "token_digest"]
