"""Lifelong-editing fidelity on tiny models: key averaging per template group, D4S's reference
keys against the reference's own layer loop, most-probable early stopping, AlphaEdit's
energy-share null space and ENCORE's norm-constrained solve."""
from __future__ import annotations

import pytest
import torch
from test_sequence import FAST, _config, _final_weights, _run, _specs, env  # noqa: F401  (env is a fixture)

from kedit.arch import arch_for
from kedit.spec import EditSpec


def _loaded(env):
    from kedit.models import load

    return load(env["model"], quiet=True)


def _templates(model, tok):
    from kedit_plugins.lte.prompts import context_templates
    from kedit_plugins.memit import TEMPLATE_GROUPS

    return context_templates(model, tok, TEMPLATE_GROUPS, seed=0)


def test_template_weights_match_the_reference_grouping():
    from kedit_plugins.lte.prompts import template_weights

    assert template_weights([(10, 5)]) == pytest.approx([1 / 2] + [1 / 10] * 5)  # "{}" is half the key
    assert template_weights([(5, 10), (10, 10)]) == pytest.approx([1 / 3] + [1 / 30] * 20)
    assert template_weights([(10, 5)], "uniform") == pytest.approx([1 / 6] * 6)
    with pytest.raises(ValueError):
        template_weights([(10, 5)], "median")


@pytest.mark.parametrize("mode", ["grouped", "uniform"])
def test_memit_keys_are_the_hand_computed_average(env, mode):
    from kedit_plugins.lte import capture
    from kedit_plugins.lte.prompts import fact_row
    from kedit_plugins.memit import Memit, MemitOptions

    model, tok, _ = _loaded(env)
    arch, layer = arch_for(model), 1
    specs = [EditSpec(**s) for s in _specs([0, 1])]
    templates = _templates(model, tok)
    assert len(templates) == 6 and templates[0] == "{}"
    rows = Memit.key_rows(tok, specs, templates, MemitOptions(key_average=mode))
    got = capture.average_by_request(capture.at_lookup(model, tok, arch, rows, key_layers=[layer])[("key", layer)],
                                     rows, len(specs))
    for i, spec in enumerate(specs):  # one template at a time, through the model's own forward
        keys = torch.stack([capture.at_lookup(model, tok, arch, [fact_row(tok, t, spec, 0, with_target=False)],
                                              key_layers=[layer], fast=False)[("key", layer)][0] for t in templates])
        want = 0.5 * keys[0] + 0.5 * keys[1:].mean(0) if mode == "grouped" else keys.mean(0)
        assert torch.allclose(got[i], want, atol=1e-5, rtol=1e-4)
    if mode == "grouped":  # and the two modes really differ
        uniform = Memit.key_rows(tok, specs, templates, MemitOptions(key_average="uniform"))
        other = capture.average_by_request(
            capture.at_lookup(model, tok, arch, uniform, key_layers=[layer])[("key", layer)], uniform, len(specs))
        assert not torch.allclose(got, other, atol=1e-4)


def _reference_d4s_loop(env, idx, options):
    """The D4S reference's instance-sequential loop, written out: W0 restored before every edit,
    z and the residual on W0, then layer by layer keys on the model as it stands (the layers below
    already hold W0 + the new solution, written in place), the sums, and W = W0 + S_RK (λC0 + S_KK)⁻¹."""
    from kedit.editing import EditPlan
    from kedit.stats import KeyStats
    from kedit_plugins.lte import capture, values
    from kedit_plugins.lte.prompts import fact_row
    from kedit_plugins.lte.solve import spd_solve
    from kedit_plugins.memit import Memit

    model, tok, _ = _loaded(env)
    arch = arch_for(model)
    opts = EditPlan.make(model, "d4s", {**FAST, **options}).options
    layers, last = opts.layers, opts.layers[-1]
    c0 = KeyStats(corpus=env["corpus"], n_tokens=1500).second_moment(model, tok, layers)
    templates = _templates(model, tok)
    names = {l: arch.mlp_out_weight(l) for l in layers}
    params = {l: model.get_parameter(names[l]) for l in layers}
    w0 = {l: params[l].detach().clone().double() for l in layers}
    s_rk = {l: 0 for l in layers}
    s_kk = {l: 0 for l in layers}
    for spec in [EditSpec(**s) for s in _specs(idx)]:
        with torch.no_grad():
            for l in layers:
                params[l].copy_(w0[l].float())
        z = values.optimize(model, tok, arch, [spec], templates, "block", last, opts).z
        plain = [fact_row(tok, "{}", spec, 0, with_target=False)]
        residual = (z - capture.at_lookup(model, tok, arch, plain, block_layers=[last])[("block", last)]).T
        rows = Memit.key_rows(tok, [spec], templates, opts)
        for i, l in enumerate(layers):
            k = capture.average_by_request(capture.at_lookup(model, tok, arch, rows, key_layers=[l])[("key", l)],
                                           rows, 1).T
            r = residual / (len(layers) - i)
            s_rk[l] = s_rk[l] + r @ k.T
            s_kk[l] = s_kk[l] + k @ k.T
            solution = spd_solve(opts.mom2_update_weight * c0[l] + s_kk[l], s_rk[l].T).T  # (d_out, d_in)
            with torch.no_grad():
                params[l].copy_((w0[l] + (solution.T if arch.transposed else solution)).float())
    return {names[l]: params[l].detach().clone() for l in layers}


def test_d4s_reference_keys_equal_the_reference_layer_loop(env):
    once = {"residual": "once"}  # the reference's allocation
    want = _reference_d4s_loop(env, [0, 1, 2], once)
    ref = _run(env, [0, 1, 2], env["tmp"] / "ref", editor="d4s", batch_size=1, options={"keys": "reference", **once})
    base = _run(env, [0, 1, 2], env["tmp"] / "base", editor="d4s", batch_size=1, name="base",
                options={"keys": "base", **once})
    got, other = _final_weights(env, ref["chain"]), _final_weights(env, base["chain"])
    gap = max(float((got[n] - w).abs().max()) for n, w in want.items())
    differ = max(float((other[n] - w).abs().max()) for n, w in want.items())
    assert gap <= 1e-5, gap
    assert differ > 100 * max(gap, 1e-7), (differ, gap)  # keys=base is a different result


def test_d4s_removal_is_refused_where_it_is_not_exact(env):
    from kedit.errors import InputError
    from kedit.workflows import remove_from_chain

    for options in ({}, {"keys": "reference", "residual": "once"}, {"keys": "base", "residual": "per_layer"}):
        out = env["tmp"] / f"chain-{'-'.join(options.values()) or 'defaults'}"
        res = _run(env, [0, 1], out, editor="d4s", options=options, name=out.name)
        with pytest.raises(InputError, match="exact removal of an edit needs keys=base and residual=once"):
            remove_from_chain(res["chain"], ["s1"], _config(env))


def test_d4s_per_layer_residual_leaves_less_for_the_upper_layers(env):
    """MEMIT's allocation: the shares add up to about one residual, not 2.28× of it."""
    from kedit.delta import to_dense
    from kedit.editing import EditPlan, compute_diff
    from kedit.stats import KeyStats

    loaded = _loaded(env)
    specs = [EditSpec(**s) for s in _specs([0, 1])]
    stats = KeyStats(corpus=env["corpus"], n_tokens=1500)
    norms = {}
    for mode in ("once", "per_layer"):
        d = compute_diff(loaded, specs, EditPlan.make(loaded.model, "d4s", {**FAST, "keys": "base", "residual": mode},
                                                        stats=stats))
        norms[mode] = [float(to_dense(d.deltas[n]).norm()) for n in sorted(d.deltas)]
    assert norms["once"][0] == pytest.approx(norms["per_layer"][0], rel=1e-4)  # the first layer sees the same
    assert norms["per_layer"][1] < norms["once"][1]


def _condition_holds(model, tok, arch, spec, templates, layer, delta):
    """Whether every target token is the argmax on every template with δ added at the fact token
    of block ``layer``'s output: a plain forward with a hook, independent of kedit's loop."""
    from kedit_plugins.lte.prompts import fact_row, pad, pad_id

    rows = [fact_row(tok, t, spec, 0, with_target=True) for t in templates]
    ids, mask = pad(rows, pad_id(tok))
    look = torch.tensor([r.lookup for r in rows])

    def hook(_m, _a, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[torch.arange(len(rows)), look] += delta.to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = model.get_submodule(f"{arch.layers}.{layer}").register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    return all(int(logits[j, p].argmax()) == t for j, r in enumerate(rows) for p, t in zip(r.target_pos, r.targets))


def test_most_probable_early_stopping_stops_exactly_when_the_condition_holds():
    """On the embedded SmolLM2 (a tiny random model cannot be pushed to an argmax target)."""
    from kedit.models import load
    from kedit_plugins.lte import values
    from kedit_plugins.lte.options import ValueOptions

    model, tok, _ = load(None, quiet=True)
    arch, layer = arch_for(model), 8
    templates = _templates(model, tok)
    spec = EditSpec(subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="English")
    common = {"early_stop_loss": 0.0, "v_lr": 0.1}
    mp = values.optimize(model, tok, arch, [spec], templates, "block", layer,
                         ValueOptions(v_steps=40, stop_at_most_probable=True, **common))
    s = mp.steps[0]
    assert mp.stopped == ["most-probable"] and 1 < s < 40
    for k, holds in ((s, True), (s - 1, False)):  # k − 1 Adam steps taken, without early stopping
        run = values.optimize(model, tok, arch, [spec], templates, "block", layer,
                              ValueOptions(v_steps=k, stop_at_most_probable=False, **common))
        assert run.stopped == ["steps"]
        if k == s:
            assert torch.allclose(run.z, mp.z)
        delta = (run.z - run.v_init)[0]
        assert _condition_holds(model, tok, arch, spec, templates, layer, delta) is holds
    assert mp.report()["stopped"] == {"most-probable": 1}


def test_energy_share_null_space_keeps_the_stated_share():
    from kedit_plugins.lte.solve import null_space_basis

    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    evals = torch.logspace(-4, 2, 40, dtype=torch.float64)
    c0 = q @ torch.diag(evals) @ q.T
    for p in (0.001, 0.02, 0.3):
        basis, share = null_space_basis(c0, p, "energy")
        r = basis.shape[1]
        assert share <= p < share + float(evals[r] / evals.sum())  # the largest set within p
        assert share == pytest.approx(float(torch.trace(basis.T @ c0 @ basis) / torch.trace(c0)), rel=1e-9)
        assert torch.allclose(basis.T @ basis, torch.eye(r, dtype=c0.dtype), atol=1e-10)
    rel, _ = null_space_basis(c0, 1.1e-2, "relative")  # (1e-2 would sit on an eigenvalue)
    assert rel.shape[1] == int((evals < 1.1e-2 * evals.max()).sum())
    assert null_space_basis(c0, 1e-2, "energy")[0].shape == null_space_basis(1000 * c0, 1e-2, "energy")[0].shape


def test_null_space_basis_is_memoised_on_the_statistics_content():
    from kedit_plugins.lte.solve import null_space_basis

    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    c0 = q @ torch.diag(torch.logspace(-4, 2, 30, dtype=torch.float64)) @ q.T
    first = null_space_basis(c0, 0.2, "energy")
    assert null_space_basis(c0.clone(), 0.2, "energy")[0] is first[0]  # equal bytes: no second eigh
    assert null_space_basis(c0, 0.1, "energy")[0].shape[1] < first[0].shape[1]  # the rule is in the key
    c0.copy_(q @ torch.diag(torch.linspace(1, 2, 30, dtype=torch.float64)) @ q.T)  # same tensor, new content
    again, share = null_space_basis(c0, 0.2, "energy")
    assert again.shape[1] == int((torch.cumsum(torch.linspace(1, 2, 30), 0) <= 0.2 * 45).sum()) != first[0].shape[1]
    assert share <= 0.2

def test_alphaedit_records_the_null_space_it_kept(env):
    from kedit.editing import EditPlan, compute_diff
    from kedit.stats import KeyStats

    loaded = _loaded(env)
    specs = [EditSpec(**s) for s in _specs([0, 1])]
    plan = EditPlan.make(loaded.model, "alphaedit", {**FAST, "nullspace_energy": 0.05},
                         stats=KeyStats(corpus=env["corpus"], n_tokens=1500))
    d = compute_diff(loaded, specs, plan)
    rep = d.manifest["report"]["alphaedit"]
    assert rep["rule"] == "energy" and rep["threshold"] == 0.05 and set(rep["layers"]) == {"1", "2"}
    for layer in rep["layers"].values():
        assert 0 < layer["kept_dims"] < layer["d_k"] and 0 < layer["variance_share"] <= 0.05
    assert d.manifest["report"]["targets"]["requests"] == 2


def test_encore_solve_minimises_its_objective():
    """∂/∂ΔW [λ tr(ΔW C0 ΔWᵀ) + ‖ΔW K − R‖² + λ_n ‖ΔW‖²] = 0 at the returned ΔW."""
    from kedit_plugins.encore import Encore, EncoreOptions

    g = torch.Generator().manual_seed(1)
    a = torch.randn(12, 30, generator=g, dtype=torch.float64)
    c0 = a.T @ a / 12
    keys = torch.randn(30, 3, generator=g, dtype=torch.float64)
    residual = torch.randn(8, 3, generator=g, dtype=torch.float64)
    opts = EncoreOptions(mom2_update_weight=5.0, norm_weight=0.5)
    u, v = Encore().solve(0, residual, keys, c0, opts)
    dw = u @ v
    ridge = 0.5 * 5.0 * float(torch.trace(c0)) / 30
    grad = 5.0 * dw @ c0 + (dw @ keys - residual) @ keys.T + ridge * dw
    assert float(grad.abs().max()) < 1e-9
    u0, v0 = Encore().solve(0, residual, keys, c0, EncoreOptions(mom2_update_weight=5.0, norm_weight=0.0))
    assert float((u @ v).norm()) < float((u0 @ v0).norm())  # the constraint shrinks the change


def test_encore_edits_a_tiny_model(env):
    from kedit.editing import EditPlan, compute_diff
    from kedit.stats import KeyStats

    loaded = _loaded(env)
    specs = [EditSpec(**s) for s in _specs([0, 1])]
    plan = EditPlan.make(loaded.model, "encore", dict(FAST), stats=KeyStats(corpus=env["corpus"], n_tokens=1500))
    d = compute_diff(loaded, specs, plan)
    assert set(d.deltas) == {arch_for(loaded.model).mlp_out_weight(l) for l in (1, 2)}
    assert d.manifest["editor"]["options"]["stop_at_most_probable"] is True
