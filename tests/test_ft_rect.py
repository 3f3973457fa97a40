"""The ft editor and the rect regularizer through the host pipeline, on tiny models."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_SPECS

from kedit import delta as D
from kedit import diff as diffmod
from kedit.editing import EditPlan, compute_diff
from kedit.models import LoadedModel, ModelSource
from kedit.plugins import lookup
from kedit.scoring import target_probs
from kedit.spec import EditSpec
from kedit.testing import tiny_model, tiny_tokenizer

SOURCE = ModelSource("tiny", None, "folder")


def _run(kind, options=None, regs=(), seed=0):
    model, tok = tiny_model(kind), tiny_tokenizer()
    specs = [EditSpec(**s) for s in TINY_SPECS]
    plan = EditPlan.make(model, "ft", {"layer": 1, "steps": 20, "lr": 0.05, **(options or {})}, regs, seed=seed)
    return model, tok, specs, compute_diff(LoadedModel(model, tok, SOURCE), specs, plan)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_ft_raises_the_new_target_and_leaves_the_model_alone(kind):
    model, tok, specs, d = _run(kind, {"norm_constraint": None})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prompts, targets = [s.text for s in specs], [s.target_new for s in specs]
    p0 = target_probs(model, tok, prompts, targets)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed"
    (name,) = d.deltas
    assert name.endswith(".1.mlp.c_proj.weight" if kind == "gpt2" else "layers.1.mlp.down_proj.weight")
    diffmod.apply(model, d)
    p1 = target_probs(model, tok, prompts, targets)
    assert all(b > 5 * a for a, b in zip(p0, p1)), (p0, p1)


def test_ft_norm_constraint_bounds_every_element():
    _, _, _, d = _run("gpt2", {"norm_constraint": 1e-3})
    (delta,) = d.deltas.values()
    from kedit.delta import to_dense

    assert float(to_dense(delta).abs().max()) <= 1e-3 + 1e-9


def test_ft_is_deterministic_under_a_seed():
    assert _run("llama", seed=3)[3].id == _run("llama", seed=3)[3].id


def test_ft_prompt_last_objective_scores_every_target_token_at_the_last_prompt_position():
    from kedit.scoring import target_ids

    model, tok, specs, d = _run("gpt2", {"objective": "prompt_last", "norm_constraint": None})
    _, _, _, tf = _run("gpt2", {"norm_constraint": None})
    assert d.manifest["editor"]["options"]["objective"] == "prompt_last"
    assert not torch.equal(next(iter(d.deltas.values())).tensor, next(iter(tf.deltas.values())).tensor)
    # FT-L trains each target token to follow the prompt directly: after the edit the first tokens
    # of both targets gained at the last prompt position (next-token probability after the prompt).
    def first_token_probs():
        out = []
        for s in specs:
            ids = tok(s.text, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                probs = model(input_ids=ids).logits[0, -1].softmax(-1)
            out.append(float(probs[target_ids(tok, s.target_new)[0]]))
        return out

    before = first_token_probs()
    diffmod.apply(model, d)
    after = first_token_probs()
    assert all(b > 3 * a for a, b in zip(before, after)), (before, after)


@pytest.mark.parametrize("k", [0.4, 0.1, 1.0])
def test_rect_keeps_exactly_the_top_fraction_by_relative_change(k):
    from kedit.plugins import lookup

    rect = lookup("regularizers", "rect").obj
    torch.manual_seed(0)
    w, delta = torch.randn(30, 20), torch.randn(30, 20)
    out = rect().apply(w, delta, rect.Options(k=k))
    kept = out != 0
    assert int(kept.sum()) == round(k * w.numel())
    rel = (delta.abs() / w.abs()).view(-1)
    threshold = rel[kept.view(-1)].min()
    assert bool((rel[~kept.view(-1)] <= threshold).all())
    assert torch.equal(out[kept], delta[kept])


def test_rect_in_the_pipeline_is_recorded_and_sparsifies():
    _, _, _, d = _run("gpt2", regs=["rect:0.25"])
    assert d.manifest["regularizers"][0]["name"] == "rect"
    assert d.manifest["regularizers"][0]["options"]["k"] == 0.25
    (entry,) = d.manifest["entries"].values()
    assert entry["encoding"] == "sparse"
    (delta,) = d.deltas.values()
    assert delta.idx.numel() == round(0.25 * 128 * 32)  # c_proj is stored (4 * n_embd, n_embd)



def test_host_refuses_an_editor_that_mutates_the_model():
    from kedit.api import Editor
    from kedit.errors import KeditError
    from kedit.plugins import Registered

    class Bad(Editor):
        name = "bad"

        def edit(self, model, tokenizer, specs, options, context):
            w = model.get_parameter("transformer.h.0.mlp.c_proj.weight")
            with torch.no_grad():
                w.add_(1.0)
            return {"transformer.h.0.mlp.c_proj.weight": torch.zeros_like(w)}

    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    plan = EditPlan(Registered("bad", Bad, "bad", "local", "0"), Bad.Options())
    with pytest.raises(KeditError, match="changed the model in place"):
        compute_diff(LoadedModel(model, tok, SOURCE), [EditSpec(**TINY_SPECS[0])], plan)


def test_rect_on_a_low_rank_edit_is_stored_as_factors_and_a_mask(tmp_path):
    """memit + rect: the kept elements are the low-rank product's own, so the diff holds the
    factors and a bitmap; it rebuilds the regularized delta bit for bit, is smaller than the
    sparse encoding of the same values, and applies and reverts exactly."""
    from kedit import diff as diffmod
    from kedit.editing import EditPlan, compute_diff
    from kedit.models import LoadedModel, ModelSource
    from kedit.spec import EditSpec
    from kedit.testing import CONTRACT_SPECS, contract_config, tiny_model, tiny_tokenizer

    model, tok = tiny_model("llama"), tiny_tokenizer()
    loaded = LoadedModel(model, tok, ModelSource("tiny", None, "folder"))
    specs = [EditSpec(**s) for s in CONTRACT_SPECS[:2]]
    stats = contract_config(tmp_path).stats_provider()
    plain = compute_diff(loaded, specs, EditPlan.make(model, "memit", {}, stats=stats))
    rect = compute_diff(loaded, specs, EditPlan.make(model, "memit", {}, regs=["rect:0.4"], stats=stats))
    for name, entry in rect.manifest["entries"].items():
        assert plain.manifest["entries"][name]["encoding"] == "lowrank"
        assert entry["encoding"] == "masked-lowrank" and entry["nnz"] == round(0.4 * D.numel(rect.deltas[name].shape))
        w = model.get_parameter(name).detach()
        expected = lookup("regularizers", "rect").obj().apply(w, D.to_dense(plain.deltas[name]), lookup("regularizers", "rect").obj.Options())
        assert torch.equal(D.to_dense(rect.deltas[name]), expected)
        sparse = D.compact(D.Dense(expected))
        assert entry["bytes"] < D.nbytes(sparse)
    path = diffmod.write(rect, tmp_path / "r.kedit.safetensors")
    back = diffmod.read(path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert diffmod.apply(model, back) == "applied" and diffmod.revert(model, back) == "reverted"
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
