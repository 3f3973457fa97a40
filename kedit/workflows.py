"""End-to-end jobs behind the CLI commands, usable from Python as well."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from . import diff as diffmod
from .atomic import atomic_dir
from .editing import compute_diff, resolve_editor, resolve_regs
from .errors import InputError
from .evaluate import Evaluation, evaluate_chain, resolve_evaluators, specs_from_diffs
from .models import load
from .scoring import target_probs
from .spec import EditSpec, read_specs


def probe_table(model, tok, specs: Sequence[EditSpec]) -> list[dict[str, Any]]:
    """P(target_new) and P(target_true) on each spec's own prompt."""
    p_new = target_probs(model, tok, [s.text for s in specs], [s.target_new for s in specs])
    with_true = [s for s in specs if s.target_true]
    p_true = dict(zip([s.id for s in with_true],
                      target_probs(model, tok, [s.text for s in with_true], [s.target_true for s in with_true])))
    return [{"id": s.id, "p_new": pn, "p_true": p_true.get(s.id)} for s, pn in zip(specs, p_new)]


def default_out(spec_path: Path, editor: str, diff_id: str, folder: Path = Path("checkpoints")) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec_path.name.removesuffix(".jsonl"))
    return folder / f"{stem}-{editor}-{diff_id.removeprefix('sha256:')[:12]}{diffmod.SUFFIX}"


def apply_specs(spec_path: str | os.PathLike, editor: str, options: dict[str, Any] | None = None,
                regs: Sequence[str] = (), model: str | None = None, out: str | os.PathLike | None = None,
                seed: int = 0, quiet: bool = False, after: Sequence[str] = (), corpus: str | None = None,
                stats_tokens: int | None = None, evaluators: Sequence[str] = (), data: Sequence[str] = (),
                use_cache: bool = True, reg_in_loop: bool = False) -> dict[str, Any]:
    """Edit a model with a spec file, write the diff and report each spec before and after.

    ``after`` is a chain of diffs applied first; the new diff names the last of them as its
    parent. Everything that can be wrong with the input is checked before the model is loaded,
    and nothing is written unless the edit succeeds. ``evaluators`` run on the model before and
    after the edit (see :mod:`kedit.evaluate`); their summary goes into the result and the manifest.
    """
    spec_path = Path(spec_path)
    specs = read_specs(spec_path)
    entry, opts = resolve_editor(editor, options or {})
    chain = resolve_regs(regs)
    if out is not None and not str(out).endswith(diffmod.SUFFIX):
        raise InputError(f"--out {out}: a diff file name ends in {diffmod.SUFFIX}")
    prior = load_chain(after)
    chosen = resolve_evaluators(evaluators, data) if evaluators else []
    lm, tok, source = load(model, quiet=quiet)
    for d in prior:
        diffmod.apply(lm, d)
    before = probe_table(lm, tok, specs)
    evaluation = Evaluation(chosen, specs, seed=seed, quiet=quiet, use_cache=use_cache) if chosen else None
    if evaluation:
        evaluation.base(lm, tok)
    from .stats import KeyStats

    stats = KeyStats(corpus=corpus, n_tokens=stats_tokens, seed=seed, quiet=quiet)
    diff = compute_diff(lm, tok, source, specs, entry, opts, chain, seed=seed, quiet=quiet,
                        parents=[prior[-1].id] if prior else [], stats=stats, reg_in_loop=reg_in_loop)
    diffmod.apply(lm, diff)
    rows = _rows(specs, before, probe_table(lm, tok, specs))
    diff.manifest["eval"] = {"protocol": "target-prob-v1 (exp mean log-prob, teacher forced, edit prompt only)",
                             "changed": sum(r["changed"] for r in rows), "count": len(rows)}
    summary: dict[str, Any] = {}
    if evaluation:
        evaluation.edited(lm, tok)
        summary = evaluation.summary()
        diff.manifest["eval"].update({k: summary[k] for k in ("metrics", "base", "protocols")})
    diff.manifest["id"] = diffmod.content_id(diff.manifest, diff.tensors())
    path = Path(out) if out else default_out(spec_path, editor, diff.id)
    diffmod.write(diff, path)
    return {"diff": str(path), "id": diff.id, "bytes": path.stat().st_size, "editor": editor,
            "changed": sum(r["changed"] for r in rows), "count": len(rows), "results": rows, **summary}


def apply_sequence(spec_path: str | os.PathLike, editor: str | None, options: dict[str, Any] | None = None,
                   regs: Sequence[str] = (), model: str | None = None, out: str | os.PathLike | None = None,
                   seed: int = 0, quiet: bool = False, batch_size: int | None = None, squash: bool = False,
                   continue_chain: str | os.PathLike | None = None, corpus: str | None = None,
                   stats_tokens: int | None = None, evaluators: Sequence[str] = (), data: Sequence[str] = (),
                   eval_at: Sequence[str] = (), use_cache: bool = True, reg_in_loop: bool = False) -> dict[str, Any]:
    """Edit in consecutive batches (``--mode sequential``), writing a chain folder, or with
    ``squash`` one diff. ``continue_chain`` resumes a chain: its editor, options, regularizers,
    seed and batch size are reused, and specs it already holds are skipped, so re-running an
    interrupted command finishes it."""
    from .paradigms import Schedule, new_chain, run_sequence
    from .sequence import Chain
    from .stats import KeyStats

    spec_path = Path(spec_path)
    specs = read_specs(spec_path)
    schedule = Schedule.parse(eval_at)
    chain = Chain.open(continue_chain) if continue_chain else None
    if chain is not None:
        rec = chain.record
        if editor is not None and editor != rec["editor"]:
            raise InputError(f"--continue {chain.path}: the chain was made with {rec['editor']!r}, not {editor!r}")
        if options or regs or reg_in_loop or (batch_size is not None and batch_size != rec["batch_size"]):
            raise InputError(f"--continue {chain.path}: the chain's editor options, regularizers and batch size are "
                             "reused; do not pass -o, --reg or another --batch-size")
        if squash or out is not None:
            raise InputError("--continue writes into the chain folder; --out and --squash do not apply")
        editor, options, regs, seed, batch_size = (rec["editor"], rec["options"], rec["regularizers"], rec["seed"],
                                                   rec["batch_size"])
        model = model if model is not None else rec.get("model")
        reg_in_loop = rec.get("reg_in_loop", False)
        corpus = corpus if corpus is not None else rec["stats"]["corpus"]
        stats_tokens = stats_tokens if stats_tokens is not None else rec["stats"]["n_tokens"]
    if editor is None:
        raise InputError("kedit apply needs --plugin EDITOR (or --continue CHAIN)")
    batch_size = batch_size or 1
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: must be at least 1")
    entry, opts = resolve_editor(editor, options or {})
    chain_regs = resolve_regs(regs)
    if squash and out is not None and not str(out).endswith(diffmod.SUFFIX):
        raise InputError(f"--out {out}: with --squash the result is one diff, whose name ends in {diffmod.SUFFIX}")
    if not squash and chain is None and out is not None and str(out).endswith(diffmod.SUFFIX):
        raise InputError(f"--out {out}: a sequence is written as a chain folder; pass a folder, or --squash for one diff")
    chosen = resolve_evaluators(evaluators, data) if evaluators else []
    lm, tok, source = load(model, quiet=quiet)
    previous: list[EditSpec] = []
    applied = chain.diffs() if chain is not None else []
    for d in applied:
        diffmod.apply(lm, d)
    if chain is not None:
        held = set(chain.spec_ids())
        previous = [s for s in specs_from_diffs(applied) if s.id in held]
        seen = {i for s in chain.steps for i in s.get("specs", [])}
        specs = [s for s in specs if s.id not in seen]
    before = probe_table(lm, tok, specs)
    stats = KeyStats(corpus=corpus, n_tokens=stats_tokens, seed=seed, quiet=quiet)
    if chain is None and not squash:
        folder = Path(out) if out else Path("checkpoints") / f"{spec_path.name.removesuffix('.jsonl')}-{editor}-seq"
        chain = new_chain(folder, entry, opts, list(regs), seed, batch_size, model, source, str(spec_path),
                          {"corpus": corpus, "n_tokens": stats_tokens}, reg_in_loop)
    result = run_sequence(lm, tok, source, specs, entry, opts, chain_regs, batch_size=batch_size, seed=seed,
                          stats=stats, chain=chain, chosen=chosen, schedule=schedule, quiet=quiet,
                          use_cache=use_cache, previous=previous, reg_in_loop=reg_in_loop, applied=applied)
    rows = _rows(specs, before, probe_table(lm, tok, specs))
    summary = {"mode": "sequential", "batch_size": batch_size, "editor": editor, "eval_at": schedule.describe(),
               "changed": sum(r["changed"] for r in rows), "count": len(rows), "results": rows,
               "edits": result["edits"], "steps": result["steps"], "evaluation": result["evaluation"],
               "forgetting": result["forgetting"]}
    if squash:
        with result["base"].reverted() as m:
            d = diffmod.squash(m, result["diffs"])
        d.manifest["sequence"] = {k: summary[k] for k in ("mode", "batch_size", "eval_at", "steps", "evaluation",
                                                          "forgetting")}
        d.manifest["id"] = diffmod.content_id(d.manifest, d.tensors())
        path = Path(out) if out else default_out(spec_path, f"{editor}-seq", d.id)
        diffmod.write(d, path)
        return {"diff": str(path), "id": d.id, **summary}
    assert chain is not None
    return {"chain": str(chain.path), "id": result["steps"][-1]["id"] if result["steps"] else None, **summary}


def remove_from_chain(chain_path: str | os.PathLike, ids: Sequence[str], model: str | None = None,
                      quiet: bool = False) -> dict[str, Any]:
    """``kedit diff revert --edit ID CHAIN``: append a step that removes the edits, exactly."""
    from .paradigms import remove_edits
    from .sequence import Chain
    from .stats import KeyStats

    chain = Chain.open(chain_path)
    rec = chain.record
    entry, opts = resolve_editor(rec["editor"], rec["options"])
    regs = resolve_regs(rec["regularizers"])
    lm, tok, source = load(model if model is not None else rec.get("model"), quiet=quiet)
    stats = KeyStats(corpus=rec["stats"]["corpus"], n_tokens=rec["stats"]["n_tokens"], seed=rec["seed"], quiet=quiet)
    return remove_edits(lm, tok, source, chain, ids, entry, opts, regs, stats, quiet=quiet,
                        reg_in_loop=rec.get("reg_in_loop", False))


def _rows(specs: Sequence[EditSpec], before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for spec, b, a in zip(specs, before, after):
        changed = a["p_true"] is None or a["p_new"] > a["p_true"]
        rows.append({"id": spec.id, "prompt": spec.text, "target_new": spec.target_new, "target_true": spec.target_true,
                     "p_new_before": b["p_new"], "p_new_after": a["p_new"],
                     "p_true_before": b["p_true"], "p_true_after": a["p_true"], "changed": changed})
    return rows


def eval_model(evaluators: Sequence[str], model: str | None = None, diffs: Sequence[str] = (),
               data: Sequence[str] = (), spec_path: str | os.PathLike | None = None, seed: int = 0,
               quiet: bool = False, use_cache: bool = True, label: str | None = None) -> dict[str, Any]:
    """Run evaluators on a model and, with ``diffs``, on the model with the chain applied.

    The specs are ``spec_path``'s, else those the diffs record. Results on the unedited model are
    cached by its content hash, so comparing many diffs of one base pays for the base once.
    """
    chain = load_chain(diffs)
    specs = read_specs(spec_path) if spec_path else specs_from_diffs(chain)
    chosen = resolve_evaluators(evaluators or (["counterfact", "token-acc"] if specs else []), data)
    if not chosen:
        raise InputError("nothing to evaluate: name evaluators with --evaluator (see `kedit evaluators`), "
                         "or give edit specs (--specs, or diffs that record them)")
    needy = [c.name for c in chosen if c.entry.obj.uses_specs]
    if needy and not specs:
        raise InputError(f"evaluator(s) {', '.join(needy)} read edit specs: give --specs SPEC.jsonl "
                         "or diffs that record their specs")
    lm, tok, source = load(model, quiet=quiet)
    result = evaluate_chain(chosen, specs, lm, tok, chain, seed=seed, quiet=quiet, use_cache=use_cache)
    editors = sorted({(d.manifest.get("editor") or {}).get("name", "?") for d in chain})
    return {"label": label or ("+".join(editors) if chain else "unedited"), "model": source.to_json(),
            "diffs": [d.id for d in chain], "specs": len(specs), "seed": seed, **result}


def load_chain(paths: Sequence[str | os.PathLike]) -> list[diffmod.Diff]:
    return diffmod.check_chain(diffmod.read(p) for p in paths)


def verify(paths: Sequence[str], model: str | None = None) -> list[dict[str, Any]]:
    """Each diff's status against the model, applying earlier ones of the chain in memory."""
    diffs = load_chain(paths)
    lm, _, _ = load(model, quiet=True)
    out = []
    for d in diffs:
        try:
            st = diffmod.state(lm, d)
        except InputError as exc:
            out.append({"diff": str(d.path), "id": d.id, "status": "refused", "reason": str(exc)})
            break
        out.append({"diff": str(d.path), "id": d.id, "status": "applies" if st == "base" else "already applied"})
        if st == "base":
            diffmod.apply(lm, d)
    return out


def _save_folder(lm, tok, out: Path, overwrite: bool, extra: dict[str, str] | None = None) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    with atomic_dir(out) as tmp:
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")


def apply_to_folder(paths: Sequence[str], out: str | os.PathLike, model: str | None = None,
                    overwrite: bool = False, card: bool = False) -> list[str]:
    """Apply a chain to a model and save the result as a ``from_pretrained`` folder."""
    diffs = load_chain(paths)
    lm, tok, source = load(model, quiet=True)
    statuses = [diffmod.apply(lm, d) for d in diffs]
    extra = None
    if card:
        extra = {"README.md": model_card(diffs, source.name_or_path),
                 "kedit_diff.json": json.dumps([d.manifest for d in diffs], indent=2, ensure_ascii=False)}
    _save_folder(lm, tok, Path(out), overwrite, extra)
    return statuses


def revert_in_folder(paths: Sequence[str], out: str | os.PathLike, model: str | None = None,
                     overwrite: bool = False) -> list[str]:
    """Revert a chain (last diff first) and save the result."""
    diffs = load_chain(paths)
    lm, tok, _ = load(model, quiet=True)
    statuses = [diffmod.revert(lm, d) for d in reversed(diffs)]
    _save_folder(lm, tok, Path(out), overwrite)
    return statuses


def squash(paths: Sequence[str], out: str | os.PathLike, model: str | None = None) -> diffmod.Diff:
    diffs = load_chain(paths)
    lm, _, _ = load(model, quiet=True)
    result = diffmod.squash(lm, diffs)
    diffmod.write(result, out)
    return result


def model_card(diffs: Sequence[diffmod.Diff], base_name: str) -> str:
    editors = sorted({(d.manifest.get("editor") or {}).get("name", "?") for d in diffs})
    specs = sum((d.manifest.get("specs") or {}).get("count", 0) for d in diffs)
    lines = ["---", f"base_model: {base_name}", "base_model_relation: finetune", "library_name: kedit",
             "tags: [kedit, knowledge-editing" + "".join(f", {e}" for e in editors) + "]", "---", "",
             f"# Edited {base_name}", "",
             f"This model is `{base_name}` with {len(diffs)} kedit diff(s) applied ({specs} edit specs, "
             f"editor(s): {', '.join(editors)}). Full provenance, including the base tensor hashes, "
             "is in `kedit_diff.json`.", "", "| diff id | editor | specs |", "|---|---|---|"]
    for d in diffs:
        lines.append(f"| `{d.id}` | {(d.manifest.get('editor') or {}).get('name')} | "
                     f"{(d.manifest.get('specs') or {}).get('count', 0)} |")
    return "\n".join(lines) + "\n"

