"""Locate-then-edit editors checked against direct computations of their formulas (tiny models)."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_SPECS

from kedit import delta as D
from kedit.api import EditContext
from kedit.arch import arch_for
from kedit.spec import EditSpec
from kedit.stats import KeyStats
from kedit.testing import CORPUS, tiny_model, tiny_tokenizer
from kedit_plugins.lte import capture, values
from kedit_plugins.lte.prompts import context_templates, fact_row
from kedit_plugins.lte.solve import alphaedit_delta, cholesky, emmet_delta, memit_delta, null_space_basis, spd_solve


def _rand(seed=0, d=6, dk=10, n=3):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dk, 4 * dk, generator=g, dtype=torch.float64)
    c0 = a @ a.T / (4 * dk)
    return c0, torch.randn(dk, n, generator=g, dtype=torch.float64), torch.randn(d, n, generator=g, dtype=torch.float64)


def test_memit_solution_satisfies_its_normal_equations():
    c0, k, r = _rand()
    u, v = memit_delta(r, k, c0, lam=3.0)
    dw = u @ v
    torch.testing.assert_close(dw @ (3.0 * c0 + k @ k.T), r @ k.T)


def test_emmet_meets_the_equality_constraint_with_minimum_norm():
    c0, k, r = _rand(1)
    u, v = emmet_delta(r, k, c0, lam=2.0, emmet_lambda=0.0)
    dw = u @ v
    torch.testing.assert_close(dw @ k, r)  # (W + ΔW) K = W K + R
    c_inv = torch.linalg.inv(2.0 * c0)
    torch.testing.assert_close(dw, r @ torch.linalg.inv(k.T @ c_inv @ k) @ k.T @ c_inv)
    u2, v2 = emmet_delta(r, k, c0, lam=2.0, emmet_lambda=0.5)  # the ridge trades exactness for conditioning
    assert float((u2 @ v2 @ k - r).norm()) > 1e-3


def test_alphaedit_leaves_the_preserved_subspace_alone():
    c0, k, r = _rand(2)
    basis, _ = null_space_basis(c0, 0.3, "relative")
    assert 0 < basis.shape[1] < c0.shape[0]
    u, v = alphaedit_delta(r, k, basis, prior=None, l2=1.0)
    dw = u @ v
    evals, evecs = torch.linalg.eigh(c0)
    preserved = evecs[:, evals >= 0.3 * evals.max()]
    assert float((dw @ preserved).abs().max()) < 1e-10
    p = basis @ basis.T
    direct = r @ k.T @ p @ torch.linalg.inv(k @ k.T @ p + 1.0 * torch.eye(c0.shape[0], dtype=c0.dtype))
    torch.testing.assert_close(dw, direct)


def test_null_space_threshold_is_relative():
    c0, _, _ = _rand(3)
    assert null_space_basis(c0, 0.1)[0].shape == null_space_basis(1000 * c0, 0.1)[0].shape
    level = 0.5 * float(torch.linalg.eigvalsh(c0).max())  # an absolute level inside c0's spectrum
    assert null_space_basis(c0, level, "absolute")[0].shape[1] > null_space_basis(1000 * c0, level, "absolute")[0].shape[1]


def test_cholesky_survives_a_singular_psd_matrix():
    x = torch.randn(5, 2, dtype=torch.float64)
    a = x @ x.T  # rank 2
    factor = cholesky(a)
    assert torch.isfinite(factor).all()
    b = torch.randn(5, 1, dtype=torch.float64)
    assert torch.isfinite(spd_solve(a + torch.eye(5, dtype=torch.float64), b)).all()


# --- editor level ----------------------------------------------------------------------------

@pytest.fixture
def stats(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS * 10))
    return KeyStats(corpus=str(corpus), n_tokens=1500, max_len=64)


def _setup(kind):
    model, tok = tiny_model(kind), tiny_tokenizer()
    return model, tok, arch_for(model), [EditSpec(**s) for s in TINY_SPECS]


def _dense_out_in(arch, d):
    return arch.to_out_in(D.to_dense(d, torch.float64))


FAST_V = {"v_steps": 4, "v_lr": 0.5}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_batched_values_equal_one_at_a_time(kind):
    model, tok, arch, specs = _setup(kind)
    templates = context_templates(model, tok, [(4, 2)])
    opts = values.ValueOptions(**FAST_V)
    both = values.optimize(model, tok, arch, specs, templates, "block", 2, opts)
    for i, spec in enumerate(specs):
        alone = values.optimize(model, tok, arch, [spec], templates, "block", 2, opts)
        torch.testing.assert_close(both.z[i], alone.z[0], rtol=1e-4, atol=1e-4)
        assert both.steps[i] == alone.steps[0]


def test_chunked_values_equal_one_batch():
    model, tok, arch, specs = _setup("llama")
    templates = context_templates(model, tok, [(4, 2)])
    whole = values.optimize(model, tok, arch, specs, templates, "block", 2, values.ValueOptions(**FAST_V))
    chunked = values.optimize(model, tok, arch, specs, templates, "block", 2, values.ValueOptions(**FAST_V, v_chunk=1))
    torch.testing.assert_close(chunked.z, whole.z, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunked.v_init, whole.v_init, rtol=1e-4, atol=1e-4)  # float32 batch rounding
    assert chunked.steps == whole.steps and len(chunked.stopped) == len(specs)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_rome_edited_matrix_maps_the_key_to_the_target_value(kind, stats):
    from kedit_plugins.rome import Rome

    model, tok, arch, specs = _setup(kind)
    spec = specs[0]
    opts = Rome().resolve(Rome.Options(layer=1, **FAST_V), model)
    ctx = EditContext(arch=arch, stats=stats)
    (name, d), = Rome().edit(model, tok, [spec], opts, ctx).items()
    assert isinstance(d, D.LowRank) and d.rank == 1
    templates = context_templates(model, tok, [(5, 10), (10, 10)])
    rows = [fact_row(tok, t, spec, 0, with_target=False) for t in templates]
    k_bar = capture.at_lookup(model, tok, arch, rows, key_layers=[1])[("key", 1)].mean(0)
    z = values.optimize(model, tok, arch, [spec], templates, "mlp_out", 1, opts, average_init=True).z[0]
    w = model.get_parameter(name).detach()
    after = capture.at_lookup(model, tok, arch, rows, mlp_out_layers=[1],
                              overrides={name: w + D.to_dense(d)})[("mlp_out", 1)].mean(0)
    torch.testing.assert_close(after, z, rtol=1e-4, atol=1e-4)  # (W + ΔW) k̄ + b = v*
    c0 = stats.second_moment(model, tok, [1])[1]
    direction = spd_solve(c0, k_bar.unsqueeze(1)).squeeze(1)
    dw = _dense_out_in(arch, d)
    torch.testing.assert_close(dw @ (direction / direction.norm()), dw.norm(dim=1) * torch.sign(dw @ direction),
                               rtol=1e-3, atol=1e-5)  # every row of ΔW is parallel to C0⁻¹ k̄


def _single_layer_parts(model, tok, arch, specs, layer, opts):
    templates = context_templates(model, tok, [(10, 5)])
    z = values.optimize(model, tok, arch, specs, templates, "block", layer, opts).z
    from kedit_plugins.memit import Memit

    rows = Memit.key_rows(tok, specs, templates, opts)  # grouped: "{}" weighs 1/2
    k = capture.average_by_request(capture.at_lookup(model, tok, arch, rows, key_layers=[layer])[("key", layer)],
                                   rows, len(specs)).T
    plain = [fact_row(tok, "{}", s, i, with_target=False) for i, s in enumerate(specs)]
    h = capture.at_lookup(model, tok, arch, plain, block_layers=[layer])[("block", layer)]
    return k, (z - h).T


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_memit_and_emmet_editors_solve_their_equations(kind, stats):
    from kedit_plugins.emmet import Emmet
    from kedit_plugins.memit import Memit

    model, tok, arch, specs = _setup(kind)
    ctx = EditContext(arch=arch, stats=stats)
    c0 = stats.second_moment(model, tok, [2])[2]

    opts = Memit().resolve(Memit.Options(layers=[2], mom2_update_weight=50.0, **FAST_V), model)
    k, r = _single_layer_parts(model, tok, arch, specs, 2, opts)
    (d,) = Memit().edit(model, tok, specs, opts, ctx).values()
    dw = _dense_out_in(arch, d)
    torch.testing.assert_close(dw @ (50.0 * c0 + k @ k.T), r @ k.T, rtol=1e-4, atol=1e-4)

    opts = Emmet().resolve(Emmet.Options(layers=[2], mom2_update_weight=50.0, emmet_lambda=0.0, **FAST_V), model)
    (d,) = Emmet().edit(model, tok, specs, opts, ctx).values()
    torch.testing.assert_close(_dense_out_in(arch, d) @ k, r, rtol=1e-4, atol=1e-4)


def test_memit_spreads_over_layers_and_alphaedit_respects_the_null_space(stats):
    from kedit_plugins.alphaedit import AlphaEdit
    from kedit_plugins.memit import Memit

    model, tok, arch, specs = _setup("llama")
    ctx = EditContext(arch=arch, stats=stats)
    out = Memit().edit(model, tok, specs, Memit().resolve(Memit.Options(layers=[1, 2], **FAST_V), model), ctx)
    assert sorted(out) == [arch.mlp_out_weight(1), arch.mlp_out_weight(2)]
    state: dict = {}
    opts = AlphaEdit().resolve(AlphaEdit.Options(layers=[1, 2], nullspace="relative", nullspace_threshold=0.05,
                                                 **FAST_V), model)
    out = AlphaEdit().edit(model, tok, specs, opts, EditContext(arch=arch, stats=stats, state=state))
    for layer in (1, 2):
        c0 = stats.second_moment(model, tok, [layer])[layer]
        evals, evecs = torch.linalg.eigh(c0)
        preserved = evecs[:, evals >= 0.05 * evals.max()]
        dw = _dense_out_in(arch, out[arch.mlp_out_weight(layer)])
        assert float((dw @ preserved).abs().max()) < 1e-6 * max(1.0, float(dw.abs().max()))
        assert state[f"alphaedit.kk.{layer}"].shape == c0.shape  # keys carried for a sequence


def _qwen2():
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, initializer_range=0.3)
    return AutoModelForCausalLM.from_config(config).eval()  # q/k/v carry biases


def _packed_case(kind):
    model = _qwen2() if kind == "qwen2" else tiny_model("llama")
    tok, specs = tiny_tokenizer(), [EditSpec(**s) for s in TINY_SPECS]
    templates = ["{}", "Apple was founded by Steve. {}", "The a. {}"]
    return model, tok, arch_for(model), specs, templates


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_lookup_activations_equal_the_models_forward(kind):
    """Packing, shared template heads and weight overrides give the model's own activations."""
    model, tok, arch, specs, templates = _packed_case(kind)
    rows = [fact_row(tok, t, s, i, with_target=False) for i, s in enumerate(specs) for t in templates]
    w = model.get_parameter(arch.mlp_out_weight(1)).detach()
    overrides = {arch.mlp_out_weight(1): w + 0.3 * torch.randn_like(w)}
    kw = {"key_layers": [0, 2], "block_layers": [1, 3], "mlp_out_layers": [2], "overrides": overrides}
    fast = capture.at_lookup(model, tok, arch, rows, fast=True, **kw)
    full = capture.at_lookup(model, tok, arch, rows, fast=False, **kw)
    assert fast.keys() == full.keys()
    for name in full:
        torch.testing.assert_close(fast[name], full[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_suffix_forward_equals_full_recomputation_in_value_and_gradient(kind, layer):
    """The fast v* path (packed, shared heads, only the fact token onwards through layers > L) is exact."""
    from kedit_plugins.lte.capture import _first
    from kedit_plugins.lte.packed import ValueRunner
    from kedit_plugins.lte.prompts import pad, pad_id

    model, tok, arch, specs, templates = _packed_case(kind)
    rows = [fact_row(tok, t, s, i, with_target=True) for i, s in enumerate(specs) for t in templates]
    g = torch.Generator().manual_seed(0)
    delta = (torch.randn(len(rows), 32, generator=g) * 3).requires_grad_(True)
    probe = torch.randn(32, generator=g)

    runner = ValueRunner(model, arch, rows, layer)
    active = torch.tensor([0, 2, 3, 5])  # a subset, as after some requests stopped early
    offset = runner.plan(active)
    need = torch.cat([offset[i] + torch.arange(len(rows[i].ids) - rows[i].lookup) for i in active.tolist()])
    fast = runner.hidden(delta[active], active, need.flip(0)).flip(0)  # any order of the tokens read
    ids, mask = pad(rows, pad_id(tok))
    look = torch.tensor([r.lookup for r in rows])
    rr = torch.arange(len(rows))

    def add(_m, _a, out):
        h = _first(out)
        return h.index_put((rr, look), h[rr, look] + delta)

    handle = model.get_submodule(f"{arch.layers}.{layer}").register_forward_hook(add)
    try:
        full = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        handle.remove()
    f_vals, s_vals = [], []
    for i in active.tolist():
        r = rows[i]
        for s in range(len(r.ids) - r.lookup):
            f_vals.append(full[i, r.lookup + s])
            s_vals.append(fast[len(s_vals)])
    f_vals, s_vals = torch.stack(f_vals), torch.stack(s_vals)
    torch.testing.assert_close(s_vals, f_vals, rtol=1e-4, atol=1e-5)
    (g_full,) = torch.autograd.grad((f_vals @ probe).square().sum(), [delta], retain_graph=True)
    (g_fast,) = torch.autograd.grad((s_vals @ probe).square().sum(), [delta])
    assert float(g_full.abs().sum()) > 0
    torch.testing.assert_close(g_fast, g_full, rtol=1e-4, atol=1e-5)


def test_fast_and_full_value_optimisation_agree():
    model, tok, arch, specs = _setup("llama")
    templates = context_templates(model, tok, [(4, 2)])
    opts = values.ValueOptions(**FAST_V)
    fast = values.optimize(model, tok, arch, specs, templates, "block", 1, opts, fast=True)
    full = values.optimize(model, tok, arch, specs, templates, "block", 1, opts, fast=False)
    torch.testing.assert_close(fast.z, full.z, rtol=1e-4, atol=1e-4)
    assert fast.nll == pytest.approx(full.nll, rel=1e-4)
