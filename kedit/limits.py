"""Size limits on edit specs, and the checks of specs against a loaded model's context.

Each limit is there so bad input fails in a second with one line, not after minutes of work:
a prompt longer than the model's context once ran for ten minutes at 6 GB before it was killed,
and a 110 MB ``meta`` edited for 28 s and then broke the diff's header (safetensors refuses
headers over 100 MB). The limits are far above what an edit needs; the README lists them
(Quickstart).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

from .errors import InputError

MAX_TEXT_CHARS = 4096  # one prompt, subject or target: a sentence, not a document
MAX_ID_CHARS = 256
MAX_META_BYTES = 1024 * 1024  # ``meta`` as JSON; it is copied into every diff's header
MAX_DIFF_SPECS_BYTES = 80_000_000  # all specs of one diff, as its header holds them (limit 100 MB)
# Tokens kept free of the model's context: the locate-then-edit editors (rome, memit, ...) put a
# context template of about 10 sampled tokens and ". " before the prompt, and a BOS may come first.
CONTEXT_MARGIN = 32


def context_length(config: Any) -> int | None:
    """The most positions a model reads (``max_position_embeddings``, ``n_positions`` or ``n_ctx``)."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _texts(spec: Any) -> Iterable[tuple[str, str, str | None]]:
    """(field, prompt, target) of every text a spec makes the model read."""
    yield "prompt", spec.text, spec.target_new
    if spec.target_true:
        yield "target_true", spec.text, spec.target_true
    for i, p in enumerate(spec.paraphrases):
        yield f"paraphrases.{i}", p, spec.target_new
    for kind in ("neighborhood", "portability"):
        for i, probe in enumerate(getattr(spec, kind)):
            yield f"{kind}.{i}", probe.prompt, probe.target
    for i, p in enumerate(spec.generation_prompts):
        yield f"generation_prompts.{i}", p, None


def _count(tokenizer: Any, texts: list[str], special: bool) -> dict[str, int]:
    unique = sorted(set(texts))
    ids = tokenizer(unique, add_special_tokens=special)["input_ids"] if unique else []
    return {t: len(i) for t, i in zip(unique, ids)}


def check_lengths(specs: Sequence[Any], tokenizer: Any, config: Any, source: str | os.PathLike | None = None) -> None:
    """Refuse, before any work, a spec whose prompt and target do not fit in the model's context
    less :data:`CONTEXT_MARGIN`, or whose target tokenizes to nothing.

    ``source`` is the spec file the specs were read from, in order (one spec per line, as
    :func:`kedit.spec.read_specs` returns them), so errors name its line; None names the spec only.
    """
    limit = context_length(config)
    rows = [(i, spec, field, prompt, target) for i, spec in enumerate(specs) for field, prompt, target in _texts(spec)]
    prompts = _count(tokenizer, [r[3] for r in rows], special=True)
    targets = _count(tokenizer, [" " + r[4] for r in rows if r[4] is not None], special=False)
    for i, spec, field, prompt, target in rows:
        where = f"{source}:{i + 1} (spec {spec.id!r})" if source is not None else f"spec {spec.id!r}"
        n_target = targets[" " + target] if target is not None else 0
        if target is not None and n_target == 0:
            raise InputError(f"{where}: field {field!r}: target {target!r} is no token at all for this tokenizer")
        n = prompts[prompt] + n_target
        if limit is not None and n > limit - CONTEXT_MARGIN:
            what = "the prompt and its target take" if target is not None else "the prompt takes"
            raise InputError(f"{where}: field {field!r}: {what} {n:,} tokens; this model reads {limit:,}, of which "
                             f"kedit keeps {CONTEXT_MARGIN} for the editors' context templates: at most "
                             f"{limit - CONTEXT_MARGIN:,}")


def check_diff_budget(specs: Sequence[Any]) -> None:
    """Refuse, before editing, more spec text than one diff's header can hold."""
    size = sum(len(json.dumps(json.dumps(s.model_dump(mode="json", exclude_defaults=True), ensure_ascii=False),
                              ensure_ascii=False).encode()) for s in specs)  # as escaped inside the header
    if size > MAX_DIFF_SPECS_BYTES:
        raise InputError(f"the {len(specs):,} specs of this diff take {size / 1e6:.0f} MB, and a diff's header holds "
                         f"at most {MAX_DIFF_SPECS_BYTES / 1e6:.0f} MB of specs: edit in smaller batches "
                         "(--mode sequential --batch-size N) or trim their meta")
