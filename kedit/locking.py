"""One writer at a time: exclusive locks on chain folders and output paths.

Locks are ``flock`` locks on a small lock file, so the kernel drops them when the holder dies
(even by SIGKILL): a stale lock never needs clearing by hand. The holder writes who it is into
the lock file; a second writer does not wait but stops at once (exit code 2) naming the holder,
since silently queueing behind an hour-long chain is rarely what was wanted.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from .errors import InputError

LOCK_NAME = ".kedit.lock"  # inside a locked folder (a chain)
_HELD: set[str] = set()  # lock files this process holds (exclusive() is re-entrant)


def lock_file_for(target: Path, folder: bool = False) -> Path:
    """Where the lock of ``target`` lives: inside a chain folder (``folder``), else a hidden file
    beside it (an output file or folder, which may not exist yet)."""
    return target / LOCK_NAME if folder else target.with_name(f".{target.name}.kedit.lock")


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return "another process"
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    return (f"pid {info['pid']} on {info.get('host', '?')} since {info.get('since', '?')}"
            f" ({info.get('command', '?')})")


def _flock(fd: int) -> bool:
    """Take the exclusive lock on ``fd`` if nobody holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _try_lock(file: Path) -> tuple[int | None, str]:
    """(fd holding the lock on ``file``, "") or (None, who holds it)."""
    while True:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        if not _flock(fd):
            holder = _holder(fd)
            os.close(fd)
            return None, holder
        # the previous holder may have removed the file between our open and our lock: retry then
        try:
            same = os.stat(file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, ""
        os.close(fd)


@contextlib.contextmanager
def exclusive(target: str | os.PathLike, what: str, folder: bool = False) -> Iterator[None]:
    """Hold the lock of ``target`` (an output path; with ``folder``, a chain folder, created if
    need be) for the block; InputError naming the holder if another process has it. Re-entrant
    within one process."""
    target = Path(target)
    if folder:
        target.mkdir(parents=True, exist_ok=True)
    file = lock_file_for(target, folder)
    key = str(file.resolve())
    if key in _HELD:
        yield
        return
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, holder = _try_lock(file)
    if fd is None:
        raise InputError(f"{target}: {what} is in use by {holder}; wait for it to finish "
                         "(two writers would lose one's work)")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(["kedit", *sys.argv[1:]])[:300],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        if file.name != LOCK_NAME:  # a lock beside an output goes with the run; one in a chain stays
            with contextlib.suppress(OSError):
                os.unlink(file)
        os.close(fd)


@contextlib.contextmanager
def waiting(target: str | os.PathLike) -> Iterator[None]:
    """Hold the lock beside ``target`` for the block, waiting for another holder to finish: for
    shared caches that several processes (torchrun's ranks, parallel runs) may fill at once, where
    the second should use the first's result instead of stopping or redoing it."""
    file = lock_file_for(Path(target))
    file.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # the holder before us removes the file on its way out: then lock the new one instead
            same = os.stat(file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(file)
        os.close(fd)


def is_locked(path: Path) -> bool:
    """Whether some live process holds an flock on ``path`` (a file or a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return not _flock(fd)
    finally:
        os.close(fd)
