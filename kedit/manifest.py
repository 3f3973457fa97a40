"""A diff file's manifest and content id, read from the safetensors bytes without torch.

The id is sha256 over the canonical manifest (less ``id`` and ``created``) and each tensor's
name, dtype, shape and the sha256 of its raw bytes, so it can be checked straight from the file
(``kedit diff show`` does this in a fraction of a second) or from tensors in memory. Since
anyone can recompute an id, the manifest's structure is checked too (every field kedit reads, and
each entry's tensors against its base record), and signatures, kept outside the manifest under
``kedit.signatures``, are verified (:mod:`kedit.signing`).
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import InputError

SCHEMA = 1
SUFFIX = ".kedit.safetensors"
HEADER_LIMIT = 100_000_000  # bytes: safetensors refuses to write or read a larger header
SIGNATURES = "kedit.signatures"  # metadata key of the signature records, outside the content id

# safetensors dtype codes -> torch dtype names (as kedit.hashing.dtype_name writes them)
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}

Digest = tuple[str, list[int], str]  # dtype name, shape, sha256 of the raw bytes

FLOATS = {"float64", "float32", "float16", "bfloat16"}
INDICES = {"int32", "int64"}
# the tensors each encoding stores per parameter, besides PARAM::fix_idx and PARAM::fix_val
ENCODINGS = {"dense": ("delta",), "lowrank": ("u", "v"), "sparse": ("idx", "val"), "masked-lowrank": ("u", "v", "mask")}
_SHA256 = re.compile(r"[0-9a-f]{64}")


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


@dataclass(frozen=True)
class Parsed:
    """What a diff file's bytes hold, everything checked: the manifest, each tensor's digest, the
    verified signatures (:mod:`kedit.signing`), and the raw header for rewriting its metadata."""

    manifest: dict[str, Any]
    digests: dict[str, Digest]
    signatures: list[dict[str, Any]]
    header: dict[str, Any]
    body: int  # offset of the first tensor byte


def header_size(data: bytes, path: Path) -> int:
    """The header length that a safetensors file declares, refused above the format's limit before
    any JSON is parsed (a hostile length would otherwise cost a long parse)."""
    if len(data) < 8:
        raise InputError(f"{path}: truncated or corrupted diff (not readable as safetensors: shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise InputError(f"{path}: truncated or corrupted diff (not readable as safetensors: the header runs past "
                         "the end of the file)")
    if n > HEADER_LIMIT:
        raise InputError(f"{path}: its header is {n / 1e6:.0f} MB; diff headers are limited to "
                         f"{HEADER_LIMIT // 1_000_000} MB (safetensors); not a diff kedit wrote")
    return n


def parse_file(path: Path, data: bytes) -> Parsed:
    """Parse and check a diff file's bytes: header, content id, manifest structure, signatures.
    InputError names the file and what is wrong with it."""
    n = header_size(data, path)
    try:
        header = json.loads(data[8:8 + n])
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        meta = header.get("__metadata__") or {}
        body = 8 + n
        digests: dict[str, Digest] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            if not 0 <= start <= end <= len(data) - body:
                raise ValueError(f"tensor {name} lies outside the file")
            digests[name] = (DTYPES[info["dtype"]], list(info["shape"]), hashlib.sha256(data[body + start:body + end]).hexdigest())
    except (ValueError, KeyError, TypeError, struct.error, RecursionError) as exc:
        raise InputError(f"{path}: truncated or corrupted diff (not readable as safetensors: {exc})") from None
    if not isinstance(meta, dict) or "kedit.manifest" not in meta:
        raise InputError(f"{path}: not a kedit diff (no kedit.manifest in its metadata)")
    try:
        manifest = json.loads(meta["kedit.manifest"])
    except (TypeError, ValueError, RecursionError) as exc:
        raise InputError(f"{path}: corrupted diff (its manifest is not JSON: {exc})") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: corrupted diff (its manifest is not a JSON object)")
    if manifest.get("schema") != SCHEMA:
        raise InputError(f"{path}: diff schema {manifest.get('schema')!r}; this kedit reads schema {SCHEMA}")
    if content_id(manifest, digests) != manifest.get("id"):
        raise InputError(f"{path}: corrupted diff (its content hash does not match its recorded id {manifest.get('id')})")
    check_structure(path, manifest, digests)
    signatures: list[dict[str, Any]] = []
    if meta.get(SIGNATURES) is not None:
        from .signing import verify_records  # cryptography loads only for signed diffs

        signatures = verify_records(path, manifest["id"], meta[SIGNATURES])
    return Parsed(manifest, digests, signatures, header, body)


class _Malformed(Exception):
    """One structural problem: the manifest field and what is wrong with it."""


def _need(ok: bool, field: str, why: str) -> None:
    if not ok:
        raise _Malformed(f"{field} {why}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_shape(x: Any) -> bool:
    return isinstance(x, list) and all(_is_int(s) and s >= 0 for s in x)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_structure(path: Path, manifest: Mapping[str, Any], digests: Mapping[str, Digest]) -> None:
    """Refuse a manifest whose fields kedit would trip over (an id recomputed over a damaged or
    hand-made manifest is still a valid id): one InputError naming the file and the field."""
    try:
        _check_structure(manifest, digests)
    except _Malformed as exc:
        raise InputError(f"{path}: malformed diff manifest: {exc}") from None


def _check_structure(m: Mapping[str, Any], digests: Mapping[str, Digest]) -> None:
    _need(isinstance(m.get("id"), str), "id", "is not a string")
    base = m.get("base")
    _need(isinstance(base, dict), "base", "is missing or not an object")
    tensors = base.get("tensors")
    _need(isinstance(tensors, dict), "base.tensors", "is missing or not an object")
    for name, rec in tensors.items():
        f = f"base.tensors[{name!r}]"
        _need(isinstance(rec, dict), f, "is not an object")
        _need(rec.get("dtype") in DTYPES.values(), f"{f}.dtype", f"{rec.get('dtype')!r} is not a tensor dtype")
        _need(_is_shape(rec.get("shape")), f"{f}.shape", "is not a list of non-negative integers")
        _need(isinstance(rec.get("sha256"), str) and bool(_SHA256.fullmatch(rec["sha256"])), f"{f}.sha256",
              "is not a sha256 hex digest")
    entries = m.get("entries")
    _need(isinstance(entries, dict), "entries", "is missing or not an object")
    expected: set[str] = set()
    for name, e in entries.items():
        f = f"entries[{name!r}]"
        _need(name in tensors, f, "names a parameter without a record in base.tensors")
        _need(isinstance(e, dict), f, "is not an object")
        _need(isinstance(e.get("encoding"), str), f"{f}.encoding", "is missing or not a string")
        _need(e["encoding"] in ENCODINGS, f"{f}.encoding", f"{e['encoding']!r} is not one of {sorted(ENCODINGS)}")
        _need(isinstance(e.get("post_sha256"), str) and bool(_SHA256.fullmatch(e["post_sha256"])),
              f"{f}.post_sha256", "is not a sha256 hex digest")
        for key in ("bytes", "rank", "nnz", "exact_revert_fixes"):
            _need(key not in e or (_is_int(e[key]) and e[key] >= 0), f"{f}.{key}", "is not a non-negative integer")
        _need("bytes" in e, f"{f}.bytes", "is missing")
        names = [f"{name}::{part}" for part in (*ENCODINGS[e["encoding"]], "fix_idx", "fix_val")]
        for t in names:
            _need(t in digests, f, f"({e['encoding']}) needs tensor {t}, which the file lacks")
        _check_tensors(name, e["encoding"], tensors[name], digests)
        expected.update(names)
    for name in tensors:
        _need(name in entries, f"base.tensors[{name!r}]", "has no entry in entries")
    extra = sorted(set(digests) - expected)
    _need(not extra, f"tensor {extra[0]!r}" if extra else "", "is in the file but not described by entries")
    _need(isinstance(m.get("parents", []), list) and all(isinstance(p, str) for p in m.get("parents", [])),
          "parents", "is not a list of diff ids")
    for key in ("editor", "specs", "stats", "eval", "tokenization"):
        _need(m.get(key) is None or isinstance(m[key], dict), key, "is not an object")
    specs = m.get("specs") or {}
    _need(_is_int(specs.get("count", 0)), "specs.count", "is not an integer")
    records = specs.get("records") or []
    _need(isinstance(records, list) and all(isinstance(r, dict) for r in records), "specs.records",
          "is not a list of objects")
    corpus = (m.get("stats") or {}).get("corpus")
    _need(corpus is None or isinstance(corpus, dict), "stats.corpus", "is not an object")
    regs = m.get("regularizers", [])
    _need(isinstance(regs, list) and all(isinstance(r, dict) and isinstance(r.get("name"), str) for r in regs),
          "regularizers", "is not a list of objects with a name")


def _check_tensors(name: str, encoding: str, rec: Mapping[str, Any], digests: Mapping[str, Digest]) -> None:
    """Dtypes and shapes of one parameter's tensors against its base record (values are checked
    where they are decoded, by :func:`kedit.diff.read`)."""
    shape, numel = rec["shape"], _numel(rec["shape"])

    def get(part: str, dtypes: set[str], ndim: int | None = None) -> list[int]:
        t = f"{name}::{part}"
        dtype, tshape, _ = digests[t]
        _need(dtype in dtypes, f"tensor {t!r}", f"is {dtype}, not {' or '.join(sorted(dtypes))}")
        _need(ndim is None or len(tshape) == ndim, f"tensor {t!r}", f"has shape {tshape}, not {ndim}-D")
        return tshape

    if encoding == "dense":
        _need(get("delta", FLOATS) == shape, f"tensor '{name}::delta'", f"does not have the base shape {shape}")
    elif encoding in ("lowrank", "masked-lowrank"):
        u, v = get("u", FLOATS, 2), get("v", FLOATS, 2)
        _need(len(shape) == 2 and [u[0], v[1]] == shape and u[1] == v[0], f"tensors '{name}::u/v'",
              f"with shapes {u} and {v} do not make the base shape {shape}")
        if encoding == "masked-lowrank":
            _need(get("mask", {"uint8"}, 1) == [(numel + 7) // 8], f"tensor '{name}::mask'",
                  f"does not hold one bit per element of {shape} ({(numel + 7) // 8} bytes)")
    else:
        idx, val = get("idx", INDICES, 1), get("val", FLOATS, 1)
        _need(idx == val and idx[0] <= numel, f"tensors '{name}::idx/val'",
              f"have lengths {idx[0]} and {val[0]} for a parameter of {numel} elements")
    fidx, fval = get("fix_idx", INDICES, 1), get("fix_val", {rec["dtype"]}, 1)
    _need(fidx == fval and fidx[0] <= numel, f"tensors '{name}::fix_idx/fix_val'",
          f"have lengths {fidx[0]} and {fval[0]} for a parameter of {numel} elements")


def parse(path: Path, data: bytes) -> tuple[dict[str, Any], dict[str, Digest]]:
    """Manifest and tensor digests of a diff file's bytes, all checked (see :func:`parse_file`)."""
    parsed = parse_file(path, data)
    return parsed.manifest, parsed.digests


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
    return read_parsed(path).manifest


def read_parsed(path: str | Path) -> Parsed:
    """A diff file's manifest, digests and verified signatures, without loading its tensors."""
    path, data = read_bytes(path)
    return parse_file(path, data)


def method_label(manifest: Mapping[str, Any]) -> str:
    """How a diff was made, in the command line's own syntax: ``memit + rect:0.4``; the editor
    alone says too little where a regularizer changed the result."""
    parts = [str((manifest.get("editor") or {}).get("name", "?"))]
    for reg in manifest.get("regularizers") or []:
        opts = {k: v for k, v in (reg.get("options") or {}).items() if v is not None}
        order, defaults = _options_of("regularizers", reg["name"])
        changed = {k: v for k, v in opts.items() if k not in defaults or defaults[k] != v}
        primary = (order or list(opts) or [None])[0]  # the plugin's first option is the one NAME:VALUE sets
        opts = changed or ({primary: opts[primary]} if primary in opts else dict(list(opts.items())[:1]))
        if list(opts) == [primary]:
            parts.append(f"{reg['name']}:{next(iter(opts.values()))}")
        else:
            parts.append(reg["name"] + (":" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else ""))
    return " + ".join(parts)


def _options_of(kind: str, name: str) -> tuple[list[str], dict[str, Any]]:
    """The installed plugin's option names in order and their defaults (nothing when it is not
    installed)."""
    try:
        from .plugins import registry

        fields = registry(kind)[name].obj.Options.model_fields
    except Exception:  # noqa: BLE001 - a label never fails for want of the plugin
        return [], {}
    return list(fields), {k: f.default for k, f in fields.items() if f.default is not None}


def summary(manifest: Mapping[str, Any], signatures: list[dict[str, Any]] | None = None) -> str:
    """Human-readable lines for ``kedit diff show``; ``signatures`` as :func:`parse_file` verified them."""
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
    if signatures:
        from .signing import describe

        lines.append("signatures:")
        lines.extend(f"  {describe(s)}" for s in signatures)
    else:
        lines.append("signatures: (none)")
    return "\n".join(lines)
