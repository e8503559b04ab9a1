"""Stream harvested activations back as shuffled ``[B, d_in]`` batches, or straight from a model.

Shuffling (``ActivationStore.batches``): for epoch ``e`` the split's shards are put in a seeded
random order and viewed as one virtual array of ``n_rows`` rows; that array is cut into windows
of ``buffer_rows`` rows and each window is permuted (seeded by seed, epoch and window). Batches are
consecutive runs of the permuted stream. So every row is served exactly once per epoch, memory
holds at most two windows, rows from several shards mix inside a window (a window spans about
``buffer_rows / shard_size`` shards in a random order), and batch ``b`` of epoch ``e`` can be
produced without replaying earlier batches (exact resume). With ``world_size > 1``, rank ``r``
takes every ``world_size``-th row of each global batch of ``batch_size * world_size`` rows, so
ranks get disjoint, equal-sized parts whose union is exactly the 1-process batch of
``batch_size * world_size`` rows; each rank reads from disk only the rows it serves (1/W of each
window, gathered shard by shard), not the whole window.

Reads are memory-mapped (``numpy.memmap`` over the safetensors data section); each shard's header,
size and (with ``verify``) sha256 are checked against the manifest the first time it is touched,
and any mismatch raises :class:`ShardError` naming the file.

Train/validation split: by shard. ``val`` holds ``max(1, round(val_fraction * n_shards))`` shards
(none when the harvest has a single shard) picked by hashing shard indices, so the split does not
depend on the shuffle seed and is spread over the corpus rather than its tail.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np
import torch

from polysae.data.actformat import HEADER_DTYPES, MANIFEST, TOKENS_DIR, read_manifest, storage_dtype
from polysae.validate import safetensors_header

log = logging.getLogger(__name__)

_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I64": np.int64}
_TORCH_VIEW = {"BF16": torch.bfloat16}
SPLITS = ("train", "val", "all")
_DEFAULT_BUFFER_BYTES = 256 << 20


class TokenInfo(NamedTuple):
    """Per-row token context, aligned with ``ActivationStore.read_rows``."""

    token_ids: torch.Tensor
    """[n] int64 token id of each row."""
    doc_ids: torch.Tensor
    """[n] int64 source document index."""
    positions: torch.Tensor
    """[n] int64 position in its model context (0 = first token of the context)."""


class ShardError(ValueError):
    """A shard file is missing, truncated or corrupt; the message names it."""


class _Shard:
    """One safetensors file, memory-mapped, checked against the manifest entry."""

    def __init__(self, path: Path, sha256: str | None, verify: bool):
        self.path = path
        header, self.data_start = read_header(path)  # parsed and checked by hand, size capped
        self.finite = False  # activations checked for NaN/inf (once, on first read)
        if verify and sha256 is not None:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
            if h.hexdigest() != sha256:
                raise ShardError(f"{path}: corrupt shard (sha256 {h.hexdigest()[:12]}... does not "
                                 f"match the manifest's {sha256[:12]}...)")
        self.header = header

    def array(self, key: str) -> tuple[np.ndarray, str]:
        meta = self.header.get(key)
        if meta is None or meta.get("dtype") not in _NP:
            raise ShardError(f"{self.path}: corrupt shard (tensor {key!r} missing or of "
                             f"unsupported dtype)")
        a, b = (int(x) for x in meta["data_offsets"])
        shape = tuple(int(s) for s in meta["shape"])
        dt = np.dtype(_NP[meta["dtype"]])
        if (b - a) != int(np.prod(shape)) * dt.itemsize:
            raise ShardError(f"{self.path}: corrupt shard (tensor {key!r} size does not match its "
                             f"shape {shape})")
        mm = np.memmap(self.path, dtype=dt, mode="r", offset=self.data_start + a, shape=shape)
        return mm, meta["dtype"]


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """``(header, data_start)`` of a shard (:func:`polysae.validate.safetensors_header`); a
    :class:`ShardError` naming the file when missing, truncated or malformed."""
    try:
        header, start, _ = safetensors_header(path)
    except FileNotFoundError as e:
        raise ShardError(str(e)) from None
    except ValueError as e:
        raise ShardError(str(e)) from None
    return header, start


def check_finite_shard(path: Path, arr: np.ndarray, st_dtype: str, rows: int = 8192) -> None:
    """A :class:`ShardError` naming the shard, row and column of the first NaN/inf in ``arr``
    (read in blocks of ``rows``: memory stays small; bfloat16 is checked on its bits)."""
    for lo in range(0, arr.shape[0], rows):
        block = np.asarray(arr[lo:lo + rows])
        bad = ((block & 0x7F80) == 0x7F80) if st_dtype == "BF16" else ~np.isfinite(block)
        if bad.any():
            r, c = (int(i) for i in np.argwhere(bad)[0])
            raise ShardError(f"{path}: NaN/inf in the stored activations (row {lo + r}, column "
                             f"{c}); this shard cannot be trained on: re-harvest it")


def _to_torch(arr: np.ndarray, st_dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.array(arr))  # copy out of the read-only map
    return t.view(_TORCH_VIEW[st_dtype]) if st_dtype in _TORCH_VIEW else t


def split_shards(n_shards: int, split: str, val_fraction: float = 0.05) -> list[int]:
    """Indices of the shards in ``split`` (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    if split == "all" or n_shards < 2:
        if split == "val" and n_shards < 2:
            raise ValueError("a validation split needs at least 2 shards; harvest with a smaller "
                             "--shard-size or use split='all'")
        return list(range(n_shards))
    n_val = max(1, round(val_fraction * n_shards))
    ranked = sorted(range(n_shards), key=lambda i: hashlib.sha256(f"val{i}".encode()).digest())
    val = set(ranked[:n_val])
    return [i for i in range(n_shards) if (i in val) == (split == "val")]


class ActivationStore:
    """Seeded, shuffled, memory-mapped batches of one hook's harvested activations.

    ``iter(store)`` yields one epoch (each call the next epoch); ``store.batches(epoch, start)``
    is the deterministic iterator a trainer resumes with."""

    def __init__(self, path: str | Path, hook: str | None = None, *, batch_size: int = 4096,
                 split: str = "train", seed: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, val_fraction: float = 0.05, buffer_rows: int | None = None,
                 verify: bool = True, drop_last: bool = False):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        hooks = list(self.manifest["hooks"])
        if hook is None:
            if len(hooks) != 1:
                raise ValueError(f"{self.path} holds hooks {hooks}; pass one of them (--hook)")
            hook = hooks[0]
        if hook not in hooks:
            raise ValueError(f"hook {hook!r} is not in {self.path} (it holds {hooks})")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got "
                             f"{batch_size}, {rank}, {world_size}")
        if not self.manifest.get("complete"):
            log.warning("%s: harvest not complete; using its %d finished shards", self.path,
                        len(self.manifest["shards"]))
        self.hook, self.batch_size, self.split, self.seed = hook, batch_size, split, seed
        self.device, self.dtype, self.shuffle = torch.device(device), dtype, shuffle
        self.rank, self.world_size = rank, world_size
        self.verify, self.drop_last = verify, drop_last
        self.d_in = int(self.manifest["d_in"][hook])
        all_shards = self.manifest["shards"]
        self._entries = [all_shards[i] for i in split_shards(len(all_shards), split, val_fraction)]
        self._rows = np.array([e["rows"] for e in self._entries], dtype=np.int64)
        self.n_rows = int(self._rows.sum())
        if self.n_rows == 0:
            raise ValueError(f"{self.path}: split {split!r} of hook {hook!r} has no rows")
        itemsize = torch.empty(0, dtype=storage_dtype(self.manifest)).element_size()
        g = batch_size * world_size
        default = max(_DEFAULT_BUFFER_BYTES // (self.d_in * itemsize), 1)
        self.buffer_rows = max(int(buffer_rows or default), g)
        self._opened: dict[tuple[int, str], _Shard] = {}
        self._epoch = 0
        self._check_headers()

    # -- sizes -------------------------------------------------------------------------------
    def __len__(self) -> int:
        g = self.batch_size * self.world_size
        return self.n_rows // g if self.drop_last else -(-self.n_rows // g)

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch = self._epoch
        self._epoch += 1
        return self.batches(epoch)

    # -- files -------------------------------------------------------------------------------
    def _shard_path(self, local: int, key: str) -> Path:
        entry = self._entries[local]
        f = entry["files"].get(key)
        where = f"{self.path / MANIFEST}: shard {entry.get('index', local)}"
        if not isinstance(f, dict) or not isinstance(f.get("path"), str):
            raise ShardError(f"{where} lists no file for {key!r}")
        rel = Path(f["path"])
        # a manifest is data: never let it point the reader outside its own folder
        if rel.is_absolute() or ".." in rel.parts or "\\" in f["path"]:
            raise ShardError(f"{where}: refusing shard path {f['path']!r} (it leaves "
                             f"{self.path})")
        return self.path / rel

    def _shard(self, local: int, key: str) -> _Shard:
        k = (local, key)
        if k not in self._opened:
            path = self._shard_path(local, key)  # (checks the entry first)
            self._opened[k] = _Shard(path, self._entries[local]["files"][key].get("sha256"),
                                     self.verify)
        return self._opened[k]

    def _acts(self, local: int) -> tuple[np.ndarray, str]:
        sh = self._shard(local, self.hook)
        arr, st = sh.array("acts")
        want = HEADER_DTYPES[self.manifest["dtype"]]
        if st != want:
            raise ShardError(f"{sh.path}: corrupt shard (dtype {st}, manifest says "
                             f"{self.manifest['dtype']})")
        if arr.shape != (self._rows[local], self.d_in):
            raise ShardError(f"{sh.path}: corrupt shard (shape {arr.shape}, manifest says "
                             f"{(int(self._rows[local]), self.d_in)})")
        if not sh.finite:
            check_finite_shard(sh.path, arr, st)
            sh.finite = True
        return arr, st

    def _check_headers(self) -> None:
        """Every shard's header of this hook against the manifest (dtype, shape, size), before
        any batch is allocated from the manifest's numbers; only headers are read."""
        want = HEADER_DTYPES[self.manifest["dtype"]]
        for local in range(len(self._entries)):
            path = self._shard_path(local, self.hook)
            meta = read_header(path)[0].get("acts")
            if meta is None:
                raise ShardError(f"{path}: corrupt shard (tensor 'acts' missing)")
            shape = tuple(meta["shape"])
            if meta["dtype"] != want:
                raise ShardError(f"{path}: corrupt shard (dtype {meta['dtype']}, manifest says "
                                 f"{self.manifest['dtype']})")
            if shape != (self._rows[local], self.d_in):
                raise ShardError(f"{path}: corrupt shard (shape {shape}, manifest says "
                                 f"{(int(self._rows[local]), self.d_in)})")

    def _gather(self, order: np.ndarray, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of the virtual array that concatenates shards in ``order``."""
        rows = self._rows[order]
        ends = np.cumsum(rows)
        starts = ends - rows
        parts = []
        for j in np.nonzero((starts < hi) & (ends > lo))[0]:
            arr, st = self._acts(int(order[j]))
            a, b = max(lo, starts[j]) - starts[j], min(hi, ends[j]) - starts[j]
            parts.append(_to_torch(arr[a:b], st))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _gather_rows(self, order: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        """Rows ``idx`` (any order) of the virtual array; reads only those rows of each shard."""
        rows = self._rows[order]
        ends = np.cumsum(rows)
        starts = ends - rows
        if len(idx) == 0:
            return torch.empty(0, self.d_in, dtype=storage_dtype(self.manifest))
        srt = np.argsort(idx, kind="stable")
        sidx = idx[srt]
        which = np.searchsorted(ends, sidx, side="right")
        out = torch.empty(len(idx), self.d_in, dtype=storage_dtype(self.manifest))
        cut = np.flatnonzero(np.diff(which)) + 1
        for a, b in zip(np.r_[0, cut], np.r_[cut, len(sidx)]):
            j = int(which[a])
            arr, st = self._acts(int(order[j]))
            out[torch.from_numpy(srt[a:b])] = _to_torch(arr[sidx[a:b] - starts[j]], st)
        return out

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.dtype, non_blocking=True)

    # -- epochs --------------------------------------------------------------------------------
    def _rng(self, *key: int) -> torch.Generator:
        h = hashlib.sha256(repr((self.seed, *key)).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & (2**63 - 1))

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[torch.Tensor]:
        """Epoch ``epoch``'s batches for this rank, skipping the first ``start`` batches."""
        n, w, g = self.n_rows, self.buffer_rows, self.batch_size * self.world_size
        n_shards = len(self._entries)
        if self.shuffle:
            order = torch.randperm(n_shards, generator=self._rng(epoch, -1)).numpy()
        else:
            order = np.arange(n_shards)
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        ws, rank = self.world_size, self.rank

        def window(k: int) -> tuple[torch.Tensor, torch.Tensor | int]:
            """(rows, perm) with one rank; with W ranks (this rank's rows, first position)."""
            if k not in cache:
                for old in [o for o in cache if o < k]:
                    del cache[old]  # windows are visited in order: keep memory at <= 2 windows
                lo, hi = k * w, min((k + 1) * w, n)
                perm = (torch.randperm(hi - lo, generator=self._rng(epoch, k)) if self.shuffle
                        else torch.arange(hi - lo))
                if ws == 1:
                    cache[k] = (self._gather(order, lo, hi), perm)
                else:
                    # Stream positions p of this window that this rank serves are those with
                    # p = rank (mod W) (global batches are multiples of W rows): read only the
                    # rows they map to, 1/W of the window.
                    first = lo + (rank - lo) % ws
                    mine = perm[torch.arange(first - lo, hi - lo, ws)].numpy() + lo
                    cache[k] = (self._gather_rows(order, mine), first)
            return cache[k]

        for b in range(start, len(self)):
            lo, hi = b * g, min((b + 1) * g, n)
            pos = torch.arange(lo + rank, hi, ws)
            out = torch.empty(len(pos), self.d_in, dtype=storage_dtype(self.manifest))
            for k in range(lo // w, (hi - 1) // w + 1):
                data, key = window(k)
                sel = (pos >= k * w) & (pos < (k + 1) * w)
                if ws == 1:
                    out[sel] = data[key[pos[sel] - k * w]]
                else:
                    out[sel] = data[(pos[sel] - key) // ws]
            yield self._out(out)

    # -- unshuffled access ---------------------------------------------------------------------
    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of this split in shard order (split-local numbering), unshuffled."""
        if not 0 <= start <= stop <= self.n_rows:
            raise IndexError(f"rows [{start}, {stop}) out of range for {self.n_rows} rows")
        if start == stop:
            return torch.empty(0, self.d_in, dtype=self.dtype, device=self.device)
        return self._out(self._gather(np.arange(len(self._entries)), start, stop))

    def tokens(self) -> TokenInfo:
        """Token id, document id and context position of every row, aligned with ``read_rows``."""
        cols: dict[str, list[torch.Tensor]] = {"token_ids": [], "doc_ids": [], "positions": []}
        for i in range(len(self._entries)):
            sh = self._shard(i, TOKENS_DIR)
            for k in cols:
                arr, st = sh.array(k)
                if arr.shape != (self._rows[i],):
                    raise ShardError(f"{sh.path}: corrupt shard ({k} has shape {arr.shape}, "
                                     f"manifest says {int(self._rows[i])} rows)")
                cols[k].append(_to_torch(arr, st).to(torch.int64))
        return TokenInfo(*(torch.cat(cols[k]) for k in ("token_ids", "doc_ids", "positions")))


class LiveActivations:
    """The same kind of batches as :class:`ActivationStore`, computed from a model on the fly.

    ``token_batches`` yields ``[b, ctx]`` int token tensors (e.g.
    ``chunking.build_chunks(...).tokens.split(32)``). Rows go into a buffer of ``buffer_rows``;
    when it is full it is permuted and served as batches, the remainder (< ``batch_size``) carried
    over, so every row is served exactly once per pass. ``exclude_ids`` drops positions holding
    those token ids (BOS etc.).
    """

    def __init__(self, model: Any, hook: str, token_batches: Iterable[torch.Tensor], *,
                 batch_size: int = 4096, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, shuffle: bool = True, seed: int = 0,
                 buffer_rows: int = 65_536, exclude_ids: Iterable[int] = ()):
        from polysae.data import models

        models.check_hooks(model, [hook])
        self.model, self.hook, self.token_batches = model, hook, token_batches
        self.batch_size, self.device, self.dtype = batch_size, torch.device(device), dtype
        self.shuffle, self.buffer_rows = shuffle, max(buffer_rows, batch_size)
        self.exclude = torch.tensor(sorted(set(int(i) for i in exclude_ids)), dtype=torch.int64)
        self.gen = torch.Generator().manual_seed(seed)
        self.d_in: int | None = None

    def _model_device(self) -> torch.device:
        m = getattr(self.model, "model", self.model)
        p = next(m.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def __iter__(self) -> Iterator[torch.Tensor]:
        from polysae.data import models

        buf: list[torch.Tensor] = []
        held = 0
        mdev = self._model_device()
        for toks in self.token_batches:
            with torch.inference_mode():
                act = models.capture(self.model, toks.to(mdev), [self.hook])[self.hook]
            rows = act.reshape(-1, act.shape[-1])
            if len(self.exclude):
                rows = rows[~torch.isin(toks.reshape(-1), self.exclude).to(rows.device)]
            self.d_in = rows.shape[-1]
            buf.append(rows)
            held += rows.shape[0]
            if held >= self.buffer_rows:
                buf, held = (yield from self._serve(torch.cat(buf), final=False))
        if held:
            yield from self._serve(torch.cat(buf), final=True)

    def _serve(self, pool: torch.Tensor, final: bool):
        if self.shuffle:
            pool = pool[torch.randperm(pool.shape[0], generator=self.gen).to(pool.device)]
        n_full = pool.shape[0] // self.batch_size
        for i in range(n_full):
            yield pool[i * self.batch_size:(i + 1) * self.batch_size].to(self.device, self.dtype)
        rest = pool[n_full * self.batch_size:]
        if final and rest.shape[0]:
            yield rest.to(self.device, self.dtype)
            return [], 0
        return ([rest] if rest.shape[0] else []), rest.shape[0]
