"""Sequential editing on a tiny Llama: chain semantics, --continue equality, D4S's batch
equivalence and exact single-edit removal, weight drift and the evaluation schedule."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from kedit import diff as diffmod

FAST = {"layers": [1, 2], "v_steps": 4}
EXACT = {"keys": "base", "residual": "once"}  # d4s's mode whose sequence is its batch and whose removal is exact
NAMES = ["France", "Spain", "Italy", "Chile", "Peru"]
TARGETS = ["Rome", "Berlin", "Oslo", "Lima", "Quito"]


def _specs(idx):
    return [{"id": f"s{i}", "subject": NAMES[i], "prompt": "The capital of {} is", "target_new": TARGETS[i],
             "target_true": "Paris", "paraphrases": [f"{NAMES[i]}'s capital is"],
             "neighborhood": [{"prompt": "The capital of Japan is", "target": "Tokyo"}]} for i in idx]


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_dirs):
    monkeypatch.setenv("KEDIT_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(["The cat sat on the mat.", "Paris is the capital of France.",
                                   "Rome is a city in Italy with many old churches."] * 40))
    return {"tmp": tmp_path, "model": str(tiny_dirs["llama"]), "corpus": str(corpus)}


def _config(env, **kw):
    from kedit.config import RunConfig, StatsConfig

    return RunConfig(model=env["model"], stats=StatsConfig(env["corpus"], 1500), quiet=True, **kw)


def _run(env, idx, out, editor="memit", batch_size=2, name="specs", options=None, evaluators=(), **kw):
    from kedit.config import EditJob, RunConfig
    from kedit.workflows import apply

    spec = write_jsonl(env["tmp"] / f"{name}.jsonl", _specs(idx))
    if kw.get("continue_chain"):
        return apply(EditJob(spec, **kw), RunConfig(model=env["model"], quiet=True))
    options = {**FAST, **(options or {})}
    job = EditJob(spec, editor, options, mode="sequential", out=out, batch_size=batch_size, **kw)
    return apply(job, _config(env, evaluators=evaluators))


def _final_weights(env, chain_dir):
    from kedit.models import load
    from kedit.sequence import Chain

    model, _, _ = load(env["model"], quiet=True)
    for d in Chain.open(chain_dir).diffs():
        diffmod.apply(model, d)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_chain_links_each_batch_to_the_last_and_squash_equals_it(env):
    from kedit.sequence import Chain

    res = _run(env, [0, 1, 2, 3, 4], env["tmp"] / "chain", batch_size=2)
    chain = Chain.open(res["chain"])
    assert [s["specs"] for s in chain.steps] == [["s0", "s1"], ["s2", "s3"], ["s4"]]
    diffs = chain.diffs()  # check_chain: each diff names the one before as its parent
    assert diffs[0].manifest["parents"] == [] and all(d.manifest["parents"] == [p.id] for p, d in zip(diffs, diffs[1:]))
    assert [d.manifest["sequence"]["edits"] for d in diffs] == [2, 4, 5]
    squashed = _run(env, [0, 1, 2, 3, 4], env["tmp"] / f"sq{diffmod.SUFFIX}", batch_size=2, squash=True)
    from kedit.models import load

    model, _, _ = load(env["model"], quiet=True)
    diffmod.apply(model, diffmod.read(squashed["diff"]))
    final = _final_weights(env, res["chain"])
    for n, p in model.named_parameters():
        assert torch.allclose(p, final[n], atol=1e-6, rtol=0), n
    assert len(diffmod.read(squashed["diff"]).manifest["sequence"]["steps"]) == 3


def test_sequential_batch_of_all_equals_batch_mode(env):
    from kedit.config import EditJob
    from kedit.workflows import apply

    seq = _run(env, [0, 1, 2], env["tmp"] / "chain", batch_size=3)
    spec = write_jsonl(env["tmp"] / "b.jsonl", _specs([0, 1, 2]))
    one = apply(EditJob(spec, "memit", dict(FAST), out=env["tmp"] / f"b{diffmod.SUFFIX}"), _config(env))
    a = diffmod.read(Path(seq["chain"]) / "step-0001.kedit.safetensors")
    b = diffmod.read(one["diff"])
    assert a.deltas.keys() == b.deltas.keys()
    for n in a.deltas:  # the same computation: bit-identical results
        assert a.manifest["entries"][n]["post_sha256"] == b.manifest["entries"][n]["post_sha256"]


def test_d4s_sequence_equals_one_batch_over_all_edits(env):
    seq = _run(env, [0, 1, 2, 3], env["tmp"] / "seq", editor="d4s", batch_size=1, options=EXACT)
    batch = _run(env, [0, 1, 2, 3], env["tmp"] / "batch", editor="d4s", batch_size=4, options=EXACT)
    w1, w2 = _final_weights(env, seq["chain"]), _final_weights(env, batch["chain"])
    for n in w1:
        assert torch.allclose(w1[n], w2[n], atol=2e-6, rtol=1e-5), n


def test_d4s_removing_one_edit_matches_never_making_it(env):
    from kedit.sequence import Chain
    from kedit.workflows import remove_from_chain

    full = _run(env, [0, 1, 2, 3], env["tmp"] / "full", editor="d4s", options=EXACT)
    r = remove_from_chain(full["chain"], ["s1"], _config(env))
    assert r["removes"] == ["s1"] and r["edits"] == 3
    chain = Chain.open(full["chain"])
    assert chain.spec_ids() == ["s0", "s2", "s3"] and chain.diffs()[-1].manifest["removes"] == ["s1"]
    without = _run(env, [0, 2, 3], env["tmp"] / "without", editor="d4s", name="without", options=EXACT)
    w1, w2 = _final_weights(env, full["chain"]), _final_weights(env, without["chain"])
    for n in w1:
        assert torch.allclose(w1[n], w2[n], atol=2e-6, rtol=1e-5), n
    s1, s2 = chain.state(), Chain.open(without["chain"]).state()
    for k in s1:
        # keys and z come from float32 forwards whose batches differ: equal to float32 precision
        assert float((s1[k] - s2[k]).abs().max()) <= 1e-4 * float(s2[k].abs().max()), k
    with pytest.raises(Exception, match="no edit 's1' in effect"):
        remove_from_chain(full["chain"], ["s1"], _config(env))


def test_removal_is_refused_for_an_editor_without_sums(env, run_cli):
    res = _run(env, [0, 1], env["tmp"] / "m")
    code, _, err = run_cli("diff", "revert", "--edit", "s0", res["chain"], "--model", env["model"])
    assert code == 2 and "cannot remove single edits" in err


def test_drift_is_recorded_after_every_batch_and_matches_the_weights(env):
    from kedit.models import load
    from kedit.sequence import Chain

    res = _run(env, [0, 1, 2, 3], env["tmp"] / "c", batch_size=2)
    chain = Chain.open(res["chain"])
    model, _, _ = load(env["model"], quiet=True)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step, d in zip(chain.steps, chain.diffs()):
        diffmod.apply(model, d)
        assert d.manifest["sequence"]["drift"] == step["drift"]
        for name, row in step["drift"].items():
            w, w0 = model.get_parameter(name).detach().double(), base[name].double()
            dw = (w - w0).abs()
            assert row["mean_abs_w"] == pytest.approx(float(w.abs().mean()))
            assert row["mean_abs_dw"] == pytest.approx(float(dw.mean()))
            assert row["l1_distance"] == pytest.approx(float(dw.sum()))
            assert row["share_rel_gt_0.077"] == pytest.approx(float((dw / w0.abs() > 0.077).double().mean()))
            assert row["share_rel_gt_0.171"] <= row["share_rel_gt_0.077"]
    assert set(res["steps"][-1]["drift"]) == {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}


def test_evaluation_schedule_and_forgetting(env):
    res = _run(env, [0, 1, 2, 3, 4], env["tmp"] / "e", batch_size=2, evaluators=["counterfact"],
               eval_at=["immediate,every:3", "final"])
    points = [(p["at"], p["edits"], p["specs"]) for p in res["evaluation"]]
    assert points == [("immediate", 2, 2), ("immediate", 4, 2), ("every", 4, 4), ("immediate", 5, 1), ("final", 5, 5)]
    imm = [p for p in res["evaluation"] if p["at"] == "immediate"]
    final = res["evaluation"][-1]["metrics"]["counterfact"]
    expect = sum(p["metrics"]["counterfact"]["ES"] * p["specs"] for p in imm) / 5
    assert res["forgetting"]["counterfact.ES"]["immediate"] == pytest.approx(expect)
    assert res["forgetting"]["counterfact.ES"]["gap"] == pytest.approx(expect - final["ES"])
    chain = json.loads((Path(res["chain"]) / "chain.json").read_text())
    assert chain["forgetting"] == res["forgetting"] and len(chain["evaluation"]) == 5


def test_sequence_cli_paths_and_errors(env, run_cli):
    spec = write_jsonl(env["tmp"] / "c.jsonl", _specs([0, 1]))
    opts = ["-o", "layers", "[1,2]", "-o", "v_steps", "3", "--corpus", env["corpus"], "--stats-tokens", "1500"]
    code, out, err = run_cli("apply", spec, "--plugin", "memit", "--model", env["model"], "--mode", "sequential",
                             "--batch-size", "1", "--out", env["tmp"] / "cli", *opts)
    assert code == 0, err
    assert "mean|ΔW|" in out and "2 batches of up to 1" in out
    code, _, err = run_cli("apply", spec, "--plugin", "memit", "--model", env["model"], "--mode", "sequential",
                           "--out", env["tmp"] / "cli", *opts)
    assert code == 2 and "already holds a chain" in err
    code, _, err = run_cli("apply", spec, "--plugin", "d4s", "--continue", env["tmp"] / "cli")
    assert code == 2 and "made with 'memit'" in err
    code, _, err = run_cli("apply", spec, "--plugin", "memit", "--batch-size", "2", "--model", env["model"])
    assert code == 2 and "--mode sequential" in err
    code, _, err = run_cli("apply", spec, "--plugin", "memit", "--mode", "sequential", "--eval-at", "sometimes",
                           "--model", env["model"])
    assert code == 2 and "immediate, final or every:N" in err


def test_nse_updates_only_the_selected_key_dimensions(env):
    from kedit.arch import arch_for
    from kedit.delta import to_dense
    from kedit.models import load
    from kedit.sequence import Chain

    res = _run(env, [0, 1], env["tmp"] / "n", editor="nse", options={"neuron_threshold": 0.5})
    model, _, _ = load(env["model"], quiet=True)
    arch = arch_for(model)
    (d,) = Chain.open(res["chain"]).diffs()
    for name, delta in d.deltas.items():
        dw = arch.to_out_in(to_dense(delta, torch.float64))  # (d_out, d_k)
        used = int((dw.abs().sum(dim=0) > 0).sum())
        assert 0 < used < dw.shape[1] * 0.75, (name, used)  # half of Σ|K| needs well under all columns
    assert set(Chain.open(res["chain"]).state()) == {"nse.kk.1", "nse.kk.2"}


def test_rect_in_the_loop_masks_each_layer_before_the_next_is_solved(env):
    from kedit.delta import to_dense
    from kedit.editing import EditPlan, compute_diff
    from kedit.models import load
    from kedit.spec import EditSpec
    from kedit.stats import KeyStats

    loaded = load(env["model"])
    specs = [EditSpec(**s) for s in _specs([0, 1])]
    stats = KeyStats(corpus=env["corpus"], n_tokens=1500)
    runs = {flag: compute_diff(loaded, specs, EditPlan.make(loaded.model, "memit", dict(FAST), ["rect:0.4"], flag,
                                                            stats=stats)) for flag in (False, True)}
    first, second = sorted(runs[True].deltas)
    assert runs[True].manifest["regularized_in_loop"] == [first, second]
    assert "regularized_in_loop" not in runs[False].manifest
    for d in runs.values():
        for delta in d.deltas.values():
            assert int((to_dense(delta) != 0).sum()) == round(0.4 * to_dense(delta).numel())  # exact fraction
    # the first layer is solved before anything was masked: the same; the second sees the mask
    assert torch.equal(to_dense(runs[True].deltas[first]), to_dense(runs[False].deltas[first]))
    assert not torch.equal(to_dense(runs[True].deltas[second]), to_dense(runs[False].deltas[second]))


def test_a_new_sequence_takes_the_whole_builtin_corpus_unless_told(env, monkeypatch):
    from kedit import stats as statsmod
    from kedit.config import EditJob, RunConfig, StatsConfig
    from kedit.sequence import Chain
    from kedit.workflows import apply, sequence_stats

    big = statsmod.SEQUENCE_BUILTIN_TOKENS
    assert big > statsmod.DEFAULT_BUILTIN_TOKENS
    assert sequence_stats(RunConfig()).stats.n_tokens == big
    assert sequence_stats(RunConfig(stats=StatsConfig("builtin"))).stats.n_tokens == big
    assert sequence_stats(RunConfig(stats=StatsConfig("builtin", 5000))).stats.n_tokens == 5000  # asked for
    assert sequence_stats(RunConfig(stats=StatsConfig(env["corpus"]))).stats.n_tokens is None  # a file's own default
    monkeypatch.setattr(statsmod, "SEQUENCE_BUILTIN_TOKENS", 900)  # the wiring, at a budget a test can afford
    spec = write_jsonl(env["tmp"] / "bi.jsonl", _specs([0, 1]))
    res = apply(EditJob(spec, "memit", dict(FAST), mode="sequential", out=env["tmp"] / "bi", batch_size=1),
                RunConfig(model=env["model"], quiet=True))
    chain = Chain.open(res["chain"])
    assert chain.record["stats"]["n_tokens"] == 900 and chain.record["stats"]["corpus"] == "builtin"
    assert chain.diffs()[0].manifest["stats"]["n_tokens_requested"] == 900
