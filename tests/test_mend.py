"""MEND and trained artifacts: an untrained network is gradient descent, training lowers the edit
loss, an interrupted training resumes to the same tensors, and an artifact is refused on another
base model and recorded in every diff made with it."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_SPECS, write_jsonl

from kedit import artifacts
from kedit.arch import arch_for
from kedit.delta import LowRank, to_dense
from kedit.editing import EditPlan, compute_diff
from kedit.errors import InputError
from kedit.models import load
from kedit.spec import EditSpec
from kedit.testing import tiny_model, tiny_tokenizer
from kedit.training import train
from kedit_plugins.mend import MendTrainOptions, _factors, _g, _init, _rows

RECORDS = [
    {"id": f"r{i}", "subject": s, "prompt": "The capital of {} is", "target_new": t, "target_true": "Paris",
     "paraphrases": [f"{s}'s capital city is"], "neighborhood": [{"prompt": "The capital of Peru is", "target": "Lima"}]}
    for i, (s, t) in enumerate([("France", "Rome"), ("Spain", "Berlin"), ("Italy", "Oslo"), ("Chile", "Lima"),
                                ("Japan", "Cairo"), ("Egypt", "Tokyo")])
]
SMALL = {"steps": 6, "batch_size": 2, "validation": 2, "validate_every": 3, "checkpoint_every": 2, "log_every": 1,
         "rank": 8}


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", RECORDS)


def test_an_untrained_network_is_gradient_descent_with_step_alpha():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    arch = arch_for(model)
    name = arch.mlp_out_weight(3)
    w = model.get_parameter(name)
    dims = [(arch.to_out_in(w).shape[1], arch.to_out_in(w).shape[0])]
    net = _init(dims, MendTrainOptions(rank=4, edit_lr=0.5), torch.Generator().manual_seed(0))  # no normaliser data
    specs = [EditSpec(**s) for s in TINY_SPECS]
    rows = _rows(tok, [(s.text, s.target_new) for s in specs], model)
    u, d = _factors(model, arch, [name], rows)[name]
    ut, dt = _g(net, 0, u, d)
    mend = -0.5 * (dt.t() @ ut)
    # the same gradient by autograd on the weight itself
    from kedit.scoring import target_logprobs

    logits = model(input_ids=rows[0], attention_mask=rows[1]).logits
    loss = torch.stack([-lp.mean() for lp in target_logprobs(logits, rows[2])]).sum()
    (grad,) = torch.autograd.grad(loss, [w])
    assert torch.allclose(mend, -0.5 * grad, atol=1e-6, rtol=1e-4)


def test_training_writes_an_artifact_with_its_provenance_and_lowers_the_edit_loss(tmp_path, data):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    loaded = (model, tok, load.__globals__["ModelSource"]("tiny", None, "folder"))
    out = tmp_path / "mend.safetensors"
    result = train("mend", data, out, loaded, {**SMALL, "steps": 40, "lr": 3e-3, "lr_lr": 3e-3, "edit_lr": 1e-2,
                                                "validate_every": 40, "checkpoint_every": 40}, seed=1)
    art = artifacts.read(out, model, tok, editor="mend")
    meta = art.meta
    assert meta["data"]["sha256"] == artifacts.file_sha256(data) and meta["data"]["records"] == 6
    assert meta["seed"] == 1 and meta["options"]["layers"] == [1, 2, 3]  # the last three of four
    assert sorted(meta["base"]["tensors"]) == sorted(arch_for(model).mlp_out_weight(i) for i in (1, 2, 3))
    curve = meta["report"]["curve"]
    assert len(curve) == 40 and {"edit_nll", "loc_kl"} <= set(curve[0])
    first, last = sum(c["edit_nll"] for c in curve[:5]) / 5, sum(c["edit_nll"] for c in curve[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert set(meta["report"]["validation"]) == {"edit_success", "paraphrase", "locality"}
    assert result["sha256"] == art.sha256 and not (tmp_path / "mend.safetensors.partial").exists()


def test_an_interrupted_training_resumes_to_the_same_tensors(tmp_path, data):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    loaded = (model, tok, load.__globals__["ModelSource"]("tiny", None, "folder"))
    whole = train("mend", data, tmp_path / "whole.safetensors", loaded, SMALL)

    class Interrupt:  # a progress reporter that stops the run after five steps
        def __call__(self, iterable=None, **_):
            for k, x in enumerate(iterable):
                if k == 5:
                    raise KeyboardInterrupt
                yield x

    out = tmp_path / "split.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train("mend", data, out, loaded, SMALL, progress=Interrupt())
    assert (tmp_path / "split.safetensors.partial" / "checkpoint.safetensors").is_file() and not out.exists()
    split = train("mend", data, out, loaded, SMALL)
    assert split["resumed_at"] == 4 and whole["resumed_at"] is None
    a, b = artifacts.read(tmp_path / "whole.safetensors"), artifacts.read(out)
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
    assert a.meta["report"]["curve"] == b.meta["report"]["curve"]
    # another seed is another run: the checkpoint is not used
    other = train("mend", data, tmp_path / "s2.safetensors", loaded, SMALL, seed=2)
    assert other["resumed_at"] is None


def test_apply_checks_the_base_and_records_the_artifact(tmp_path, data, tiny_dirs, run_cli):
    loaded = load(str(tiny_dirs["gpt2"]))
    out = tmp_path / "mend.safetensors"
    train("mend", data, out, loaded, SMALL)
    specs = [EditSpec(**s) for s in RECORDS[:2]]
    d = compute_diff(loaded, specs, EditPlan.make(loaded.model, "mend", {"artifact": str(out)}))
    assert d.manifest["artifacts"]["artifact"]["sha256"] == artifacts.file_sha256(out)
    tokens = int(_rows(loaded.tokenizer, [(s.text, s.target_new) for s in specs], loaded.model)[1].sum())
    for delta in d.deltas.values():  # one rank-one term per token of the teacher-forced rows
        assert isinstance(delta, LowRank) and delta.u.shape[1] == tokens
        assert to_dense(delta).abs().sum() > 0
    other = load(str(tiny_dirs["gpt2-other"]))
    with pytest.raises(InputError, match="trained for another base model"):
        compute_diff(other, specs, EditPlan.make(other.model, "mend", {"artifact": str(out)}))
    spec = write_jsonl(tmp_path / "s.jsonl", RECORDS[:1])
    code, _, err = run_cli("apply", spec, "--plugin", "mend", "--model", tiny_dirs["gpt2"], "--out",
                           tmp_path / "x.kedit.safetensors")
    assert code == 2 and "kedit train mend" in err
    code, _, err = run_cli("train", "rome", "--data", data, "--out", tmp_path / "r.safetensors",
                           "--model", tiny_dirs["gpt2"])
    assert code == 2 and "not trained; trainable editors: mend" in err
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    code, _, err = run_cli("apply", spec, "--plugin", "mend", "-o", "artifact", tmp_path / "junk.safetensors",
                           "--model", tiny_dirs["gpt2"], "--out", tmp_path / "y.kedit.safetensors")
    assert code == 2 and "junk.safetensors" in err


def test_kedit_train_command(tmp_path, data, tiny_dirs, run_cli):
    out = tmp_path / "a.safetensors"
    opts = [x for k, v in SMALL.items() for x in ("-o", k, json.dumps(v))]
    code, stdout, err = run_cli("train", "mend", "--data", data, "--out", out, "--model", tiny_dirs["llama"], *opts)
    assert code == 0, err
    assert f"wrote {out}" in stdout and "validation edit_success" in stdout
    code, _, err = run_cli("train", "mend", "--data", data, "--out", out, "--model", tiny_dirs["llama"])
    assert code == 2 and "exists" in err
