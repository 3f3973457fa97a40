"""Where kedit keeps its caches (dequantized models, statistics), and how a cache proves it is intact.

A cache folder carries a content record (every file's size, mtime and sha256), written last, so
a folder with a record was written completely. Checking it costs one ``stat`` per file when
nothing changed (the fast path, the way make and rsync decide); a file whose size or mtime
changed is hashed again, so damage (truncation, zeroed or flipped bytes) is found, never used.
Single cache files use :func:`write_checked` / :func:`read_checked` (the bytes behind a one-line
header with their sha256 and size) or, when others read the file as it is, a ``NAME.sha256``
file beside it (:func:`write_file_record` / :func:`check_file_record`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

RECORD = "kedit-record.json"
_RECORD_VERSION = 1
_CHECKED_MAGIC = b"kedit-checked-v1 sha256="


def cache_root() -> Path:
    """``$KEDIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/kedit``, else ``~/.cache/kedit``."""
    if os.environ.get("KEDIT_CACHE_DIR"):
        return Path(os.environ["KEDIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kedit"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != RECORD}


def _entry(path: Path, sha256: str | None = None) -> dict[str, object]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256 or file_sha256(path)}


def write_record(folder: str | os.PathLike) -> None:
    """Record the size, mtime and sha256 of every file in ``folder``; call it after the last file
    is written (the record's presence means the folder is complete)."""
    from .atomic import atomic_write_text

    folder = Path(folder)
    files = {name: _entry(path) for name, path in _files(folder).items()}
    atomic_write_text(folder / RECORD, json.dumps({"v": _RECORD_VERSION, "files": files}, indent=1))


def has_record(folder: str | os.PathLike) -> bool:
    return (Path(folder) / RECORD).is_file()


def verify_folder(folder: str | os.PathLike, full: bool = False) -> str | None:
    """``None`` if ``folder`` holds exactly the files its record lists, with the recorded content;
    otherwise why not, in a few words.

    A file whose size and mtime match the record is trusted without reading it (unless ``full``);
    one whose mtime alone changed is hashed, and when its content is still the recorded one the
    record is refreshed, so the next check is fast again.
    """
    folder = Path(folder)
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
        recorded = record["files"]
        if record.get("v") != _RECORD_VERSION or not isinstance(recorded, dict) or not recorded:
            raise ValueError("unknown layout")
    except FileNotFoundError:
        return f"it has no content record ({RECORD})"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its content record {RECORD} is damaged"
    present = _files(folder)
    if missing := sorted(set(recorded) - set(present)):
        return f"{missing[0]} is missing"
    if extra := sorted(set(present) - set(recorded)):
        return f"{extra[0]} was not part of it"
    refreshed = False
    for name, want in recorded.items():
        try:
            st = present[name].stat()
            if st.st_size != want["size"]:
                return f"{name} has {st.st_size:,} bytes instead of {want['size']:,}"
            if st.st_mtime_ns == want["mtime_ns"] and not full:
                continue
            now = _entry(present[name])
        except (OSError, KeyError, TypeError):
            return f"{name} cannot be checked"
        if now["sha256"] != want["sha256"]:
            return f"{name} changed: its sha256 differs from the recorded one"
        if now["mtime_ns"] != want["mtime_ns"]:
            want["mtime_ns"], refreshed = now["mtime_ns"], True
    if refreshed:
        from .atomic import atomic_write_text

        try:
            atomic_write_text(folder / RECORD, json.dumps(record, indent=1))
        except OSError:  # a read-only cache stays correct, only slower to check
            pass
    return None


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_file_record(path: str | os.PathLike) -> None:
    """Record ``path``'s sha256 and size beside it (``NAME.sha256``), for a cache file whose
    format others read as it is (a JSONL corpus); write it after the file."""
    from .atomic import atomic_write_text

    path = Path(path)
    atomic_write_text(_sidecar(path), f"{file_sha256(path)} {path.stat().st_size}\n")


def check_file_record(path: str | os.PathLike) -> str | None:
    """``None`` if ``path`` has the content its ``NAME.sha256`` records; otherwise why not."""
    path = Path(path)
    try:
        digest, size = _sidecar(path).read_text(encoding="utf-8").split()
        size_n = int(size)
    except FileNotFoundError:
        return "it has no checksum"
    except (OSError, ValueError):
        return "its checksum file is damaged"
    try:
        if path.stat().st_size != size_n:
            return f"it has {path.stat().st_size:,} bytes instead of {size_n:,}"
        if file_sha256(path) != digest:
            return "its content does not match its checksum"
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    return None


def write_checked(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` atomically behind a header with its sha256 and size (see :func:`read_checked`)."""
    from .atomic import atomic_path

    header = _CHECKED_MAGIC + hashlib.sha256(data).hexdigest().encode() + f" size={len(data)}\n".encode()
    with atomic_path(path) as tmp:
        tmp.write_bytes(header + data)


def read_checked(path: str | os.PathLike) -> tuple[bytes | None, str]:
    """``(data, "")`` for an intact file written by :func:`write_checked`, else ``(None, why not)``."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        return None, f"it cannot be read ({exc.strerror or exc})"
    head, sep, data = raw.partition(b"\n")
    if not sep or not head.startswith(_CHECKED_MAGIC):
        return None, "it has no checksum header" if raw else "it is empty"
    try:
        digest, size = head[len(_CHECKED_MAGIC):].decode().split(" size=")
        size_n = int(size)
    except ValueError:
        return None, "its checksum header is damaged"
    if len(data) != size_n:
        return None, f"it has {len(data):,} bytes instead of {size_n:,}"
    if hashlib.sha256(data).hexdigest() != digest:
        return None, "its content does not match its checksum"
    return data, ""
