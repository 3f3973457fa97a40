from __future__ import annotations

import json

import pytest
from conftest import SHARED, TINY_SPECS, needs_shared, write_jsonl

from kedit.errors import InputError
from kedit.spec import EditSpec, import_specs, read_specs, write_specs


def test_prompt_with_subject_written_out_becomes_a_template():
    s = EditSpec(subject="Danielle Darrieux", prompt="The mother tongue of Danielle Darrieux is", target_new="English")
    assert s.prompt == "The mother tongue of {} is"
    assert s.text == "The mother tongue of Danielle Darrieux is"
    assert s.id and len(s.id) == 12  # derived from the content


def test_round_trip_is_canonical(tmp_path):
    specs = read_specs(write_jsonl(tmp_path / "a.jsonl", TINY_SPECS))
    assert [s.id for s in specs] == ["fr", "lebron"]
    assert specs[0].neighborhood[0].target == "Madrid"
    write_specs(tmp_path / "b.jsonl", specs)
    again = read_specs(tmp_path / "b.jsonl")
    assert again == specs
    assert json.loads((tmp_path / "b.jsonl").read_text().splitlines()[0])["prompt"] == "The capital of {} is"


@pytest.mark.parametrize("lines, message", [
    (['{"subject": "France", "prompt": "The capital of {} is"'], "a.jsonl:1: malformed JSON"),
    (['{"subject": "France", "prompt": "The capital of {} is", "target_new": "Rome"}', "",
      '{"subject": "Spain", "prompt": "The capital of {} is", "target_new": "Rome"}'], "a.jsonl:2: blank line"),
    (['// a comment'], "a.jsonl:1: comments are not JSON"),
    (['{"prompt": "The capital of {} is", "target_new": "Rome"}'], "a.jsonl:1: field 'subject': missing"),
    (['{"subject": "France", "prompt": "The capital of {} is", "target_new": "  "}'], "a.jsonl:1: field 'target_new': must not be empty"),
    (['{"subject": "France", "prompt": "The capital is", "target_new": "Rome"}'], "a.jsonl:1: field 'prompt': contains neither"),
    (['{"subject": "France", "prompt": "{} {}", "target_new": "Rome"}'], "a.jsonl:1: field 'prompt': has more than one"),
    (['{"subject": "France", "prompt": "{} is", "target_new": "Rome", "target_neww": "x"}'], "a.jsonl:1: field 'target_neww': unknown field"),
    (['{"subject": "France", "prompt": "{} is", "target_new": "Rome", "target_true": "Rome"}'], "a.jsonl:1: field 'target_new': equals target_true"),
    (['{"id": "a", "subject": "France", "prompt": "{} is", "target_new": "Rome"}'] * 2, "a.jsonl:2: field 'id': 'a' already used on line 1"),
    (['{"subject": "France", "prompt": "{} is", "target_new": "Rome", "neighborhood": [{"prompt": "x"}]}'], "a.jsonl:1: field 'neighborhood.0.target': missing"),
    (['[1, 2]'], "a.jsonl:1: expected a JSON object"),
])
def test_bad_records_name_file_line_and_field(tmp_path, lines, message):
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_specs(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_specs(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="no edit specs"):
        read_specs(tmp_path / "empty.jsonl")


def _importer(name):
    from kedit.plugins import lookup

    return lookup("spec_importers", name).obj()


def test_counterfact_rome_form(tmp_path):
    record = {"case_id": 0, "requested_rewrite": {
        "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}},
        "paraphrase_prompts": ["Danielle Darrieux spoke the language"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Colette's mother tongue is"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"]}
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([record]))
    (spec,), skipped = import_specs(_importer("counterfact").read(path))
    assert not skipped
    assert spec.id == "cf-0" and spec.target_new == "English" and spec.target_true == "French"
    assert [n.target for n in spec.neighborhood] == ["French", "French"]
    assert spec.generation_prompts == ["Danielle Darrieux's mother tongue is"]


def test_counterfact_flat_form_and_bad_record(tmp_path):
    good = {"case_id": 3, "prompt": "Autonomous University of Madrid, which is located in", "target_new": "Sweden",
            "subject": "Autonomous University of Madrid", "ground_truth": "Spain",
            "rephrase_prompt": "Autonomous University of Madrid is located in",
            "locality_prompt": "Biure, which is located in", "locality_ground_truth": "Spain"}
    bad = dict(good, case_id=4, subject="Nowhere")
    path = tmp_path / "cf.jsonl"
    write_jsonl(path, [good, bad])
    with pytest.raises(InputError, match=r"record|cf.jsonl:2 \(case_id 4\): field 'prompt'"):
        import_specs(_importer("counterfact").read(path))
    specs, skipped = import_specs(_importer("counterfact").read(path), skip_invalid=True)
    assert [s.prompt for s in specs] == ["{}, which is located in"]
    assert len(skipped) == 1 and "case_id 4" in skipped[0]


def test_zsre_importer(tmp_path):
    rec = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "rephrase": "What does UniFirst make?",
           "alt": "unmanned aircraft", "answers": ["uniform"], "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}
    path = tmp_path / "z.json"
    path.write_text(json.dumps([rec]))
    (spec,), _ = import_specs(_importer("zsre").read(path))
    assert spec.prompt == "What is the product made by {}?"
    assert (spec.target_new, spec.target_true) == ("unmanned aircraft", "uniform")
    assert spec.neighborhood[0].target == "Shakespeare"


@needs_shared("counterfact", "CounterFact and zsRE")
def test_importers_read_the_shared_data():
    cf, skipped = import_specs(_importer("counterfact").read(SHARED / "counterfact" / "counterfact-train.json"))
    assert len(cf) == 10000 and not skipped
    z, skipped = import_specs(_importer("zsre").read(SHARED / "zsre" / "zsre_mend_train-1k.json"), skip_invalid=True)
    assert len(z) + len(skipped) == 1000 and len(skipped) == 2  # two records have an empty `alt`
