"""Edit metrics read from the specs: ``counterfact`` (probability comparison), ``token-acc``
(EasyEdit's teacher-forced token accuracy) and ``neighborhood-kl``.

Every metric is averaged within a spec first, then across specs (CounterFact's metrics as in Meng et al. 2022; token accuracy as in EasyEdit), and
the per-spec values are returned as samples so the host can pair them for intervals.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from kedit.api import EditSpec, EvalContext, EvalResult, Evaluator, hookimpl

if TYPE_CHECKING:
    import torch

    from kedit.scoring import TeacherForced


def _per_spec(groups: Sequence[list[float]]) -> tuple[float, list[float]]:
    """Mean of per-spec means over specs that have any value."""
    per = [sum(g) / len(g) for g in groups if g]
    return (sum(per) / len(per) if per else float("nan")), per


def _scorer(context: EvalContext, model: "torch.nn.Module", tok: Any) -> "TeacherForced":
    from kedit.scoring import TeacherForced

    return context.scorer if context.scorer is not None else TeacherForced(model, tok)


def counterfact_result(scorer: "TeacherForced", specs: Sequence[EditSpec]) -> EvalResult:
    """ES/PS/NS (fractions of wins), EM/PM/NM (mean probability margins) and S (their harmonic mean)."""
    specs = [s for s in specs if s.target_true]
    pairs = []
    for s in specs:
        for p in [s.text, *s.paraphrases]:
            pairs += [(p, s.target_new), (p, s.target_true)]
        for n in s.neighborhood:
            pairs += [(n.prompt, s.target_new), (n.prompt, n.target)]
    scores = iter(scorer.score(pairs))
    groups: dict[str, list[list[float]]] = {k: [] for k in ("ES", "EM", "PS", "PM", "NS", "NM")}
    for s in specs:
        # (score, margin, prompts, sign): sign +1 when the new target should win, -1 when the old one should.
        for win, margin, count, sign in (("ES", "EM", 1, 1), ("PS", "PM", len(s.paraphrases), 1),
                                         ("NS", "NM", len(s.neighborhood), -1)):
            diffs = [sign * (next(scores).prob - next(scores).prob) for _ in range(count)]
            groups[win].append([float(d > 0) for d in diffs])
            groups[margin].append(diffs)
    metrics, samples = {}, {}
    for k, g in groups.items():
        metrics[k], per = _per_spec(g)
        if per:
            samples[k] = per
    parts = [metrics[k] for k in ("ES", "PS", "NS") if k in samples]
    if parts and all(p > 0 for p in parts):
        metrics["S"] = len(parts) / sum(1 / p for p in parts)
    metrics = {k: v for k, v in metrics.items() if k == "S" or k in samples}
    info = {"specs": len(specs), "paraphrases": sum(len(s.paraphrases) for s in specs),
            "neighborhood": sum(len(s.neighborhood) for s in specs)}
    return EvalResult(metrics, samples, info)


class CounterFactEval(Evaluator):
    """CounterFact ES/PS/NS by probability comparison, with magnitudes EM/PM/NM and S."""

    name = "counterfact"
    default = True
    edit_metrics = ("ES", "PS", "NS")
    headline = ("ES", "PS", "NS")
    protocol = ("counterfact-prob-v1: P = exp(mean token log-prob) of ' target' after the prompt, teacher forced; "
                "ES/PS: share with P(new) > P(true), NS: share with P(true) > P(new); margins EM/PM/NM; "
                "per spec then across specs; specs without target_true skipped")

    def evaluate(self, model, tokenizer, specs, options, context) -> EvalResult:
        return counterfact_result(_scorer(context, model, tokenizer), specs)


def _locality_pairs(specs: Sequence[EditSpec]) -> list[tuple[str, str]]:
    return [(n.prompt, n.target) for s in specs for n in s.neighborhood]


class TokenAccuracy(Evaluator):
    """EasyEdit-style teacher-forced token accuracy: reliability, generalization, locality, portability."""

    name = "token-acc"
    default = True
    edit_metrics = ("reliability", "generalization", "locality", "portability")
    protocol = ("easyedit-token-acc-v1: share of target tokens that are the argmax given the prompt and the "
                "earlier target tokens (teacher forced, right padded); locality: share of positions where the "
                "edited argmax equals the unedited argmax; per spec then across specs")

    def reference(self, model, tokenizer, specs, options, context) -> list[list[int]]:
        scores = _scorer(context, model, tokenizer).score(_locality_pairs(specs))
        return [s.argmax.tolist() for s in scores]

    def evaluate(self, model, tokenizer, specs, options, context) -> EvalResult:
        import torch

        scorer = _scorer(context, model, tokenizer)
        groups: dict[str, list[list[float]]] = {"reliability": [], "generalization": [], "locality": [],
                                                "portability": []}
        base_argmax = iter(context.reference if context.reference is not None else
                           self.reference(model, tokenizer, specs, options, context))
        loc = iter(scorer.score(_locality_pairs(specs)))
        # every pair in one batched pass; the per-spec lookups below then read the scorer's memo
        scorer.score([(s.text, s.target_new) for s in specs] + [(p, s.target_new) for s in specs for p in s.paraphrases]
                     + [(p.prompt, p.target) for s in specs for p in s.portability])
        for s in specs:
            groups["reliability"].append([scorer.score([(s.text, s.target_new)])[0].token_acc])
            groups["generalization"].append([x.token_acc for x in scorer.score([(p, s.target_new) for p in s.paraphrases])])
            agree = []
            for _ in s.neighborhood:
                now, before = next(loc).argmax, torch.tensor(next(base_argmax))
                agree.append(float((now == before).double().mean()))
            groups["locality"].append(agree)
            groups["portability"].append([x.token_acc for x in scorer.score([(p.prompt, p.target) for p in s.portability])])
        metrics, samples = {}, {}
        for k, g in groups.items():
            value, per = _per_spec(g)
            if per:
                metrics[k], samples[k] = value, per
        return EvalResult(metrics, samples, {"specs": len(specs)})


class NeighborhoodKL(Evaluator):
    """KL(unedited ‖ edited) of the next-token distribution after each neighbourhood prompt."""

    name = "neighborhood-kl"
    protocol = ("neighborhood-kl-v1: KL(p_unedited || p_edited) in nats over the full vocabulary, next token "
                "after each neighbourhood prompt; per spec then across specs")

    def reference(self, model, tokenizer, specs, options, context) -> "torch.Tensor":
        import torch

        prompts = [n.prompt for s in specs for n in s.neighborhood]
        return _scorer(context, model, tokenizer).next_token_logprobs(prompts) if prompts else torch.empty(0)

    def evaluate(self, model, tokenizer, specs, options, context) -> EvalResult:
        base = context.reference if context.reference is not None else self.reference(model, tokenizer, specs,
                                                                                      options, context)
        prompts = [n.prompt for s in specs for n in s.neighborhood]
        if not prompts:
            return EvalResult({}, {}, {"specs": len(specs), "prompts": 0})
        now = _scorer(context, model, tokenizer).next_token_logprobs(prompts)
        kl = (base.double().exp() * (base.double() - now.double())).sum(-1).clamp_min(0).tolist()
        it = iter(kl)
        groups = [[next(it) for _ in s.neighborhood] for s in specs]
        value, per = _per_spec(groups)
        return EvalResult({"kl": value, "kl_max": max(kl)}, {"kl": per}, {"specs": len(specs), "prompts": len(prompts)})


@hookimpl
def register_evaluators(register):
    register(CounterFactEval)
    register(TokenAccuracy)
    register(NeighborhoodKL)


def counterfact_scores(model: "torch.nn.Module", tokenizer: Any, specs: Sequence[EditSpec]) -> dict[str, float]:
    """ES/PS/NS and their companions for a model as it is (the benches' shortcut)."""
    from kedit.scoring import TeacherForced

    return counterfact_result(TeacherForced(model, tokenizer), specs).metrics
