"""Edit specs: the pydantic model and the JSONL reader/writer (strict in what is stored)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .atomic import atomic_path
from .errors import InputError


class Probe(BaseModel):
    """A prompt with the answer expected from it (neighbourhood and portability checks)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    target: str = Field(min_length=1)

    @field_validator("prompt", "target")
    @classmethod
    def _strip(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must not be empty or blank")
        return v


class EditSpec(BaseModel):
    """One edit: make ``prompt`` (with ``subject`` in it) complete to ``target_new``.

    ``prompt`` is stored as a template with one ``{}`` where the subject goes; a prompt given
    with the subject written out is rewritten once, on reading.
    """

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    subject: str
    prompt: str
    target_new: str
    target_true: str | None = None
    paraphrases: list[str] = Field(default_factory=list)
    neighborhood: list[Probe] = Field(default_factory=list)
    portability: list[Probe] = Field(default_factory=list)
    generation_prompts: list[str] = Field(default_factory=list)
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("subject", "prompt", "target_new")
    @classmethod
    def _required_text(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty or blank")
        return v.strip()

    @field_validator("target_true")
    @classmethod
    def _optional_text(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty or blank (omit the field instead)")
        return None if v is None else v.strip()

    @model_validator(mode="after")
    def _template(self) -> "EditSpec":
        n = self.prompt.count("{}")
        if n > 1:
            raise ValueError("prompt: has more than one '{}'")
        if n == 0:
            if self.subject not in self.prompt:
                raise ValueError(f"prompt: contains neither '{{}}' nor the subject {self.subject!r}")
            self.prompt = self.prompt.replace(self.subject, "{}", 1)
        if self.target_true is not None and self.target_true == self.target_new:
            raise ValueError("target_new: equals target_true")
        if self.id is None:
            self.id = hashlib.sha256(self.canonical_json(exclude_id=True).encode()).hexdigest()[:12]
        return self

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    def canonical_json(self, exclude_id: bool = False) -> str:
        data = self.model_dump(exclude_defaults=True, exclude={"id"} if exclude_id else None)
        if not exclude_id:
            data = {"id": self.id, **{k: v for k, v in data.items() if k != "id"}}
        return json.dumps(data, ensure_ascii=False, sort_keys=False)


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "record"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        return f"field {loc!r}: missing (required)"
    if first["type"] == "extra_forbidden":
        return f"field {loc!r}: unknown field (known: {', '.join(EditSpec.model_fields)})"
    if loc == "record" and ":" in msg:
        loc, msg = msg.split(":", 1)
    return f"field {loc!r}: {msg.strip()}"


def parse_record(record: Any, where: str) -> EditSpec:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    try:
        return EditSpec.model_validate(record)
    except ValidationError as exc:
        raise InputError(f"{where}: {_describe(exc)}") from None


def read_specs(path: str | os.PathLike) -> list[EditSpec]:
    """Read a JSONL spec file; any problem raises InputError naming file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    specs: list[EditSpec] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            stripped = line.strip()
            if not stripped:
                raise InputError(f"{where}: blank line (JSONL has one JSON object per line; remove it)")
            if stripped.startswith(("//", "#")):
                raise InputError(f"{where}: comments are not JSON (remove the line)")
            try:
                record = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: malformed JSON: {exc.msg} (column {exc.colno})") from None
            spec = parse_record(record, where)
            if spec.id in seen:
                raise InputError(f"{where}: field 'id': {spec.id!r} already used on line {seen[spec.id]}")
            seen[spec.id] = lineno
            specs.append(spec)
    if not specs:
        raise InputError(f"{path}: no edit specs in file")
    return specs


def write_specs(path: str | os.PathLike, specs: Iterable[EditSpec]) -> int:
    """Write specs in canonical form, atomically; returns how many were written."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for spec in specs:
            fh.write(spec.canonical_json() + "\n")
            n += 1
    return n


def specs_sha256(specs: Iterable[EditSpec]) -> str:
    h = hashlib.sha256()
    for spec in specs:
        h.update(spec.canonical_json().encode())
        h.update(b"\n")
    return h.hexdigest()


def read_records(path: str | os.PathLike) -> list[tuple[str, Any]]:
    """Records of a JSON array file or a JSONL file, each with a location string for errors."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
        return [(f"{path}: record {i}", r) for i, r in enumerate(data)]
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
    return out


def import_specs(records: Iterable[tuple[str, Any]], skip_invalid: bool = False) -> tuple[list[EditSpec], list[str]]:
    """Validate importer output; returns the specs and, with ``skip_invalid``, the problems skipped."""
    specs: list[EditSpec] = []
    skipped: list[str] = []
    for where, record in records:
        try:
            specs.append(parse_record(record, where))
        except InputError as exc:
            if not skip_invalid:
                raise
            skipped.append(str(exc))
    return specs, skipped
