"""Hook activations of the probing texts, kept between ``evaluate`` calls in one process.

Every SAE evaluated on the same model, hook and labelled texts needs the same language-model
activations: only the SAE's encoding of them differs. ``polysae replicate`` evaluates a dozen or
more SAE pairs on one model, and the language-model forward over the probing texts (thousands of
texts at the larger probing sizes) was most of each cell's evaluation on a CPU. This cache keeps the
last few :class:`~polysae.evaluation.probing.PooledText` results per model, so that forward runs
once per process instead of once per cell.

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

MAX_ENTRIES = 6
"""Entries kept per model (one per probing dataset; the bundled defaults use three)."""

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""module -> OrderedDict[key, PooledText], least recently used first."""


def _fingerprint(module: Any) -> tuple:
    """Parameters' and buffers' (storage pointer, version counter): changes when the model's
    weights are replaced or modified in place."""
    out = []
    for t in (*module.parameters(), *module.buffers()):
        out.append((t.data_ptr(), t._version))
    return tuple(out)


def _key(hook: str, token_lists: Sequence[Tensor], special_ids: Iterable[int], pad_id: int,
         batch_size: int, module: Any) -> tuple:
    h = hashlib.sha256()
    for t in token_lists:
        b = t.detach().cpu().to(dtype=t.dtype).contiguous().numpy().tobytes()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return (hook, h.hexdigest(), tuple(sorted(set(int(i) for i in special_ids))), int(pad_id),
            int(batch_size), _fingerprint(module))


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
    module = getattr(backend, "module", None)
    try:
        entries = _CACHE.get(module) if module is not None else None
    except TypeError:  # not weakly referenceable
        module = None
        entries = None
    key = _key(hook, token_lists, special_ids, pad_id, batch_size, module) if module is not None \
        else None
    if entries is not None and key in entries:
        entries.move_to_end(key)
        if progress is not None:
            progress(len(token_lists))
        return entries[key]
    pooled = collect_text_acts(backend, hook, token_lists, special_ids, batch_size=batch_size,
                               pad_id=pad_id, progress=progress)
    if module is not None:
        try:
            entries = _CACHE.setdefault(module, OrderedDict())
        except TypeError:
            return pooled
        entries[key] = pooled
        while len(entries) > MAX_ENTRIES:
            entries.popitem(last=False)
    return pooled


def clear() -> None:
    """Forget every cached activation."""
    _CACHE.clear()


__all__ = ["MAX_ENTRIES", "cached_text_acts", "clear"]
