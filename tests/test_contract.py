"""The contract every registered editor keeps, built-in or installed (the third-party test plugin
``kedit-bias-nudge`` included, installed by conftest), checked the same way for all of them on
tiny GPT-2 (Conv1D weights) and Llama (Linear weights) models with each editor's own defaults.
Registering a new editor is all it takes to be covered here; the checks themselves live in
:mod:`kedit.testing` so that plugin authors run the same ones in their own suites.

- the caller's model is left bit for bit as it was;
- the same seed gives the same diff id;
- the diff verifies against the model, applies, verifies as applied, and reverts bit-exactly;
- a sequence continued with ``--continue`` in a new call equals one uninterrupted run (weights
  and carried state), for every editor (trivially for those that carry no state);
- an unknown option and a badly typed one are refused with exit code 2 before anything is written.
"""
from __future__ import annotations

import pytest
from conftest import write_jsonl

from kedit import diff as diffmod
from kedit.plugins import registry
from kedit.testing import CONTRACT_SPECS, check_continue, check_editor

EDITORS = sorted(registry("editors"))


def test_the_matrix_covers_every_registered_editor_including_installed_ones():
    assert {"ft", "rome", "memit", "alphaedit", "emmet", "d4s", "nse"} <= set(EDITORS)
    assert registry("editors")["nudge"].package == "kedit-bias-nudge"  # third-party, found by its entry point


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


# Editors that must be trained first get an artifact trained briefly on the contract specs.
TRAINING = {"mend": {"steps": 2, "validation": 1, "checkpoint_every": 25, "rank": 4}}


def _options(editor: str, model_dir, work) -> dict:
    entry = registry("editors")[editor]
    if entry.obj.TrainOptions is None:
        return {}
    from kedit.models import load
    from kedit.training import train

    data = write_jsonl(work / "train.jsonl", CONTRACT_SPECS)
    out = work / f"{editor}-artifact.safetensors"
    train(editor, data, out, load(str(model_dir)), TRAINING.get(editor, {}), overwrite=True)
    return {entry.obj.artifact_options[0]: str(out)}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("editor", EDITORS)
def test_untouched_deterministic_and_exactly_revertible(work, tiny_dirs, editor, kind):
    check_editor(editor, tiny_dirs[kind], work, _options(editor, tiny_dirs[kind], work))


@pytest.mark.parametrize("editor", EDITORS)
def test_continue_equals_one_uninterrupted_run(work, tiny_dirs, editor):
    check_continue(editor, tiny_dirs["llama"], work, _options(editor, tiny_dirs["llama"], work))


@pytest.mark.parametrize("editor", EDITORS)
def test_bad_options_are_refused_with_exit_code_2(run_cli, work, tiny_dirs, editor):
    spec = write_jsonl(work / "s.jsonl", CONTRACT_SPECS[:1])
    out = work / f"x{diffmod.SUFFIX}"
    model = ["--model", tiny_dirs["llama"], "--out", out]
    code, _, err = run_cli("apply", spec, "--plugin", editor, *model, "-o", "no_such_option", "1")
    assert code == 2 and f"unknown option 'no_such_option' for editor '{editor}'" in err
    fields = registry("editors")[editor].obj.Options.model_fields
    typed = next((k for k, f in fields.items() if f.annotation in (int, float)), None)
    if typed is not None:  # an option that must be a number, given a word
        code, _, err = run_cli("apply", spec, "--plugin", editor, *model, "-o", typed, "many")
        assert code == 2 and f"bad value 'many' for option '{typed}'" in err
    assert not out.exists()


def test_the_checks_catch_an_editor_that_breaks_the_contract(work, tiny_dirs):
    """The checks can fail: an editor whose result depends on a draw no seed controls."""
    import os

    import torch

    from kedit.api import Editor, hookimpl
    from kedit.plugins import register_plugin, unregister_plugin

    class Unseeded(Editor):
        name = "unseeded"

        def edit(self, model, tokenizer, specs, options, context):
            name = context.arch.mlp_out_weight(1)
            w = model.get_parameter(name)
            seed = int.from_bytes(os.urandom(4), "little")
            return {name: 1e-3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))}

    class Plugin:
        register_editors = staticmethod(hookimpl(lambda register: register(Unseeded)))

    register_plugin(Plugin, name="unseeded", package="kedit-unseeded")
    try:
        with pytest.raises(AssertionError, match="the same seed gave another diff"):
            check_editor("unseeded", tiny_dirs["gpt2"], work)
    finally:
        unregister_plugin("unseeded")
