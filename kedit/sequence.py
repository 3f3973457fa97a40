"""Sequences of edits: consecutive batches, each computed on the model the previous ones left.

A sequence is written as a *chain folder*: one diff per batch (each naming the one before as its
parent), the editor's carried state, the per-batch data an editor keeps for single-edit removal,
and ``chain.json``, which is written last after every batch and so is the commit point: a run
cut off mid-batch leaves a folder that ``--continue`` resumes from its last whole batch.

Every batch of a sequence sees the *sequence base* (the model before its first edit): its
weights through :class:`SequenceBase` (D4S solves from them) and its key statistics through
:class:`BaseStats` (as sequential MEMIT and AlphaEdit use them; asking the edited model would
recompute them after every batch).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from . import diff as diffmod
from .api import SequenceView, StatsProvider
from .atomic import atomic_path, atomic_write_text, fault_point
from .errors import InputError

CHAIN_FILE = "chain.json"
STATE_FILE = "state.safetensors"
CHAIN_SCHEMA = 2  # 2: step-numbered state files and the hashes of state and data in chain.json
READ_SCHEMAS = (1, 2)
STEP_FILE = re.compile(r"^(step-\d{4,}(\.kedit|\.data)\.safetensors|state-\d{4,}\.safetensors|state\.safetensors)$")
DRIFT_THRESHOLDS = (0.077, 0.171)  # the RECT paper's relative-change levels


class SequenceBase(SequenceView):
    """The unedited model behind a sequence. Its weights are the live ones with the applied diffs
    reverted (exactly, on copies); :meth:`reverted` swaps them in without touching the model's
    own tensors, so editors may look at the base while the host checks they change nothing."""

    def __init__(self, model: torch.nn.Module, applied: list[diffmod.Diff] | None = None) -> None:
        self.model = model
        self.applied: list[diffmod.Diff] = list(applied or [])
        self._weights: dict[str, torch.Tensor] = {}

    def weight(self, name: str) -> torch.Tensor:
        """``name``'s value before the sequence's first edit."""
        if name not in self._weights:
            w = self.model.get_parameter(name).detach().clone()
            for d in reversed(self.applied):
                if name in d.deltas:
                    w = diffmod.reverted_tensor(d, name, w)
            self._weights[name] = w
        return self._weights[name]

    @contextlib.contextmanager
    def reverted(self) -> Iterator[torch.nn.Module]:
        """The model at the sequence base for the duration of the block."""
        names = sorted({n for d in self.applied for n in d.deltas})
        params = {n: self.model.get_parameter(n) for n in names}
        live = {n: p.data for n, p in params.items()}
        try:
            for n, p in params.items():
                p.data = self.weight(n)
            yield self.model
        finally:
            for n, p in params.items():
                p.data = live[n]



class BaseStats(StatsProvider):
    """A statistics provider that serves the sequence base's moments, computed once per layer
    from ``inner`` with the base's weights swapped in, whatever the live model holds."""

    def __init__(self, inner: StatsProvider, base: SequenceBase) -> None:
        self.inner, self.base = inner, base
        self._moments: dict[int, torch.Tensor] = {}

    @property
    def used(self) -> bool:
        return self.inner.used

    def second_moment(self, _model: torch.nn.Module, tokenizer: Any, layers: list[int]) -> dict[int, torch.Tensor]:
        missing = [layer for layer in layers if layer not in self._moments]
        if missing:
            with self.base.reverted() as m:
                self._moments.update(self.inner.second_moment(m, tokenizer, missing))
        return {layer: self._moments[layer] for layer in layers}

    def record(self) -> dict[str, Any]:
        return {**self.inner.record(), "model": "sequence base (the model before the sequence's first edit)"}


def drift(model: torch.nn.Module, base: SequenceBase, names: list[str]) -> dict[str, dict[str, float]]:
    """Per edited matrix: mean |W| and mean |ΔW| (D4S's L1 analysis), the Manhattan distance to the
    base, and the share of elements whose relative change |ΔW|/|W0| exceeds RECT's levels."""
    out = {}
    for name in sorted(names):
        w = model.get_parameter(name).detach().double().cpu()
        w0 = base.weight(name).double().cpu()
        dw = (w - w0).abs()
        rel = dw / w0.abs().clamp_min(1e-12)
        row = {"mean_abs_w": float(w.abs().mean()), "mean_abs_dw": float(dw.mean()), "l1_distance": float(dw.sum())}
        for t in DRIFT_THRESHOLDS:
            row[f"share_rel_gt_{t}"] = float((rel > t).double().mean())
        out[name] = row
    return out


# --- the chain folder ---------------------------------------------------------------------------

@dataclass
class Chain:
    """A chain folder: ``chain.json`` plus the files it lists.

    A step is one commit: its diff, its data and the new editor state are written under
    step-numbered names beside the previous ones, then ``chain.json`` (listing them with their
    hashes) replaces the old one, and only then is the previous state removed. A process killed
    anywhere in between leaves the last committed step intact; files no ``chain.json`` names are
    an uncommitted step's and are removed by the next writer (:meth:`clean`)."""

    path: Path
    record: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "Chain":
        path = Path(path)
        file = path / CHAIN_FILE
        if not file.is_file():
            raise InputError(f"{path}: not a chain folder (no {CHAIN_FILE}); chains are written by "
                             "`kedit apply --mode sequential`")
        try:
            record = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise InputError(f"{file}: unreadable ({exc})") from None
        if not isinstance(record, dict):
            raise InputError(f"{file}: not a chain record (a JSON object)")
        if record.get("schema") not in READ_SCHEMAS:
            raise InputError(f"{file}: chain schema {record.get('schema')!r}; this kedit reads {READ_SCHEMAS}")
        steps = record.get("steps", [])
        if not isinstance(steps, list) or not all(isinstance(s, dict) and isinstance(s.get("diff"), str)
                                                  and "/" not in s["diff"] for s in steps):
            raise InputError(f"{file}: malformed 'steps' (a list of steps, each naming its diff file)")
        return cls(path, record)

    @classmethod
    def create(cls, path: Path, record: dict[str, Any]) -> "Chain":
        """A new chain with no steps, committed at once so an interrupted first step resumes too."""
        chain = cls(path, {**record, "schema": CHAIN_SCHEMA, "steps": []})
        chain.save()
        return chain

    @property
    def steps(self) -> list[dict[str, Any]]:
        return self.record.setdefault("steps", [])

    def files(self) -> set[str]:
        """The names of the files the committed record points to."""
        names = {CHAIN_FILE}
        for s in self.steps:
            names.add(s["diff"])
            if s.get("data"):
                names.add(s["data"])
        st = self.record.get("state")
        if st:
            names.add(st["file"])
        elif self.record.get("schema") == 1 and (self.path / STATE_FILE).exists():
            names.add(STATE_FILE)
        return names

    def clean(self) -> list[str]:
        """Remove an uncommitted step's files (and kedit temporaries); call with the lock held."""
        from .atomic import sweep

        sweep(self.path)
        keep = self.files()
        removed = []
        for p in self.path.iterdir():
            if p.name in keep or not p.is_file() or not STEP_FILE.match(p.name):
                continue
            p.unlink()
            removed.append(p.name)
        return sorted(removed)

    def verify(self) -> None:
        """Check the step data files against their recorded hashes: diffs (by id) and the state
        (by hash) check themselves when a writer loads them, data only when an edit is removed,
        so this is what lets a writer continue only a chain whose committed files are intact."""
        for s in self.steps:
            if s.get("data"):
                self._bytes(s["data"], s.get("data_sha256"), f"data of step {s.get('step')}")

    def diffs(self) -> list[diffmod.Diff]:
        diffs = [diffmod.read(self.path / s["diff"]) for s in self.steps]
        for s, d in zip(self.steps, diffs):
            if d.id != s["id"]:
                raise InputError(f"{self.path / s['diff']}: its id {d.id[:19]}… is not the one {CHAIN_FILE} lists")
        return diffmod.check_chain(diffs)

    def spec_ids(self) -> list[str]:
        """Ids of the edits in effect: those added by the steps, less those removed."""
        ids: list[str] = []
        for s in self.steps:
            ids += s.get("specs", [])
            removed = set(s.get("removes", []))
            ids = [i for i in ids if i not in removed]
        return ids

    def _bytes(self, name: str, sha256: str | None, what: str) -> bytes:
        """A committed file's bytes, checked against the hash chain.json recorded for it."""
        file = self.path / name
        if not file.is_file():
            raise InputError(f"{file}: missing; {CHAIN_FILE} lists it as the {what}")
        data = file.read_bytes()
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise InputError(f"{file}: its content does not match the hash {CHAIN_FILE} recorded for the {what}; "
                             "the file was changed or damaged after the step was committed")
        return data

    def _load(self, name: str, sha256: str | None, what: str) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load

        data = self._bytes(name, sha256, what)
        try:
            return load(data)
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"{self.path / name}: unreadable {what} ({exc})") from None

    def state(self) -> dict[str, torch.Tensor]:
        """The editor state after the last committed step, checked against its recorded hash."""
        st = self.record.get("state")
        if st:
            return self._load(st["file"], st.get("sha256"), "editor state")
        file = self.path / STATE_FILE
        if self.record.get("schema") != 1 or not file.is_file():
            return {}
        from safetensors import safe_open

        with safe_open(str(file), "pt") as fh:  # schema 1: no hash; the step count is the check
            meta = fh.metadata() or {}
            if meta.get("steps") != str(len(self.steps)):
                raise InputError(f"{file}: saved after step {meta.get('steps')}, but {CHAIN_FILE} lists "
                                 f"{len(self.steps)} steps; the chain folder was changed by hand")
            return {k: fh.get_tensor(k) for k in fh.keys()}

    def step_data(self) -> list[tuple[list[str], dict[str, torch.Tensor]]]:
        out = []
        for s in self.steps:
            data = self._load(s["data"], s.get("data_sha256"), f"data of step {s.get('step')}") if s.get("data") else {}
            out.append((list(s.get("specs", [])), data))
        return out

    def add_step(self, diff: diffmod.Diff, info: dict[str, Any], state: dict[str, torch.Tensor] | None,
                 data: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        """Commit one step: its files under new names, then chain.json, then drop the old state."""
        n = len(self.steps) + 1
        step = {"step": n, "diff": f"step-{n:04d}{diffmod.SUFFIX}", "id": diff.id, **info}
        diffmod.write(diff, self.path / step["diff"], kind="chain")
        if data:
            step["data"] = f"step-{n:04d}.data.safetensors"
            step["data_sha256"] = self._write_tensors(step["data"], data)
        old = self.files()
        record = copy.deepcopy(self.record)
        if state:
            name = f"state-{n:04d}.safetensors"
            sha = self._write_tensors(name, state, {"steps": str(n), "last": diff.id})
            record["state"] = {"file": name, "sha256": sha, "step": n}
        record["schema"] = CHAIN_SCHEMA
        record.setdefault("steps", []).append(step)
        self._commit(record)
        for name in old - self.files():
            (self.path / name).unlink(missing_ok=True)
        fault_point("chain", "previous state removed")
        return step

    def _write_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
        """Write a safetensors file of the chain atomically; returns the sha256 of its bytes."""
        from safetensors.torch import save

        data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
        with atomic_path(self.path / name, "chain") as tmp:
            tmp.write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    def _commit(self, record: dict[str, Any]) -> None:
        atomic_write_text(self.path / CHAIN_FILE, json.dumps(record, indent=1, ensure_ascii=False) + "\n", "chain")
        self.record = record

    def save(self) -> None:
        self._commit(self.record)
