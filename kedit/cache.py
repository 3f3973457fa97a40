"""Where kedit keeps its caches (dequantized models, statistics)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


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
