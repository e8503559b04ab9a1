"""Crash-safe file writes and sha256 hashing, shared by every module that writes to disk.

The rule everywhere in polysae: a file is written under a temporary name in its own folder,
flushed and fsynced, renamed over the final name, and the folder is fsynced. A crash (power loss,
SIGKILL, out of space) therefore leaves either the old file or the complete new one, never a
truncated file under the final name. Manifests and config files that record hashes are written
last, so a folder whose data files were damaged afterwards fails its checksum instead of loading.
Logs appended to as a run goes (``metrics.jsonl``) are the one exception, written in place
(:func:`open_log`; a torn last line is dropped by whoever reads or resumes them). Every failed
write, atomic or appended, is an ``OSError`` naming the file (:func:`write_error`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

_BLOCK = 1 << 22  # 4 MiB read blocks for hashing


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in blocks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def fsync_and_hash(path: str | os.PathLike) -> str:
    """Flush a just-written file to stable storage and return its hex sha256."""
    h = hashlib.sha256()
    with open(path, "rb+") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
        os.fsync(f.fileno())
    return h.hexdigest()


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder so a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: str | os.PathLike) -> Path:
    """The temporary sibling a file is written under before it is renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_error(path: str | os.PathLike, e: BaseException) -> BaseException:
    """What a failed write of ``path`` raises: an ``OSError`` (its errno kept, ``EIO`` when the
    writer gave none) whose message names the file, for an ``OSError`` or a writer's I/O error
    (``torch.save``'s ``RuntimeError``, safetensors' ``SafetensorError``: disk full, quota,
    read-only); any other exception (a bug, Ctrl-C) unchanged."""
    if isinstance(e, OSError):
        return OSError(e.errno or errno.EIO, f"cannot write {path}: {e.strerror or e}")
    if isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError":
        return OSError(errno.EIO, f"cannot write {path}: {e}")
    return e


def _write_then_rename(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` (which must leave the file flushed to disk), rename ``tmp`` over ``path``,
    fsync the folder; on any error (out of space, Ctrl-C) the temporary file is removed and an
    I/O error becomes an ``OSError`` naming ``path`` (:func:`write_error`)."""
    tmp = temp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        err = write_error(path, e)
        if err is e:
            raise
        raise err from e
    fsync_dir(path.parent)


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> str:
    """Run ``write(tmp)`` on a temporary sibling of ``path``, then fsync, rename and fsync the
    folder. For writers that want a path (``safetensors.save_file``, ``torch.save``). Returns the
    file's sha256. On any error (out of space, Ctrl-C) the temporary file is removed."""
    digest: list[str] = []

    def write_and_sync(tmp: Path) -> None:
        write(tmp)
        digest.append(fsync_and_hash(tmp))

    _write_then_rename(Path(path), write_and_sync)
    return digest[0]


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> str:
    """Write ``payload`` to ``path`` crash-safely (see the module docstring); returns its sha256
    (hashed from memory: a harvest shard is not read back)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())

    _write_then_rename(Path(path), write)
    return hashlib.sha256(payload).hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode())


class LogFile:
    """A text file appended to in place (see :func:`open_log`): ``write``, ``flush`` and ``close``
    of a file object, whose I/O errors (disk full, quota, a removed mount) are an ``OSError``
    naming the file (:func:`write_error`), its errno kept."""

    def __init__(self, path: str | os.PathLike, mode: str = "a"):
        self.path = Path(path)
        self._file: Any = self._named(open, self.path, mode, encoding="utf-8")

    def _named(self, fn: Callable, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except OSError as e:
            raise write_error(self.path, e) from e

    def write(self, text: str) -> int:
        """Write ``text`` (buffered; :meth:`flush` puts it in the file)."""
        return self._named(self._file.write, text)

    def flush(self) -> None:
        """Hand what was written to the operating system (where a full disk shows)."""
        self._named(self._file.flush)

    def close(self) -> None:
        """Flush and close (closing again is a no-op)."""
        self._named(self._file.close)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran."""
        return self._file.closed


def open_log(path: str | os.PathLike, mode: str = "a") -> LogFile:
    """Open ``path`` to append lines to (``mode="w"``: start it afresh): for logs written as a
    run goes, like ``metrics.jsonl``; a failed open, write or flush names the file."""
    return LogFile(path, mode)


def replace_folder(new: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Put the finished folder ``new`` (a sibling of ``dest``) at ``dest``: an existing ``dest``
    is renamed aside first (``.<name>.old-<pid>``), ``new`` is renamed in, the parent folder is
    fsynced, and only then is the old folder removed. Readers see the old folder or the whole
    new one, never a mix; a crash between the two renames leaves the old folder under its
    ``.old-`` name."""
    new, dest = Path(new), Path(dest)
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        os.replace(dest, old)
    os.replace(new, dest)
    fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
