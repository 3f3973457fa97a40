"""Importer for zsRE in the MEND schema (``src``/``alt``/``answers``/``rephrase``/``loc``/``loc_ans``).

The edit target is ``alt`` (the EasyEdit/D4S task); ``answers[0]`` becomes ``target_true``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from kedit import hookimpl
from kedit.api import SpecImporter
from kedit.errors import InputError
from kedit.spec import read_records


class ZsRE(SpecImporter):
    name = "zsre"
    description = "zsRE question-answer edits, MEND schema (src, alt, answers, rephrase, loc, loc_ans)"

    def read(self, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        for i, (where, r) in enumerate(read_records(path)):
            if not isinstance(r, dict):
                raise InputError(f"{where}: expected a JSON object")
            answers = r.get("answers") or []
            if not isinstance(answers, list):  # a string's first character would become target_true
                raise InputError(f"{where}: field 'answers': expected a list of strings, got {type(answers).__name__}")
            out = {"id": f"zsre-{i}", "subject": r.get("subject"), "prompt": r.get("src"), "target_new": r.get("alt"),
                   "target_true": answers[0] if answers and answers[0] != r.get("alt") else None,
                   "paraphrases": [r["rephrase"]] if r.get("rephrase") else [],
                   "neighborhood": [{"prompt": r["loc"], "target": r["loc_ans"]}] if r.get("loc") and r.get("loc_ans") else [],
                   "meta": {"source": f"zsre:{i}"}}
            yield where, {k: v for k, v in out.items() if v is not None}


@hookimpl
def register_spec_importers(register):
    register(ZsRE)
