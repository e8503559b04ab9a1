"""Harvest activations of many hook points in one forward pass, to resumable safetensors shards.

The on-disk layout and manifest are defined in :mod:`polysae.data.actformat`.

Crash safety: every file is written to a temp name, fsynced and renamed; a shard's entry (with the
sha256 of its files) is added to ``manifest.json`` only after all its files are in place, and the
entry records where the next shard starts (forward batch, row offset). Re-running the same command
resumes from there. Forward batches are always the same ``batch_size`` contexts, so a resumed run
computes bit-identical activations and writes byte-identical shards.

Speed: the forward stops as soon as the last wanted hook has fired (``models.capture``), runs in
inference mode, and shards are written by a background thread so the model never waits on the disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import queue
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from polysae.data.backend import BACKENDS
from polysae.data.actformat import (
    FORMAT_VERSION,
    MANIFEST,
    STORAGE_DTYPES,
    TOKENS_DIR,
    ManifestError,
    hook_dir,
    new_manifest,
    read_manifest,
    shard_name,
    write_manifest,
)
from polysae.data.chunking import BOS_POLICIES
from polysae.fileio import atomic_write_bytes
from polysae.validate import check_token_ids

_KILL_ENV = "POLYSAE_HARVEST_TEST_KILL"  # "<shard>:<stage>" -> SIGKILL self there (crash tests)

log = logging.getLogger(__name__)


class HarvestError(ValueError):
    """A harvest that cannot start or continue; the message names the folder, file or flag."""


@dataclass
class HarvestConfig:
    """What to harvest and where. Every field except ``out`` and ``progress`` must match when
    resuming into an existing folder (``device`` as resolved: ``None`` on a CPU machine is
    ``cpu``)."""

    model: str = "smollm2-135m"
    """Model: smollm2-135m (bundled), minilm-l6 (bundled encoder), a TransformerLens model name
    (needs a hub or a warm cache), a Hugging Face hub id (owner/name: a local folder or the
    Hugging Face cache when offline) or a local Hugging Face model folder (see
    :func:`polysae.data.models.load_model`)."""
    backend: str = field(default="transformer_lens", metadata={"choices": BACKENDS})
    """What runs the model: transformer_lens (default), hf (plain transformers with forward
    hooks) or nnsight (pip install 'polysae[nnsight]'); all take the same hook names and give the
    same activations within float32 noise (see docs/harvest.md)."""
    hooks: list[str] = field(default_factory=list)
    """Hook points recorded in one forward (empty: the middle layer's hook_resid_post, i.e.
    ``blocks.<n_layers//2>.hook_resid_post``); list them with ``polysae hooks --model M``."""
    dataset: str = "bbc"
    """Text to harvest: bbc, tweets, fortunes (bundled), a local .txt/.jsonl/.csv/.parquet file, a
    pre-tokenized .npy, or hf:NAME[:config][@split] (a Hugging Face dataset streamed via
    ``datasets``: hub id, local data folder or save_to_disk folder)."""
    tokens: int = 100_000
    """Tokens to forward (rounded up to whole contexts; fewer if the dataset runs out)."""
    ctx: int = 128
    """Context length in tokens."""
    out: str = "activations"
    """Output folder (re-run the same command to resume)."""
    dtype: str = field(default="float16", metadata={"choices": tuple(STORAGE_DTYPES)})
    """Storage dtype: float16 (default; 10 mantissa bits, half the disk of float32, overflow
    detected per batch), bfloat16 (float32's range, 7 bits) or float32 (exact)."""
    model_dtype: str = field(default="float32", metadata={"choices": tuple(STORAGE_DTYPES)})
    """Dtype the model runs in (bfloat16 is ~2.4x faster on AVX512-BF16 CPUs)."""
    batch_size: int = 32
    """Contexts per forward pass."""
    shard_size: int = 65_536
    """Rows per shard file."""
    bos: str = field(default="chunk", metadata={"choices": BOS_POLICIES})
    """BOS policy: chunk = BOS starts every context; doc = BOS before every document; none (see
    :mod:`polysae.data.chunking`)."""
    exclude_special: bool = False
    """Leave BOS/EOS/PAD/CLS/SEP positions out of the stored rows."""
    text_column: str | None = None
    """Column holding the text in .jsonl/.csv/.parquet/hf: datasets (default ``text``)."""
    encoding: str | None = None
    """Encoding of a local .txt/.jsonl/.csv dataset (default: strict UTF-8, bad bytes an error)."""
    seed: int = 0
    """Seed of the bundled corpora's document order."""
    device: str | None = None
    """Device the model runs on (default: cuda when present, else cpu)."""
    progress: bool = True
    """Show a progress bar (tokens/s) on stderr."""

    def __post_init__(self) -> None:
        for name in ("dtype", "model_dtype"):
            if getattr(self, name) not in STORAGE_DTYPES:
                raise HarvestError(f"HarvestConfig.{name} {getattr(self, name)!r}: expected one "
                                   f"of {sorted(STORAGE_DTYPES)}")
        for name in ("batch_size", "shard_size", "tokens", "ctx"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise HarvestError(f"HarvestConfig.{name} must be positive, got {v!r}")
        if self.backend not in BACKENDS:
            raise HarvestError(f"HarvestConfig.backend {self.backend!r}: expected one of "
                               f"{list(BACKENDS)}")
        if self.bos not in BOS_POLICIES:
            raise HarvestError(f"HarvestConfig.bos {self.bos!r}: expected one of {BOS_POLICIES}")
        if isinstance(self.hooks, str):
            self.hooks = [self.hooks]
        self.hooks = list(self.hooks)
        dup = sorted({h for h in self.hooks if self.hooks.count(h) > 1})
        if dup:
            raise HarvestError(f"HarvestConfig.hooks: {dup} listed more than once")


class HarvestResult(NamedTuple):
    out: Path
    """The output folder."""
    n_rows: int
    """Rows stored per hook."""
    n_shards: int
    """Shard files per hook."""
    d_in: dict
    """Width of each hook's rows."""
    seconds: float
    """Wall time of this call's forward/write loop (0 when the folder was already complete)."""
    tokens_per_s: float
    """Tokens forwarded per second by this call."""
    cpu_seconds: float = 0.0
    """Process CPU time of the same loop (all threads, the writer's included)."""


# Fields whose change makes an existing folder incompatible (everything that shapes the bytes).
_IDENTITY = ("model", "backend", "hooks", "dataset", "tokens", "ctx", "dtype", "model_dtype",
             "batch_size", "shard_size", "bos", "exclude_special", "text_column", "seed", "device",
             "encoding")


def harvest(cfg: HarvestConfig, model: Any = None) -> HarvestResult:
    """Run (or resume, or confirm) a harvest. ``model`` may be a preloaded ``LoadedModel`` or a bare
    ``HookedTransformer``; by default ``cfg.model`` is loaded."""
    from polysae.data import chunking, models
    from polysae.device import resolve_device

    # (the values themselves were checked by HarvestConfig.__post_init__)
    cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device, model))
    out = Path(cfg.out)
    existing = _existing_manifest(out)
    _refuse_foreign_folder(out, existing)

    lm = _as_loaded(model, cfg)
    hooks = list(cfg.hooks) or [_default_hook(lm)]
    # A preloaded model runs through its own backend, whatever cfg.backend says.
    cfg = dataclasses.replace(cfg, hooks=hooks, backend=lm.backend)
    be = models.as_backend(lm)
    models.check_hooks(be, hooks)
    limit = be.n_ctx
    if limit is not None and cfg.ctx > limit:
        raise HarvestError(f"--ctx {cfg.ctx} is longer than the model's context ({limit} tokens)")
    identity = {k: getattr(cfg, k) for k in _IDENTITY}
    if existing is not None:
        # Folders from before backends existed were all harvested through TransformerLens.
        old = dict({"backend": "transformer_lens"}, **existing["config"])
        diff = {k: (old.get(k), v) for k, v in identity.items() if old.get(k) != v}
        if diff:
            shown = "; ".join(f"{k}: folder has {a!r}, asked {b!r}" for k, (a, b) in diff.items())
            raise HarvestError(f"{out} holds an incompatible harvest ({shown}); use a new --out "
                               f"or delete the folder")
        if existing.get("complete"):
            log.info("%s: harvest already complete (%d rows)", out, existing["n_rows"])
            return HarvestResult(out, existing["n_rows"], len(existing["shards"]),
                                 existing["d_in"], 0.0, 0.0)

    chunks = chunking.build_chunks(cfg.dataset, lm.tokenizer, cfg.ctx,
                                   chunking.chunks_needed(cfg.tokens, cfg.ctx), kind=lm.kind,
                                   bos=cfg.bos, text_column=cfg.text_column, seed=cfg.seed,
                                   encoding=cfg.encoding)
    check_token_ids(chunks.tokens, be.module, cfg.dataset, HarvestError)  # e.g. another model's
    digest = hashlib.sha256(chunks.tokens.numpy().tobytes()).hexdigest()
    if existing is not None and existing.get("tokens_sha256") != digest:
        # Same flags but different text (an edited file, another tokenizer): resuming would
        # splice two datasets into one harvest.
        raise HarvestError(f"{out} was harvested from different tokens than --dataset "
                           f"{cfg.dataset} gives now (file or tokenizer changed); use a new --out")
    special = chunking.special_tokens(lm.tokenizer, lm.kind).all_ids if cfg.exclude_special else ()
    if cfg.exclude_special and not special:
        log.warning("--exclude-special: the model has no tokenizer, so no special ids are known")
    special_t = torch.tensor(sorted(special), dtype=torch.int64)
    store_dtype = STORAGE_DTYPES[cfg.dtype]
    dev = torch.device(cfg.device)

    with torch.inference_mode():
        probe = models.capture(be, chunks.tokens[:1, : min(cfg.ctx, 8)].to(dev), hooks)
    d_in = {h: int(a.shape[-1]) for h, a in probe.items()}

    manifest = existing or dict(_new_manifest(cfg, lm, identity, d_in, chunks),
                                tokens_sha256=digest)
    done_rows = manifest["n_rows"]
    start_batch, skip = 0, 0
    if manifest["shards"]:
        start_batch, skip = manifest["shards"][-1]["next"]
    n_batches = -(-chunks.tokens.shape[0] // cfg.batch_size)

    # Disk: estimate what is still to be written, print it first, refuse when space is short.
    n_ctx_left = max(0, chunks.tokens.shape[0] - start_batch * cfg.batch_size)
    row_bytes = sum(d_in.values()) * store_dtype.itemsize + 12
    need = n_ctx_left * cfg.ctx * row_bytes
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    print(f"polysae harvest: {chunks.tokens.shape[0] * cfg.ctx:,} tokens x {len(hooks)} hook(s) "
          f"{d_in} as {cfg.dtype}: about {_gb(need)} still to write, {_gb(free)} free at {out}",
          file=sys.stderr)
    if need * 1.02 + (64 << 20) > free:
        raise HarvestError(f"not enough disk space at {out}: the harvest needs about {_gb(need)}, "
                           f"{_gb(free)} free; free space, lower --tokens or use a smaller --dtype")

    for stale in out.glob(f".{MANIFEST}.tmp*"):  # a manifest write cut short by a kill
        stale.unlink()
    if existing is None:
        # The manifest goes first, so a folder killed right after this is recognised as ours.
        write_manifest(out, manifest)
    for d in [TOKENS_DIR, *(hook_dir(h) for h in hooks)]:
        (out / d).mkdir(exist_ok=True)
        for stale in (out / d).glob(".*.tmp*"):  # leftovers of a killed writer
            stale.unlink()

    writer = _ShardWriter(out, manifest)
    writer.start()
    bar = _progress(cfg, chunks.tokens.shape[0] * cfg.ctx, start_batch * cfg.batch_size * cfg.ctx)
    buffers: dict[str, list[torch.Tensor]] = {h: [] for h in [*hooks, "_tok", "_doc", "_pos"]}
    buffered = 0
    shard_index = len(manifest["shards"])
    positions = torch.arange(cfg.ctx, dtype=torch.int32)
    t0, c0 = time.perf_counter(), time.process_time()
    fed = 0
    try:
        for b in range(start_batch, n_batches):
            toks = chunks.tokens[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            with torch.inference_mode():
                acts = models.capture(be, toks.to(dev), hooks)
            keep = ~torch.isin(toks, special_t).reshape(-1) if len(special_t) else None
            rows = {h: _rows(a, keep, store_dtype, h) for h, a in acts.items()}
            rows["_tok"] = _sel(toks.reshape(-1).to(torch.int32), keep)
            rows["_doc"] = _sel(chunks.doc_ids[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                                .reshape(-1).to(torch.int32), keep)
            rows["_pos"] = _sel(positions.repeat(toks.shape[0]), keep)
            n = rows["_tok"].shape[0]
            offset = skip if b == start_batch else 0
            # Cut this batch's rows at shard boundaries; each cut records where the next shard
            # starts (batch b, row offset), which is exactly what a resumed run needs.
            while offset < n:
                take = min(n - offset, cfg.shard_size - buffered)
                for k, v in rows.items():
                    buffers[k].append(v[offset:offset + take])
                buffered += take
                offset += take
                if buffered == cfg.shard_size:
                    nxt = (b, offset) if offset < n else (b + 1, 0)
                    writer.put(shard_index, _drain(buffers), nxt)
                    shard_index += 1
                    buffered = 0
            fed += toks.numel()
            if bar is not None:
                bar.update(toks.numel())
            writer.raise_if_failed()
        if buffered:
            writer.put(shard_index, _drain(buffers), (n_batches, 0))
            shard_index += 1
        writer.finish()
    finally:
        writer.stop()
        if bar is not None:
            bar.close()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    done = writer.manifest
    log.info("%s: %d rows in %d shards (%d new)", out, done["n_rows"], len(done["shards"]),
             done["n_rows"] - done_rows)
    return HarvestResult(out, done["n_rows"], len(done["shards"]), d_in, seconds,
                         fed / seconds if seconds > 0 else 0.0, cpu_seconds)


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _as_loaded(model: Any, cfg: HarvestConfig):
    from polysae.data import models

    if model is None:
        return models.load_model(cfg.model, device=cfg.device,
                                 dtype=STORAGE_DTYPES[cfg.model_dtype], backend=cfg.backend)
    if isinstance(model, models.LoadedModel):
        return model
    be = models.as_backend(model)
    return models.LoadedModel(be.module if be.name == "transformer_lens" else be, be.tokenizer,
                              cfg.model, be.kind, be.name)


def _default_hook(lm) -> str:
    from polysae.data import models

    be = models.as_backend(lm)
    name = f"blocks.{(be.n_layers or 0) // 2}.hook_resid_post"
    if be.n_layers is None or name not in be.hook_names():
        raise HarvestError("no --hooks given and the model's blocks are unknown, so there is no "
                           "default; pass --hooks (see `polysae hooks --model ... --backend "
                           f"{be.name}`)")
    return name


def _rows(act: torch.Tensor, keep: torch.Tensor | None, dtype: torch.dtype, hook: str):
    flat = act.reshape(-1, act.shape[-1])
    if keep is not None:
        flat = flat[keep.to(flat.device)]
    cast = flat.to(dtype)
    if not torch.isfinite(cast).all():  # never store NaN/inf: training would only find it later
        if torch.isfinite(flat).all():
            raise HarvestError(f"hook {hook!r}: activations up to {flat.abs().max().item():.4g} "
                               f"overflow {str(dtype)[6:]}; harvest with --dtype bfloat16 or "
                               "float32")
        raise HarvestError(f"hook {hook!r}: the model gave NaN/inf activations "
                           f"({int((~torch.isfinite(flat)).sum())} values in this batch, first at "
                           f"row {int((~torch.isfinite(flat)).any(-1).nonzero()[0])}); nothing of "
                           "it was stored; check the model and --model-dtype")
    return cast.cpu().contiguous()


def _sel(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return x if keep is None else x[keep]


def _drain(buffers: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {k: torch.cat(v) for k, v in buffers.items()}
    for v in buffers.values():
        v.clear()
    return out


def _progress(cfg: HarvestConfig, total: int, initial: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc="harvest",
                smoothing=0.1, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Manifest and files


def _new_manifest(cfg: HarvestConfig, lm, identity: dict, d_in: dict, chunks) -> dict:
    from polysae.data import chunking
    from polysae.version import __version__

    sp = chunking.special_tokens(lm.tokenizer, lm.kind)
    return new_manifest(
        polysae_version=__version__, torch_version=torch.__version__, config=identity,
        model=lm.name, model_kind=lm.kind, model_backend=lm.backend, hooks=list(cfg.hooks),
        d_in=d_in, hook_dirs={h: hook_dir(h) for h in cfg.hooks}, dtype=cfg.dtype, ctx=cfg.ctx,
        dataset=cfg.dataset, bos_policy=cfg.bos, exclude_special=cfg.exclude_special,
        special_token_ids=sorted(sp.all_ids), bos_token_ids=sp.prefix,
        n_contexts=int(chunks.tokens.shape[0]), n_tokens=int(chunks.tokens.numel()),
        shard_size=cfg.shard_size)


def _existing_manifest(out: Path) -> dict | None:
    """The folder's manifest to resume from (None for a new folder); it must be of exactly this
    polysae's format version, since the harvest appends to it."""
    if not (out / MANIFEST).exists():
        return None
    try:
        m = read_manifest(out)
    except ManifestError as e:
        raise HarvestError(str(e)) from None
    if m["format_version"] != FORMAT_VERSION:
        raise HarvestError(f"{out / MANIFEST}: format version {m['format_version']} is not "
                           f"{FORMAT_VERSION}; re-harvest with this polysae")
    return m


def _refuse_foreign_folder(out: Path, manifest: dict | None) -> None:
    if out.exists() and not out.is_dir():
        raise HarvestError(f"--out {out} exists and is not a folder")
    ours = f".{MANIFEST}.tmp"  # only a first manifest write cut short leaves this behind
    if manifest is None and out.is_dir() and any(not p.name.startswith(ours)
                                                 for p in out.iterdir()):
        raise HarvestError(f"--out {out} is not empty and holds no polysae harvest "
                           f"({MANIFEST} missing); use an empty or new folder")


def _maybe_kill(shard: int, stage: str) -> None:
    want = os.environ.get(_KILL_ENV)
    if want and want == f"{shard}:{stage}":
        os.kill(os.getpid(), signal.SIGKILL)


_FINISH, _STOP = object(), object()  # writer-queue sentinels


class _ShardWriter(threading.Thread):
    """Writes shards in order and advances the manifest after each; errors surface on the main
    thread at the next batch. The queue is short so memory stays bounded when the disk is slow."""

    def __init__(self, out: Path, manifest: dict):
        super().__init__(name="polysae-shard-writer", daemon=True)
        self.out, self.manifest = out, manifest
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None

    def put(self, index: int, tensors: dict[str, torch.Tensor], nxt: tuple[int, int]) -> None:
        while True:
            self.raise_if_failed()
            try:
                self.q.put((index, tensors, nxt), timeout=0.5)
                return
            except queue.Full:
                continue

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise HarvestError(f"writing shards to {self.out} failed: {self.error}") from self.error

    def finish(self) -> None:
        """All shards queued: write them, then mark the manifest complete."""
        self.q.put(_FINISH)
        self.join()
        self.raise_if_failed()

    def stop(self) -> None:
        """Abort (error or Ctrl-C on the main thread): shards already queued are still written
        whole, but the manifest is never marked complete."""
        if self.is_alive():
            try:
                self.q.put(_STOP, timeout=120)
            except queue.Full:  # pragma: no cover - writer wedged on the disk; it is a daemon
                return
            self.join(timeout=120)

    def run(self) -> None:
        from safetensors.torch import save

        try:
            while True:
                item = self.q.get()
                if item is _STOP:
                    return
                if item is _FINISH:
                    m = dict(self.manifest, complete=True)
                    write_manifest(self.out, m)
                    self.manifest = m
                    return
                index, t, nxt = item
                files = {}
                for hook, d in self.manifest["hook_dirs"].items():
                    rel = f"{d}/{shard_name(index)}"
                    files[hook] = {"path": rel, "sha256": atomic_write_bytes(
                        self.out / rel, save({"acts": t[hook]}, metadata={"hook": hook}))}
                    _maybe_kill(index, "mid_shard")
                rel = f"{TOKENS_DIR}/{shard_name(index)}"
                files[TOKENS_DIR] = {"path": rel, "sha256": atomic_write_bytes(self.out / rel, save(
                    {"token_ids": t["_tok"], "doc_ids": t["_doc"], "positions": t["_pos"]}))}
                _maybe_kill(index, "before_manifest")
                rows = int(t["_tok"].shape[0])
                m = dict(self.manifest)
                m["shards"] = [*m["shards"], {"index": index, "rows": rows, "files": files,
                                              "next": list(nxt)}]
                m["n_rows"] = m["n_rows"] + rows
                write_manifest(self.out, m)
                self.manifest = m
                _maybe_kill(index, "after_manifest")
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e
            # Unblock a producer waiting on a full queue.
            while True:
                try:
                    self.q.get_nowait()
                except queue.Empty:
                    break
