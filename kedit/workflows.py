"""End-to-end jobs behind the CLI commands, usable from Python as well."""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from . import diff as diffmod
from .atomic import atomic_dir
from .config import EditJob, RunConfig
from .editing import EditPlan, compute_diff
from .errors import InputError
from .evaluate import Evaluation, default_evaluators, evaluate_chain, resolve_evaluators, specs_from_diffs
from .limits import check_lengths
from .locking import exclusive
from .models import load
from .outputs import claimed
from .paradigms import Schedule, check_new_chain, new_chain, run_sequence
from .sequence import CHAIN_FILE, Chain
from .spec import EditSpec, read_specs

if TYPE_CHECKING:
    from .signing import Trust


def probe_table(model, tok, specs: Sequence[EditSpec]) -> list[dict[str, Any]]:
    """P(target_new) and P(target_true) on each spec's own prompt and on its paraphrases, and on
    each neighbourhood prompt P(its own answer) against P(target_new): everything the spec
    carries, scored in one batched pass, so the table shows damage as well as success."""
    from .scoring import TeacherForced

    pairs: list[tuple[str, str]] = []
    for s in specs:
        pairs.append((s.text, s.target_new))
        if s.target_true:
            pairs.append((s.text, s.target_true))
        for p in s.paraphrases:
            pairs += [(p, s.target_new)] + ([(p, s.target_true)] if s.target_true else [])
        for n in s.neighborhood:
            pairs += [(n.prompt, n.target), (n.prompt, s.target_new)]
    probs = dict(zip(pairs, TeacherForced(model, tok).probs([p for p, _ in pairs], [t for _, t in pairs])))
    out = []
    for s in specs:
        def pr(prompt: str, target: str | None) -> float | None:
            return probs[(prompt, target)] if target else None

        out.append({"id": s.id, "p_new": pr(s.text, s.target_new), "p_true": pr(s.text, s.target_true),
                    "para": [(pr(p, s.target_new), pr(p, s.target_true)) for p in s.paraphrases],
                    "neigh": [(pr(n.prompt, n.target), pr(n.prompt, s.target_new)) for n in s.neighborhood]})
    return out


def default_out(spec_path: Path, editor: str, diff_id: str, folder: Path = Path("checkpoints")) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec_path.name.removesuffix(".jsonl"))
    return folder / f"{stem}-{editor}-{diff_id.removeprefix('sha256:')[:12]}{diffmod.SUFFIX}"


def check_job(job: EditJob) -> None:
    """Everything about the job that can be wrong, checked before any model is loaded."""
    if job.editor is not None:
        EditPlan.check(job.editor, job.options, job.regs, job.reg_in_loop)
    if job.out is not None and not job.sequential and not job.out.endswith(diffmod.SUFFIX):
        raise InputError(f"--out {job.out}: a diff file name ends in {diffmod.SUFFIX}")


def apply(job: EditJob, config: RunConfig | None = None) -> dict[str, Any]:
    """``kedit apply``: edit a model with a spec file and write a diff (``mode="batch"``), or a
    chain folder or squashed diff (``mode="sequential"``, or ``continue_chain``).

    Everything that can be wrong with the input is checked before the model is loaded, and
    nothing is written unless the edit succeeds. Evaluators named in ``config.evaluators`` run
    before and after; their summary goes into the result and the manifest.
    """
    from .distributed import rank_and_size

    config = config or RunConfig()
    if job.sequential:
        if rank_and_size()[1] > 1:
            raise InputError("sequential editing (--mode sequential, --continue) runs in one process: each step "
                             "depends on the last, and only a batch edit's target values split over processes; "
                             "drop --nproc (or run it outside torchrun)")
        return _apply_sequence(job, config)
    return _apply_batch(job, config)


def _apply_batch(job: EditJob, config: RunConfig) -> dict[str, Any]:
    specs = read_specs(job.specs)
    check_job(job)
    if job.out is None:
        return _edit_batch(job, config, specs)
    with claimed(job.out, inputs=[job.specs, *job.after], overwrite=job.overwrite):
        return _edit_batch(job, config, specs)


def _edit_batch(job: EditJob, config: RunConfig, specs: list[EditSpec]) -> dict[str, Any]:
    assert job.editor is not None
    progress = config.progress()
    prior = load_chain(job.after)
    chosen = resolve_evaluators(config.evaluators, config.data) if config.evaluators else []
    loaded = load(config.model, progress=progress, **config.placement())
    lm, tok, _ = loaded
    check_lengths(specs, tok, lm.config, job.specs)
    for d in prior:
        diffmod.apply(lm, d)
    with progress.stage(f"scoring {len(specs)} specs before the edit"):
        before = probe_table(lm, tok, specs)
    evaluation = Evaluation(chosen, specs, seed=config.seed, progress=progress, use_cache=config.use_cache) \
        if chosen else None
    if evaluation:
        evaluation.base(lm, tok)
    plan = EditPlan.make(lm, job.editor, job.options, job.regs, job.reg_in_loop, config.seed,
                         stats=config.stats_provider(), progress=progress)
    with progress.stage(f"editing {len(specs)} specs with {job.editor}"):
        diff = compute_diff(loaded, specs, plan, parents=[prior[-1].id] if prior else [])
    diffmod.apply(lm, diff)
    with progress.stage(f"scoring {len(specs)} specs after the edit"):
        rows = _rows(specs, before, probe_table(lm, tok, specs))
    diff.manifest["eval"] = {"protocol": "target-prob-v1 (exp mean log-prob, teacher forced, edit prompt only)",
                             **probe_summary(rows)}
    summary: dict[str, Any] = {}
    if evaluation:
        evaluation.edited(lm, tok)
        summary = evaluation.summary()
        diff.manifest["eval"].update({k: summary[k] for k in ("metrics", "base", "protocols")})
    diffmod.seal(diff)
    path = _write_new(diff, job, default_out(job.specs, job.editor, diff.id))
    return {"diff": str(path), "id": diff.id, "bytes": path.stat().st_size, "editor": job.editor,
            **probe_summary(rows), "results": rows, **summary}


def _write_new(diff: diffmod.Diff, job: EditJob, default: Path) -> Path:
    """Write ``diff`` to ``--out`` (claimed by the caller) or to its default, id-named path,
    where an existing file holds the same edit (the name carries the id)."""
    from .distributed import barrier, is_writer

    if not is_writer():  # under torchrun rank 0 writes; the others wait until the file is there
        barrier()
        return Path(job.out) if job.out is not None else default
    if job.out is not None:
        path = diffmod.write(diff, job.out)
    else:
        with exclusive(default, f"the output {default.name}"):
            path = diffmod.write(diff, default)
    barrier()
    return path


def _chain_run(chain: Any, config: RunConfig) -> tuple[dict[str, Any], RunConfig]:
    """What a chain recorded about how it was made: the editor fields of its job and the run
    configuration (seed, statistics, model) that continuing it must use."""
    rec = chain.record
    stats = rec.get("stats") or {}
    # chains written before the built-in corpus existed took model-sampled text when none was named
    corpus = config.stats.corpus or stats.get("corpus") or "sampled"
    fields = {"editor": rec["editor"], "options": rec["options"], "regs": tuple(rec["regularizers"]),
              "batch_size": rec["batch_size"], "reg_in_loop": rec.get("reg_in_loop", False)}
    config = replace(config, seed=rec["seed"], model=config.model if config.model is not None else rec.get("model"),
                     stats=replace(config.stats, corpus=corpus,
                                   n_tokens=config.stats.n_tokens or stats.get("n_tokens"),
                                   max_len=config.stats.max_len or stats.get("max_len")))
    return fields, config


def _continued(job: EditJob, config: RunConfig, chain: Any) -> tuple[EditJob, RunConfig]:
    """The job and configuration of ``--continue CHAIN``, refusing what the chain fixes."""
    rec = chain.record
    if job.editor is not None and job.editor != rec["editor"]:
        raise InputError(f"--continue {chain.path}: the chain was made with {rec['editor']!r}, not {job.editor!r}")
    if job.options or job.regs or job.reg_in_loop or (job.batch_size is not None and job.batch_size != rec["batch_size"]):
        raise InputError(f"--continue {chain.path}: the chain's editor options, regularizers and batch size are "
                         "reused; do not pass -o, --reg or another --batch-size")
    if job.squash or job.out is not None:
        raise InputError("--continue writes into the chain folder; --out and --squash do not apply")
    fields, config = _chain_run(chain, config)
    return replace(job, **fields), config


def sequence_stats(config: RunConfig) -> RunConfig:
    """A new sequence's statistics budget: all of the built-in corpus unless one was asked for,
    because what the small single-edit budget costs grows with the sequence. A chain records the
    budget it was made with, so ``--continue`` keeps it."""
    from .stats import default_budget

    s, budget = config.stats, default_budget(config.stats.corpus, sequence=True)
    if s.n_tokens is not None or budget == default_budget(s.corpus):  # asked for, or no different
        return config
    return replace(config, stats=replace(s, n_tokens=budget))


def _apply_sequence(job: EditJob, config: RunConfig) -> dict[str, Any]:
    """Checks, then the run holding its chain folder or squashed output for its whole length."""
    specs = read_specs(job.specs)
    schedule = Schedule.parse(job.eval_at)
    if job.continue_chain:
        Chain.open(job.continue_chain)  # a clear error for what is not a chain, before locking
        with exclusive(job.continue_chain, "the chain", folder=True):
            chain = Chain.open(job.continue_chain)
            job, config = _continued(job, config, chain)
            check_job(job)
            chain.clean()
            chain.verify()
            return _edit_sequence(job, config, specs, schedule, chain)
    assert job.editor is not None
    check_job(job)
    config = sequence_stats(config)
    if job.squash:
        if job.out is not None and not job.out.endswith(diffmod.SUFFIX):
            raise InputError(f"--out {job.out}: with --squash the result is one diff, whose name ends in {diffmod.SUFFIX}")
        if job.out is None:
            return _edit_sequence(job, config, specs, schedule, None)
        with claimed(job.out, inputs=[job.specs], overwrite=job.overwrite):
            return _edit_sequence(job, config, specs, schedule, None)
    if job.out is not None and job.out.endswith(diffmod.SUFFIX):
        raise InputError(f"--out {job.out}: a sequence is written as a chain folder; pass a folder, or --squash for one diff")
    folder = Path(job.out) if job.out else Path("checkpoints") / f"{job.specs.name.removesuffix('.jsonl')}-{job.editor}-seq"
    check_new_chain(folder)
    created = not folder.exists()
    try:
        with exclusive(folder, "the chain", folder=True):
            check_new_chain(folder)
            return _edit_sequence(job, config, specs, schedule, folder)
    finally:  # a run that stopped before its chain was created leaves no folder behind
        if created and not (folder / CHAIN_FILE).exists():
            shutil.rmtree(folder, ignore_errors=True)


def _edit_sequence(job: EditJob, config: RunConfig, specs: list[EditSpec], schedule: Schedule,
                   chain: Chain | Path | None) -> dict[str, Any]:
    """The sequence itself: ``chain`` is the chain to continue, the folder of a new one, or None (squash)."""
    assert job.editor is not None
    progress = config.progress()
    batch_size = job.batch_size or 1
    chosen = resolve_evaluators(config.evaluators, config.data) if config.evaluators else []
    loaded = load(config.model, progress=progress, **config.placement())
    lm, tok, source = loaded
    check_lengths(specs, tok, lm.config, job.specs)
    previous: list[EditSpec] = []
    applied = chain.diffs() if isinstance(chain, Chain) else []
    for d in applied:
        diffmod.apply(lm, d)
    if isinstance(chain, Chain):
        held = set(chain.spec_ids())
        previous = [s for s in specs_from_diffs(applied) if s.id in held]
        seen = {i for s in chain.steps for i in s.get("specs", [])}
        specs = [s for s in specs if s.id not in seen]
    with progress.stage(f"scoring {len(specs)} specs before the edits"):
        before = probe_table(lm, tok, specs)
    plan = EditPlan.make(lm, job.editor, job.options, job.regs, job.reg_in_loop, config.seed,
                         stats=config.stats_provider(), progress=progress)
    if isinstance(chain, Path):
        chain = new_chain(chain, plan, job.regs, batch_size, config, source, str(job.specs))
    result = run_sequence(loaded, specs, plan, config, batch_size=batch_size, chain=chain, chosen=chosen,
                          schedule=schedule, previous=previous, applied=applied)
    with progress.stage(f"scoring {len(specs)} specs after the edits"):
        rows = _rows(specs, before, probe_table(lm, tok, specs))
    summary = {"mode": "sequential", "batch_size": batch_size, "editor": job.editor, "eval_at": schedule.describe(),
               **probe_summary(rows), "results": rows, "edits": result["edits"], "steps": result["steps"],
               "evaluation": result["evaluation"],
               "forgetting": result["forgetting"]}
    if chain is None:
        with result["base"].reverted() as m:
            d = diffmod.squash(m, result["diffs"])
        d.manifest["sequence"] = {k: summary[k] for k in ("mode", "batch_size", "eval_at", "steps", "evaluation",
                                                          "forgetting")}
        diffmod.seal(d)
        path = _write_new(d, job, default_out(job.specs, f"{job.editor}-seq", d.id))
        return {"diff": str(path), "id": d.id, **summary}
    return {"chain": str(chain.path), "id": result["steps"][-1]["id"] if result["steps"] else None, **summary}


def remove_from_chain(chain_path: str | os.PathLike, ids: Sequence[str], config: RunConfig | None = None) -> dict[str, Any]:
    """``kedit diff revert --edit ID CHAIN``: append a step that removes the edits, exactly."""
    from .paradigms import remove_edits

    Chain.open(chain_path)
    with exclusive(chain_path, "the chain", folder=True):
        chain = Chain.open(chain_path)
        chain.clean()
        chain.verify()
        fields, config = _chain_run(chain, config or RunConfig())
        progress = config.progress()
        loaded = load(config.model, progress=progress, **config.placement())
        plan = EditPlan.make(loaded.model, fields["editor"], fields["options"], fields["regs"], fields["reg_in_loop"],
                             config.seed, stats=config.stats_provider(), progress=progress)
        return remove_edits(loaded, chain, ids, plan)


def _rows(specs: Sequence[EditSpec], before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per spec: the edit prompt's probabilities before and after; paraphrases that now prefer
    the new target (over the old one, or, without one, more than before); neighbours whose own
    answer still beats the new target, and those the edit broke (they passed before)."""
    rows = []
    for spec, b, a in zip(specs, before, after):
        changed = a["p_true"] is None or a["p_new"] > a["p_true"]
        para_ok = sum((nt is None and n > bn) or (nt is not None and n > nt)
                      for (n, nt), (bn, _) in zip(a["para"], b["para"]))
        neigh_ok = [own > new for own, new in a["neigh"]]
        was_ok = [own > new for own, new in b["neigh"]]
        rows.append({"id": spec.id, "prompt": spec.text, "target_new": spec.target_new, "target_true": spec.target_true,
                     "p_new_before": b["p_new"], "p_new_after": a["p_new"],
                     "p_true_before": b["p_true"], "p_true_after": a["p_true"], "changed": changed,
                     "paraphrases": len(a["para"]), "paraphrases_changed": para_ok,
                     "neighbours": len(neigh_ok), "neighbours_kept": sum(neigh_ok),
                     "neighbours_damaged": sum(w and not k for w, k in zip(was_ok, neigh_ok))})
    return rows


def probe_summary(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """The table's totals: facts changed, paraphrases that follow, neighbours kept and broken."""
    return {"changed": sum(r["changed"] for r in rows), "count": len(rows),
            "paraphrases_changed": sum(r["paraphrases_changed"] for r in rows),
            "paraphrases": sum(r["paraphrases"] for r in rows),
            "neighbours_kept": sum(r["neighbours_kept"] for r in rows), "neighbours": sum(r["neighbours"] for r in rows),
            "neighbours_damaged": sum(r["neighbours_damaged"] for r in rows)}


def eval_model(config: RunConfig | None = None, diffs: Sequence[str | os.PathLike] = (),
               spec_path: str | os.PathLike | None = None, label: str | None = None) -> dict[str, Any]:
    """``kedit eval``: the evaluators of ``config`` on a model and, with ``diffs``, on the model
    with the chain applied.

    The specs are ``spec_path``'s, else those the diffs record; without evaluators named, the
    ones that declare themselves ``default`` run on the specs. Results on the unedited model are
    cached by its content hash, so comparing many diffs of one base pays for the base once.
    """
    config = config or RunConfig()
    chain = load_chain(diffs)
    specs = read_specs(spec_path) if spec_path else specs_from_diffs(chain)
    chosen = resolve_evaluators(config.evaluators or (default_evaluators() if specs else []), config.data)
    if not chosen:
        raise InputError("nothing to evaluate: name evaluators with --evaluator (see `kedit evaluators`), "
                         "or give edit specs (--specs, or diffs that record them)")
    needy = [c.name for c in chosen if c.entry.obj.uses_specs]
    if needy and not specs:
        raise InputError(f"evaluator(s) {', '.join(needy)} read edit specs: give --specs SPEC.jsonl "
                         "or diffs that record their specs")
    progress = config.progress()
    lm, tok, source = load(config.model, progress=progress, **config.placement())
    check_lengths(specs, tok, lm.config, spec_path)
    result = evaluate_chain(chosen, specs, lm, tok, chain, seed=config.seed, progress=progress,
                            use_cache=config.use_cache)
    from .manifest import method_label

    methods = list(dict.fromkeys(method_label(d.manifest) for d in chain))  # in chain order, once each
    return {"label": label or (", ".join(methods) if chain else "unedited"), "model": source.to_json(),
            "diffs": [d.id for d in chain], "specs": len(specs), "seed": config.seed, **result}


def load_chain(paths: Sequence[str | os.PathLike], trust: "Trust | None" = None) -> list[diffmod.Diff]:
    """Read diffs (their signatures verified), refuse what ``trust`` requires, check the order."""
    return diffmod.check_chain(_read_trusted(paths, trust))


def _read_trusted(paths: Sequence[str | os.PathLike], trust: "Trust | None") -> list[diffmod.Diff]:
    diffs = [diffmod.read(p) for p in paths]
    for d in diffs:
        if trust is not None:
            trust.check(str(d.path), d.signatures)
    return diffs


def diff_dtype(diffs: Sequence[diffmod.Diff], dtype: str | None) -> str:
    """The dtype to load the base in: the one asked for, else the one the first diff was made
    against (a diff computed on bfloat16 weights verifies only against bfloat16 weights)."""
    if dtype is not None:
        return dtype
    tensors = diffs[0].manifest.get("base", {}).get("tensors", {}) if diffs else {}
    return next((t["dtype"] for t in tensors.values() if t.get("dtype") in ("float32", "bfloat16", "float16")),
                "float32")


def verify(paths: Sequence[str], model: str | None = None, trust: "Trust | None" = None,
           dtype: str | None = None) -> list[dict[str, Any]]:
    """Each diff's status against the model, applying earlier ones of the chain in memory, and
    its signers (marked trusted or not with ``trust``). Diffs that are not a chain and name none
    of each other as parents are independent edits of one base: each is verified against the
    model alone, and every result says so (``"independent": true``)."""
    diffs = _read_trusted(paths, trust)
    independent = False
    try:
        diffmod.check_chain(diffs)
    except InputError:
        ids = {d.id for d in diffs}
        if any(ids & set(d.manifest.get("parents", [])) for d in diffs):
            raise  # parts of one chain, listed out of order: the error says how
        independent = True
    lm, _, _ = load(model, dtype=diff_dtype(diffs, dtype))
    out = []
    for d in diffs:
        signed = trust.report(d.signatures) if trust is not None else [dict(s) for s in d.signatures]
        try:
            st = diffmod.state(lm, d)
        except InputError as exc:
            out.append({"diff": str(d.path), "id": d.id, "status": "refused", "reason": str(exc), "signatures": signed,
                        "independent": independent})
            if independent:
                continue
            break
        out.append({"diff": str(d.path), "id": d.id, "status": "applies" if st == "base" else "already applied",
                    "signatures": signed, "independent": independent})
        if st == "base" and not independent:
            diffmod.apply(lm, d)
    return out


def _save_folder(lm, tok, out: Path, extra: dict[str, str] | None = None, dtype: str | None = None,
                 max_shard_size: str | None = None) -> None:
    """``save_pretrained`` into ``out`` atomically, in ``dtype`` (default: as loaded), sharded as
    ``save_pretrained`` shards (``max_shard_size``, default transformers')."""
    import torch

    if dtype is not None:
        lm.to(getattr(torch, dtype))
    with atomic_dir(out) as tmp:
        lm.save_pretrained(tmp, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
        tok.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")


def apply_to_folder(paths: Sequence[str], out: str | os.PathLike, model: str | None = None,
                    overwrite: bool = False, card: bool = False, trust: "Trust | None" = None,
                    dtype: str | None = None, max_shard_size: str | None = None) -> list[str]:
    """Apply a chain to a model and save the result as a ``from_pretrained`` folder. The chain
    applies in the dtype it was computed against (exactly); ``dtype`` is the dtype saved."""
    with claimed(out, inputs=paths, overwrite=overwrite, folder=True):
        diffs = load_chain(paths, trust)
        lm, tok, source = load(model, dtype=diff_dtype(diffs, None))
        statuses = [diffmod.apply(lm, d) for d in diffs]
        extra = None
        if card:
            extra = {"README.md": model_card(diffs, source),
                     "kedit_diff.json": json.dumps([d.manifest for d in diffs], indent=2, ensure_ascii=False)}
        _save_folder(lm, tok, Path(out), extra, dtype=dtype, max_shard_size=max_shard_size)
        return statuses


def export_peft(paths: Sequence[str], out: str | os.PathLike, model: str | None = None, overwrite: bool = False,
                trust: "Trust | None" = None, svd_rank: int | None = None) -> dict[str, Any]:
    """A chain of low-rank diffs as a PEFT LoRA adapter folder (see :mod:`kedit.peft_export`)."""
    from .atomic import atomic_dir
    from .peft_export import export_peft as write_adapter

    with claimed(out, inputs=paths, overwrite=overwrite, folder=True):
        diffs = load_chain(paths, trust)
        lm, _, source = load(model, dtype=diff_dtype(diffs, None))
        # load_chain checked the order, so the chain starts at this model if its first diff does
        if diffmod.state(lm, diffs[0]) != "base":
            raise InputError(f"{diffs[0].path}: already applied to {source.name_or_path}; an adapter goes on the base")
        base = (diffs[0].manifest.get("base") or {}).get("hub_id") or source.name_or_path
        with atomic_dir(out) as tmp:
            return write_adapter(diffs, lm, tmp, base, svd_rank)


def revert_in_folder(paths: Sequence[str], out: str | os.PathLike, model: str | None = None,
                     overwrite: bool = False, trust: "Trust | None" = None, dtype: str | None = None) -> list[str]:
    """Revert a chain (last diff first) and save the result."""
    with claimed(out, inputs=paths, overwrite=overwrite, folder=True):
        diffs = load_chain(paths, trust)
        lm, tok, _ = load(model, dtype=diff_dtype(diffs, dtype))
        statuses = [diffmod.revert(lm, d) for d in reversed(diffs)]
        _save_folder(lm, tok, Path(out))
        return statuses


def squash(paths: Sequence[str], out: str | os.PathLike, model: str | None = None,
           trust: "Trust | None" = None, overwrite: bool = False, dtype: str | None = None) -> diffmod.Diff:
    """One diff equal to a chain, written to ``out``."""
    if Path(out).is_dir():
        raise InputError(f"-o {out}: is a folder; squash writes one diff file")
    with claimed(out, inputs=paths, overwrite=overwrite, flag="-o"):
        diffs = load_chain(paths, trust)
        lm, _, _ = load(model, dtype=diff_dtype(diffs, dtype))
        result = diffmod.squash(lm, diffs)
        diffmod.write(result, out)
        return result


def _hub_base(source: Any) -> tuple[str | None, str]:
    """(Hub id for the card's ``base_model``, or None; a sentence on where the weights came from)."""
    from .models import EMBEDDED_UPSTREAM

    if source.kind == "hub":
        return source.name_or_path, f"the Hub model `{source.name_or_path}`"
    if source.kind == "embedded":
        return EMBEDDED_UPSTREAM, (f"`{EMBEDDED_UPSTREAM}` as kedit embeds it: {source.name_or_path}, a Q4_1 GGUF "
                                   "quantization dequantized to float32, so its weights differ slightly from the "
                                   "original bfloat16 ones")
    return None, f"the local model `{source.name_or_path}`"


def model_card(diffs: Sequence[diffmod.Diff], source: Any) -> str:
    """A Hub-style README: ``base_model`` names a Hub id where there is one (the embedded model's
    upstream id, with its quantization noted), never a local path or a free-form string."""
    from .manifest import method_label

    hub_id, origin = _hub_base(source)
    methods = list(dict.fromkeys(method_label(d.manifest) for d in diffs))
    editors = sorted({(d.manifest.get("editor") or {}).get("name", "?") for d in diffs})
    specs = sum((d.manifest.get("specs") or {}).get("count", 0) for d in diffs)
    title = hub_id or Path(str(source.name_or_path)).name
    lines = ["---"] + ([f"base_model: {hub_id}", "base_model_relation: finetune"] if hub_id else []) + \
        ["library_name: transformers", "tags: [kedit, knowledge-editing" + "".join(f", {e}" for e in editors) + "]",
         "---", "", f"# {title}, edited with kedit", "",
         f"This model is {origin}, with {len(diffs)} kedit diff(s) applied ({specs} edit specs; "
         f"{', '.join(methods)}). Full provenance, including the base tensor hashes, is in `kedit_diff.json`.",
         "", "| diff id | method | specs |", "|---|---|---|"]
    for d in diffs:
        lines.append(f"| `{d.id}` | {method_label(d.manifest)} | {(d.manifest.get('specs') or {}).get('count', 0)} |")
    return "\n".join(lines) + "\n"
