"""Edit specs: the pydantic model and the JSONL reader/writer (strict in what is stored)."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Iterable

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .atomic import atomic_path
from .errors import InputError
from .limits import MAX_ID_CHARS, MAX_META_BYTES, MAX_TEXT_CHARS
from .textio import iter_lines, loads, read_text

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # tab and line breaks are text


def _text(v: str, blank: str = "must not be empty or blank", strip: bool = True) -> str:
    """``v`` (stripped); refused when blank, absurdly long, or not encodable Unicode."""
    if strip:
        v = v.strip()
    if not v.strip():
        raise ValueError(blank)
    if len(v) > MAX_TEXT_CHARS:
        raise ValueError(f"{len(v):,} characters, at most {MAX_TEXT_CHARS:,} (an edit prompt is a sentence, "
                         "not a document)")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"a lone surrogate {v[exc.start]!r} at character {exc.start + 1} is not Unicode text") from None
    bad = _CONTROL.search(v)
    if bad:
        raise ValueError(f"control character {bad.group()!r} at character {bad.start() + 1} (binary data?)")
    return v


Text = Annotated[str, AfterValidator(_text)]
Prompt = Annotated[str, AfterValidator(lambda v: _text(v, strip=False))]  # kept as written


class Probe(BaseModel):
    """A prompt with the answer expected from it (neighbourhood and portability checks)."""

    model_config = ConfigDict(extra="forbid")
    prompt: Text
    target: Text


class EditSpec(BaseModel):
    """One edit: make ``prompt`` (with ``subject`` in it) complete to ``target_new``.

    ``prompt`` is stored as a template with one ``{}`` where the subject goes; a prompt given
    with the subject written out is rewritten once, on reading.
    """

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    subject: Text
    prompt: Text
    target_new: Text
    target_true: str | None = None
    paraphrases: list[Prompt] = Field(default_factory=list)
    neighborhood: list[Probe] = Field(default_factory=list)
    portability: list[Probe] = Field(default_factory=list)
    generation_prompts: list[Prompt] = Field(default_factory=list)
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = _text(v, "must not be empty or blank (omit the field to derive an id from the content)")
        if len(v) > MAX_ID_CHARS:
            raise ValueError(f"{len(v):,} characters, at most {MAX_ID_CHARS}")
        if any(c in "\t\n\r" for c in v):
            raise ValueError(f"{v!r} holds a tab or line break (ids are printed and typed: `--edit ID`)")
        return v

    @field_validator("target_true")
    @classmethod
    def _optional_text(cls, v: str | None) -> str | None:
        return None if v is None else _text(v, "must not be empty or blank (omit the field instead)")

    @field_validator("meta")
    @classmethod
    def _meta(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            size = len(json.dumps(v, ensure_ascii=False, allow_nan=False).encode())
        except UnicodeEncodeError:
            raise ValueError("holds a lone surrogate, which is not Unicode text") from None
        except RecursionError:
            raise ValueError("nested too deeply") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not JSON data ({exc})") from None
        if size > MAX_META_BYTES:
            raise ValueError(f"{size / 2**20:.1f} MiB as JSON, at most {MAX_META_BYTES / 2**20:g} MiB (meta is "
                             "copied into every diff's header; keep bulky data in a file and name it here)")
        return v

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
    """Read a JSONL spec file; any problem raises InputError naming file, line and field.

    UTF-8 only (a byte-order mark and CRLF line ends are fine); blank lines are refused except at
    the end of the file; lines are at most MAX_LINE_BYTES (see :mod:`kedit.limits` for the rest).
    """
    import jsonlines

    path = Path(path)
    at = [0]  # the line jsonlines is parsing, for our messages

    def lines() -> Iterable[str]:
        """The file's lines through kedit's bounded reader, with the checks JSON itself lacks."""
        blank: int | None = None  # the first blank line not yet followed by a spec
        for lineno, line in iter_lines(path):
            stripped = line.strip()
            if not stripped:
                blank = blank or lineno
                continue
            if blank is not None:
                raise InputError(f"{path}:{blank}: blank line (JSONL has one JSON object per line; remove it)")
            if stripped.startswith(("//", "#")):
                raise InputError(f"{path}:{lineno}: comments are not JSON (remove the line)")
            at[0] = lineno
            yield stripped

    specs: list[EditSpec] = []
    seen: dict[str, int] = {}
    # jsonlines reads the records; kedit's loads bounds nesting and names the line on a JSON error
    with jsonlines.Reader(lines(), loads=lambda text: loads(text, path, at[0])) as reader:
        for record in reader.iter(allow_none=True):
            lineno = at[0]
            spec = parse_record(record, f"{path}:{lineno}")
            if spec.id in seen:
                raise InputError(f"{path}:{lineno}: field 'id': {spec.id!r} already used on line {seen[spec.id]}")
            seen[spec.id] = lineno
            specs.append(spec)
    if not specs:
        raise InputError(f"{path}: no edit specs in file")
    return specs


def write_specs(path: str | os.PathLike, specs: Iterable[EditSpec]) -> int:
    """Write specs in canonical form (jsonlines, one object per line), atomically; returns how
    many were written."""
    import jsonlines

    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh, \
            jsonlines.Writer(fh, dumps=_dumps) as writer:
        for spec in specs:
            writer.write(spec)
            n += 1
    return n


def _dumps(obj: Any) -> str:
    """jsonlines' serializer: specs in canonical form (it also probes with a plain object)."""
    return obj.canonical_json() if isinstance(obj, EditSpec) else json.dumps(obj, ensure_ascii=False)


def specs_sha256(specs: Iterable[EditSpec]) -> str:
    h = hashlib.sha256()
    for spec in specs:
        h.update(spec.canonical_json().encode())
        h.update(b"\n")
    return h.hexdigest()


def _starts_with_bracket(path: Path) -> bool:
    with open(path, "rb") as fh:
        while chunk := fh.read(65536):
            head = chunk.removeprefix(b"\xef\xbb\xbf").lstrip()
            if head:
                return head.startswith(b"[")
    return False


def read_records(path: str | os.PathLike) -> list[tuple[str, Any]]:
    """Records of a JSON array file or a JSONL file, each with a location string for errors
    (read as :mod:`kedit.textio` reads user files: UTF-8, bounded lines and nesting)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if _starts_with_bracket(path):
        data = loads(read_text(path), path)
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON array of records")
        return [(f"{path}: record {i}", r) for i, r in enumerate(data)]
    return [(f"{path}:{lineno}", loads(line, path, lineno)) for lineno, line in iter_lines(path) if line.strip()]


def import_specs(records: Iterable[tuple[str, Any]], skip_invalid: bool = False) -> tuple[list[EditSpec], list[str]]:
    """Validate importer output; returns the specs and, with ``skip_invalid``, the problems skipped."""
    specs: list[EditSpec] = []
    skipped: list[str] = []
    seen: dict[str, str] = {}
    for where, record in records:
        try:
            spec = parse_record(record, where)
            if spec.id in seen:
                raise InputError(f"{where}: field 'id': {spec.id!r} already used by {seen[spec.id]}")
        except InputError as exc:
            if not skip_invalid:
                raise
            skipped.append(str(exc))
            continue
        seen[spec.id] = where
        specs.append(spec)
    return specs, skipped
