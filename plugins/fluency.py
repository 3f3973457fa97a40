"""``fluency``: weighted 2/3-gram entropy of greedy continuations (ROME's generation entropy).

An edit that makes a model repeat itself lowers the entropy long before it changes any single
prediction a probe would catch.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Literal

from pydantic import Field

from kedit.api import EvalResult, Evaluator, Options, hookimpl

WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """mean_n(w_n · H_n) with H_n the entropy in bits of the n-gram frequencies of the word tokens."""
    words = WORD.findall(text.lower())
    parts = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        parts.append(w * h)
    return sum(parts) / len(parts)


class FluencyOptions(Options):
    max_new_tokens: int = Field(100, ge=1, le=2048, description="tokens generated greedily per prompt")
    prompts: Literal["auto", "generation", "edit"] = Field(
        "auto", description="generation: the specs' generation_prompts; edit: their edit prompts; "
        "auto: generation_prompts where a spec has them, else its edit prompt")
    per_spec: int = Field(2, ge=1, description="at most this many prompts per spec")


class Fluency(Evaluator):
    """Weighted 2/3-gram entropy (bits) of greedy continuations of generation prompts."""

    name = "fluency"
    protocol = ("ngram-entropy-v1: greedy decoding, max_new_tokens per prompt; (2/3·H2 + 4/3·H3)/2 in bits "
                "over lower-cased word tokens of prompt + continuation; per spec then across specs "
                "(ROME tables print this x100)")
    Options = FluencyOptions

    def evaluate(self, model, tokenizer, specs, options, context) -> EvalResult:
        owners, prompts = [], []
        for i, s in enumerate(specs):
            chosen = [s.text] if options.prompts == "edit" else s.generation_prompts
            if options.prompts == "auto" and not chosen:
                chosen = [s.text]
            for p in chosen[: options.per_spec]:
                owners.append(i)
                prompts.append(p)
        texts = generate_greedy(model, tokenizer, prompts, options.max_new_tokens, context.progress)
        per: dict[int, list[float]] = {}
        for i, t in zip(owners, texts):
            per.setdefault(i, []).append(ngram_entropy(t))
        values = [sum(v) / len(v) for v in per.values()]
        if not values:
            return EvalResult({}, {}, {"prompts": 0})
        return EvalResult({"entropy": sum(values) / len(values)}, {"entropy": values},
                          {"prompts": len(prompts), "specs": len(values), "max_new_tokens": options.max_new_tokens})


def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, progress=None) -> list[str]:
    """Prompt + greedy continuation for each prompt. Prompts are grouped by token length, so no
    batch needs padding and every position is exact."""
    import torch

    with torch.no_grad():
        return _generate(model, tokenizer, prompts, max_new_tokens, progress)


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, progress=None) -> list[str]:
    import torch

    device = next(model.parameters()).device
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(ids):
        groups.setdefault(len(r), []).append(i)
    out: list[str] = [""] * len(prompts)
    batches = [g[k:k + 32] for g in groups.values() for k in range(0, len(g), 32)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for batch in (progress(batches, desc="generating", unit="batch") if progress else batches):
        x = torch.tensor([ids[i] for i in batch], device=device)
        y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                           max_new_tokens=max_new_tokens, pad_token_id=pad)
        for i, row in zip(batch, y):
            out[i] = tokenizer.decode(row, skip_special_tokens=True)
    return out


@hookimpl
def register_evaluators(register):
    register(Fluency)
