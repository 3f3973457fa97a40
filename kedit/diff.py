"""The diff file: one self-describing safetensors file with a provenance manifest.

Tensors: ``PARAM::delta`` (dense), ``PARAM::u``/``PARAM::v`` (low rank), ``PARAM::idx``/``PARAM::val``
(sparse), plus ``PARAM::fix_idx``/``PARAM::fix_val``: the few base values that ``(W + Δ) − Δ`` does
not give back bit for bit in the base dtype, so that revert is always exact. The manifest and the
content id are read and checked by :mod:`kedit.manifest`, which needs no torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from . import delta as D
from . import manifest as M
from .atomic import atomic_path
from .errors import InputError, KeditError
from .hashing import dtype_name, tensor_sha256

SCHEMA = M.SCHEMA
SUFFIX = M.SUFFIX


@dataclass
class Diff:
    manifest: dict[str, Any]
    deltas: dict[str, D.Delta]
    fixes: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    path: Path | None = None
    signatures: list[dict[str, Any]] = field(default_factory=list)  # verified when read (kedit.signing)

    @property
    def id(self) -> str:
        return self.manifest["id"]

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, d in sorted(self.deltas.items()):
            out.update(D.to_tensors(name, d))
            idx, val = self.fixes[name]
            out[f"{name}::fix_idx"] = idx.to(D.index_dtype(D.numel(d.shape))).contiguous()
            out[f"{name}::fix_val"] = val.contiguous()
        return out


def versions() -> dict[str, str]:
    import transformers

    import kedit

    return {"version": kedit.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def content_id(manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str:
    """Hash of the manifest (less id and creation time) and every tensor's bytes."""
    return M.content_id(manifest, {n: (dtype_name(t.dtype), list(t.shape), tensor_sha256(t)) for n, t in tensors.items()})


def seal(diff: Diff) -> Diff:
    """Recompute the id after the manifest was completed (evaluations, sequence info): the one
    place an id is made, so a diff's id always matches what is written."""
    diff.manifest["id"] = content_id(diff.manifest, diff.tensors())
    return diff


def _plus(weight: torch.Tensor, dense64: torch.Tensor) -> torch.Tensor:
    return (weight.detach().double() + dense64).to(weight.dtype)


def _minus(weight: torch.Tensor, dense64: torch.Tensor) -> torch.Tensor:
    return (weight.detach().double() - dense64).to(weight.dtype)


def build(base: Mapping[str, torch.Tensor], deltas: Mapping[str, D.Delta | torch.Tensor],
          record: Mapping[str, Any]) -> Diff:
    """Encode deltas against their base tensors and write the manifest.

    ``record`` holds the provenance fields (base model, parents, editor, regularizers, specs, ...).
    """
    entries: dict[str, Any] = {}
    base_tensors: dict[str, Any] = {}
    encoded: dict[str, D.Delta] = {}
    fixes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in sorted(deltas):
        if name not in base:
            raise KeditError(f"delta for {name!r}, which the model does not have")
        w = base[name].detach().cpu()
        d = D.compact(deltas[name])
        if tuple(d.shape) != tuple(w.shape):
            raise KeditError(f"delta for {name} has shape {tuple(d.shape)}, the parameter {tuple(w.shape)}")
        dense = D.to_dense(d, torch.float64)
        if not torch.isfinite(dense).all():
            raise KeditError(f"the delta for {name} has NaN or infinite values; nothing written")
        post = _plus(w, dense)
        back = _minus(post, dense)
        wrong = torch.nonzero((back != w).reshape(-1), as_tuple=True)[0]
        fixes[name] = (wrong.to(torch.int64), w.reshape(-1)[wrong].clone())
        encoded[name] = d
        base_tensors[name] = {"dtype": dtype_name(w.dtype), "shape": list(w.shape), "sha256": tensor_sha256(w)}
        entry: dict[str, Any] = {"encoding": D.encoding_name(d), "delta_dtype": "float32",
                                 "post_sha256": tensor_sha256(post), "exact_revert_fixes": int(wrong.numel()),
                                 "bytes": D.nbytes(d)}
        if isinstance(d, (D.LowRank, D.MaskedLowRank)):
            entry["rank"] = d.rank
        if isinstance(d, D.Sparse):
            entry["nnz"] = int(d.idx.numel())
        if isinstance(d, D.MaskedLowRank):
            entry["nnz"] = int(d.mask.sum())  # elements the mask keeps
        entries[name] = entry
    rec = dict(record)
    base_info = dict(rec.pop("base", {}))
    base_info["tensors"] = base_tensors
    manifest: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kedit": versions(),
        "base": base_info,
        "parents": list(rec.pop("parents", [])),
        **rec,
        "entries": entries,
    }
    return seal(Diff(manifest, encoded, fixes))


def write(diff: Diff, path: str | os.PathLike, kind: str = "file") -> Path:
    """Write atomically; returns the path written. (``kind`` names its fault points.)"""
    from safetensors.torch import save_file

    path = Path(path)
    metadata = {"format": "pt", "kedit.schema": str(SCHEMA), "kedit.id": diff.id,
                "kedit.base": str(diff.manifest.get("base", {}).get("name_or_path", "")),
                "kedit.manifest": json.dumps(diff.manifest, ensure_ascii=False)}
    tensors = diff.tensors()
    _check_header_size(path, metadata, len(tensors))
    with atomic_path(path, kind) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    diff.path = path
    return path


def _check_header_size(path: Path, metadata: Mapping[str, str], n_tensors: int) -> None:
    """Refuse before writing a manifest that safetensors cannot hold: its header limit would
    otherwise fail deep inside the writer, after all the work."""
    size = len(json.dumps(metadata, ensure_ascii=False).encode()) + 200 * n_tensors  # + each tensor's entry
    if size > M.HEADER_LIMIT:
        manifest = len(metadata["kedit.manifest"].encode())
        raise InputError(f"{path}: the diff's manifest is {manifest / 1e6:.0f} MB; diff headers are limited to "
                         f"{M.HEADER_LIMIT // 1_000_000} MB (safetensors): large spec meta fields? nothing written")


def read(path: str | os.PathLike) -> Diff:
    """Read and integrity-check a diff; any damage raises InputError naming the file."""
    from safetensors.torch import load as load_bytes

    path, data = M.read_bytes(path)
    parsed = M.parse_file(path, data)
    manifest = parsed.manifest
    try:
        tensors = load_bytes(data)
        entries = manifest["entries"]
        shapes = {n: tuple(t["shape"]) for n, t in manifest["base"]["tensors"].items()}
        deltas = {n: D.from_tensors(n, e["encoding"], tensors, shapes[n]) for n, e in entries.items()}
        fixes = {n: (tensors[f"{n}::fix_idx"].to(torch.int64), tensors[f"{n}::fix_val"]) for n in entries}
    except Exception as exc:  # safetensors and the decoders raise several types for damaged content
        raise InputError(f"{path}: corrupted diff (manifest and tensors disagree: {exc})") from None
    _check_values(path, tensors, fixes, shapes)
    return Diff(manifest, deltas, fixes, path, parsed.signatures)


def _check_values(path: Path, tensors: Mapping[str, torch.Tensor],
                  fixes: Mapping[str, tuple[torch.Tensor, torch.Tensor]], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """What the content id cannot vouch for, since anyone can recompute it: finite values (a NaN
    delta would give a NaN model), and fix indices inside their tensor (revert must be exact)."""
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(f"{path}: tensor {name} holds NaN or infinite values; refusing the diff")
    for name, (idx, val) in sorted(fixes.items()):
        size = D.numel(shapes[name])
        if idx.dim() != 1 or val.dim() != 1 or idx.numel() != val.numel():
            raise InputError(f"{path}: {name}::fix_idx and ::fix_val differ in length; refusing the diff")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
            raise InputError(f"{path}: {name}::fix_idx has indices outside the tensor's {size} elements; "
                             "refusing the diff")


# --- verifying against a live model ---------------------------------------------------------

def _param(model: torch.nn.Module, name: str, diff: Diff) -> torch.nn.Parameter:
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise InputError(f"{_label(diff)}: the model has no parameter {name} (diff made for another architecture?)") from None


def _label(diff: Diff) -> str:
    return str(diff.path) if diff.path else diff.id[:19]


def state(model: torch.nn.Module, diff: Diff) -> str:
    """``"base"`` if the diff can be applied, ``"applied"`` if it already is; otherwise InputError with the likely reason."""
    label = _label(diff)
    base = diff.manifest["base"]
    states = set()
    for name in sorted(diff.deltas):
        rec = base["tensors"][name]
        p = _param(model, name, diff)
        if list(p.shape) != rec["shape"]:
            raise InputError(f"{label}: {name} has shape {list(p.shape)} in the model but {rec['shape']} in the diff; "
                             f"the diff was made for another model ({base.get('name_or_path')})")
        if dtype_name(p.dtype) != rec["dtype"]:
            raise InputError(f"{label}: {name} is {dtype_name(p.dtype)} in the model but {rec['dtype']} in the diff's base; "
                             f"load the model in the diff's dtype (--dtype {rec['dtype']}; a dtype cast changes every tensor hash)")
        h = tensor_sha256(p)
        if h == rec["sha256"]:
            states.add("base")
        elif h == diff.manifest["entries"][name]["post_sha256"]:
            states.add("applied")
        elif diff.manifest.get("parents"):
            raise InputError(f"{label}: {name} matches neither this diff's base nor its result; the diff continues "
                             f"a chain (parent {diff.manifest['parents'][-1][:19]}…): apply its parents first, in order")
        else:
            raise InputError(f"{label}: {name} does not match the diff's base tensor; the diff was made for another "
                             f"model or checkpoint ({base.get('name_or_path')}), or other edits were applied first")
    if len(states) > 1:
        raise InputError(f"{label}: the diff is partly applied (some tensors are at its base, some at its result)")
    return states.pop()


def apply(model: torch.nn.Module, diff: Diff) -> str:
    """Apply in place after verifying the base; returns ``"applied"`` or ``"already applied"``.

    All or nothing: every new tensor is computed and checked against the recorded result hash
    before any parameter changes."""
    if state(model, diff) == "applied":
        return "already applied"
    with torch.no_grad():
        new = {}
        for name, d in diff.deltas.items():
            p = model.get_parameter(name)
            new[name] = _plus(p, D.to_dense(d, torch.float64).to(p.device))
        _check_hashes(diff, new, {n: e["post_sha256"] for n, e in diff.manifest["entries"].items()},
                      "applying it gives another result than the one it records")
        _commit(model, new)
    return "applied"


def _check_hashes(diff: Diff, new: Mapping[str, torch.Tensor], expected: Mapping[str, str], what: str) -> None:
    """Refuse, before the model changes, new tensors whose hashes are not the recorded ones."""
    for name, t in new.items():
        if tensor_sha256(t) != expected[name]:
            raise InputError(f"{_label(diff)}: {name}: {what} (a changed delta or fix list?); the model is unchanged")


def _commit(model: torch.nn.Module, new: Mapping[str, torch.Tensor]) -> None:
    """Copy checked tensors into the model. A Ctrl-C waits until every copy is done (a copy is
    idempotent, so an interrupted one is redone): the model is never left half changed."""
    interrupted: KeyboardInterrupt | None = None
    for name, t in new.items():
        while True:
            try:
                model.get_parameter(name).copy_(t)
                break
            except KeyboardInterrupt as exc:
                interrupted = exc
    if interrupted is not None:
        raise interrupted


def reverted_tensor(diff: Diff, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (``name`` with ``diff`` applied) with the diff undone, exactly; a new tensor."""
    back = _minus(tensor, D.to_dense(diff.deltas[name], torch.float64).to(tensor.device)).reshape(-1)
    idx, val = diff.fixes[name]
    back[idx.to(back.device)] = val.to(back.device, back.dtype)
    return back.view(tensor.shape)


def revert(model: torch.nn.Module, diff: Diff) -> str:
    """Undo an applied diff exactly; returns ``"reverted"`` or ``"not applied"``."""
    if state(model, diff) == "base":
        return "not applied"
    with torch.no_grad():
        new = {name: reverted_tensor(diff, name, model.get_parameter(name).detach()) for name in diff.deltas}
        _check_hashes(diff, new, {n: t["sha256"] for n, t in diff.manifest["base"]["tensors"].items()},
                      "reverting it does not give back its recorded base tensor")
        _commit(model, new)
    return "reverted"


def check_chain(diffs: Iterable[Diff]) -> list[Diff]:
    """Diffs in application order; each after the first must name the one before as its parent."""
    diffs = list(diffs)
    for prev, nxt in zip(diffs, diffs[1:]):
        if prev.id not in nxt.manifest.get("parents", []):
            raise InputError(f"{_label(nxt)} does not continue {_label(prev)} (its parents: "
                             f"{[p[:19] for p in nxt.manifest.get('parents', [])]}); list a chain in order")
    return diffs


def squash(model: torch.nn.Module, diffs: list[Diff]) -> Diff:
    """One diff equal to applying the chain in order (to within rounding, which is recorded).

    The model must be at the chain's base; it is left unchanged.
    """
    diffs = check_chain(diffs)
    state(model, diffs[0])
    total: dict[str, D.Delta] = {}
    for d in diffs:
        for name, delta in d.deltas.items():
            total[name] = D.add(total[name], delta) if name in total else delta
    base = {n: model.get_parameter(n).detach().cpu().clone() for n in total}
    seq = dict(base)
    for d in diffs:
        for name, delta in d.deltas.items():
            seq[name] = _plus(seq[name], D.to_dense(delta, torch.float64))
    first = diffs[0].manifest
    record = {
        "base": {k: v for k, v in first["base"].items() if k != "tensors"},
        "parents": first.get("parents", []),
        "editor": {"name": "squash", "of": [{"id": d.id, "editor": d.manifest.get("editor")} for d in diffs]},
        "regularizers": [],
        "specs": _merge_specs(d.manifest.get("specs") for d in diffs),
        "tokenization": first.get("tokenization"),
    }
    out = build(base, total, record)
    err = max(float((_plus(base[n], D.to_dense(out.deltas[n], torch.float64)).double() - seq[n].double()).abs().max())
              for n in total)
    out.manifest["squash_max_abs_vs_chain"] = err
    return seal(out)


def _merge_specs(blocks: Iterable[Mapping[str, Any] | None]) -> dict[str, Any]:
    records: list[Any] = []
    for b in blocks:
        records.extend((b or {}).get("records", []))
    h = hashlib.sha256("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()).hexdigest()
    return {"count": len(records), "sha256": h, "records": records}


def summary(diff: Diff) -> str:
    """Human-readable lines for ``kedit diff show``."""
    return M.summary(diff.manifest, diff.signatures)
