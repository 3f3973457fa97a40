"""Bad input of every kind: one clear line naming file, line and field, exit code 2, before any work.

Encodings, absurd nesting and sizes, blank and control-character fields, strict option types,
counts that must be positive, and prompts longer than the model's context.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import TINY_SPECS, files_under, write_jsonl

from kedit.errors import InputError
from kedit.spec import import_specs, read_specs

OK = {"subject": "France", "prompt": "The capital of {} is", "target_new": "Rome"}
OK_LINE = json.dumps(OK)






def _refused(run_cli, *args, message: str, code: int = 2) -> str:
    rc, _, err = run_cli(*args)
    assert rc == code and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _with(**fields) -> str:
    return json.dumps({**OK, **fields})


# --- 1. encodings --------------------------------------------------------------------------------

ENCODINGS = {
    "latin1": ('{"subject": "Fran\xe7e", "prompt": "{} is", "target_new": "Rome"}\n'.encode("latin-1"),
               "a.jsonl:1: not UTF-8 text (byte 0xe7 at column 18)"),
    "latin1-line2": ((OK_LINE + "\n").encode() + '{"subject": "Gen\xe8ve", "prompt": "{} is", "target_new": "x"}\n'
                     .encode("latin-1"), "a.jsonl:2: not UTF-8 text (byte 0xe8 at column 17)"),
    "utf16-bom": ((OK_LINE + "\n").encode("utf-16"), "a.jsonl: UTF-16 text (it starts with a UTF-16 byte-order mark)"),
    "utf32-bom": ((OK_LINE + "\n").encode("utf-32"), "a.jsonl: UTF-32 text"),
    "utf16-no-bom": ((OK_LINE + "\n").encode("utf-16-le"), "a.jsonl:1: not UTF-8 text (byte 0x00 at column 2, a NUL"),
    "binary": (bytes(range(256)) * 4, "a.jsonl:1: not UTF-8 text (byte 0x00 at column 1, a NUL"),
}


@pytest.mark.parametrize("case", sorted(ENCODINGS))
def test_spec_files_that_are_not_utf8(run_cli, workdir, case):
    data, message = ENCODINGS[case]
    (workdir / "a.jsonl").write_bytes(data)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_specs(workdir / "a.jsonl")
    _refused(run_cli, "check", "a.jsonl", message=message)


def test_utf8_bom_crlf_and_trailing_blank_lines_are_accepted(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + f"{OK_LINE}\r\n{_with(subject='Spain')}\r\n\r\n  \n".encode())
    specs = read_specs(path)
    assert [s.subject for s in specs] == ["France", "Spain"]
    path.write_text(f"{OK_LINE}\n\n{_with(subject='Spain')}\n")
    with pytest.raises(InputError, match="a.jsonl:2: blank line"):
        read_specs(path)


def test_importer_inputs_that_are_not_utf8(run_cli, workdir):
    records = [{"case_id": 1, "requested_rewrite": {"subject": "Gen\xe8ve", "prompt": "{} is in", "target_new": {"str": "x"}}}]
    (workdir / "cf.json").write_bytes(json.dumps(records, indent=1, ensure_ascii=False).encode("latin-1"))
    _refused(run_cli, "import", "counterfact", "cf.json", "-o", "out.jsonl", message="cf.json:5: not UTF-8 text (byte 0xe8")
    (workdir / "z.jsonl").write_bytes('{"src": "x"}\n'.encode("utf-16"))
    _refused(run_cli, "import", "zsre", "z.jsonl", "-o", "out.jsonl", message="z.jsonl: UTF-16 text")
    assert not (workdir / "out.jsonl").exists()


def test_data_and_corpus_files_that_are_not_utf8(tmp_path):
    from kedit.corpus import read_documents
    from kedit.report import load_runs
    from kedit_plugins.glue import load_items
    from kedit_plugins.perplexity import read_text

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"Some prose.\nCaf\xe9 au lait.\n")
    for call in (lambda: read_documents(bad), lambda: read_text(str(bad))):
        with pytest.raises(InputError, match=r"bad.txt:2: not UTF-8 text \(byte 0xe9 at column 4\)"):
            call()
    (tmp_path / "bad.json").write_bytes(b'[{"sentence": "\xe9"}]')
    with pytest.raises(InputError, match=r"bad.json:1: not UTF-8 text"):
        load_items(tmp_path / "bad.json", lambda r: ("", ["a"], 0), None, 0, "sst2")
    with pytest.raises(InputError, match=r"bad.json:1: not UTF-8 text"):
        load_runs([tmp_path / "bad.json"])


# --- 2. nesting ----------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_json_is_refused_everywhere(run_cli, workdir):
    from kedit.corpus import read_documents
    from kedit.report import load_runs
    from kedit_plugins.glue import load_items

    (workdir / "a.jsonl").write_text(f"{OK_LINE}\n{_with(meta={'x': 1})[:-1]}, \"deep\": {DEEP}}}\n")
    _refused(run_cli, "check", "a.jsonl", message="a.jsonl:2: JSON nested deeper than 64 levels")
    (workdir / "a.jsonl").write_text(DEEP + "\n")
    _refused(run_cli, "check", "a.jsonl", message="a.jsonl:1: JSON nested deeper than 64 levels")
    (workdir / "cf.json").write_text("[\n" + DEEP + "\n]")
    _refused(run_cli, "import", "counterfact", "cf.json", "-o", "o.jsonl", message="cf.json:2: JSON nested deeper")
    (workdir / "c.jsonl").write_text('{"text": "fine prose here"}\n' + DEEP + "\n")
    with pytest.raises(InputError, match="c.jsonl:2: JSON nested deeper than 64 levels"):
        read_documents(workdir / "c.jsonl")
    (workdir / "g.json").write_text(DEEP)
    with pytest.raises(InputError, match="g.json:1: JSON nested deeper"):
        load_items(workdir / "g.json", lambda r: ("", ["a"], 0), None, 0, "sst2")
    with pytest.raises(InputError, match="g.json:1: JSON nested deeper"):
        load_runs([workdir / "g.json"])
    # brackets inside strings are text, not nesting
    assert read_specs(write_jsonl(workdir / "s.jsonl", [{**OK, "meta": {"note": "[" * 500}}]))[0].meta


@pytest.mark.parametrize("header", [DEEP.encode(),
                                    json.dumps({"__metadata__": {"kedit.manifest": DEEP}}).encode()])
def test_diff_with_a_deeply_nested_header(run_cli, workdir, header):
    (workdir / "d.kedit.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    _refused(run_cli, "diff", "show", "d.kedit.safetensors", message="d.kedit.safetensors: ")


# --- 3. sizes ------------------------------------------------------------------------------------

def test_a_line_too_long_is_refused_before_it_is_read(run_cli, workdir):
    (workdir / "a.jsonl").write_text(OK_LINE + "\n" + _with(meta={"blob": "x" * (5 * 2**20)}) + "\n")
    _refused(run_cli, "check", "a.jsonl", message="a.jsonl:2: line longer than 4 MiB")


@pytest.mark.parametrize("fields, message", [
    ({"meta": {"blob": "x" * (3 * 2**19)}}, "field 'meta': 1.5 MiB as JSON, at most 1 MiB"),
    ({"prompt": "The capital of {} is " + "very " * 1000}, "field 'prompt': 5,020 characters, at most 4,096"),
    ({"paraphrases": ["ok", "y" * 5000]}, "field 'paraphrases.1': 5,000 characters"),
    ({"id": "i" * 300}, "field 'id': 300 characters, at most 256"),
])
def test_oversized_fields(tmp_path, fields, message):
    with pytest.raises(InputError, match=f"a.jsonl:1: {message}"):
        read_specs(write_jsonl(tmp_path / "a.jsonl", [{**OK, **fields}]))


def test_more_spec_text_than_a_diff_holds_is_refused_before_editing(run_cli, tiny_dirs, workdir, monkeypatch, spec_file):
    import kedit.limits

    def no_edit(*args, **kwargs):
        raise AssertionError("the editor ran")

    monkeypatch.setattr(kedit.limits, "MAX_DIFF_SPECS_BYTES", 200)
    monkeypatch.setattr("kedit_plugins.ft.FT.edit", no_edit)
    before = files_under(workdir)
    _refused(run_cli, "apply", spec_file, "--plugin", "ft", "--model", tiny_dirs["gpt2"], "-q",
             message="a diff's header holds at most 0 MB of specs")
    assert files_under(workdir) == before


# --- 4. empty, blank and binary fields ------------------------------------------------------------

@pytest.mark.parametrize("line, message", [
    (_with(id=""), "field 'id': must not be empty or blank"),
    (_with(id="   "), "field 'id': must not be empty or blank"),
    (_with(id="a\nb"), "field 'id': 'a\\\\nb' holds a tab or line break"),
    (_with(subject=" "), "field 'subject': must not be empty"),
    (_with(paraphrases=["fine", " "]), "field 'paraphrases.1': must not be empty"),
    (_with(generation_prompts=[""]), "field 'generation_prompts.0': must not be empty"),
    (_with(portability=[{"prompt": "x", "target": "\t"}]), "field 'portability.0.target': must not be empty"),
    (_with(target_new="Ro\u0000me"), "field 'target_new': control character '\\\\x00' at character 3"),
    (_with(target_new="Rome").replace("Rome", "Rome\\ud800"), "field 'target_new': a lone surrogate"),
    (_with(meta={"x": 1}).replace("1", "NaN"), "NaN is not a JSON number"),
    (_with(meta={"x": 1}).replace("1", "1e999"), "1e999 is not a JSON number"),
    (_with(meta={"x": 1}).replace("1", "1" * 5000), "unreadable JSON number"),
    ("[1, 2]", "expected a JSON object, got list"),
    ("5", "expected a JSON object, got int"),
    ('"a string"', "expected a JSON object, got str"),
])
def test_bad_fields_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "a.jsonl"
    path.write_text(OK_LINE.replace("France", "Spain") + "\n" + line + "\n")
    with pytest.raises(InputError, match="a.jsonl:2: " + message.replace("(", r"\(").replace("[", r"\[")):
        read_specs(path)


def test_importers_refuse_garbage_they_would_misread(run_cli, workdir):
    cf = [{"case_id": 1, "requested_rewrite": {"subject": "France", "prompt": "The capital of {} is",
                                               "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}}}]
    write_jsonl(workdir / "cf.jsonl", [{**cf[0], "neighborhood_prompts": "The capital of Spain is"}])
    _refused(run_cli, "import", "counterfact", "cf.jsonl", "-o", "o.jsonl",
             message="cf.jsonl:1 (case_id 1): field 'neighborhood_prompts': expected a list, got str")
    write_jsonl(workdir / "z.jsonl", [{"subject": "France", "src": "The capital of France is", "alt": "Rome",
                                       "answers": "Paris"}])
    _refused(run_cli, "import", "zsre", "z.jsonl", "-o", "o.jsonl", message="z.jsonl:1: field 'answers': expected a list")
    write_jsonl(workdir / "cf.jsonl", cf * 2)  # one case_id twice: the written file would not read back
    _refused(run_cli, "import", "counterfact", "cf.jsonl", "-o", "o.jsonl", message="field 'id': 'cf-1' already used by")
    rc, out, err = run_cli("import", "counterfact", "cf.jsonl", "-o", "o.jsonl", "--skip-invalid")
    assert rc == 0 and "wrote 1 specs" in out and "already used" in err
    assert len(read_specs(workdir / "o.jsonl")) == 1


def test_recorded_specs_that_no_longer_validate_name_the_diff():
    from kedit.evaluate import specs_from_diffs

    old = SimpleNamespace(path="old.kedit.safetensors", id="sha256:1", manifest={"specs": {"records": [{**OK, "id": ""}]}})
    with pytest.raises(InputError, match="old.kedit.safetensors: recorded spec 0: field 'id'"):
        specs_from_diffs([old])


# --- 5. counts that must be positive, seeds ------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["apply", "SPEC", "--plugin", "ft", "--mode", "sequential", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["apply", "SPEC", "--plugin", "ft", "--mode", "sequential", "--batch-size", "-2"], "argument --batch-size: must be at least 1, got -2"),
    (["apply", "SPEC", "--plugin", "memit", "--stats-tokens", "0"], "argument --stats-tokens: must be at least 1"),
    (["apply", "SPEC", "--plugin", "ft", "--seed", "-1"], "argument --seed: must be from 0 to"),
    (["apply", "SPEC", "--plugin", "ft", "--seed", str(2**64)], "argument --seed: must be from 0 to"),
    (["apply", "SPEC", "--plugin", "ft", "--mode", "sequential", "--eval-at", "every:0"], "every:N needs a positive"),
    (["stats", "compute", "--layers", "1", "--tokens", "0"], "argument --tokens: must be at least 1, got 0"),
    (["stats", "compute", "--layers", "1", "--max-len", "-3"], "argument --max-len: must be at least 1"),
    (["stats", "compute", "--layers", "1", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["import", "counterfact", "x.json", "-o", "y.jsonl", "--limit", "0"], "argument --limit: must be at least 1"),
    (["apply", "SPEC", "--plugin", "ft", "--batch-size", "two"], "argument --batch-size: 'two' is not a whole number"),
    (["apply"], "the following arguments are required: spec (see `kedit apply --help`)"),
    (["apply", "SPEC", "--plugin", "ft", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_counts_and_usage_are_one_line(run_cli, spec_file, workdir, args, message):
    before = files_under(workdir)
    _refused(run_cli, *[str(spec_file) if a == "SPEC" else a for a in args], message=message)
    assert files_under(workdir) == before


def test_the_library_refuses_the_same_counts():
    from kedit.config import EditJob, RunConfig, StatsConfig

    for make in (lambda: EditJob("s.jsonl", editor="ft", mode="sequential", batch_size=0),
                 lambda: EditJob("s.jsonl", editor="ft", mode="sequential", batch_size=True),
                 lambda: StatsConfig(n_tokens=0), lambda: StatsConfig(max_len=-1),
                 lambda: RunConfig(seed=-1), lambda: RunConfig(seed=2**64), lambda: RunConfig(seed=1.5)):
        with pytest.raises(InputError):
            make()


# --- 6. strict option types ----------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["-o", "steps", "true"], "bad value true for option 'steps' of editor 'ft': Input should be a valid integer"),
    (["-o", "steps", "5.0"], "bad value 5.0 for option 'steps'"),
    (["-o", "steps", '"5"'], "bad value '5' for option 'steps'"),
    (["-o", "lr", "Infinity"], "bad value 'Infinity' for option 'lr' of editor 'ft': Input should be a valid number (numbers must be finite)"),
    (["--reg", "rect:k=-Infinity"], "numbers must be finite"),
    (["-o", "lr", "NaN"], "numbers must be finite"),
    (["-o", "lr", "1e999"], "numbers must be finite"),
    (["-o", "lr", "true"], "bad value true for option 'lr'"),
    (["--reg", "rect:k=NaN"], "bad value 'NaN' for option 'k' of regularizer 'rect'"),
    (["--reg", "rect:1.5"], "bad value 1.5 for option 'k' of regularizer 'rect': Input should be less than or equal to 1"),
    (["--reg", "rect:false"], "bad value false for option 'k' of regularizer 'rect'"),
    (["-o", "steps", DEEP[:2000]], "bad value '[[[["),
    (["--eval", "fluency:max_new_tokens=1.5"], "bad value 1.5 for option 'max_new_tokens' of evaluator 'fluency'"),
    (["--eval", "counterfact:"], "malformed evaluator 'counterfact:'"),
])
def test_strict_options_on_the_command_line(run_cli, spec_file, workdir, args, message):
    _refused(run_cli, "apply", spec_file, "--plugin", "ft", *args, message=message)


def test_strict_options_in_python_for_every_plugin():
    from pydantic import Field

    from kedit.api import Options
    from kedit.options import parse_pairs, validate
    from kedit.plugins import lookup

    ft, rome = lookup("editors", "ft").obj.Options, lookup("editors", "rome").obj.Options
    assert validate("editor", "ft", ft, parse_pairs([["lr", "5"], ["steps", "3"], ["layer", "null"]])).lr == 5.0
    assert validate("editor", "rome", rome, {"original": True}).original is True
    with pytest.raises(InputError, match=r"bad value 1 for option 'original'.*\(write true or false\)"):
        validate("editor", "rome", rome, {"original": 1})
    with pytest.raises(InputError, match="bad value nan for option 'lr' of editor 'ft': numbers must be finite"):
        validate("editor", "ft", ft, {"lr": float("nan")})

    class ThirdParty(Options):  # a plugin's own types: lists still fill tuples, paths stay paths
        sizes: tuple[int, ...] = Field((1,))
        where: Path = Path(".")

    for name in ("memit", "alphaedit", "d4s", "emmet", "nse"):  # [] silently meant the default layers
        with pytest.raises(InputError, match=f"bad value \\[\\] for option 'layers' of editor '{name}'"):
            validate("editor", name, lookup("editors", name).obj.Options, {"layers": []})

    got = validate("editor", "tp", ThirdParty, {"sizes": [2, 3], "where": Path("/tmp")})
    assert got.sizes == (2, 3) and got.where == Path("/tmp")
    with pytest.raises(InputError, match=r"option 'sizes.1'"):
        validate("editor", "tp", ThirdParty, {"sizes": [2, True]})


# --- 7. prompts longer than the model's context ---------------------------------------------------

LONG = {"id": "long", "subject": "France", "prompt": "The capital of {} is" + " the" * 150, "target_new": "Rome"}


def test_check_lengths_counts_tokens_against_the_context():
    from kedit.limits import CONTEXT_MARGIN, check_lengths
    from kedit.spec import EditSpec
    from kedit.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    specs = [EditSpec(**s) for s in TINY_SPECS]
    check_lengths(specs, tok, SimpleNamespace(n_positions=128), "s.jsonl")
    check_lengths([EditSpec(**LONG)], tok, SimpleNamespace(), "s.jsonl")  # no known context: nothing to check
    with pytest.raises(InputError, match=rf"s.jsonl:3 \(spec 'long'\): field 'prompt': the prompt and its target take "
                                         rf"\d+ tokens; this model reads 128, .* at most {128 - CONTEXT_MARGIN}"):
        check_lengths([*specs, EditSpec(**LONG)], tok, SimpleNamespace(max_position_embeddings=128), "s.jsonl")
    para = EditSpec(**{**OK, "id": "p", "paraphrases": ["France's capital" + " is" * 200]})
    with pytest.raises(InputError, match=r"^spec 'p': field 'paraphrases.0'"):
        check_lengths([para], tok, SimpleNamespace(n_positions=128))

    class Empty:  # a tokenizer that has no token for a target
        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [[1] * (not t.startswith(" ")) for t in texts]}

    with pytest.raises(InputError, match="spec 'fr': field 'prompt': target 'Rome' is no token at all"):
        check_lengths(specs[:1], Empty(), SimpleNamespace(n_positions=128))


def test_a_prompt_longer_than_the_context_is_refused_before_any_work(run_cli, tiny_dirs, workdir, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("scored or edited the specs")

    # the refusal must come before the model scores or edits anything
    monkeypatch.setattr("kedit.scoring.TeacherForced", no_work)
    monkeypatch.setattr("kedit.workflows.compute_diff", no_work)
    write_jsonl(workdir / "s.jsonl", [TINY_SPECS[0], LONG])
    before = files_under(workdir)
    message = "s.jsonl:2 (spec 'long'): field 'prompt': the prompt and its target take"
    _refused(run_cli, "apply", "s.jsonl", "--plugin", "ft", "--model", tiny_dirs["gpt2"], "-q", message=message)
    _refused(run_cli, "apply", "s.jsonl", "--plugin", "ft", "--model", tiny_dirs["llama"], "-q", "--mode", "sequential",
             message=message)
    _refused(run_cli, "eval", "--model", tiny_dirs["gpt2"], "--specs", "s.jsonl", "-q", message=message)
    assert files_under(workdir) == before


def test_import_then_check_round_trip_still_works(run_cli, workdir):
    """The stricter reader still takes what kedit itself writes."""
    specs, _ = import_specs([(f"r{i}", r) for i, r in enumerate(TINY_SPECS)])
    from kedit.spec import write_specs

    write_specs(workdir / "w.jsonl", specs)
    rc, out, _ = run_cli("check", "w.jsonl")
    assert rc == 0 and "2 edit specs, all valid" in out
