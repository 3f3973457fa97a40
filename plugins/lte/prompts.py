"""Context templates and token bookkeeping (fact-token positions, target positions), right-padded."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from kedit.hashing import tensor_sha256, tokenizer_sha256
from kedit.scoring import target_ids
from kedit.spec import EditSpec

_TEMPLATE_CACHE: dict[tuple, list[str]] = {}

MEMIT_SEEDS = ("The", "Therefore", "Because", "I", "You")


def context_templates(model: torch.nn.Module, tok: Any, groups: Sequence[tuple[int, int]],
                      seed: int = 0, seed_words: Sequence[str] = MEMIT_SEEDS) -> list[str]:
    """``["{}"]`` plus, for each ``(n_tokens, count)`` group, ``count`` seeded samples of ``n_tokens``
    tokens from the model, each followed by ``". {}"``.

    Cached per process by the embedding matrix's hash (MLP edits never change it) and the
    tokenizer's content hash, so a sequence of edits keeps using the base model's templates.
    """
    emb = model.get_input_embeddings().weight
    key = (tensor_sha256(emb), tokenizer_sha256(tok), tuple(groups), seed, tuple(seed_words))
    if key not in _TEMPLATE_CACHE:
        out = ["{}"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for n_tokens, count in groups:
                words = [seed_words[i % len(seed_words)] for i in range(count)]
                side, tok.padding_side = tok.padding_side, "left"  # generation continues from the right end
                try:
                    batch = tok(words, return_tensors="pt", padding=True).to(emb.device)
                finally:
                    tok.padding_side = side
                pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
                with torch.no_grad():
                    gen = model.generate(**batch, do_sample=True, top_k=5, max_new_tokens=n_tokens,
                                         min_new_tokens=n_tokens, pad_token_id=pad)
                for g, w in zip(gen, words):
                    text = w + tok.decode(g[batch["input_ids"].shape[1]:], skip_special_tokens=True)
                    text = text.replace("{", " ").replace("}", " ").replace("\n", " ").strip()
                    out.append(text + ". {}")
        _TEMPLATE_CACHE[key] = out
    return list(_TEMPLATE_CACHE[key])


def template_weights(groups: Sequence[tuple[int, int]], mode: str = "grouped") -> list[float]:
    """Per template of :func:`context_templates` (``"{}"`` first, then each group's samples), its
    weight in a request's averaged key.

    ``grouped`` (the MEMIT reference): the mean within each group (``"{}"`` alone is a group),
    then the mean over groups, so the plain prompt weighs 1/(groups + 1); ``uniform``: one mean
    over all templates.
    """
    sizes = [1] + [count for _, count in groups]
    if mode == "uniform":
        return [1.0 / sum(sizes)] * sum(sizes)
    if mode != "grouped":
        raise ValueError(f"key averaging {mode!r}: expected grouped or uniform")
    return [1.0 / (len(sizes) * size) for size in sizes for _ in range(size)]


def key_rows(tok: Any, specs: Sequence[EditSpec], templates: Sequence[str], weights: Sequence[float]) -> list["Row"]:
    """Every spec filled into every template (request-major), each row weighted for averaging."""
    if len(weights) != len(templates):
        raise ValueError(f"{len(weights)} template weights for {len(templates)} templates")
    rows = []
    for i, spec in enumerate(specs):
        for t, w in zip(templates, weights):
            row = fact_row(tok, t, spec, i, with_target=False)
            row.weight = w
            rows.append(row)
    return rows


def templates_sha256(templates: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(templates).encode()).hexdigest()


def subject_last_token(tok: Any, text: str, subject_end: int) -> tuple[list[int], int]:
    """Token ids of ``text`` and the index of the last token that starts before ``subject_end``."""
    enc = tok(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    last = max(i for i, (s, e) in enumerate(offsets) if e > s and s < subject_end)
    return ids, last


@dataclass
class Row:
    request: int
    ids: list[int]
    lookup: int
    targets: list[int] = field(default_factory=list)  # token ids predicted...
    target_pos: list[int] = field(default_factory=list)  # ...from these positions
    head: str = ""  # the context template's text before the prompt: rows sharing it share leading tokens
    weight: float = 1.0  # this row's weight when keys are averaged per request (:func:`key_rows`)


def fact_row(tok: Any, template: str, spec: EditSpec, request: int, with_target: bool) -> Row:
    """``template`` (with ``{}`` for the prompt) filled with ``spec``'s prompt and subject; with
    ``with_target``, the target's tokens but the last are appended (teacher forcing)."""
    head, _, tail = template.partition("{}")
    before, _, after = spec.prompt.partition("{}")
    text = head + before + spec.subject + after + tail
    ids, lookup = subject_last_token(tok, text, len(head) + len(before) + len(spec.subject))
    row = Row(request, ids, lookup, head=head)
    if with_target:
        tgt = target_ids(tok, spec.target_new)
        row.ids = ids + tgt[:-1]
        row.targets = tgt
        row.target_pos = list(range(len(ids) - 1, len(ids) - 1 + len(tgt)))
    return row


def kl_row(tok: Any, spec: EditSpec, request: int) -> Row:
    """``"{subject} is a"``: the prompt whose next-token distribution the KL term keeps in place."""
    ids, lookup = subject_last_token(tok, f"{spec.subject} is a", len(spec.subject))
    return Row(request, ids, lookup)


def pad(rows: Sequence[Row], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask``."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.ids)] = torch.tensor(r.ids)
        mask[i, : len(r.ids)] = 1
    return ids.to(device), mask.to(device)


def pad_id(tok: Any) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
