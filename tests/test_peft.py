"""`kedit diff export --format peft`: a low-rank chain as a LoRA adapter that PEFT loads onto the
base and that computes the edited model (to float rounding), on Linear and Conv1D layouts."""
from __future__ import annotations

import json

import pytest
import torch

from kedit import diff as diffmod
from kedit.editing import EditPlan, compute_diff
from kedit.models import load
from kedit.spec import EditSpec
from kedit.testing import CONTRACT_SPECS, contract_config

peft = pytest.importorskip("peft")
# peft itself still calls a transformers property deprecated in 5.x; nothing kedit can change
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def _diff(tmp_path, folder, editor, specs, name, after=None):
    loaded = load(str(folder))
    if after is not None:
        diffmod.apply(loaded.model, after)
    d = compute_diff(loaded, [EditSpec(**s) for s in specs],
                     EditPlan.make(loaded.model, editor, {}, stats=contract_config(tmp_path).stats_provider()),
                     parents=[after.id] if after is not None else [])
    return diffmod.write(d, tmp_path / f"{name}.kedit.safetensors")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_adapter_gives_the_merged_models_logits(tmp_path, tiny_dirs, run_cli, kind):
    first = _diff(tmp_path, tiny_dirs[kind], "memit", CONTRACT_SPECS[:2], "a")
    second = _diff(tmp_path, tiny_dirs[kind], "rome", CONTRACT_SPECS[2:3], "b", after=diffmod.read(first))
    code, out, err = run_cli("diff", "export", first, second, "--model", tiny_dirs[kind], "--format", "peft",
                             "--out", tmp_path / "adapter")
    assert code == 0, err
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] == (kind == "gpt2")
    code, _, err = run_cli("diff", "apply", first, second, "--model", tiny_dirs[kind], "--out", tmp_path / "merged")
    assert code == 0, err

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dirs[kind])
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    unedited = AutoModelForCausalLM.from_pretrained(tiny_dirs[kind]).eval()
    ids = torch.randint(3, 400, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, m, u = adapted(input_ids=ids).logits, merged(input_ids=ids).logits, unedited(input_ids=ids).logits
    assert (m - u).abs().max() > 1e-3  # the edit changes the logits
    assert (a - m).abs().max() < 1e-5
    print(f"PEFT round trip, {kind}: max |logit difference| {float((a - m).abs().max()):.2e}")
    prov = json.loads((tmp_path / "adapter" / "kedit_provenance.json").read_text())
    assert prov["diffs"] == [diffmod.read(first).id, diffmod.read(second).id] and all(
        m["exact"] for m in prov["modules"].values())


def test_peft_export_refuses_dense_diffs_unless_asked_to_approximate(tmp_path, tiny_dirs, run_cli):
    d = _diff(tmp_path, tiny_dirs["llama"], "ft", CONTRACT_SPECS[:1], "ft")
    code, _, err = run_cli("diff", "export", d, "--model", tiny_dirs["llama"], "--format", "peft",
                           "--out", tmp_path / "x")
    assert code == 2 and "has no exact LoRA form" in err and "--svd-rank" in err
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
    code, out, err = run_cli("diff", "export", d, "--model", tiny_dirs["llama"], "--format", "peft", "--svd-rank", "4",
                             "--out", tmp_path / "svd", "--json")
    assert code == 0, err
    (module,) = json.loads(out)["modules"].values()
    assert module["rank"] == 4 and not module["exact"] and 0 < module["svd_relative_error"] < 1
    code, _, err = run_cli("diff", "apply", d, "--model", tiny_dirs["llama"], "--svd-rank", "4", "--out", tmp_path / "y")
    assert code == 2 and "--svd-rank" in err
