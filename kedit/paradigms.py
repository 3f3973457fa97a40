"""Sequential editing (RECT's and D4S's paradigm): consecutive batches, a chain of diffs, weight
drift after every batch, and evaluation on a declared schedule, so the gap between how an edit
scores right after its batch and after the whole sequence (forgetting) is measured, not hidden.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from . import diff as diffmod
from .atomic import TMP_SUFFIX
from .config import RunConfig
from .editing import EditPlan, Removal, SequenceStep, compute_diff
from .errors import InputError
from .evaluate import Chosen, Evaluation
from .locking import LOCK_NAME
from .models import LoadedModel
from .progress import SILENT
from .sequence import CHAIN_FILE, CHAIN_SCHEMA, BaseStats, Chain, SequenceBase, drift
from .spec import EditSpec


@dataclass(frozen=True)
class Schedule:
    """When to evaluate: ``immediate`` (each batch's specs right after it), ``final`` (every spec
    after the last batch), ``every`` (every spec so far, each time the count passes a multiple)."""

    immediate: bool = False
    final: bool = True
    every: int | None = None

    @classmethod
    def parse(cls, texts: Sequence[str]) -> "Schedule":
        immediate = final = False
        every = None
        for text in (t.strip() for chunk in texts for t in chunk.split(",")):
            if text == "immediate":
                immediate = True
            elif text == "final":
                final = True
            elif text.startswith("every:"):
                try:
                    every = int(text[6:])
                except ValueError:
                    every = 0
                if every < 1:
                    raise InputError(f"--eval-at {text}: every:N needs a positive whole number of edits")
            elif text:
                raise InputError(f"--eval-at {text!r}: expected immediate, final or every:N")
        if not (immediate or final or every):
            final = True
        return cls(immediate, final, every)

    def describe(self) -> list[str]:
        return [x for x, on in (("immediate", self.immediate), ("final", self.final),
                                (f"every:{self.every}", self.every)) if on]


def evaluate_point(chosen: list[Chosen], specs: list[EditSpec], loaded: LoadedModel, base: SequenceBase, at: str,
                   edits: int, config: RunConfig) -> dict[str, Any]:
    """Evaluators on ``specs``: the sequence base (cached) against the model as it is now."""
    model, tok, _ = loaded
    ev = Evaluation(chosen, specs, seed=config.seed, use_cache=config.use_cache)
    with base.reverted() as m:
        ev.base(m, tok)
    ev.edited(model, tok)
    s = ev.summary()
    return {"at": at, "edits": edits, "specs": len(specs), **{k: s[k] for k in ("metrics", "base", "delta", "ci")},
            "protocols": s["protocols"], "display": s["display"]}


def forgetting(points: list[dict[str, Any]]) -> dict[str, dict[str, float]] | None:
    """Per metric: the mean over edits of its score right after its own batch, the score after
    the last batch, and the gap (immediate − final)."""
    imm = [p for p in points if p["at"] == "immediate"]
    final = [p for p in points if p["at"] == "final"]
    if not imm or not final:
        return None
    out: dict[str, dict[str, float]] = {}
    total = sum(p["specs"] for p in imm)
    for ev, metrics in final[-1]["metrics"].items():
        for name, value in metrics.items():
            vals = [(p["metrics"].get(ev, {}).get(name), p["specs"]) for p in imm]
            if value is None or any(v is None for v, _ in vals):
                continue
            mean = sum(v * n for v, n in vals) / total
            out[f"{ev}.{name}"] = {"immediate": mean, "final": value, "gap": mean - value}
    return out


def run_sequence(loaded: LoadedModel, specs: list[EditSpec], plan: EditPlan, config: RunConfig, *,
                 batch_size: int, chain: Chain | None, chosen: list[Chosen] = (), schedule: Schedule = Schedule(),
                 previous: Sequence[EditSpec] = (), applied: Sequence[diffmod.Diff] = ()) -> dict[str, Any]:
    """Edit ``specs`` in consecutive batches on ``loaded.model`` (which ends edited).

    With ``chain`` each batch is written to the chain folder as it completes. ``applied`` are the
    chain's diffs, already applied to the model (``--continue``), and ``previous`` their specs.
    Returns the steps, evaluations and forgetting; the applied diffs are in ``"diffs"`` (for
    squashing) and the sequence base in ``"base"``.
    """
    model = loaded.model
    base = SequenceBase(model, list(applied))
    step_plan = replace(plan, stats=BaseStats(plan.stats, base) if plan.stats is not None else None,
                        progress=plan.progress if batch_size >= len(specs) else SILENT)
    state: dict[str, torch.Tensor] = chain.state() if chain is not None and chain.steps else {}
    in_effect = list(previous)
    touched = {n for d in base.applied for n in d.deltas}
    batches = [specs[i:i + batch_size] for i in range(0, len(specs), batch_size)]
    steps, points = [], []
    bar = plan.progress(total=len(specs), desc="edits", unit="edit")
    for batch in batches:
        t0 = time.perf_counter()
        data: dict[str, torch.Tensor] = {}
        d = compute_diff(loaded, batch, step_plan, parents=[base.applied[-1].id] if base.applied else [],
                         sequence=SequenceStep(base, state, data))
        seconds = time.perf_counter() - t0
        diffmod.apply(model, d)
        base.applied.append(d)
        in_effect += batch
        touched |= set(d.deltas)
        info: dict[str, Any] = {"specs": [s.id for s in batch], "edits": len(in_effect), "seconds": round(seconds, 3),
                                "drift": drift(model, base, sorted(touched))}
        evals = []
        if chosen and schedule.immediate:
            evals.append(evaluate_point(chosen, batch, loaded, base, "immediate", len(in_effect), config))
        if chosen and schedule.every and len(in_effect) // schedule.every > (len(in_effect) - len(batch)) // schedule.every:
            evals.append(evaluate_point(chosen, in_effect, loaded, base, "every", len(in_effect), config))
        if evals:
            info["eval"] = evals
            points += evals
        d.manifest["sequence"] = {"mode": "sequential", "batch_size": batch_size, **info}
        diffmod.seal(d)
        if chain is not None:
            chain.add_step(d, info, state, data)
        steps.append({"id": d.id, **info})
        bar.update(len(batch))
    bar.close()
    if chosen and schedule.final and in_effect:
        points.append(evaluate_point(chosen, in_effect, loaded, base, "final", len(in_effect), config))
    gap = forgetting(points)
    if chain is not None:
        chain.record.setdefault("evaluation", []).extend(points)
        if gap is not None:
            chain.record["forgetting"] = gap
        chain.save()
    return {"steps": steps, "evaluation": points, "forgetting": gap, "diffs": base.applied, "base": base,
            "edits": len(in_effect)}


def check_new_chain(path: Path) -> None:
    """A new chain needs a new or empty folder (kedit's own lock and temporaries aside)."""
    if (path / CHAIN_FILE).exists():
        raise InputError(f"{path}: already holds a chain; continue it with --continue {path}, or pick another --out")
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: is a file; a chain is written as a folder")
    if path.exists() and any(p.name != LOCK_NAME and not p.name.endswith(TMP_SUFFIX) for p in path.iterdir()):
        raise InputError(f"{path}: exists and is not empty; a chain needs a new or empty folder")


def new_chain(path: Path, plan: EditPlan, reg_texts: Sequence[str], batch_size: int, config: RunConfig,
              source: Any, spec_file: str) -> Chain:
    """Create the chain folder's record with no steps (the caller holds its lock and has
    checked the folder with :func:`check_new_chain`)."""
    stats = {**config.stats.to_json(), "corpus": config.stats.corpus or "builtin"}
    record = {"schema": CHAIN_SCHEMA, "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "mode": "sequential", "editor": plan.editor.name, "options": plan.options.model_dump(mode="json"),
              "regularizers": list(reg_texts), "seed": plan.seed, "batch_size": batch_size, "model": config.model,
              "base": source.to_json(), "spec_files": [spec_file], "stats": stats, "reg_in_loop": plan.reg_in_loop,
              "steps": []}
    return Chain.create(path, record)


def remove_edits(loaded: LoadedModel, chain: Chain, ids: Sequence[str], plan: EditPlan) -> dict[str, Any]:
    """Append to ``chain`` a step that takes the edits ``ids`` out, as if they had never been made
    (for editors that can, see :meth:`kedit.api.Editor.remove`). The model is at the chain's base."""
    model = loaded.model
    held = chain.spec_ids()
    missing = [i for i in ids if i not in held]
    if missing:
        raise InputError(f"{chain.path}: no edit {missing[0]!r} in effect in the chain "
                         f"({len(held)} are, e.g. {', '.join(held[:3])})")
    base = SequenceBase(model, chain.diffs())
    for d in base.applied:
        diffmod.apply(model, d)
    state = chain.state()
    t0 = time.perf_counter()
    step_plan = replace(plan, stats=BaseStats(plan.stats, base) if plan.stats is not None else None)
    d = compute_diff(loaded, [], step_plan, parents=[base.applied[-1].id], sequence=SequenceStep(base, state),
                     removal=Removal(list(ids), chain.step_data()))
    diffmod.apply(model, d)
    base.applied.append(d)
    touched = sorted({n for x in base.applied for n in x.deltas})
    info = {"specs": [], "removes": list(ids), "edits": len(held) - len(ids),
            "seconds": round(time.perf_counter() - t0, 3), "drift": drift(model, base, touched)}
    d.manifest["sequence"] = {"mode": "sequential", "batch_size": chain.record["batch_size"], **info}
    diffmod.seal(d)
    step = chain.add_step(d, info, state, None)
    return {"chain": str(chain.path), "id": d.id, "step": step["step"], **info}
