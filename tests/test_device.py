"""Placement flags: --dtype, --device and --device-map on the CPU (CUDA is checked by
bench/gpu.py where a GPU is lent; no test needs one)."""
from __future__ import annotations

import pytest
import torch

from kedit import diff as diffmod
from kedit.config import RunConfig
from kedit.editing import EditPlan, compute_diff
from kedit.errors import InputError
from kedit.models import load
from kedit.spec import EditSpec
from kedit.testing import CONTRACT_SPECS, contract_config

EDITORS = ["ft", "rome", "memit", "alphaedit", "emmet", "encore", "d4s", "nse", "kn"]


@pytest.mark.parametrize("editor", EDITORS)
def test_every_editor_edits_bfloat16_weights_and_the_diff_reverts_exactly(tmp_path, tiny_dirs, editor):
    loaded = load(str(tiny_dirs["llama"]), dtype="bfloat16")
    model = loaded.model
    assert next(model.parameters()).dtype == torch.bfloat16
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    specs = [EditSpec(**s) for s in CONTRACT_SPECS[:2]]
    d = compute_diff(loaded, specs, EditPlan.make(model, editor, {}, stats=contract_config(tmp_path).stats_provider()))
    for name, rec in d.manifest["base"]["tensors"].items():
        assert rec["dtype"] == "bfloat16", name  # what the deltas were computed against
        assert d.manifest["entries"][name]["delta_dtype"] == "float32"
    assert diffmod.apply(model, d) == "applied"
    assert diffmod.revert(model, d) == "reverted"
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_cli_dtype_flag_and_verify_in_the_diffs_dtype(tmp_path, tiny_dirs, spec_file, run_cli):
    out = tmp_path / "bf.kedit.safetensors"
    code, _, err = run_cli("apply", spec_file, "--plugin", "rome", "--model", tiny_dirs["llama"], "--dtype", "bfloat16",
                           "--out", out, "-q")
    assert code == 0, err
    # verify loads the base in the diff's dtype by default ...
    code, stdout, err = run_cli("diff", "verify", out, "--model", tiny_dirs["llama"])
    assert code == 0 and "applies" in stdout, err
    # ... and explains a mismatch when another dtype is asked for
    code, stdout, err = run_cli("diff", "verify", out, "--model", tiny_dirs["llama"], "--dtype", "float32")
    assert code == 1 and "bfloat16 in the diff's base" in stdout and "--dtype bfloat16" in stdout


def test_device_flags_resolve_or_refuse(tmp_path, tiny_dirs, spec_file, run_cli):
    assert RunConfig(device="auto").placement()["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in (dict(device="gpu"), dict(dtype="float8"), dict(device_map="balanced")):
        with pytest.raises(InputError):
            RunConfig(**bad)
    if not torch.cuda.is_available():
        code, _, err = run_cli("apply", spec_file, "--plugin", "rome", "--model", tiny_dirs["llama"], "--device", "cuda",
                               "--out", tmp_path / "c.kedit.safetensors")
        assert code == 2 and "no CUDA device is available" in err
    code, _, err = run_cli("apply", spec_file, "--plugin", "rome", "--model", tiny_dirs["llama"], "--device-map", "auto",
                           "--out", tmp_path / "m.kedit.safetensors", "-q")
    assert code == 0, err


def test_evaluators_run_on_bfloat16_weights(tiny_dirs, spec_file, run_cli):
    code, stdout, err = run_cli("eval", "--model", tiny_dirs["gpt2"], "--dtype", "bfloat16", "--specs", spec_file,
                                "--evaluator", "counterfact", "--evaluator", "token-acc", "-q")
    assert code == 0, err
    assert "ES" in stdout and "reliability" in stdout
