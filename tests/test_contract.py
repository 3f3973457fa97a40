"""The contract every registered editor keeps, built-in or installed (the third-party test plugin
``kedit-bias-nudge`` included, installed by conftest): checked the same way for all of them, on
tiny GPT-2 (Conv1D weights) and Llama (Linear weights) models, with each editor's own defaults.
Registering a new editor is all it takes to be covered here.

- the caller's model is left bit for bit as it was;
- the same seed gives the same diff id;
- the diff verifies against the model, applies, verifies as applied, and reverts bit-exactly;
- a sequence continued with ``--continue`` in a new call equals one uninterrupted run (weights
  and carried state), for every editor (trivially for those that carry no state);
- an unknown option and a badly typed one are refused with exit code 2 before anything is written.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from kedit import diff as diffmod
from kedit.config import EditJob, RunConfig, StatsConfig
from kedit.editing import EditPlan, compute_diff
from kedit.models import load
from kedit.plugins import registry
from kedit.spec import EditSpec
from kedit.testing import CORPUS

EDITORS = sorted(registry("editors"))
NAMES = ["France", "Spain", "Italy", "Chile"]
TARGETS = ["Rome", "Berlin", "Oslo", "Lima"]


def _specs(idx):
    return [{"id": f"c{i}", "subject": NAMES[i], "prompt": "The capital of {} is", "target_new": TARGETS[i],
             "target_true": "Paris"} for i in idx]


def test_the_matrix_covers_every_registered_editor_including_installed_ones():
    reg = registry("editors")
    assert {"ft", "rome", "memit", "alphaedit", "emmet", "d4s", "nse"} <= set(EDITORS)
    assert reg["nudge"].package == "kedit-bias-nudge"  # a third-party package, found by its entry point


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_dirs):
    monkeypatch.setenv("KEDIT_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS * 8), encoding="utf-8")
    config = RunConfig(stats=StatsConfig(str(corpus), 600, 64), quiet=True)
    return {"tmp": tmp_path, "dirs": tiny_dirs, "config": config}


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("editor", EDITORS)
def test_untouched_deterministic_and_exactly_revertible(env, editor, kind):
    config = env["config"]
    loaded = load(str(env["dirs"][kind]))
    model = loaded.model
    specs = [EditSpec(**s) for s in _specs([0, 1])]
    before = _snapshot(model)

    def run():
        plan = EditPlan.make(model, editor, {}, seed=3, stats=config.stats_provider())
        return compute_diff(loaded, specs, plan)

    first = run()
    assert _same(_snapshot(model), before), "the editor changed the caller's model"
    assert run().id == first.id, "the same seed gave another diff"

    path = diffmod.write(first, env["tmp"] / f"{editor}{diffmod.SUFFIX}")
    d = diffmod.read(path)
    assert d.id == first.id and diffmod.state(model, d) == "base"
    assert diffmod.apply(model, d) == "applied"
    assert diffmod.state(model, d) == "applied"
    assert not _same(_snapshot(model), before), "the diff changed nothing"
    assert diffmod.revert(model, d) == "reverted"
    assert _same(_snapshot(model), before), "reverting did not give the base back bit for bit"


@pytest.mark.parametrize("editor", EDITORS)
def test_continue_equals_one_uninterrupted_run(env, editor):
    from kedit.sequence import Chain
    from kedit.workflows import apply

    config = replace(env["config"], model=str(env["dirs"]["llama"]))
    tmp = env["tmp"]
    all_specs = write_jsonl(tmp / "all.jsonl", _specs([0, 1, 2, 3]))
    first_half = write_jsonl(tmp / "half.jsonl", _specs([0, 1]))
    apply(EditJob(all_specs, editor, mode="sequential", batch_size=2, out=str(tmp / "whole")), config)
    apply(EditJob(first_half, editor, mode="sequential", batch_size=2, out=str(tmp / "split")), config)
    apply(EditJob(all_specs, continue_chain=str(tmp / "split")), config)  # a new call: the rest

    def final(chain: Path):
        model = load(config.model).model
        for d in Chain.open(chain).diffs():
            diffmod.apply(model, d)
        return _snapshot(model)

    whole, split = Chain.open(tmp / "whole"), Chain.open(tmp / "split")
    assert [s["specs"] for s in split.steps] == [s["specs"] for s in whole.steps] == [["c0", "c1"], ["c2", "c3"]]
    assert _same(final(tmp / "whole"), final(tmp / "split"))
    assert _same(whole.state(), split.state())


@pytest.mark.parametrize("editor", EDITORS)
def test_bad_options_are_refused_with_exit_code_2(run_cli, env, editor):
    spec = write_jsonl(env["tmp"] / "s.jsonl", _specs([0]))
    out = env["tmp"] / f"x{diffmod.SUFFIX}"
    code, _, err = run_cli("apply", spec, "--plugin", editor, "--model", env["dirs"]["llama"], "--out", out,
                           "-o", "no_such_option", "1")
    assert code == 2 and f"unknown option 'no_such_option' for editor '{editor}'" in err
    fields = registry("editors")[editor].obj.Options.model_fields
    typed = next((k for k, f in fields.items() if f.annotation in (int, float)), None)
    if typed is not None:  # an option that must be a number, given a word
        code, _, err = run_cli("apply", spec, "--plugin", editor, "--model", env["dirs"]["llama"], "--out", out,
                               "-o", typed, "many")
        assert code == 2 and f"bad value 'many' for option '{typed}'" in err
    assert not out.exists()
