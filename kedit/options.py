"""Parsing ``-o KEY VALUE`` pairs and ``--reg NAME[:VALUE | :k=v,...]`` into validated plugin options.

Options are validated strictly, for every plugin alike (third-party ones too), because they are
recorded in diffs and must mean what was typed: a boolean is never a number nor a number a
boolean, ``"5"`` is not 5, a whole-number option refuses ``5.0``, a float option takes ``5``,
and numbers must be finite (``NaN``/``Infinity`` are not JSON and are refused).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import InputError
from .textio import loads


def _value(raw: str) -> Any:
    """A VALUE typed on the command line: JSON if it parses as JSON (finite numbers, nesting
    bounded), else the plain string (which a number option then refuses)."""
    try:
        return loads(raw, "VALUE")
    except InputError:
        return raw


def _path(value: Any) -> str:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(type(value).__name__)


def _infinite(text: str) -> bool:
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    return False


def validate(kind: str, name: str, cls: type[BaseModel], values: dict[str, Any]) -> BaseModel:
    """Validate option values strictly (see the module docstring); unknown keys and bad values
    name the option and list the known ones."""
    known = list(cls.model_fields)
    for key, value in values.items():
        if key not in cls.model_fields:
            raise InputError(f"unknown option {key!r} for {kind} {name!r}; options: {', '.join(known) or '(none)'}")
        try:
            bad = _non_finite(value)
        except RecursionError:
            raise InputError(f"bad value for option {key!r} of {kind} {name!r}: nested too deeply") from None
        if bad:
            raise InputError(f"bad value {value!r} for option {key!r} of {kind} {name!r}: numbers must be finite")
    try:
        text = json.dumps(values, allow_nan=False, default=_path)
    except (TypeError, ValueError):  # Python objects JSON cannot hold: validated as they are
        text = None
    try:
        if text is None:
            return cls.model_validate(values, strict=True)
        return cls.model_validate_json(text, strict=True)  # strict, but lists may fill tuples
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "?"
        got = values.get(str(err["loc"][0]), "") if err["loc"] else ""
        hint = ""
        if isinstance(got, str) and _infinite(got):
            hint = " (numbers must be finite)"
        elif isinstance(got, bool) and err["type"] in ("int_type", "float_type"):
            hint = " (a boolean is not a number)"
        elif isinstance(got, float) and err["type"].startswith("int"):
            hint = " (a whole number, without a decimal point)"
        elif isinstance(got, (int, float)) and err["type"] == "bool_type":
            hint = " (write true or false)"
        elif isinstance(got, str) and _value(got) != got and err["type"] in ("int_type", "float_type"):
            hint = " (got a string; write the number without quotes)"
        shown = repr(got) if isinstance(got, str) else json.dumps(got, default=str)
        shown = shown if len(shown) <= 80 else shown[:76] + " ..."
        raise InputError(f"bad value {shown} for option {key!r} of {kind} {name!r}: {err['msg']}{hint}") from None


def parse_pairs(pairs: list[list[str]] | None) -> dict[str, Any]:
    return {k: _value(v) for k, v in (pairs or [])}


def parse_reg(text: str, label: str = "--reg") -> tuple[str, dict[str, Any] | Any]:
    """``rect`` -> (rect, {}); ``rect:0.4`` -> (rect, 0.4) for the primary option; ``rect:k=0.4,eps=1e-8``."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not name or (sep and not rest.strip()):
        raise InputError(f"malformed {label} {text!r}: use NAME, NAME:VALUE or NAME:KEY=VALUE[,KEY=VALUE]")
    if not sep:
        return name, {}
    if "=" not in rest:
        return name, _value(rest.strip())
    values: dict[str, Any] = {}
    for part in rest.split(","):
        key, eq, val = part.partition("=")
        if not eq or not key.strip() or not val.strip():
            raise InputError(f"malformed {label} {text!r}: {part!r} is not KEY=VALUE")
        values[key.strip()] = _value(val.strip())
    return name, values


def bind(kind: str, label: str, text: str) -> tuple[Any, dict[str, Any]]:
    """Look up the plugin a ``NAME[:VALUE | :K=V,...]`` reference names (in registry ``kind``) and
    return it with its raw option values, a bare VALUE bound to the plugin's ``primary`` option."""
    from .plugins import lookup

    name, values = parse_reg(text, label)
    entry = lookup(kind, name)
    if not isinstance(values, dict):
        primary = getattr(entry.obj, "primary", None)
        if not primary:
            raise InputError(f"{label} {text!r}: {name!r} has no primary option; use {name}:KEY=VALUE")
        values = {primary: values}
    return entry, values


def schema_listing(cls: type[BaseModel]) -> dict[str, Any]:
    """Option name -> {type, default, description}, for ``kedit editors --options``."""
    props = cls.model_json_schema().get("properties", {})
    out = {}
    for key, field in cls.model_fields.items():
        prop = props.get(key, {})
        typ = prop.get("type") or " | ".join(p.get("type", "?") for p in prop.get("anyOf", [])) or prop.get("enum")
        out[key] = {"type": typ, "default": field.default if not field.is_required() else None,
                    "required": field.is_required(), "description": field.description or ""}
        if "enum" in prop:
            out[key]["choices"] = prop["enum"]
    return out
