"""``perplexity``: perplexity of a local text file, the cheapest general-ability drift signal."""
from __future__ import annotations

import math
from pathlib import Path

from pydantic import Field

from kedit.api import EvalResult, Evaluator, InputError, Options, hookimpl


class PerplexityOptions(Options):
    data: str = Field(..., description="text file (.txt/.raw), or .json/.jsonl records with a \"text\" field")
    window: int = Field(512, ge=2, description="tokens per non-overlapping window")
    max_tokens: int | None = Field(32768, ge=16, description="read at most this many tokens of the text "
                                   "(null: all of it)")


def read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"perplexity: data {path}: no such file")
    if p.suffix.lower() in (".json", ".jsonl"):
        from kedit.corpus import read_documents

        return "\n\n".join(read_documents(p))
    from kedit.textio import read_text as read_utf8

    return read_utf8(p)


class Perplexity(Evaluator):
    """Perplexity of a text file (non-overlapping windows)."""

    name = "perplexity"
    protocol = ("ppl-window-v1: text tokenized without special tokens, cut to max_tokens, non-overlapping "
                "windows of `window` tokens, exp(total NLL / predicted tokens)")
    Options = PerplexityOptions
    primary = "data"
    uses_specs = False
    headline = ("ppl",)

    def evaluate(self, model, tokenizer, specs, options, context) -> EvalResult:
        from kedit.scoring import window_nll

        config = getattr(model, "config", None)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        window = min(options.window, limit) if limit else options.window  # never past the position table
        parts = window_nll(model, tokenizer, read_text(options.data), window, options.max_tokens)
        if not parts:
            raise InputError(f"perplexity: data {options.data}: fewer than 2 tokens of text")
        tokens = sum(c for _, c in parts)
        nll = sum(n for n, _ in parts) / tokens
        return EvalResult({"ppl": math.exp(nll), "nll": nll}, {"nll": [n / c for n, c in parts]},
                          {"tokens": tokens, "windows": len(parts), "window": window, "data": options.data})


@hookimpl
def register_evaluators(register):
    register(Perplexity)
