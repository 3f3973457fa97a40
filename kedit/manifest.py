"""A diff file's manifest and content id, read from the safetensors bytes without torch.

The id is sha256 over the canonical manifest (less ``id`` and ``created``) and each tensor's
name, dtype, shape and the sha256 of its raw bytes, so it can be checked straight from the file
(``kedit diff show`` does this in a fraction of a second) or from tensors in memory.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Mapping

from .errors import InputError

SCHEMA = 1
SUFFIX = ".kedit.safetensors"

# safetensors dtype codes -> torch dtype names (as kedit.hashing.dtype_name writes them)
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}

Digest = tuple[str, list[int], str]  # dtype name, shape, sha256 of the raw bytes


def canonical(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def content_id(manifest: Mapping[str, Any], digests: Mapping[str, Digest]) -> str:
    """The diff id from its manifest and its tensors' digests."""
    h = hashlib.sha256(canonical({k: v for k, v in manifest.items() if k not in ("id", "created")}))
    for name in sorted(digests):
        dtype, shape, sha = digests[name]
        h.update(f"{name}|{dtype}|{list(shape)}".encode())
        h.update(sha.encode())
    return "sha256:" + h.hexdigest()


def parse(path: Path, data: bytes) -> tuple[dict[str, Any], dict[str, Digest]]:
    """Manifest and tensor digests of a diff file's bytes, its id checked; InputError names the
    file for anything damaged."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        if n > len(data) - 8:
            raise ValueError("the header runs past the end of the file")
        header = json.loads(data[8:8 + n])
        meta = header.pop("__metadata__", None) or {}
        body = 8 + n
        digests: dict[str, Digest] = {}
        for name, info in header.items():
            start, end = info["data_offsets"]
            if not 0 <= start <= end <= len(data) - body:
                raise ValueError(f"tensor {name} lies outside the file")
            digests[name] = (DTYPES[info["dtype"]], list(info["shape"]), hashlib.sha256(data[body + start:body + end]).hexdigest())
    except (ValueError, KeyError, TypeError, struct.error, RecursionError) as exc:
        raise InputError(f"{path}: truncated or corrupted diff (not readable as safetensors: {exc})") from None
    if "kedit.manifest" not in meta:
        raise InputError(f"{path}: not a kedit diff (no kedit.manifest in its metadata)")
    try:
        manifest = json.loads(meta["kedit.manifest"])
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{path}: corrupted diff (its manifest is not JSON: {exc})") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: corrupted diff (its manifest is not a JSON object)")
    if manifest.get("schema") != SCHEMA:
        raise InputError(f"{path}: diff schema {manifest.get('schema')!r}; this kedit reads schema {SCHEMA}")
    if content_id(manifest, digests) != manifest.get("id"):
        raise InputError(f"{path}: corrupted diff (its content hash does not match its recorded id {manifest.get('id')})")
    return manifest, digests


def read_bytes(path: str | Path) -> tuple[Path, bytes]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such diff file")
    try:
        return path, path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the diff ({exc})") from None


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A diff's manifest, integrity checked, without loading its tensors."""
    path, data = read_bytes(path)
    return parse(path, data)[0]


def summary(manifest: Mapping[str, Any]) -> str:
    """Human-readable lines for ``kedit diff show``."""
    m = manifest
    ed = m.get("editor") or {}
    lines = [f"id:       {m['id']}", f"created:  {m.get('created')}",
             f"base:     {m['base'].get('name_or_path')} ({m['base'].get('model_type')}, revision {m['base'].get('revision')})",
             f"parents:  {', '.join(p[:19] + '…' for p in m.get('parents', [])) or '(none)'}",
             f"editor:   {ed.get('name')} {json.dumps(ed.get('options', {}))}",
             f"regs:     {', '.join(r['name'] + json.dumps(r.get('options', {})) for r in m.get('regularizers', [])) or '(none)'}",
             f"specs:    {(m.get('specs') or {}).get('count', 0)}"]
    stats = m.get("stats")
    if stats:
        corpus = stats.get("corpus") or {}
        lines.append(f"stats:    {corpus.get('name') or corpus.get('path') or corpus.get('kind')}, "
                     f"{stats.get('n_tokens')} tokens")
    lines.append("entries:")
    for name, e in m["entries"].items():
        extra = f" rank={e['rank']}" if "rank" in e else (f" nnz={e['nnz']}" if "nnz" in e else "")
        lines.append(f"  {name}: {e['encoding']}{extra} {e['bytes'] / 1024:.1f} KiB")
    return "\n".join(lines)
