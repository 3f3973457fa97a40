"""Sequential editing (RECT's and D4S's paradigm): consecutive batches, a chain of diffs, weight
drift after every batch, and evaluation on a declared schedule, so the gap between how an edit
scores right after its batch and after the whole sequence (forgetting) is measured, not hidden.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from . import diff as diffmod
from .editing import Reg, compute_diff
from .errors import InputError
from .evaluate import Chosen, Evaluation
from .models import ModelSource
from .plugins import Registered
from .sequence import CHAIN_SCHEMA, Chain, SequenceBase, drift
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


def evaluate_point(chosen: list[Chosen], specs: list[EditSpec], model: torch.nn.Module, tok: Any,
                   base: SequenceBase, at: str, edits: int, seed: int, quiet: bool, use_cache: bool) -> dict[str, Any]:
    """Evaluators on ``specs``: the sequence base (cached) against the model as it is now."""
    ev = Evaluation(chosen, specs, seed=seed, quiet=quiet, use_cache=use_cache)
    with base.reverted() as m:
        ev.base(m, tok)
    ev.edited(model, tok)
    s = ev.summary()
    return {"at": at, "edits": edits, "specs": len(specs), **{k: s[k] for k in ("metrics", "base", "delta", "ci")},
            "protocols": s["protocols"]}


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


def run_sequence(model: torch.nn.Module, tok: Any, source: ModelSource, specs: list[EditSpec],
                 editor: Registered, options: Any, regs: Sequence[Reg], *, batch_size: int, seed: int,
                 stats: Any, chain: Chain | None, chosen: list[Chosen], schedule: Schedule,
                 quiet: bool = True, use_cache: bool = True, previous: Sequence[EditSpec] = (),
                 reg_in_loop: bool = False, applied: Sequence[diffmod.Diff] = ()) -> dict[str, Any]:
    """Edit ``specs`` in consecutive batches on ``model`` (which ends edited).

    With ``chain`` each batch is written to the chain folder as it completes. ``applied`` are the
    chain's diffs, already applied to ``model`` (``--continue``), and ``previous`` their specs. Returns the steps, evaluations and forgetting; the applied
    diffs are in the returned ``"diffs"`` (for squashing).
    """
    base = SequenceBase(model, stats)
    base.applied = list(applied)
    state: dict[str, torch.Tensor] = chain.state() if chain is not None and chain.steps else {}
    in_effect = list(previous)
    touched = {n for d in base.applied for n in d.deltas}
    batches = [specs[i:i + batch_size] for i in range(0, len(specs), batch_size)]
    steps, points = [], []
    bar = _bar(quiet, len(specs))
    for batch in batches:
        t0 = time.perf_counter()
        data: dict[str, torch.Tensor] = {}
        d = compute_diff(model, tok, source, batch, editor, options, regs, seed=seed,
                         parents=[base.applied[-1].id] if base.applied else [], state=state, quiet=True,
                         stats=base, base=base, step_data=data, reg_in_loop=reg_in_loop)
        seconds = time.perf_counter() - t0
        diffmod.apply(model, d)
        base.applied.append(d)
        in_effect += batch
        touched |= set(d.deltas)
        info: dict[str, Any] = {"specs": [s.id for s in batch], "edits": len(in_effect), "seconds": round(seconds, 3),
                                "drift": drift(model, base, sorted(touched))}
        evals = []
        if chosen and schedule.immediate:
            evals.append(evaluate_point(chosen, batch, model, tok, base, "immediate", len(in_effect), seed, True, use_cache))
        if chosen and schedule.every and len(in_effect) // schedule.every > (len(in_effect) - len(batch)) // schedule.every:
            evals.append(evaluate_point(chosen, in_effect, model, tok, base, "every", len(in_effect), seed, True, use_cache))
        if evals:
            info["eval"] = evals
            points += evals
        d.manifest["sequence"] = {"mode": "sequential", "batch_size": batch_size, **info}
        d.manifest["id"] = diffmod.content_id(d.manifest, d.tensors())
        if chain is not None:
            chain.add_step(d, info, state, data)
        steps.append({"id": d.id, **info})
        bar.update(len(batch))
    bar.close()
    if chosen and schedule.final and in_effect:
        points.append(evaluate_point(chosen, in_effect, model, tok, base, "final", len(in_effect), seed, True, use_cache))
    gap = forgetting(points)
    if chain is not None:
        chain.record.setdefault("evaluation", []).extend(points)
        if gap is not None:
            chain.record["forgetting"] = gap
        chain.save()
    return {"steps": steps, "evaluation": points, "forgetting": gap, "diffs": base.applied, "base": base,
            "edits": len(in_effect)}


def new_chain(path: Path, editor: Registered, options: Any, reg_texts: Sequence[str], seed: int, batch_size: int,
              model_arg: str | None, source: ModelSource, spec_file: str, stats: dict[str, Any],
              reg_in_loop: bool = False) -> Chain:
    if (path / "chain.json").exists():
        raise InputError(f"{path}: already holds a chain; continue it with --continue {path}, or pick another --out")
    if path.exists() and any(path.iterdir()):
        raise InputError(f"{path}: exists and is not empty; a chain needs a new or empty folder")
    record = {"schema": CHAIN_SCHEMA, "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "mode": "sequential", "editor": editor.name, "options": options.model_dump(mode="json"),
              "regularizers": list(reg_texts), "seed": seed, "batch_size": batch_size, "model": model_arg,
              "base": source.to_json(), "spec_files": [spec_file], "stats": stats, "reg_in_loop": reg_in_loop, "steps": []}
    return Chain(path, record)  # written with its first step


def remove_edits(model: torch.nn.Module, tok: Any, source: ModelSource, chain: Chain, ids: Sequence[str],
                 editor: Registered, options: Any, regs: Sequence[Reg], stats: Any, quiet: bool = True,
                 reg_in_loop: bool = False) -> dict[str, Any]:
    """Append to ``chain`` a step that takes the edits ``ids`` out, as if they had never been made
    (for editors that can, see :meth:`kedit.api.Editor.remove`). ``model`` is at the chain's base."""
    held = chain.spec_ids()
    missing = [i for i in ids if i not in held]
    if missing:
        raise InputError(f"{chain.path}: no edit {missing[0]!r} in effect in the chain "
                         f"({len(held)} are, e.g. {', '.join(held[:3])})")
    base = SequenceBase(model, stats)
    base.applied = chain.diffs()
    for d in base.applied:
        diffmod.apply(model, d)
    state = chain.state()
    t0 = time.perf_counter()
    d = compute_diff(model, tok, source, [], editor, options, regs, seed=chain.record["seed"],
                     parents=[base.applied[-1].id], state=state, stats=base, base=base, remove=list(ids),
                     steps=chain.step_data(), quiet=quiet, reg_in_loop=reg_in_loop)
    diffmod.apply(model, d)
    base.applied.append(d)
    touched = sorted({n for x in base.applied for n in x.deltas})
    info = {"specs": [], "removes": list(ids), "edits": len(held) - len(ids),
            "seconds": round(time.perf_counter() - t0, 3), "drift": drift(model, base, touched)}
    d.manifest["sequence"] = {"mode": "sequential", "batch_size": chain.record["batch_size"], **info}
    d.manifest["id"] = diffmod.content_id(d.manifest, d.tensors())
    step = chain.add_step(d, info, state, None)
    return {"chain": str(chain.path), "id": d.id, "step": step["step"], **info}


def _bar(quiet: bool, total: int):
    from .editing import progress_bar

    return progress_bar(quiet)(total=total, desc="edits", unit="edit")
