"""The kn editor: integrated gradients checked against a plain full-prompt computation and against
IG's completeness property, the paper's selection rule, and the edit of the selected value vectors
in both weight layouts (GPT-2's Conv1D rows, Llama's Linear columns)."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_SPECS

from kedit.arch import arch_for
from kedit.delta import to_dense
from kedit.editing import EditPlan, compute_diff
from kedit.models import LoadedModel, ModelSource
from kedit.scoring import prompt_ids, target_ids
from kedit.spec import EditSpec
from kedit.testing import tiny_model, tiny_tokenizer
from kedit_plugins.kn import KNOptions, attribute, select

SOURCE = ModelSource("tiny", None, "folder")


def _options(model, **kw):
    from kedit_plugins.kn import KN

    return KN().resolve(KNOptions(**kw), model)


def _full_prompt_ig(model, arch, ids, pos, answer_tok, layer, alphas):
    """IG of one layer by the textbook route: the whole prompt through the model once per α,
    the activation at ``pos`` replaced by α·a."""
    module = model.get_submodule(arch.mlp_out.format(layer))
    grads, base = [], {}
    for alpha in alphas:
        leaf = {}

        def hook(_m, args, alpha=alpha, leaf=leaf):
            x = args[0]
            base["a"] = x[0, pos].detach()
            v = (alpha * base["a"]).requires_grad_(True)
            leaf["v"] = v
            x = x.clone()
            x[0, pos] = v
            return (x, *args[1:])

        h = module.register_forward_pre_hook(hook)
        try:
            logits = model(torch.tensor([ids])).logits
        finally:
            h.remove()
        prob = torch.softmax(logits[0, pos].float(), -1)[answer_tok]
        grads.append(torch.autograd.grad(prob, leaf["v"])[0])
    return (torch.stack(grads).sum(0) * base["a"] / len(alphas)).double()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_cached_batched_attribution_equals_the_full_prompt_computation(kind):
    model, tok = tiny_model(kind), tiny_tokenizer()
    arch = arch_for(model)
    opts = _options(model, steps=5, batch_size=7)  # chunks of one layer: several forward passes
    prompt, answer = "The capital of France is", target_ids(tok, "Paris")[:2]
    got = attribute(model, tok, arch, prompt, answer, opts)
    assert got.shape == (len(opts.layers), model.get_submodule(arch.mlp_out.format(0)).weight.shape[
        0 if arch.transposed else 1])
    ids = prompt_ids(tok, prompt)
    alphas = torch.linspace(0, 1, 5)
    want = torch.stack([
        sum(_full_prompt_ig(model, arch, ids + answer[:j], len(ids) + j - 1, t, layer, alphas)
            for j, t in enumerate(answer)) / len(answer)
        for layer in opts.layers])
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-9), (got - want).abs().max()


def test_attributions_sum_to_the_probability_the_layer_carries():
    """Completeness: over one layer's neurons, IG sums to P(answer) − P(answer | that layer's
    activation zeroed), up to the Riemann error."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    arch = arch_for(model)
    layer = 2
    opts = _options(model, steps=400, batch_size=400, layers=[layer])
    prompt, answer = "LeBron James plays the sport of", target_ids(tok, "basketball")[:1]
    ig = attribute(model, tok, arch, prompt, answer, opts)[0]
    ids = prompt_ids(tok, prompt)

    def prob(zero: bool) -> float:
        def hook(_m, args):
            x = args[0].clone()
            x[0, -1] = 0
            return (x, *args[1:])
        h = model.get_submodule(arch.mlp_out.format(layer)).register_forward_pre_hook(hook) if zero else None
        try:
            with torch.no_grad():
                return float(torch.softmax(model(torch.tensor([ids])).logits[0, -1], -1)[answer[0]])
        finally:
            if h:
                h.remove()

    carried = prob(False) - prob(True)
    assert abs(carried) > 1e-4  # the check means something
    assert float(ig.sum()) == pytest.approx(carried, rel=0.02, abs=1e-6)


def test_selection_keeps_neurons_coarse_in_more_than_p_of_the_prompts():
    s1 = torch.tensor([[1.0, 0.5, 0.1], [0.25, 0.0, 0.9]])
    s2 = torch.tensor([[0.1, 0.6, 0.1], [0.0, 0.0, 1.0]])
    s3 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # threshold 0.2 × max: s1 keeps (0,0) (0,1) (1,0) (1,2); s2 keeps (0,1) (1,2); s3 keeps (0,0)
    assert select([s1], 0.2, 0.4) == [(0, 0), (1, 2), (0, 1), (1, 0)]  # one prompt: every coarse neuron
    assert sorted(select([s1, s2, s3], 0.2, 0.4)) == [(0, 0), (0, 1), (1, 2)]  # in 2 of 3 > 1.2
    assert select([s1, s2, s3], 0.2, 0.7) == []  # none in 3 of 3
    assert select([s1, s2, s3], 0.2, 0.4, max_neurons=1) == [(0, 0)]  # highest mean score first (0.70 > 0.63)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_the_edit_moves_exactly_the_selected_value_vectors(kind):
    model, tok = tiny_model(kind), tiny_tokenizer()
    arch = arch_for(model)
    spec = EditSpec(**TINY_SPECS[0])
    options = {"prompts": "edit", "steps": 4, "adaptive_threshold": 0.5}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = EditPlan.make(model, "kn", options, seed=0)
    d = compute_diff(LoadedModel(model, tok, SOURCE), [spec], plan)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed"
    opts = _options(model, **options)
    ig = attribute(model, tok, arch, spec.text, target_ids(tok, "Paris"), opts)
    neurons = select([ig], 0.5, opts.p)
    assert neurons and d.manifest["report"]["kn"]["neurons_per_edit"] == [len(neurons)]
    new = target_ids(tok, "Rome")
    with torch.no_grad():
        greedy = prompt_ids(tok, spec.text)
        old = []
        for _ in new:
            old.append(int(model(torch.tensor([greedy + old])).logits[0, -1].argmax()))
    emb = model.get_input_embeddings().weight.double()
    change = (2 * (emb[new[0]] - emb[old[0]]) if len(new) == 1 else emb[new].sum(0) - emb[old].sum(0)).float()
    expected = {}
    for li, i in neurons:
        name = arch.mlp_out_weight(opts.layers[li])
        w = expected.setdefault(name, torch.zeros_like(before[name]))
        if arch.transposed:
            w[i, :] += change
        else:
            w[:, i] += change
    assert set(d.deltas) == set(expected)
    for name, delta in d.deltas.items():
        assert type(delta).__name__ == "Sparse"
        assert torch.allclose(to_dense(delta), expected[name], atol=1e-6)


def test_template_prompts_select_by_agreement_across_the_six_phrasings():
    from kedit_plugins.kn import TEMPLATE_GROUPS
    from kedit_plugins.lte.prompts import context_templates

    model, tok = tiny_model("llama"), tiny_tokenizer()
    arch = arch_for(model)
    spec = EditSpec(**TINY_SPECS[1])
    options = {"prompts": "templates", "steps": 3, "p": 0.5}
    d = compute_diff(LoadedModel(model, tok, SOURCE), [spec], EditPlan.make(model, "kn", options, seed=0))
    templates = context_templates(model, tok, TEMPLATE_GROUPS, seed=0)
    assert len(templates) == 6
    opts = _options(model, **options)
    scores = [attribute(model, tok, arch, t.replace("{}", spec.text), target_ids(tok, "basketball"), opts)
              for t in templates]
    want = select(scores, opts.adaptive_threshold, 0.5)
    assert d.manifest["report"]["kn"]["neurons_per_edit"] == [len(want)]
    assert len(want) < len(select(scores[:1], opts.adaptive_threshold, 0.5))  # agreement prunes


def test_an_edit_with_no_neuron_to_move_is_refused_by_name(monkeypatch):
    """On a model whose attributions are all <= 0 (as after KN's collapse in a long sequence) no
    neuron passes the selection: the edit fails naming the spec, never a silent empty delta."""
    import kedit_plugins.kn as kn
    from kedit.errors import KeditError

    model, tok = tiny_model("llama"), tiny_tokenizer()
    monkeypatch.setattr(kn, "attribute", lambda *a, **k: -torch.rand(2, 8, dtype=torch.float64))
    spec = EditSpec(**{**TINY_SPECS[0], "id": "fact-7"})
    plan = EditPlan.make(model, "kn", {"prompts": "edit", "steps": 2}, seed=0)
    with pytest.raises(KeditError, match=r"kn: no neuron passes the selection for edit 'fact-7' \(largest attribution -"):
        compute_diff(LoadedModel(model, tok, SOURCE), [spec], plan)
