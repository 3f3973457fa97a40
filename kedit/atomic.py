"""Atomic file writes: a crash, a kill or a full disk never leaves a half-written diff, spec or
cache in place of a good one.

Temporaries are named ``.NAME.<random>.kedit-tmp`` beside their target and hold an ``flock``
while they are written, so the kernel marks them as live for exactly as long as their writer
lives. Whoever writes into a folder next removes the ones nobody holds (:func:`sweep`): a
killed export or model conversion does not leave hundreds of megabytes behind for good.

:func:`fault_point` marks each step of a write so tests can kill the process there
(``KEDIT_FAULT_AT=KIND:N`` sends SIGKILL at the N-th point of that kind).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import KeditError

TMP_SUFFIX = ".kedit-tmp"
_FAULTS: dict[str, int] = {}
_SWEPT: set[str] = set()  # folders this process has swept: a long chain writes thousands of files


def fault_point(kind: str, name: str = "") -> None:
    """A place where a crash must leave recoverable files: with ``KEDIT_FAULT_AT=KIND:N`` the
    process kills itself at the N-th point of ``kind``; ``KEDIT_FAULT_LOG=FILE`` lists them."""
    spec = os.environ.get("KEDIT_FAULT_AT")
    log = os.environ.get("KEDIT_FAULT_LOG")
    if not spec and not log:
        return
    _FAULTS[kind] = _FAULTS.get(kind, 0) + 1
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"{kind}:{_FAULTS[kind]} {name}\n")
    if spec == f"{kind}:{_FAULTS[kind]}":
        os.kill(os.getpid(), signal.SIGKILL)


def _disk_error(target: Path, exc: OSError) -> KeditError:
    why = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror or str(exc)
    return KeditError(f"{target}: could not be written ({why}); nothing was replaced, and the "
                      "partial file was removed")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _hold(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new and private: never contended
    return fd


def sweep(folder: str | os.PathLike, again: bool = False) -> list[Path]:
    """Remove the kedit temporaries in ``folder`` whose writer is gone; returns them. Once per
    folder and process (unless ``again``): orphans come from runs that ended before this one."""
    from .locking import is_locked

    folder = Path(folder)
    removed: list[Path] = []
    key = str(folder.resolve())
    if key in _SWEPT and not again:
        return removed
    _SWEPT.add(key)
    try:
        entries = [p for p in folder.iterdir() if p.name.endswith(TMP_SUFFIX)]
    except OSError:
        return removed
    for p in entries:
        if is_locked(p):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed


def _umask_modes(folder: Path) -> None:
    """Give what was written under ``folder`` the modes the umask gives new files and folders
    (writers such as safetensors create files 0600)."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def _umask() -> int:
    """The process's umask (read by setting it and putting it back: the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, kind: str = "file", mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; it replaces ``target`` only if the block succeeds.

    The file gets ``mode``, by default what the umask gives a new file (0644 under the usual
    022), whatever the writer did: mkstemp and safetensors create files 0600, which would make
    every diff, export and report unreadable to the people it is shared with."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    lock = _hold(tmp_path)
    try:
        try:
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~_umask() if mode is None else mode)
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        except OSError as exc:
            raise _disk_error(target, exc) from None
        fault_point(kind, f"{target.name} written")
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
        fault_point(kind, f"{target.name} in place")
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        os.close(lock)


def atomic_write_text(target: str | os.PathLike, text: str, kind: str = "file") -> None:
    with atomic_path(target, kind) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``target`` that becomes ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target.parent, again=True)  # folders are written rarely and their orphans are large
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # as a plain mkdir would make it, not mkdtemp's 0700
    lock = _hold(tmp)
    try:
        try:
            yield tmp
            _umask_modes(tmp)
        except OSError as exc:
            raise _disk_error(target, exc) from None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", suffix=TMP_SUFFIX, dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(lock)
