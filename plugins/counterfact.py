"""Importer for CounterFact, in ROME's ``requested_rewrite`` form and in the flat form
(``prompt``/``ground_truth``/``rephrase_prompt``/``locality_prompt``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from kedit import hookimpl
from kedit.api import SpecImporter
from kedit.errors import InputError
from kedit.spec import read_records


def _text(value: Any) -> Any:
    return value.get("str") if isinstance(value, dict) else value


def _list(record: dict[str, Any], key: str, where: str) -> list[Any]:
    """A list field (missing: empty); a string here would otherwise be read character by character."""
    value = record.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InputError(f"{where}: field {key!r}: expected a list, got {type(value).__name__}")
    return value


def convert(record: Any, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object")
    case = record.get("case_id")
    where = f"{where} (case_id {case})" if case is not None else where
    if "requested_rewrite" in record:
        rw = record["requested_rewrite"]
        if not isinstance(rw, dict):
            raise InputError(f"{where}: field 'requested_rewrite': expected an object")
        true = _text(rw.get("target_true"))
        out = {"subject": rw.get("subject"), "prompt": rw.get("prompt"), "target_new": _text(rw.get("target_new")),
               "target_true": true, "paraphrases": _list(record, "paraphrase_prompts", where),
               "neighborhood": [{"prompt": p, "target": true}
                                for p in _list(record, "neighborhood_prompts", where)] if true else [],
               "generation_prompts": _list(record, "generation_prompts", where)}
    else:
        loc = record.get("locality_prompt")
        out = {"subject": record.get("subject"), "prompt": record.get("prompt"),
               "target_new": _text(record.get("target_new")), "target_true": _text(record.get("ground_truth")),
               "paraphrases": [record["rephrase_prompt"]] if record.get("rephrase_prompt") else [],
               "neighborhood": [{"prompt": loc, "target": record.get("locality_ground_truth")}] if loc else []}
    out = {k: v for k, v in out.items() if v is not None}
    out["meta"] = {"source": f"counterfact:{case}" if case is not None else "counterfact"}
    if case is not None:
        out["id"] = f"cf-{case}"
    return where, out


class CounterFact(SpecImporter):
    name = "counterfact"
    description = "CounterFact (ROME requested_rewrite form, or flat prompt/ground_truth form), JSON or JSONL"

    def read(self, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        for where, record in read_records(path):
            yield convert(record, where)


@hookimpl
def register_spec_importers(register):
    register(CounterFact)
