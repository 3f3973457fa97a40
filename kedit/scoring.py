"""Target probabilities under teacher forcing, the quantity every edit report starts from.

P(target | prompt) = exp(mean log-prob of the target's tokens), as in CounterFact scoring.
Batches are right-padded so token positions are plain offsets.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch


def target_ids(tokenizer: Any, target: str) -> list[int]:
    """Token ids of `` target`` (leading space), without BOS or other special tokens."""
    ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    return ids


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    return tokenizer(prompt)["input_ids"]


def teacher_forced_batch(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str]):
    """``input_ids``, ``attention_mask`` (right-padded) and, per row, the positions whose logits
    predict each target token and the target token ids."""
    rows, spans = [], []
    for prompt, target in zip(prompts, targets):
        p, t = prompt_ids(tokenizer, prompt), target_ids(tokenizer, target)
        if not t:
            raise ValueError(f"target {target!r} tokenizes to nothing")
        rows.append(p + t[:-1])
        spans.append((list(range(len(p) - 1, len(p) - 1 + len(t))), t))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return input_ids, mask, spans


def target_logprobs(logits: torch.Tensor, spans) -> list[torch.Tensor]:
    """Per row, the log-probabilities of its target tokens."""
    out = []
    for i, (pos, toks) in enumerate(spans):
        lp = torch.log_softmax(logits[i, pos].float(), dim=-1)
        out.append(lp[torch.arange(len(toks)), torch.tensor(toks)])
    return out


@torch.no_grad()
def target_probs(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str],
                 batch_size: int = 32) -> list[float]:
    """P(target | prompt) for each pair."""
    out: list[float] = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        ids, mask, spans = teacher_forced_batch(tokenizer, prompts[start:start + batch_size],
                                                targets[start:start + batch_size])
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        out.extend(float(lp.mean().exp()) for lp in target_logprobs(logits, spans))
    return out


def counterfact_scores(model: torch.nn.Module, tokenizer: Any, specs: Sequence[Any]) -> dict[str, float]:
    """ES / PS / NS by probability comparison (algorithms.md §4.1): the fraction of edit prompts
    (paraphrases, averaged within a spec first) where P(new) > P(true), and of neighbourhood
    prompts where P(true) > P(new). Specs without ``target_true`` are skipped."""
    specs = [s for s in specs if s.target_true]
    es_p, ps_p, ns_p = [], [], []
    for i, s in enumerate(specs):
        es_p.append((i, s.text, s.target_new, s.target_true))
        ps_p += [(i, p, s.target_new, s.target_true) for p in s.paraphrases]
        ns_p += [(i, n.prompt, s.target_new, n.target) for n in s.neighborhood]

    def wins(pairs, new_wins: bool) -> float:
        if not pairs:
            return float("nan")
        a = target_probs(model, tokenizer, [p for _, p, _, _ in pairs], [n for _, _, n, _ in pairs])
        b = target_probs(model, tokenizer, [p for _, p, _, _ in pairs], [t for _, _, _, t in pairs])
        per: dict[int, list[bool]] = {}
        for (i, *_), x, y in zip(pairs, a, b):
            per.setdefault(i, []).append(x > y if new_wins else y > x)
        return sum(sum(v) / len(v) for v in per.values()) / len(per)

    return {"ES": wins(es_p, True), "PS": wins(ps_p, True), "NS": wins(ns_p, False)}


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer: Any, text: str, window: int = 512) -> float:
    """Perplexity of ``text`` over non-overlapping windows of ``window`` tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start:start + window]], device=device)
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
    return float(torch.exp(torch.tensor(nll / count)))
