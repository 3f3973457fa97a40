"""MQD-style importers: one CounterFact fact as a true/false, a multiple-choice or an open question.

The D4S paper's Multi-Question Dataset (MQD) is not public (Huang et al., the D4S paper); these
importers build its equivalent from CounterFact. Every record is first read by the CounterFact
importer (:func:`kedit_plugins.counterfact.convert`, either schema), and the same fact (subject,
relation prompt, new and true object, rephrase prompt, locality prompt and its answer) is then
written in one of three forms:

``tf`` (true/false)
    ``Question: Is it true that <relation prompt> <object>? Answer:`` with target ``Yes``/``No``.
    So that the targets are diverse, record *i* asks about the NEW object when *i* is even
    (``target_new`` "Yes", ``target_true`` "No") and about the OLD object when *i* is odd
    (``target_new`` "No", ``target_true`` "Yes"). The paraphrase is the same question on the
    rephrase prompt; the neighbourhood probe asks about the SAME object on the locality prompt,
    its target "Yes" if that is the locality prompt's true answer, else "No". So an edit that
    leaks to its neighbours shows: the even records' neighbours must stay "No" while the edit says
    "Yes", the odd records' neighbours (whose answer is usually the old object) must stay "Yes".
``mc`` (multiple choice)
    ``Question: <relation prompt> ...? A. <option> B. <option> Answer:`` with the new and the true
    object as options. The targets are the option LETTERS, not the option texts: ``target_new`` is
    the letter of the new object, ``target_true`` the letter of the old one (the MQD paper's
    multiple-choice targets are letters, and a letter is one token whatever the object). Which
    object is ``A`` is fixed per fact by sha256 of ``mqd-mc:<case_id>`` (even first byte: the new
    object is A), so it is deterministic and independent of Python's hash seed. The paraphrase
    uses the rephrase prompt with the same option order; the neighbourhood probe offers the
    locality answer in the true object's slot and the new object in the other, target the
    locality answer's letter.
``dg`` (directly generated)
    Exactly the CounterFact importer's spec (prompt → entity), relabelled.

``mqd-mixed`` gives record *i* the form ``("tf", "mc", "dg")[i % 3]``, so one sequence mixes
forms over the same facts (its tf records still alternate Yes/No with *i*'s parity).

Ids are ``mqd-<form>-<case_id>`` and ``meta`` is ``{"source": "counterfact:<case_id>", "form": ...}``,
so a record needs a ``case_id``. Only ``dg`` keeps CounterFact's ``generation_prompts``.

The ``counterfact`` evaluator's NS (P(neighbour target) > P(target_new)) is meaningful for every
form: a tf neighbour's target is never the same word as its edit's unless the locality answer is
the very object the edit asks about.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, ClassVar, Iterator

from kedit import hookimpl
from kedit.api import SpecImporter
from kedit.errors import InputError
from kedit.spec import read_records
from kedit_plugins.counterfact import convert

FORMS = ("tf", "mc", "dg")
LETTERS = ("A", "B")


def _str(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        got = "missing" if value is None else f"expected a non-empty string, got {value!r}"
        raise InputError(f"{where}: field {field!r}: {got} (the tf and mc forms need it)")
    return value.strip()


def _template(prompt: str, subject: str, where: str) -> str:
    """The relation prompt with ``{}`` where the subject goes (so the wrapper text never takes it)."""
    if "{}" in prompt:
        return prompt
    if subject not in prompt:
        raise InputError(f"{where}: field 'prompt': contains neither '{{}}' nor the subject {subject!r}")
    return prompt.replace(subject, "{}", 1)


def new_first(case: Any) -> bool:
    """Whether the new object is option A for this case id (seeded, independent of PYTHONHASHSEED)."""
    return hashlib.sha256(f"mqd-mc:{case}".encode()).digest()[0] % 2 == 0


def tf_question(text: str, obj: str) -> str:
    return f"Question: Is it true that {text.strip()} {obj}? Answer:"


def mc_question(text: str, options: tuple[str, str]) -> str:
    return f"Question: {text.strip()} ...? A. {options[0]} B. {options[1]} Answer:"


def build(record: Any, where: str, index: int, form: str) -> tuple[str, dict[str, Any]]:
    """Record ``index`` (its position in the file) of a CounterFact file as a spec of ``form``."""
    if form not in FORMS:
        raise ValueError(f"unknown MQD form {form!r}")
    where, cf = convert(record, where)
    case = record.get("case_id")
    if case is None:
        raise InputError(f"{where}: field 'case_id': missing (MQD spec ids and option order derive from it)")
    out: dict[str, Any] = {"id": f"mqd-{form}-{case}"}
    meta = {"source": f"counterfact:{case}", "form": form}
    if form == "dg":
        out.update({k: v for k, v in cf.items() if k not in ("id", "meta")})
        out["meta"] = meta
        return where, out

    subject = _str(cf.get("subject"), "subject", where)
    prompt = _template(_str(cf.get("prompt"), "prompt", where), subject, where)
    new = _str(cf.get("target_new"), "target_new", where)
    true = _str(cf.get("target_true"), "target_true", where)
    paraphrases = [_str(p, "paraphrases", where) for p in cf.get("paraphrases", [])]
    neighbours = [(_str(n.get("prompt"), "neighborhood.prompt", where),
                   _str(n.get("target"), "neighborhood.target", where)) for n in cf.get("neighborhood", [])]

    if form == "tf":
        obj, yes = (new, True) if index % 2 == 0 else (true, False)
        out.update({"subject": subject, "prompt": tf_question(prompt, obj),
                    "target_new": "Yes" if yes else "No", "target_true": "No" if yes else "Yes",
                    "paraphrases": [tf_question(p, obj) for p in paraphrases],
                    "neighborhood": [{"prompt": tf_question(p, obj), "target": "Yes" if t == obj else "No"}
                                     for p, t in neighbours]})
    else:
        a_is_new = new_first(case)
        new_letter, true_letter = LETTERS if a_is_new else LETTERS[::-1]

        def options(other: str) -> tuple[str, str]:  # the new object and ``other`` in the case's order
            return (new, other) if a_is_new else (other, new)

        for _, t in neighbours:
            if t == new:
                raise InputError(f"{where}: field 'neighborhood.target': {t!r} equals target_new, so the mc "
                                 "neighbourhood question would offer the same option twice")
        out.update({"subject": subject, "prompt": mc_question(prompt, options(true)),
                    "target_new": new_letter, "target_true": true_letter,
                    "paraphrases": [mc_question(p, options(true)) for p in paraphrases],
                    "neighborhood": [{"prompt": mc_question(p, options(t)), "target": true_letter}
                                     for p, t in neighbours]})
    out["meta"] = meta
    return where, out


class _MQD(SpecImporter):
    form: ClassVar[str | None] = None  # None: record i takes FORMS[i % 3]

    def read(self, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        for i, (where, record) in enumerate(read_records(path)):
            yield build(record, where, i, self.form or FORMS[i % len(FORMS)])


class MQDTrueFalse(_MQD):
    name = "mqd-tf"
    form = "tf"
    description = ("CounterFact as MQD-style true/false questions (target Yes/No, alternating by record), "
                   "JSON or JSONL")


class MQDMultipleChoice(_MQD):
    name = "mqd-mc"
    form = "mc"
    description = "CounterFact as MQD-style two-option multiple choice (target: the option letter), JSON or JSONL"


class MQDDirect(_MQD):
    name = "mqd-dg"
    form = "dg"
    description = "CounterFact as MQD-style directly generated answers (the counterfact spec, mqd ids), JSON or JSONL"


class MQDMixed(_MQD):
    name = "mqd-mixed"
    form = None
    description = "CounterFact as MQD-style mixed forms: record i is tf, mc, dg for i % 3 = 0, 1, 2"


@hookimpl
def register_spec_importers(register):
    for importer in (MQDTrueFalse, MQDMultipleChoice, MQDDirect, MQDMixed):
        register(importer)
