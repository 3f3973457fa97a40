"""Parsing ``-o KEY VALUE`` pairs and ``--reg NAME[:VALUE | :k=v,...]`` into validated plugin options."""
from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import InputError


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def validate(kind: str, name: str, cls: type[BaseModel], values: dict[str, Any]) -> BaseModel:
    """Validate option values; unknown keys and bad values name the option and list the known ones."""
    known = list(cls.model_fields)
    for key in values:
        if key not in cls.model_fields:
            raise InputError(f"unknown option {key!r} for {kind} {name!r}; options: {', '.join(known) or '(none)'}")
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "?"
        got = values.get(key, "")
        raise InputError(f"bad value {got!r} for option {key!r} of {kind} {name!r}: {err['msg']}") from None


def parse_pairs(pairs: list[list[str]] | None) -> dict[str, Any]:
    return {k: _value(v) for k, v in (pairs or [])}


def parse_reg(text: str) -> tuple[str, dict[str, Any] | Any]:
    """``rect`` -> (rect, {}); ``rect:0.4`` -> (rect, 0.4) for the primary option; ``rect:k=0.4,eps=1e-8``."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not name or (sep and not rest.strip()):
        raise InputError(f"malformed --reg {text!r}: use NAME, NAME:VALUE or NAME:KEY=VALUE[,KEY=VALUE]")
    if not sep:
        return name, {}
    if "=" not in rest:
        return name, _value(rest.strip())
    values: dict[str, Any] = {}
    for part in rest.split(","):
        key, eq, val = part.partition("=")
        if not eq or not key.strip() or not val.strip():
            raise InputError(f"malformed --reg {text!r}: {part!r} is not KEY=VALUE")
        values[key.strip()] = _value(val.strip())
    return name, values


def bind(kind: str, label: str, text: str) -> tuple[Any, dict[str, Any]]:
    """Look up the plugin a ``NAME[:VALUE | :K=V,...]`` reference names (in registry ``kind``) and
    return it with its raw option values, a bare VALUE bound to the plugin's ``primary`` option."""
    from .plugins import lookup

    name, values = parse_reg(text)
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
