"""The MQD-style importers (plugins/mqd.py): one CounterFact fact as tf, mc and dg specs."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import needs_shared

from kedit.errors import InputError
from kedit.plugins import register_plugin, registry, unregister_plugin
from kedit.spec import import_specs
from kedit_plugins import mqd
from kedit_plugins.counterfact import convert

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-train.json"
NAMES = ("mqd-tf", "mqd-mc", "mqd-dg", "mqd-mixed")

# Flat schema (case 7: the new object is option A; case 12: it is option B) and ROME's schema (case 11).
RECORDS = [
    {"case_id": 7, "prompt": "Toko Yasuda, the", "target_new": "piano", "subject": "Toko Yasuda",
     "ground_truth": "guitar", "rephrase_prompt": "Toko Yasuda is incredible at",
     "locality_prompt": "John Lennon performs on the", "locality_ground_truth": "guitar"},
    {"case_id": 12, "prompt": "Autonomous University of Madrid, which is located in", "target_new": "Sweden",
     "subject": "Autonomous University of Madrid", "ground_truth": "Spain",
     "rephrase_prompt": "Autonomous University of Madrid is located in",
     "locality_prompt": "Lyon, which is located in", "locality_ground_truth": "France"},
    {"case_id": 11, "requested_rewrite": {"prompt": "{} plays the sport of", "subject": "LeBron James",
                                          "target_new": {"str": "football"}, "target_true": {"str": "basketball"}},
     "paraphrase_prompts": ["LeBron James is a professional", "What sport does LeBron James play? He plays"],
     "neighborhood_prompts": ["Michael Jordan plays the sport of"],
     "generation_prompts": ["LeBron James is known for"]},
]

TF = [
    {"id": "mqd-tf-7", "subject": "Toko Yasuda", "prompt": "Question: Is it true that {}, the piano? Answer:",
     "target_new": "Yes", "target_true": "No",
     "paraphrases": ["Question: Is it true that Toko Yasuda is incredible at piano? Answer:"],
     "neighborhood": [{"prompt": "Question: Is it true that John Lennon performs on the piano? Answer:",
                       "target": "No"}],
     "meta": {"source": "counterfact:7", "form": "tf"}},
    {"id": "mqd-tf-12", "subject": "Autonomous University of Madrid",
     "prompt": "Question: Is it true that {}, which is located in Spain? Answer:",
     "target_new": "No", "target_true": "Yes",
     "paraphrases": ["Question: Is it true that Autonomous University of Madrid is located in Spain? Answer:"],
     "neighborhood": [{"prompt": "Question: Is it true that Lyon, which is located in Spain? Answer:",
                       "target": "No"}],
     "meta": {"source": "counterfact:12", "form": "tf"}},
    {"id": "mqd-tf-11", "subject": "LeBron James",
     "prompt": "Question: Is it true that {} plays the sport of football? Answer:",
     "target_new": "Yes", "target_true": "No",
     "paraphrases": ["Question: Is it true that LeBron James is a professional football? Answer:",
                     "Question: Is it true that What sport does LeBron James play? He plays football? Answer:"],
     "neighborhood": [{"prompt": "Question: Is it true that Michael Jordan plays the sport of football? Answer:",
                       "target": "No"}],
     "meta": {"source": "counterfact:11", "form": "tf"}},
]

MC = [
    {"id": "mqd-mc-7", "subject": "Toko Yasuda", "prompt": "Question: {}, the ...? A. piano B. guitar Answer:",
     "target_new": "A", "target_true": "B",
     "paraphrases": ["Question: Toko Yasuda is incredible at ...? A. piano B. guitar Answer:"],
     "neighborhood": [{"prompt": "Question: John Lennon performs on the ...? A. piano B. guitar Answer:",
                       "target": "B"}],
     "meta": {"source": "counterfact:7", "form": "mc"}},
    {"id": "mqd-mc-12", "subject": "Autonomous University of Madrid",
     "prompt": "Question: {}, which is located in ...? A. Spain B. Sweden Answer:",
     "target_new": "B", "target_true": "A",
     "paraphrases": ["Question: Autonomous University of Madrid is located in ...? A. Spain B. Sweden Answer:"],
     "neighborhood": [{"prompt": "Question: Lyon, which is located in ...? A. France B. Sweden Answer:",
                       "target": "A"}],
     "meta": {"source": "counterfact:12", "form": "mc"}},
    {"id": "mqd-mc-11", "subject": "LeBron James",
     "prompt": "Question: {} plays the sport of ...? A. football B. basketball Answer:",
     "target_new": "A", "target_true": "B",
     "paraphrases": ["Question: LeBron James is a professional ...? A. football B. basketball Answer:",
                     "Question: What sport does LeBron James play? He plays ...? A. football B. basketball Answer:"],
     "neighborhood": [{"prompt": "Question: Michael Jordan plays the sport of ...? A. football B. basketball "
                                 "Answer:", "target": "B"}],
     "meta": {"source": "counterfact:11", "form": "mc"}},
]

DG = [
    {"id": "mqd-dg-7", "subject": "Toko Yasuda", "prompt": "Toko Yasuda, the", "target_new": "piano",
     "target_true": "guitar", "paraphrases": ["Toko Yasuda is incredible at"],
     "neighborhood": [{"prompt": "John Lennon performs on the", "target": "guitar"}],
     "meta": {"source": "counterfact:7", "form": "dg"}},
    {"id": "mqd-dg-12", "subject": "Autonomous University of Madrid",
     "prompt": "Autonomous University of Madrid, which is located in", "target_new": "Sweden",
     "target_true": "Spain", "paraphrases": ["Autonomous University of Madrid is located in"],
     "neighborhood": [{"prompt": "Lyon, which is located in", "target": "France"}],
     "meta": {"source": "counterfact:12", "form": "dg"}},
    {"id": "mqd-dg-11", "subject": "LeBron James", "prompt": "{} plays the sport of", "target_new": "football",
     "target_true": "basketball",
     "paraphrases": ["LeBron James is a professional", "What sport does LeBron James play? He plays"],
     "neighborhood": [{"prompt": "Michael Jordan plays the sport of", "target": "basketball"}],
     "generation_prompts": ["LeBron James is known for"],
     "meta": {"source": "counterfact:11", "form": "dg"}},
]

EXPECTED = {"tf": TF, "mc": MC, "dg": DG}
IMPORTERS = {"tf": mqd.MQDTrueFalse, "mc": mqd.MQDMultipleChoice, "dg": mqd.MQDDirect, "mixed": mqd.MQDMixed}


@pytest.fixture
def cf_file(tmp_path) -> Path:
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    return path


def records(form: str, path: Path) -> list[dict]:
    return [r for _, r in IMPORTERS[form]().read(path)]


def options(prompt: str) -> dict[str, str]:
    """{letter: option text} of an mc question."""
    m = re.search(r"\? A\. (.+) B\. (.+) Answer:$", prompt)
    assert m, prompt
    return {"A": m.group(1), "B": m.group(2)}


@pytest.mark.parametrize("form", ["tf", "mc", "dg"])
def test_each_form_exactly(cf_file, form):
    got = list(IMPORTERS[form]().read(cf_file))
    assert [where for where, _ in got] == [f"{cf_file}: record 0 (case_id 7)", f"{cf_file}: record 1 (case_id 12)",
                                            f"{cf_file}: record 2 (case_id 11)"]
    assert [r for _, r in got] == EXPECTED[form]


def test_dg_is_the_counterfact_spec_relabelled(cf_file):
    for i, rec in enumerate(RECORDS):
        _, cf = convert(rec, "x")
        dg = records("dg", cf_file)[i]
        assert {k: v for k, v in dg.items() if k not in ("id", "meta")} == \
               {k: v for k, v in cf.items() if k not in ("id", "meta")}
        assert dg["meta"]["source"] == cf["meta"]["source"]


def test_forms_share_the_fact(cf_file):
    tf, mc, dg = (records(f, cf_file) for f in ("tf", "mc", "dg"))
    for i, (t, m, d) in enumerate(zip(tf, mc, dg)):
        assert t["subject"] == m["subject"] == d["subject"]
        assert t["meta"]["source"] == m["meta"]["source"] == d["meta"]["source"]
        new, true = d["target_new"], d["target_true"]
        asked = new if i % 2 == 0 else true  # tf asks about the new object on even records
        assert t["prompt"].endswith(f" {asked}? Answer:")
        assert sorted(options(m["prompt"]).values()) == sorted([new, true])


def test_mc_letters_point_at_the_right_option_and_order_is_deterministic(cf_file):
    first, second = records("mc", cf_file), records("mc", cf_file)
    assert first == second
    dg = records("dg", cf_file)
    for m, d in zip(first, dg):
        opts = options(m["prompt"])
        assert opts[m["target_new"]] == d["target_new"] and opts[m["target_true"]] == d["target_true"]
        assert all(options(p) == opts for p in m["paraphrases"])
        for n, dn in zip(m["neighborhood"], d["neighborhood"]):
            nopts = options(n["prompt"])
            assert nopts[n["target"]] == dn["target"] and nopts[m["target_new"]] == d["target_new"]
    assert {m["target_new"] for m in first} == {"A", "B"}  # the fixtures cover both orders


def test_mc_order_does_not_depend_on_the_hash_seed(cf_file):
    code = ("import sys; from pathlib import Path; from kedit_plugins.mqd import MQDMultipleChoice as M; "
            "print([r['prompt'] for _, r in M().read(Path(sys.argv[1]))])")
    outs = {subprocess.run([sys.executable, "-c", code, str(cf_file)], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("0", "1", "12345")}
    assert outs == {repr([m["prompt"] for m in MC]) + "\n"}


def test_tf_alternates_yes_and_no_by_index(tmp_path):
    path = tmp_path / "cf.jsonl"
    path.write_text("".join(json.dumps({**RECORDS[0], "case_id": i}) + "\n" for i in range(5)), encoding="utf-8")
    got = records("tf", path)
    assert [r["target_new"] for r in got] == ["Yes", "No", "Yes", "No", "Yes"]
    assert [r["target_true"] for r in got] == ["No", "Yes", "No", "Yes", "No"]
    assert [r["prompt"].split()[-2] for r in got] == ["piano?", "guitar?", "piano?", "guitar?", "piano?"]


def test_mixed_cycles_forms(tmp_path):
    recs = [{**RECORDS[i % 3], "case_id": 100 + i} for i in range(7)]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(recs), encoding="utf-8")
    mixed = records("mixed", path)
    assert [r["meta"]["form"] for r in mixed] == ["tf", "mc", "dg", "tf", "mc", "dg", "tf"]
    assert [r["id"] for r in mixed] == [f"mqd-{f}-{100 + i}" for i, f in enumerate(["tf", "mc", "dg"] * 2 + ["tf"])]
    single = {f: records(f, path) for f in ("tf", "mc", "dg")}
    assert all(r == single[r["meta"]["form"]][i] for i, r in enumerate(mixed))
    assert [r["target_new"] for r in mixed if r["meta"]["form"] == "tf"] == ["Yes", "No", "Yes"]


@pytest.mark.parametrize("form", list(IMPORTERS))
def test_every_spec_validates(cf_file, form):
    specs, skipped = import_specs(IMPORTERS[form]().read(cf_file))
    assert not skipped and len(specs) == 3
    for spec, rec in zip(specs, records(form, cf_file)):
        assert spec.id == rec["id"] and spec.meta == rec["meta"]
        assert spec.prompt.count("{}") == 1 and spec.subject in spec.text


BAD = [
    ("not an object", "record 1: expected a JSON object"),
    ({"case_id": 5, "prompt": "Toko Yasuda, the", "subject": "Toko Yasuda", "ground_truth": "guitar"},
     "record 1 (case_id 5): field 'target_new': missing"),
    ({**RECORDS[0], "case_id": 5, "prompt": "The instrument is the"},
     "record 1 (case_id 5): field 'prompt': contains neither '{}' nor the subject 'Toko Yasuda'"),
    ({"case_id": 5, "requested_rewrite": RECORDS[2]["requested_rewrite"], "paraphrase_prompts": "LeBron plays"},
     "record 1 (case_id 5): field 'paraphrase_prompts': expected a list"),
    ({k: v for k, v in RECORDS[0].items() if k != "case_id"}, "record 1: field 'case_id': missing"),
]


@pytest.mark.parametrize("form", list(IMPORTERS))
@pytest.mark.parametrize("bad,message", BAD, ids=["not-object", "no-target", "no-subject", "string-list", "no-case"])
def test_malformed_record_names_its_location(tmp_path, form, bad, message):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([RECORDS[0], bad]), encoding="utf-8")
    with pytest.raises(InputError) as err:
        import_specs(IMPORTERS[form]().read(path))
    assert str(err.value).startswith(f"{path}: {message}"), str(err.value)


def test_mc_neighbour_equal_to_the_new_object_is_refused(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([{**RECORDS[0], "locality_ground_truth": "piano"}]), encoding="utf-8")
    with pytest.raises(InputError, match=r"record 0 \(case_id 7\): field 'neighborhood.target': 'piano' equals"):
        records("mc", path)
    assert records("tf", path)[0]["neighborhood"][0]["target"] == "Yes"


@pytest.fixture
def registered():
    """The importers as the CLI finds them: through the entry point once the package metadata lists
    it (``pip install -e .``), else registered here for the test."""
    added = "mqd-tf" not in registry("spec_importers")
    if added:
        register_plugin(mqd, name="mqd", package="kedit")
    yield
    if added:
        unregister_plugin("mqd")


def test_registered_with_descriptions_and_an_entry_point(registered, run_cli, cf_file, tmp_path):
    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["kedit"]
    assert entry_points["mqd"] == "kedit_plugins.mqd"
    reg = registry("spec_importers")
    assert all(reg[n].obj.description and reg[n].plugin == "mqd" for n in NAMES)
    code, out, _ = run_cli("importers", "--json")
    assert code == 0 and all(n in json.loads(out) for n in NAMES)
    code, out, err = run_cli("import", "mqd-mixed", cf_file, "-o", tmp_path / "mixed.jsonl")
    assert code == 0 and "wrote 3 specs" in out, err
    lines = [json.loads(line) for line in (tmp_path / "mixed.jsonl").read_text().splitlines()]
    assert [s["id"] for s in lines] == ["mqd-tf-7", "mqd-mc-12", "mqd-dg-11"]
    code, out, _ = run_cli("check", tmp_path / "mixed.jsonl")
    assert code == 0 and "3 edit specs, all valid" in out


@needs_shared("counterfact/counterfact-train.json", "CounterFact")
def test_real_counterfact_imports_in_every_form():
    n = len(json.loads(REAL.read_text(encoding="utf-8")))
    for form, importer in IMPORTERS.items():
        specs, skipped = import_specs(importer().read(REAL))
        assert not skipped and len(specs) == n
        if form == "tf":
            assert {s.target_new for s in specs} == {"Yes", "No"}
        elif form == "mc":
            assert {s.target_new for s in specs} == {"A", "B"}
        elif form == "mixed":
            assert [s.meta["form"] for s in specs[:6]] == ["tf", "mc", "dg"] * 2
