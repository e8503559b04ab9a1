"""One writer per output folder: an exclusive lock held by every command that writes one.

``polysae harvest``, ``train``, ``eval``, ``export``, ``browse``, ``run`` and ``replicate`` hold
:func:`output_lock` on their output folder for as long as they run (``polysae.__main__`` takes it
around the command). A second process that asks for the same folder, for a folder inside one that
is locked, or for a folder that holds a locked one (``polysae run --out runs/x`` while a ``polysae
train --out runs/x/train`` runs) fails at once with :class:`FolderBusy`, naming the folder and the
holder, and leaves the first run's files untouched.

The lock is a ``filelock`` (``flock``: released by the kernel when the holder dies, so a killed
run never leaves a stale lock) on a hidden file *beside* the folder,
``<parent>/.<name>.polysae-lock``, so the folder itself holds nothing but the command's output
(a harvest refuses a non-empty foreign folder; an export compares the folder's files). The
holder's pid, host, command line and start time go into a sidecar,
``<parent>/.<name>.polysae-lock.json``, which a refused process reads for its message. Folders are
compared by their real path (symlinks and ``..`` resolved).

Nested writers are caught from both sides without a race: a process takes its own lock first and
only then looks for held locks above its folder (its parents') and below it (lock files inside
its tree, :func:`inner_locks`), so of two nested writers starting together at least one sees the
other's lock.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import deque
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCK_SUFFIX = ".polysae-lock"

SCAN_ENTRIES = 20_000
"""At most this many directory entries are read looking for locked folders inside an output
folder (:func:`inner_locks`); a larger tree is checked only that far (breadth first)."""
SCAN_DEPTH = 8
"""Folders deeper than this below the output folder are not looked into."""

OUTPUT_FLAGS = {"harvest": "out", "train": "out", "eval": "out", "export": "out",
                "browse": "out", "run": "out", "replicate": "out"}
"""Subcommand -> the attribute of its parsed arguments naming the folder it writes. A command
module may instead define ``output_folder(args) -> str | None``."""


class FolderBusy(OSError):
    """Another process is writing the output folder; the message names it and the holder."""


def lock_paths(folder: str | os.PathLike) -> tuple[Path, Path]:
    """``(lock file, sidecar)`` of ``folder`` (by its real path)."""
    real = Path(os.path.realpath(folder))
    if not real.name:  # the file-system root
        return real / LOCK_SUFFIX, real / (LOCK_SUFFIX + ".json")
    base = real.parent / f".{real.name}{LOCK_SUFFIX}"
    return base, base.with_name(base.name + ".json")


def holder(folder: str | os.PathLike) -> str:
    """Who holds ``folder``'s lock, as the sidecar says (``pid 123 on host, started ...:
    polysae train ...``), or a note that it is not recorded."""
    side = lock_paths(folder)[1]
    try:
        info = json.loads(side.read_text())
        return (f"pid {int(info['pid'])} on {info['host']}, started {info['started']}: "
                f"{info['command']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its pid is not recorded yet)"


def _busy(folder: Path, lock: Path) -> bool:
    """Whether ``lock`` (an existing lock file) is held by someone right now."""
    from filelock import FileLock, Timeout

    probe = FileLock(str(lock), timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return True
    except OSError:  # unreadable/unwritable: cannot tell, do not block on it
        return False
    probe.release()
    return False


def inner_locks(folder: str | os.PathLike, limit: int = SCAN_ENTRIES,
                depth: int = SCAN_DEPTH) -> Iterator[tuple[Path, Path]]:
    """``(folder, lock file)`` of each folder inside ``folder`` that has a lock file (held or
    not), breadth first. Bounded: at most ``limit`` directory entries are read and ``depth``
    levels entered; symlinks, hidden folders (temporary and old copies, ``.<name>.partial-*``)
    and the sub-folders of a harvest (a folder holding ``manifest.json``: its shards) are not
    entered."""
    todo = deque([(Path(os.path.realpath(folder)), 0)])
    seen = 0
    while todo and seen < limit:
        d, level = todo.popleft()
        try:
            entries = os.scandir(d)
        except OSError:  # unreadable, gone, not a folder
            continue
        subdirs = []
        harvest = False
        with entries:
            for e in entries:
                seen += 1
                name = e.name
                inner = name[1:-len(LOCK_SUFFIX)] if name.endswith(LOCK_SUFFIX) else ""
                if name.startswith(".") and inner:  # .<inner>.polysae-lock
                    yield d / inner, d / name
                elif name == "manifest.json":
                    harvest = True
                elif not name.startswith(".") and level < depth:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            subdirs.append(d / name)
                    except OSError:
                        pass
                if seen >= limit:
                    break
        if not harvest:
            todo.extend((s, level + 1) for s in sorted(subdirs))


def _check_outer(folder: Path, real: Path) -> None:
    """:class:`FolderBusy` when another process holds the lock of a folder that contains
    ``folder``."""
    for anc in real.parents:  # a `polysae run` writing runs/x also owns runs/x/train ...
        alock = lock_paths(anc)[0]
        if alock.is_file() and _busy(anc, alock):
            raise FolderBusy(f"output folder {folder} is inside {anc}, which another polysae "
                             f"process is writing ({holder(anc)}); wait for it or choose "
                             "another folder")


def _check_inner(folder: Path, real: Path) -> None:
    """:class:`FolderBusy` when another process holds the lock of a folder inside ``folder``."""
    own = lock_paths(real)[0]
    for inner, ilock in inner_locks(real):  # ... and a `polysae train` writing runs/x/train
        if ilock != own and ilock.is_file() and _busy(inner, ilock):
            raise FolderBusy(f"output folder {folder} holds {inner}, which another polysae "
                             f"process is writing ({holder(inner)}); wait for it or choose "
                             "another folder")


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, command: str | None = None) -> Iterator[Path]:
    """Hold the exclusive lock of output folder ``folder`` for the ``with`` block.

    Raises :class:`FolderBusy` when another process holds it, the lock of a folder that contains
    ``folder``, or the lock of a folder inside it (looked for after taking ``folder``'s own lock,
    which is then released; :func:`inner_locks` bounds the search). ``command`` is recorded for
    the message a refused process prints (default: this process's command line). The folder
    itself is not created."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    real = Path(os.path.realpath(folder))
    _check_outer(folder, real)  # before creating anything inside a folder someone else writes
    lock, side = lock_paths(folder)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create {lock.parent} for output folder {folder}: "
                               f"{e.strerror or e}") from e
    fl = FileLock(str(lock), timeout=0)
    try:
        fl.acquire()
    except Timeout:
        raise FolderBusy(f"output folder {folder} is in use by {holder(folder)}; wait for it "
                         f"to finish or choose another folder (lock file {lock})") from None
    try:
        # again, and below, with our lock held: of two nested writers starting together, the
        # one that takes its lock second finds the other's (no window between check and lock)
        _check_outer(folder, real)
        _check_inner(folder, real)
    except BaseException:
        fl.release()
        raise
    try:
        info: dict[str, Any] = {
            "pid": os.getpid(), "host": socket.gethostname(),
            "command": command or " ".join(["polysae", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "folder": str(real)}
        try:
            from polysae.fileio import atomic_write_text

            atomic_write_text(side, json.dumps(info))
        except OSError:
            pass  # the lock holds without its sidecar; a refused process says "not recorded"
        yield real
    finally:
        try:
            side.unlink(missing_ok=True)
        finally:
            fl.release()


def command_folder(command: str, module: Any, args: Any) -> str | None:
    """The output folder subcommand ``command`` (module ``module``, parsed ``args``) writes, or
    None when it writes none (``list``, ``hooks``, ``download``)."""
    fn = getattr(module, "output_folder", None)
    if callable(fn):
        return fn(args)
    attr = OUTPUT_FLAGS.get(command)
    value = getattr(args, attr, None) if attr else None
    return str(value) if value else None


def command_lock(command: str, module: Any, args: Any,
                 argv: list[str] | None = None) -> contextlib.AbstractContextManager:
    """:func:`output_lock` on the folder of ``command`` (``argv``: its command line, recorded
    for a refused process), or a no-op when it writes none. Under ``torchrun`` only rank 0 locks
    (every rank runs the same command on the same folder)."""
    folder = command_folder(command, module, args)
    if folder is None or os.environ.get("RANK", "0") not in ("", "0"):
        return contextlib.nullcontext()
    argv = sys.argv[1:] if argv is None else argv
    return output_lock(folder, " ".join(["polysae", *map(str, argv)]))


__all__ = ["FolderBusy", "OUTPUT_FLAGS", "SCAN_DEPTH", "SCAN_ENTRIES", "command_folder",
           "command_lock", "holder", "inner_locks", "lock_paths", "output_lock"]
