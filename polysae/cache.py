"""The download cache of pretrained dictionaries: the only module that touches the network.

Sources (:func:`download`):

- a registry name (``polysae list``, :mod:`polysae.registry`), e.g. ``gpt2-small-res-jb-L8``: the
  entry's repo at its pinned commit; the files whose sha256 the registry lists are checked;
- ``hf://owner/repo/path/inside@revision`` (revision defaults to ``main``), fetched through
  ``huggingface_hub`` (so ``HF_ENDPOINT``, tokens and proxies work as usual);
- an ``http(s)://`` URL of a checkpoint *folder*, fetched with plain ``urllib``.

A folder's files are found by probing the known layouts (polysae ``config.json``, SAELens /
reference / sparsify ``cfg.json``, Gemma Scope ``params.npz``), so no listing API is needed.

Cache (``POLYSAE_CACHE``, default ``~/.cache/polysae``)::

    <cache>/hf/<owner>/<repo>/<revision>/<path>/...     complete folders
    <cache>/url/<host>/<sha256(url)[:16]>/...
    <cache>/.partial/<same key>/...                       downloads in progress (resumable)
    <cache>/.locks/<sha256(key)[:24]>.lock                one file lock per folder

A folder counts as downloaded only when its ``.polysae-download.json`` marker exists; the marker is
written last, after every file was received in full, checked against its sha256 where the registry
knows it and moved into place. Files stream into ``.partial``; a truncated HTTP transfer keeps its
``.part`` file and the next attempt resumes it with a ``Range`` request; a checksum mismatch
deletes it. With ``HF_HUB_OFFLINE=1`` (or ``POLYSAE_OFFLINE=1``) complete folders are served from
the cache and anything else fails with a clear error, without any network access.

Paths that would escape the cache (absolute, ``..``, backslashes, symlinked components) are refused
before anything is written.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from polysae.fileio import atomic_write_text, sha256_file
from polysae.registry import REGISTRY, PretrainedEntry

log = logging.getLogger(__name__)

CACHE_ENV = "POLYSAE_CACHE"
"""Environment variable naming the cache folder (default ``~/.cache/polysae``)."""
MARKER = ".polysae-download.json"
"""The file that marks a cached folder complete (written last; records each file's sha256/size)."""
DEFAULT_TIMEOUT = 60.0
"""Network timeout per request, in seconds."""
_CHUNK = 1 << 20


class DownloadError(ValueError):
    """A download failed (HTTP error, timeout, truncated body, checksum mismatch, offline).

    A ``ValueError`` so the CLI reports it as one line with exit code 1; nothing that looks like a
    complete download is left behind when it is raised."""


class Source(NamedTuple):
    """A parsed remote source."""

    kind: str
    """``hf`` or ``url``."""
    repo: str | None
    """Hub repo id (``hf``)."""
    path: str
    """Folder inside the repo (``hf``)."""
    revision: str
    """Git revision (``hf``)."""
    url: str | None
    """Folder URL (``url``)."""


# -- sources ----------------------------------------------------------------------------------
def is_remote(source: str) -> bool:
    """Whether ``source`` names a remote folder (``hf://``, ``http://`` or ``https://``)."""
    return source.startswith(("hf://", "http://", "https://"))


def parse_source(source: str) -> Source:
    """``hf://owner/repo[/path][@rev]`` or an http(s) URL -> :class:`Source`."""
    if source.startswith("hf://"):
        rest, revision = source[5:], "main"
        if "@" in rest and "/" not in rest.rsplit("@", 1)[1]:
            rest, revision = rest.rsplit("@", 1)
        parts = [p for p in rest.split("/") if p]
        if len(parts) < 2 or not revision:
            raise ValueError(f"{source!r}: expected hf://owner/repo/path/in/repo@revision")
        path = _safe_relpath("/".join(parts[2:]), source) if parts[2:] else ""
        _safe_relpath(f"{parts[0]}/{parts[1]}/{revision}", source)
        return Source("hf", f"{parts[0]}/{parts[1]}", path, revision, None)
    if source.startswith(("http://", "https://")):
        u = urllib.parse.urlsplit(source)
        if not u.hostname:
            raise ValueError(f"{source!r}: URL has no host")
        return Source("url", None, "", "", source.rstrip("/"))
    raise ValueError(f"{source!r} is not a remote source (hf://... or http(s)://...)")


def _safe_relpath(rel: str, what: str) -> str:
    """Refuse paths that could leave the cache: absolute, ``..``, backslashes, NUL, ``~``."""
    if not rel or rel.startswith(("/", "~")) or "\\" in rel or "\x00" in rel or \
            re.match(r"^[A-Za-z]:", rel):
        raise DownloadError(f"{what}: refusing path {rel!r} (it could escape the cache)")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise DownloadError(f"{what}: refusing path {rel!r} (it could escape the cache)")
    return rel


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$POLYSAE_CACHE``, else ``~/.cache/polysae``."""
    root = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "polysae"
    return Path(root).expanduser().resolve()


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``POLYSAE_OFFLINE`` is set (read at call time)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "POLYSAE_OFFLINE"))


def _key(src: Source) -> Path:
    if src.kind == "hf":
        key = f"hf/{src.repo}/{src.revision}" + (f"/{src.path}" if src.path else "")
    else:
        host = urllib.parse.urlsplit(src.url).hostname or "host"
        port = urllib.parse.urlsplit(src.url).port
        key = f"url/{host}{'_' + str(port) if port else ''}/" + \
            hashlib.sha256(src.url.encode()).hexdigest()[:16]
    return Path(_safe_relpath(key, "cache key"))


def _inside(root: Path, rel: Path) -> Path:
    """root/rel, refusing symlinked components and anything that resolves outside ``root``."""
    target = root / rel
    p = root
    for part in rel.parts:
        p = p / part
        if p.is_symlink():
            raise DownloadError(f"refusing cache path {target}: {p} is a symlink")
    if not target.resolve().is_relative_to(root):
        raise DownloadError(f"refusing cache path {target}: it resolves outside {root}")
    return target


def cached_folder(source: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The complete cached folder of a registry name or remote source, or None."""
    src = _entry_source(REGISTRY[source]) if source in REGISTRY else parse_source(source)
    folder = _inside(cache_root(cache_dir), _key(src))
    return folder if (folder / MARKER).is_file() else None


def _entry_source(e: PretrainedEntry) -> Source:
    if e.repo:
        return Source("hf", e.repo, e.path, e.revision, None)
    return Source("url", None, "", "", str(e.url).rstrip("/"))


# -- public entry point -----------------------------------------------------------------------
def download(source: str, *, cache_dir: str | os.PathLike | None = None, force: bool = False,
             timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Fetch a registry name, ``hf://`` source or http(s) folder URL into the cache and return
    the local folder (served from the cache when complete). Raises :class:`DownloadError`."""
    if source in REGISTRY:
        e = REGISTRY[source]
        return fetch_folder(_entry_source(e), files=e.files, sha256=e.sha256,
                            cache_dir=cache_dir, force=force, timeout=timeout, label=e.name)
    if is_remote(source):
        return fetch_folder(parse_source(source), cache_dir=cache_dir, force=force,
                            timeout=timeout, label=source)
    raise DownloadError(f"{source!r} is not a registry name (see `polysae list`), an "
                        "hf://owner/repo/path@revision source or an http(s) URL")


def fetch_folder(src: Source, *, files: Sequence[str] | None = None,
                 sha256: Mapping[str, str] | None = None,
                 cache_dir: str | os.PathLike | None = None, force: bool = False,
                 timeout: float = DEFAULT_TIMEOUT, label: str | None = None) -> Path:
    """Download the files of one checkpoint folder (probing the layout when ``files`` is None)."""
    from filelock import FileLock, Timeout

    label = label or (src.url or f"hf://{src.repo}/{src.path}@{src.revision}")
    root = cache_root(cache_dir)
    key = _key(src)
    final = _inside(root, key)
    partial = _inside(root, Path(".partial") / key)
    for f in files or ():
        _safe_relpath(f, label)
    lock_path = root / ".locks" / (hashlib.sha256(str(key).encode()).hexdigest()[:24] + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(lock_path), timeout=max(600.0, 10 * timeout)):
            # re-check under the lock: another process may have finished meanwhile
            if not force and _complete(final, sha256):
                return final
            if is_offline():
                raise DownloadError(
                    f"{label} is not in the cache ({final}) and offline mode is on "
                    "(HF_HUB_OFFLINE/POLYSAE_OFFLINE); download it once with network access")
            return _fetch_locked(src, files, dict(sha256 or {}), final, partial, timeout, label)
    except Timeout as e:
        raise DownloadError(f"{label}: another process holds the download lock {lock_path}") from e


def _complete(final: Path, sha256: Mapping[str, str] | None) -> bool:
    m = final / MARKER
    if not m.is_file():
        return False
    try:
        doc = json.loads(m.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    recorded = doc.get("files", {})
    for name, info in recorded.items():
        if not (final / name).is_file() or (final / name).stat().st_size != info.get("size"):
            return False
    for name, want in (sha256 or {}).items():
        if want and recorded.get(name, {}).get("sha256") != want:
            return False
    return bool(recorded)


def _fetch_locked(src: Source, files: Sequence[str] | None, sha256: dict[str, str],
                  final: Path, partial: Path, timeout: float, label: str) -> Path:
    partial.mkdir(parents=True, exist_ok=True)
    get: Callable[[str, bool], Path | None]
    if src.kind == "hf":
        def get(name: str, missing_ok: bool) -> Path | None:
            return _get_hf(src, name, partial, sha256.get(name), timeout, missing_ok, label)
    else:
        def get(name: str, missing_ok: bool) -> Path | None:
            return _get_url(f"{src.url}/{urllib.parse.quote(name)}", partial / name,
                            sha256.get(name), timeout, missing_ok, label)

    got: dict[str, Path] = {}
    if files:
        for name in files:
            got[name] = get(name, False)  # type: ignore[assignment]
    else:
        got = _probe_layout(get, label)
    # weights first, configs last, marker at the very end: a crash in between leaves no marker
    final.mkdir(parents=True, exist_ok=True)
    (final / MARKER).unlink(missing_ok=True)  # a forced re-download invalidates the old copy first
    order = sorted(got, key=lambda n: n.endswith(".json"))
    record = {}
    for name in order:
        p = got[name]
        record[name] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        dest = final / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, dest)
    doc = {"source": label, "files": record, "downloaded_at": time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_text(final / MARKER, json.dumps(doc, indent=2))
    shutil.rmtree(partial, ignore_errors=True)
    log.info("downloaded %s -> %s", label, final)
    return final


def _probe_layout(get: Callable[[str, bool], Path | None], label: str) -> dict[str, Path]:
    """Find a checkpoint folder's files without a listing API, trying each known layout."""
    cfg = get("config.json", True)
    if cfg is not None:
        return {"config.json": cfg, "sae.safetensors": get("sae.safetensors", False)}
    cfg = get("cfg.json", True)
    if cfg is not None:
        try:
            doc = json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DownloadError(f"{label}: cfg.json is not valid JSON ({e})") from e
        # SAELens and the reference always write d_sae; sparsify writes num_latents instead
        saelens = isinstance(doc, dict) and ("d_sae" in doc or "architecture" in doc)
        weights = "sae_weights.safetensors" if saelens else "sae.safetensors"
        return {"cfg.json": cfg, weights: get(weights, False)}
    npz = get("params.npz", True)
    if npz is not None:
        return {"params.npz": npz}
    raise DownloadError(f"{label}: no checkpoint found there (none of config.json, cfg.json, "
                        "params.npz exists)")


def _verify(path: Path, want: str | None, label: str, name: str) -> None:
    if not want:
        return
    got = sha256_file(path)
    if got != want.lower():
        path.unlink(missing_ok=True)
        raise DownloadError(f"{label}: checksum mismatch for {name} (sha256 {got[:16]}..., "
                            f"expected {want[:16]}...); the file was deleted")


# -- plain HTTP -------------------------------------------------------------------------------
def _get_url(url: str, dest: Path, sha: str | None, timeout: float, missing_ok: bool,
             label: str) -> Path | None:
    """Stream ``url`` into ``dest`` via ``dest.part``, resuming a previous partial transfer."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "polysae",
                                               "Accept-Encoding": "identity"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # our partial file is stale or complete: start over
            part.unlink(missing_ok=True)
            return _get_url(url, dest, sha, timeout, missing_ok, label)
        if e.code == 404 and missing_ok:
            return None
        raise DownloadError(f"{label}: GET {url} failed with HTTP {e.code} {e.reason}") from e
    except (socket.timeout, TimeoutError) as e:
        raise DownloadError(f"{label}: GET {url} timed out after {timeout:g}s") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        if isinstance(getattr(e, "reason", None), TimeoutError):  # timed out while connecting
            raise DownloadError(f"{label}: GET {url} timed out after {timeout:g}s") from e
        raise DownloadError(f"{label}: GET {url} failed ({e})") from e
    with resp:
        if resp.status == 206 and have:
            mode, start = "ab", have
        else:
            mode, start = "wb", 0
        length = resp.headers.get("Content-Length")
        expected = start + int(length) if length is not None else None
        try:
            with open(part, mode) as f:
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except (socket.timeout, TimeoutError) as e:
            raise DownloadError(f"{label}: GET {url} timed out after {timeout:g}s while reading "
                                f"({part.stat().st_size} bytes kept for resume)") from e
        except (http.client.IncompleteRead, OSError, http.client.HTTPException) as e:
            raise DownloadError(f"{label}: GET {url}: connection lost after "
                                f"{part.stat().st_size} bytes ({e}); run again to resume") from e
    size = part.stat().st_size
    if expected is not None and size != expected:
        raise DownloadError(f"{label}: GET {url} returned a truncated body ({size} of {expected} "
                            "bytes); run again to resume")
    _verify(part, sha, label, dest.name)
    os.replace(part, dest)
    return dest


# -- Hugging Face Hub -------------------------------------------------------------------------
def _get_hf(src: Source, name: str, partial: Path, sha: str | None, timeout: float,
            missing_ok: bool, label: str) -> Path | None:
    """One file through ``hf_hub_download`` into ``partial/.hf`` (its own resume and etag
    checks apply), then checked and moved to ``partial/name``."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    filename = f"{src.path}/{name}" if src.path else name
    staging = partial / ".hf"
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now, not at huggingface_hub import
    try:
        p = huggingface_hub.hf_hub_download(
            repo_id=src.repo, filename=filename, revision=src.revision, local_dir=staging,
            endpoint=endpoint, etag_timeout=timeout)
    except hf_errors.LocalEntryNotFoundError as e:
        # also an EntryNotFoundError subclass: raised when the Hub could not be reached at all,
        # which must not be mistaken for "this file does not exist" while probing layouts
        raise DownloadError(f"{label}: cannot reach the Hub for {filename} ({endpoint or 'default'}"
                            f" endpoint): {str(e).splitlines()[0] if str(e) else ''}") from e
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError) as e:
        raise DownloadError(f"{label}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    except (hf_errors.EntryNotFoundError, hf_errors.HfHubHTTPError) as e:
        resp = getattr(e, "response", None)
        status = getattr(resp, "status_code", None)
        if isinstance(e, hf_errors.EntryNotFoundError) or status == 404:  # mirrors may omit the
            if missing_ok:                                                 # X-Error-Code header
                return None
            raise DownloadError(f"{label}: {filename} not found in {src.repo}@{src.revision}"
                                ) from e
        raise DownloadError(f"{label}: downloading {filename} from {src.repo}@{src.revision} "
                            f"failed (HTTP {status}: {str(e).splitlines()[0] if str(e) else ''})"
                            ) from e
    except OSError as e:
        raise DownloadError(f"{label}: downloading {filename} from {src.repo}@{src.revision} "
                            f"failed ({e})") from e
    p = Path(p)
    _verify(p, sha, label, name)
    dest = partial / name
    os.replace(p, dest)
    return dest


def entry_info(e: PretrainedEntry, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """A JSON-ready description of an entry, with its cache state."""
    folder = cached_folder(e.name, cache_dir)
    return {"name": e.name, "model": e.model, "hook": e.hook, "architecture": e.architecture,
            "format": e.format, "d_in": e.d_in, "d_sae": e.d_sae, "source": e.source,
            "revision": e.revision if e.repo else None, "files": list(e.files),
            "sha256": dict(e.sha256), "verified": e.verified, "description": e.description,
            "cached": str(folder) if folder else None}


__all__ = ["DownloadError", "Source", "download", "fetch_folder", "parse_source", "cache_root",
           "cached_folder", "is_offline", "is_remote", "entry_info", "MARKER", "CACHE_ENV",
           "DEFAULT_TIMEOUT"]
