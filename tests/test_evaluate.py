"""Evaluators on a model whose probabilities are set by hand (a bigram table), so that every
metric has a value computed here independently of the code under test."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import needs_shared

from kedit.evaluate import Evaluation, mean_ci, model_fingerprint, resolve_evaluators, split_eval_list
from kedit.scoring import TeacherForced, target_ids
from kedit.spec import EditSpec
from kedit.testing import tiny_model, tiny_tokenizer
from kedit_plugins.fluency import generate_greedy, ngram_entropy
from kedit_plugins.glue import macro_f1


class BigramLM(torch.nn.Module):
    """Next-token logits depend only on the current token: ``table[token]``."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(vocab, vocab))

    def forward(self, input_ids, attention_mask=None, use_cache=False, logits_to_keep=0, **_):
        logits = self.table[input_ids]
        if isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep]
        elif logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits, past_key_values=None)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def one(tok, word: str) -> int:
    ids = target_ids(tok, word)
    assert len(ids) == 1, f"{word!r} must be one token for these hand computations"
    return ids[0]


def last(tok, prompt: str) -> int:
    return tok(prompt)["input_ids"][-1]


def softmax_row(model: BigramLM, token: int) -> torch.Tensor:
    return torch.softmax(model.table[token].detach().double(), -1)


SPEC = EditSpec(subject="France", prompt="The capital of {} is", target_new="Rome", target_true="Paris",
                paraphrases=["France's capital is"],
                neighborhood=[{"prompt": "The capital of Spain is", "target": "Italy"}])


def spec_with(update: dict) -> EditSpec:
    return EditSpec.model_validate({**SPEC.model_dump(exclude={"id"}), **update})


def make_model(tok, rome: float) -> BigramLM:
    """After ' is': Paris logit 2, Rome ``rome``, Italy 0.5, everything else 0."""
    m = BigramLM(len(tok))
    is_ = last(tok, "The capital of France is")
    with torch.no_grad():
        m.table[is_, one(tok, "Paris")] = 2.0
        m.table[is_, one(tok, "Rome")] = rome
        m.table[is_, one(tok, "Italy")] = 0.5
    return m


def run(tok, names, model, specs, edited=None):
    ev = Evaluation(resolve_evaluators(names), specs, use_cache=False)
    ev.base(model, tok)
    if edited is not None:
        ev.edited(edited, tok)
    return ev.summary()


def test_counterfact_by_hand(tok):
    base, edited = make_model(tok, 1.0), make_model(tok, 3.0)
    is_ = last(tok, SPEC.text)
    assert last(tok, SPEC.paraphrases[0]) == is_ and last(tok, "The capital of Spain is") == is_
    p0, p1 = softmax_row(base, is_), softmax_row(edited, is_)
    paris, rome, italy = one(tok, "Paris"), one(tok, "Rome"), one(tok, "Italy")
    out = run(tok, ["counterfact"], base, [SPEC], edited)
    b, e = out["base"]["counterfact"], out["metrics"]["counterfact"]
    assert b["ES"] == 0 and b["PS"] == 0
    # NS: does the neighbour's own target (Italy, logit 0.5) beat the new target?
    assert b["NS"] == 0 and b["NS"] == float(p0[italy] > p0[rome])
    assert e["ES"] == 1 and e["PS"] == 1 and e["NS"] == float(p1[italy] > p1[rome])
    assert e["EM"] == pytest.approx(float(p1[rome] - p1[paris]), abs=1e-6)
    assert b["EM"] == pytest.approx(float(p0[rome] - p0[paris]), abs=1e-6)
    assert e["NM"] == pytest.approx(float(p1[italy] - p1[rome]), abs=1e-6)
    assert out["delta"]["counterfact"]["ES"] == 1


def test_counterfact_ns_and_s(tok):
    spec = spec_with({"neighborhood": [{"prompt": "The capital of Spain is", "target": "Paris"}]})
    out = run(tok, ["counterfact"], make_model(tok, 3.0), [spec])
    m = out["metrics"]["counterfact"]
    assert (m["ES"], m["PS"], m["NS"]) == (1, 1, 0)  # Rome beats Paris everywhere, so the neighbour fails
    assert "S" not in m  # the harmonic mean with a zero is not reported as a number
    m2 = run(tok, ["counterfact"], make_model(tok, 1.0), [spec])["metrics"]["counterfact"]
    assert (m2["ES"], m2["NS"]) == (0, 1)


def test_token_accuracy_and_locality(tok):
    base, edited = make_model(tok, 1.0), make_model(tok, 3.0)
    out = run(tok, ["token-acc"], base, [SPEC], edited)
    # The argmax after ' is' is Paris before and Rome after the edit.
    assert out["base"]["token-acc"]["reliability"] == 0 and out["metrics"]["token-acc"]["reliability"] == 1
    assert out["metrics"]["token-acc"]["generalization"] == 1
    assert out["base"]["token-acc"]["locality"] == 1  # the base agrees with itself
    assert out["metrics"]["token-acc"]["locality"] == 0  # the neighbour's argmax moved from Paris to Rome
    assert "portability" not in out["metrics"]["token-acc"]
    spec = spec_with({"portability": [{"prompt": "Italy is", "target": "Rome"}]})
    assert run(tok, ["token-acc"], edited, [spec])["metrics"]["token-acc"]["portability"] == 1


def test_neighborhood_kl_by_hand(tok):
    base, edited = make_model(tok, 1.0), make_model(tok, 3.0)
    is_ = last(tok, SPEC.text)
    p, q = softmax_row(base, is_), softmax_row(edited, is_)
    expected = float((p * (p.log() - q.log())).sum())
    out = run(tok, ["neighborhood-kl"], base, [SPEC], edited)
    assert out["base"]["neighborhood-kl"]["kl"] == 0
    assert out["metrics"]["neighborhood-kl"]["kl"] == pytest.approx(expected, rel=1e-4)


def test_glue_generic_file_by_hand(tok, tmp_path):
    # After ' is' the model prefers Paris (2) over Rome (1): the prediction is always Paris.
    items = [{"prompt": "The capital of France is", "choices": ["Paris", "Rome"], "answer": a} for a in [0, 0, 0, 1]]
    path = tmp_path / "quiz.json"
    path.write_text(json.dumps(items))
    out = run(tok, [f"glue:data={path},sample=null"], make_model(tok, 1.0), [])
    m, info = out["metrics"]["glue"], out["info"]["glue"]["quiz"]
    assert m["quiz.acc"] == 0.75
    # macro-F1: class 0 has tp 3, fp 1, fn 0 -> 6/7; class 1 has tp 0 -> 0.
    assert m["quiz.f1"] == pytest.approx((6 / 7 + 0) / 2)
    assert info == {**info, "n": 4, "chance": 0.5, "majority": 0.75, "most_predicted_share": 1.0}
    lo, hi = out["ci"]["glue"]["quiz.acc"]
    assert lo < 0.75 < hi


def test_glue_sample_is_seeded(tok, tmp_path):
    items = [{"prompt": f"Item {i} is", "choices": ["Paris", "Rome"], "answer": i % 2} for i in range(50)]
    path = tmp_path / "many.json"
    path.write_text(json.dumps(items))
    from kedit_plugins.glue import discover, load_items

    (name, (p, fmt)), = discover(str(path), None).items()
    a, b = load_items(p, fmt, 10, 0, name), load_items(p, fmt, 10, 0, name)
    c = load_items(p, fmt, 10, 1, name)
    assert a == b and a != c and len(a) == 10


@needs_shared("glue", "the GLUE-style probe sets")
def test_glue_known_sets_load_with_their_labels():
    from pathlib import Path

    from kedit_plugins.glue import discover, load_items

    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
    sets = discover(str(folder), None)
    assert set(sets) == {"sst2", "sentiment", "cola", "mrpc", "rte", "nli", "mmlu", "dialogue"}
    for name, (path, fmt) in sets.items():
        items = load_items(path, fmt, 20, 0, name)
        assert len(items) == 20 and all(0 <= a < len(o) for _, o, a in items)
    # RTE's label 0 is entailment, which the template's "True" option stands for.
    rte = json.loads((folder / "rte.json").read_text())
    prompt, options, answer = sets["rte"][1](rte[0])
    assert options[answer] == ("True" if rte[0]["label"] == 0 else "False")


def test_perplexity_by_hand(tok, tmp_path):
    m = make_model(tok, 1.0)
    text = "The capital of France is Paris. The capital of Italy is Rome."
    path = tmp_path / "text.txt"
    path.write_text(text)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    window = 5
    nll, count = 0.0, 0
    for s in range(0, len(ids), window):
        chunk = ids[s:s + window]
        for a, b in zip(chunk, chunk[1:]):
            nll -= float(torch.log(softmax_row(m, a)[b]))
            count += 1
    out = run(tok, [f"perplexity:data={path},window={window}"], m, [])
    assert out["metrics"]["perplexity"]["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_ngram_entropy_by_hand():
    # words a b a b: bigrams ab, ba, ab (2/3, 1/3); trigrams aba, bab (1/2, 1/2).
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("x x x x x") == 0
    assert ngram_entropy("the cat sat on a mat") > ngram_entropy("the the the the the cat")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_generation_matches_a_manual_loop(kind, tok):
    model = tiny_model(kind)
    prompts = ["The capital of France is", "Paris", "The mother tongue of Danielle Darrieux is"]
    texts = generate_greedy(model, tok, prompts, max_new_tokens=6)
    for prompt, text in zip(prompts, texts):
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert text == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_teacher_forced_matches_a_full_forward(kind, tok):
    model = tiny_model(kind)
    long = "the cat sat on the mat and the dog " * 3
    pairs = [(long, o) for o in ["cat sat", "dog on the mat", "the"]] + [("The capital of", "France is"),
                                                                       ("Paris", "Rome")]
    for shared_min in (4, 10 ** 9):
        scores = TeacherForced(model, tok, shared_min=shared_min, token_budget=16).score(pairs)
        for (prompt, target), s in zip(pairs, scores):
            p, t = tok(prompt)["input_ids"], target_ids(tok, target)
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([p + t])).logits[0].float(), -1)
            expected = lp[torch.arange(len(p) - 1, len(p) - 1 + len(t)), torch.tensor(t)]
            assert torch.allclose(s.logprobs, expected, atol=1e-5)
            assert s.argmax.tolist() == lp[len(p) - 1: len(p) - 1 + len(t)].argmax(-1).tolist()


def test_cached_base_and_paired_interval(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_CACHE_DIR", str(tmp_path / "cache"))
    specs = [SPEC, spec_with({"id": "b", "target_new": "Italy"})]
    base, edited = make_model(tok, 1.0), make_model(tok, 3.0)
    chosen = resolve_evaluators(["counterfact"])
    first = Evaluation(chosen, specs)
    first.base(base, tok)
    second = Evaluation(chosen, specs)
    second.base(base, tok)
    assert not first.base_runs["counterfact"].cached and second.base_runs["counterfact"].cached
    assert second.base_runs["counterfact"].result.samples == first.base_runs["counterfact"].result.samples
    second.edited(edited, tok)
    out = second.summary()
    # ES per spec: base (0, 0); edited (1 for Rome, 0 for Italy whose logit 0.5 < Paris 2).
    assert out["metrics"]["counterfact"]["ES"] == 0.5 and out["delta"]["counterfact"]["ES"] == 0.5
    assert out["ci"]["counterfact"]["ES"] == list(mean_ci([1.0, 0.0], change=True))  # a paired change, in [-1, 1]
    assert -1 <= out["ci"]["counterfact"]["ES"][0] < 0.5 < out["ci"]["counterfact"]["ES"][1] <= 1
    assert model_fingerprint(base) != model_fingerprint(edited)


def test_mean_ci_and_split():
    # 0/1 outcomes: Wilson's score interval (hand computation: p = 73/75, z = 1.959964)
    z, p, n = 1.959964, 73 / 75, 75
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert mean_ci([1.0] * 73 + [0.0] * 2) == pytest.approx((centre - half, centre + half), rel=1e-6)
    assert mean_ci([1.0] * 20) == pytest.approx((20 / (20 + z * z), 1.0), rel=1e-6)  # all the same: still an interval
    lo, hi = mean_ci([0.0, 1.0, 1.0, 0.0])
    assert (lo + hi) / 2 == pytest.approx(0.5) and 0 < lo < 0.5 < hi < 1
    # the cases: a near-zero accuracy and a near-one score stay inside [0, 1]
    near_zero = mean_ci([0.1, 0.0, 0.0, 0.3, 0.0, 0.0, 0.0, 0.15, 0.0, 0.0])
    near_one = mean_ci([1.0] * 18 + [0.6, 0.9])
    assert 0 <= near_zero[0] < 0.055 < near_zero[1] <= 1 and 0 <= near_one[0] < 0.975 < near_one[1] <= 1
    # changes in [-1, 1] stay inside [-1, 1]; unbounded metrics keep the normal interval
    assert -1 <= mean_ci([1.0] * 15 + [0.0])[0] and mean_ci([1.0] * 15 + [0.0])[1] <= 1
    assert -1 <= mean_ci([-1.0] * 9 + [-0.5])[0]
    lo, hi = mean_ci([3.0, 5.0, 4.0])
    assert (lo, hi) == pytest.approx((4 - z * 1 / math.sqrt(3), 4 + z * 1 / math.sqrt(3)), rel=1e-6)
    assert mean_ci([1.0]) is None
    assert split_eval_list("counterfact,glue:sample=50,seed=1,fluency") == ["counterfact", "glue:sample=50,seed=1", "fluency"]
    assert macro_f1([0, 1, 1], [0, 1, 0], 2) == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_third_party_evaluator_goes_through_the_same_runner(tok):
    """An evaluator registered like any plugin gets the shared scorer, pairing and intervals."""
    import types

    from kedit import hookimpl
    from kedit.api import EvalResult, Evaluator
    from kedit.plugins import register_plugin, unregister_plugin

    class RomeFirst(Evaluator):
        name = "rome-first"
        protocol = "rome-first-v1"

        def evaluate(self, model, tokenizer, specs, options, context):
            lp = context.scorer.next_token_logprobs([s.text for s in specs])
            hits = [float(row.argmax() == one(tokenizer, "Rome")) for row in lp]
            return EvalResult({"share": sum(hits) / len(hits)}, samples={"share": hits})

    module = types.ModuleType("rome_first_plugin")
    module.register_evaluators = hookimpl(lambda register: register(RomeFirst))
    register_plugin(module, "rome-first-plugin", package="kedit-rome-first")
    try:
        out = run(tok, ["rome-first"], make_model(tok, 1.0), [SPEC, spec_with({"target_new": "Italy"})],
                  make_model(tok, 3.0))
    finally:
        unregister_plugin("rome-first-plugin")
    assert out["base"]["rome-first"]["share"] == 0 and out["metrics"]["rome-first"]["share"] == 1
    assert out["ci"]["rome-first"]["share"] == [1.0, 1.0]  # both items moved by exactly one
    assert out["protocols"]["rome-first"] == "rome-first-v1"


def test_several_data_paths_go_by_kind(tmp_path):
    from kedit.errors import InputError

    folder, text = tmp_path / "sets", tmp_path / "text.txt"
    folder.mkdir()
    text.write_text("some text")
    chosen = {c.name: c.options.data for c in resolve_evaluators(["glue,perplexity"], [str(text), str(folder)])}
    assert chosen == {"glue": str(folder), "perplexity": str(text)}
    with pytest.raises(InputError, match="perplexity:data=PATH"):
        resolve_evaluators(["perplexity"], [str(text), str(text)])
