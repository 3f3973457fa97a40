"""The RECT paper's study on the embedded SmolLM2: KN, ROME, MEND and MEMIT on zsRE, with and
without ``rect:0.4``, general abilities on the paper's eight tasks (``rect-tasks-v1``).

The edits are the last 100 zsRE records, the ones ``bench/mend_train.py`` holds out of MEND's
training. Parts (each resumable: every finished unit is merged into
``bench/results/rect_paper.json`` at once and skipped on the next run):

- ``unedited``: the tasks on the unedited model, per task-sample seed.
- ``single``: each of the first ``--single-n`` edits alone on the unedited model (token accuracy,
  mean over edits); the tasks after the first one.
- ``sequential``: ``--seq-n`` edits one at a time, each on the model the earlier ones left (ROME,
  MEMIT, KN, MEND); the paper's weight-change table (Manhattan distance, share of elements with
  relative change above 0.077 and 0.171) after 1, 5, 10 and 15 edits; token accuracy on all
  edits and the tasks at the end.
- ``batch``: one batch of 10, 50 and 100 edits (MEMIT, MEND).
- ``sweep``: RECT's keep-fraction 0.1–1.0 for ROME (single edits), MEMIT and MEND (a batch of
  ``--sweep-batch``): the edit is computed once and regularized at each fraction; the share of
  edit success kept at 0.4 against the paper's "over 94%".

    python bench/rect_study.py --part sweep
    python bench/rect_study.py --part sequential --editor rome --editor kn --seeds 0,1
    python bench/rect_study.py --report

MEND reads its artifact from ``--mend`` (default: bench/mend_train.py's output).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from lifelong import FixedBase, load_specs  # noqa: E402  (sets the runtime up before torch)
from lte import DATA, ROOT  # noqa: E402
from mend_train import DEFAULT_OUT as MEND_ARTIFACT  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "rect_paper.json"  # rect_study.json: the earlier GLUE-suite study
EDITORS = ("rome", "memit", "kn", "mend")
REGS = ((), ("rect:0.4",))
DRIFT_AT = (1, 5, 10, 15)
ACC_AT = (10, 25, 50)  # token accuracy on the edits so far, along a sequence (the end is always measured)
BATCHES = (10, 50, 100)


def results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"units": {}}


def save(path: Path, key: str, value: dict) -> None:
    from kedit.atomic import atomic_write_text

    data = results(path)
    data["units"][key] = value
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


class Study:
    def __init__(self, args):
        from kedit.models import load

        self.args = args
        self.loaded = load(None, quiet=True)
        self.model = self.loaded.model
        self.specs = load_specs("zsre", 10_000)[-100:]
        self.path = Path(args.results)
        self.done = set(results(self.path)["units"])

    def options(self, editor: str) -> dict[str, Any]:
        return {"artifact": str(self.args.mend)} if editor == "mend" else {}

    def plan(self, editor: str, regs: tuple[str, ...]):
        from kedit.editing import EditPlan
        from kedit.stats import KeyStats

        stats = KeyStats(corpus=str(DATA / "wikipedia" / "enwiki_sample_plaintext.jsonl"), n_tokens=1_000_000)
        return EditPlan.make(self.model, editor, self.options(editor), list(regs), seed=0, stats=stats)

    def tasks(self, seed: int) -> dict:
        from kedit.api import EvalContext
        from kedit_plugins.rect_tasks import RectTasks, RectTasksOptions

        opts = RectTasksOptions(data=str(DATA / "rect"), sample=self.args.sample, tasks=self.args.tasks or None)
        t = time.perf_counter()
        r = RectTasks().evaluate(self.model, self.loaded.tokenizer, [], opts, EvalContext(seed=seed))
        return {"metrics": r.metrics, "seconds": round(time.perf_counter() - t, 1)}

    def token_acc(self, specs) -> dict[str, float]:
        from kedit.api import EvalContext
        from kedit.scoring import TeacherForced
        from kedit_plugins.edit_metrics import TokenAccuracy

        ev = TokenAccuracy()
        opts = ev.Options()
        ctx = EvalContext(seed=0, scorer=TeacherForced(self.model, self.loaded.tokenizer))
        with self.base.reverted() as m:
            ref = ev.reference(m, self.loaded.tokenizer, specs, opts, EvalContext(seed=0))
        ctx.reference = ref
        r = ev.evaluate(self.model, self.loaded.tokenizer, specs, opts, ctx)
        return dict(r.metrics if hasattr(r, "metrics") else r)

    def unit(self, key: str, fn) -> None:
        if key in self.done:
            return
        t = time.perf_counter()
        value = fn()
        value["wall_seconds"] = round(time.perf_counter() - t, 1)
        save(self.path, key, value)
        self.done.add(key)
        print(f"{key}: {json.dumps(value)[:400]}", file=sys.stderr, flush=True)

    def edited(self, editor: str, regs, batches: list[list], at=(), acc_at=()) -> dict:
        """Apply ``batches`` in order (each computed on the model the earlier ones left); the
        drift after the counts in ``at``, token accuracy on the edits so far after those in
        ``acc_at``. The model is edited on return (see :meth:`restore`)."""
        from kedit import diff as diffmod
        from kedit.editing import SequenceStep, compute_diff
        from kedit.errors import KeditError
        from kedit.sequence import BaseStats, drift

        plan = self.plan(editor, regs)
        plan.stats = BaseStats(plan.stats, self.base)
        state: dict = {}
        specs = [s for b in batches for s in b]
        out: dict[str, Any] = {"drift": {}, "token_acc_at": {}}
        edits, t, acc_seconds = 0, time.perf_counter(), 0.0
        for batch in batches:
            try:
                d = compute_diff(self.loaded, batch, plan, sequence=SequenceStep(self.base, state))
            except KeditError as e:  # e.g. kn on a collapsed model: no neuron to move; the edit is not made
                out.setdefault("failed", []).append({"after": edits, "edits": len(batch), "error": str(e)[:300]})
                print(f"{editor}: edit {edits + 1} failed: {e}", file=sys.stderr, flush=True)
            else:
                self.base.keep(d.deltas)
                diffmod.apply(self.model, d)
            edits += len(batch)
            if edits in at:
                rows = drift(self.model, self.base, sorted(self.base._weights))
                out["drift"][edits] = {"l1_distance": sum(r["l1_distance"] for r in rows.values()),
                                       "share_rel_gt_0.077": _mean(r["share_rel_gt_0.077"] for r in rows.values()),
                                       "share_rel_gt_0.171": _mean(r["share_rel_gt_0.171"] for r in rows.values()),
                                       "matrices": len(rows)}
            if edits in acc_at:
                t_acc = time.perf_counter()
                out["token_acc_at"][edits] = self.token_acc(specs[:edits])
                acc_seconds += time.perf_counter() - t_acc
        out["edit_seconds"] = round(time.perf_counter() - t - acc_seconds, 1)
        return out

    def fresh(self) -> None:
        self.base = FixedBase(self.model, {})

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            for n, w in self.base._weights.items():
                self.model.get_parameter(n).copy_(w)
        self.fresh()

    # --- parts ---

    def unedited(self) -> None:
        self.fresh()
        for n in sorted({*BATCHES, self.args.single_n, self.args.sweep_batch}):
            # the floor under edit success: what the unedited model already gets right
            self.unit(f"unedited/token_acc/first{n}", lambda n=n: {"token_acc": self.token_acc(self.specs[:n])})
        for seed in self.args.seed_list:
            self.unit(f"unedited/seed{seed}", lambda s=seed: self.tasks(s))

    def single(self) -> None:
        n = self.args.single_n
        for editor in self.args.editors:
            for regs in self.args.regs:
                tag = f"single/{editor}/{_reg_tag(regs)}"

                def run(editor=editor, regs=regs):
                    accs = []
                    for spec in self.specs[:n]:
                        self.fresh()
                        self.edited(editor, regs, [[spec]])
                        accs.append(self.token_acc([spec]))
                        self.restore()
                    return {"n": n, "token_acc": {k: _mean(a[k] for a in accs) for k in accs[0]}}
                self.unit(tag, run)

                def tasks(seed, editor=editor, regs=regs):
                    self.fresh()
                    self.edited(editor, regs, [[self.specs[0]]])
                    try:
                        return {"tasks": self.tasks(seed)}
                    finally:
                        self.restore()
                self.task_units(tag, tasks)

    def sequential(self) -> None:
        n = self.args.seq_n
        for editor in self.args.editors:
            for regs in self.args.regs:
                self.measured(f"sequential/{editor}/{_reg_tag(regs)}/n{n}", editor, regs,
                              [[s] for s in self.specs[:n]], at=DRIFT_AT, acc_at=[a for a in ACC_AT if a < n])

    def batch(self) -> None:
        for editor in [e for e in self.args.editors if e in ("memit", "mend")]:
            for size in BATCHES:
                for regs in self.args.regs:
                    self.measured(f"batch/{editor}/{_reg_tag(regs)}/b{size}", editor, regs, [self.specs[:size]])

    def measured(self, tag: str, editor: str, regs, batches: list[list], at=(), acc_at=()) -> None:
        """Edit ``batches`` in order, then token accuracy on all their edits (unit ``tag``) and the
        tasks per seed (``tag/tasks/seedN``); the model is restored afterwards."""
        if tag in self.done and not self.tasks_missing(tag):
            return
        self.fresh()
        res = self.edited(editor, regs, batches, at=at, acc_at=acc_at)
        res["token_acc"] = self.token_acc([s for b in batches for s in b])
        if tag in self.done:  # edited again for its tasks: say whether the edit reproduced
            was = results(self.path)["units"][tag]["token_acc"]
            gap = max(abs(res["token_acc"][m] - was[m]) for m in was)
            print(f"{tag}: edited again for the tasks; token accuracy {'reproduced' if gap < 1e-9 else f'differs by {gap:.3g}'}",
                  file=sys.stderr, flush=True)
        self.unit(tag, lambda: res)
        self.task_units(tag, lambda seed: {"tasks": self.tasks(seed)})
        self.restore()

    def tasks_missing(self, tag: str) -> list[int]:
        """The seeds whose task unit under ``tag`` this run should still make."""
        return [] if self.args.skip_tasks else \
            [s for s in self.args.seed_list if f"{tag}/tasks/seed{s}" not in self.done]

    def task_units(self, tag: str, fn) -> None:
        for seed in self.tasks_missing(tag):
            self.unit(f"{tag}/tasks/seed{seed}", lambda seed=seed: fn(seed))

    def sweep(self) -> None:
        from kedit import diff as diffmod
        from kedit.editing import compute_diff, regularize_diff, resolve_regs

        keeps = [round(0.1 * i, 1) for i in range(1, 11)]
        for editor in [e for e in self.args.editors if e in ("rome", "memit", "mend")]:
            tag = f"sweep/{editor}"

            def run(editor=editor):
                groups = [[s] for s in self.specs[:self.args.single_n]] if editor == "rome" else \
                    [self.specs[:self.args.sweep_batch]]
                self.fresh()
                plan = self.plan(editor, ())
                diffs = [compute_diff(self.loaded, g, plan) for g in groups]
                out = {}
                for k in keeps:
                    accs = []
                    for g, d in zip(groups, diffs):
                        r = d if k == 1.0 else regularize_diff(self.model, d, resolve_regs([f"rect:{k}"]))
                        diffmod.apply(self.model, r)
                        accs.append((self.token_acc(g), len(g)))
                        diffmod.revert(self.model, r)
                    total = sum(n for _, n in accs)
                    out[str(k)] = {m: sum(a[m] * n for a, n in accs) / total for m in accs[0][0]}
                return {"groups": len(groups), "edits": sum(len(g) for g in groups), "keep": out}
            self.unit(tag, run)


def _reg_tag(regs) -> str:
    return "+".join(regs) or "none"


def _natural(key: str) -> list:
    """Sort key that orders b10 < b50 < b100."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _repeats(short: dict, long: dict | None, rtol: float = 1e-5) -> bool:
    """Whether another run's weight-change rows repeat every row of this one."""
    return bool(long) and all(
        n in long and all(abs(long[n][m] - d[m]) <= rtol * max(1.0, abs(d[m])) for m in d) for n, d in short.items())


def _drifts(units: dict) -> dict[str, dict]:
    """Each run's weight-change rows, less those a longer run of the same editor repeats exactly
    (a run to 15 edits and one to 100 share their first 15: the sequence is deterministic)."""
    drifts = {k: v["drift"] for k, v in units.items() if v.get("drift")}
    return {k: d for k, d in drifts.items()
            if not any(_repeats(d, dd) for kk, dd in drifts.items()
                       if kk.rsplit("/n", 1)[0] == k.rsplit("/n", 1)[0] and _natural(kk) > _natural(k))}


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def report(path: Path) -> None:
    units = results(path)["units"]
    print("## Unedited, rect-tasks-v1\n")
    for k, v in sorted(units.items()):
        if k.startswith("unedited/seed"):
            print(f"- {k}: mean.score {v['metrics']['mean.score']:.3f} ({v['seconds']:.0f} s)")
    print("\n## Edit success (token accuracy) and general abilities\n")
    print("| run | rewrite | rephrase | locality | rect-tasks mean (seeds) |")
    print("|---|---|---|---|---|")
    for k, v in sorted(units.items(), key=lambda kv: _natural(kv[0])):
        if "/tasks/" in k or k.startswith("sweep"):
            continue
        if "token_acc" not in v:
            continue
        tasks = [u["tasks"]["metrics"]["mean.score"] for kk, u in units.items() if kk.startswith(k + "/tasks/")]
        ta = v["token_acc"]
        print(f"| {k} | {ta['reliability']:.3f} | {ta['generalization']:.3f} | {ta['locality']:.3f} | "
              + (", ".join(f"{t:.3f}" for t in tasks) or "–") + " |")
    for k, v in sorted(units.items()):
        if v.get("failed"):
            f = v["failed"]
            n = sum(x["edits"] for x in f)
            print(f"\n- {k}: {n} {'edit' if n == 1 else 'edits'} could not be made and {'was' if n == 1 else 'were'} "
                  f"skipped, {'' if n == 1 else 'the first '}after {f[0]['after']} edits ({f[0]['error'][:200]})")
    tasks_table(units)
    curves = {k: v["token_acc_at"] for k, v in units.items() if v.get("token_acc_at")}
    if curves:
        print("\n## Sequential editing: token accuracy on all edits so far\n")
        print("| run | edits | rewrite | rephrase | locality |")
        print("|---|---|---|---|---|")
        for k, c in sorted(curves.items()):
            end = int(k.rsplit("/n", 1)[1])
            for n, ta in sorted({**c, str(end): units[k]["token_acc"]}.items(), key=lambda x: int(x[0])):
                print(f"| {k} | {n} | {ta['reliability']:.3f} | {ta['generalization']:.3f} | {ta['locality']:.3f} |")
    print("\n## Weight change after sequential edits (the paper's table)\n")
    print("| run | edits | Manhattan distance | share δ > 0.077 | share δ > 0.171 |")
    print("|---|---|---|---|---|")
    for k, rows in sorted(_drifts(units).items(), key=lambda kv: _natural(kv[0])):
        for n, d in sorted(rows.items(), key=lambda x: int(x[0])):
            print(f"| {k} | {n} | {d['l1_distance']:.4g} | {d['share_rel_gt_0.077']:.4f} | {d['share_rel_gt_0.171']:.4f} |")
    print("\n## RECT keep-fraction sweep (share of edit success kept, against keep 1.0)\n")
    keeps = [f"{0.1 * i:.1f}" for i in range(1, 11)]
    print("| run | edits | rewrite, unedited | " + " | ".join(keeps) + " |")
    print("|---|---|---|" + "---|" * len(keeps))
    for k, v in sorted(units.items()):
        if k.startswith("sweep/"):
            floor = units.get(f"unedited/token_acc/first{v['edits']}", {}).get("token_acc", {}).get("reliability")
            full = v["keep"]["1.0"]["reliability"]
            print(f"| {k} rewrite | {v['edits']} | {'–' if floor is None else f'{floor:.3f}'} | "
                  + " | ".join(f"{v['keep'][kk]['reliability']:.3f}" for kk in keeps) + " |")
            print(f"| {k} share kept | | | " + " | ".join(f"{v['keep'][kk]['reliability'] / full:.2f}" for kk in keeps)
                  + " |")
            if floor is not None and full > floor:
                print(f"| {k} share of the gain kept | | | "
                      + " | ".join(f"{(v['keep'][kk]['reliability'] - floor) / (full - floor):.2f}" for kk in keeps)
                      + " |")


def _task_scores(units: dict, prefix: str) -> dict[int, dict[str, float]]:
    """Seed -> the task metrics of the units ``{prefix}seedN``."""
    return {int(k.rsplit("seed", 1)[1]): (u.get("tasks") or u)["metrics"] for k, u in units.items()
            if k.startswith(prefix) and k[len(prefix):].startswith("seed")}


def _task_runs(units: dict) -> list[str]:
    """The runs that have task scores, in the tables' natural order."""
    return sorted({k.split("/tasks/")[0] for k in units if "/tasks/seed" in k}, key=_natural)


def tasks_table(units: dict) -> None:
    """Per task, the mean over sample seeds; the last column is the change of the mean score from
    the unedited model on the same samples, per seed (paired: a seed fixes the examples)."""
    base = _task_scores(units, "unedited/")
    runs = _task_runs(units)
    if not base or not runs:
        return
    names = sorted(n for n in next(iter(base.values())) if n.endswith(".score") and n != "mean.score")
    print("\n## General abilities (rect-tasks-v1), mean over sample seeds\n")
    print("| run | seeds | " + " | ".join(n[:-6] for n in names) + " | mean | change of mean, per seed |")
    print("|---|---|" + "---|" * (len(names) + 2))
    for run, scores in [("unedited", base)] + [(r, _task_scores(units, r + "/tasks/")) for r in runs]:
        diffs = [scores[s]["mean.score"] - base[s]["mean.score"] for s in sorted(scores) if s in base]
        print(f"| {run} | {','.join(map(str, sorted(scores)))} | "
              + " | ".join(f"{_mean(m[n] for m in scores.values()):.3f}" for n in names)
              + f" | {_mean(m['mean.score'] for m in scores.values()):.3f} | "
              + ("–" if run == "unedited" else ", ".join(f"{d:+.3f}" for d in diffs)) + " |")


def plots(path: Path, folder: Path) -> list[Path]:
    """The sweep, the weight-change table and the tasks per run, as PNGs under ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = results(path)["units"]
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    sweeps = {k.split("/")[1]: v for k, v in units.items() if k.startswith("sweep/")}
    if sweeps:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for editor, v in sorted(sweeps.items()):
            full = max(v["keep"]["1.0"]["reliability"], 1e-9)
            keeps = sorted(v["keep"], key=float)
            ax.plot([float(k) for k in keeps], [v["keep"][k]["reliability"] / full for k in keeps], marker="o",
                    label=f"{editor} ({v['edits']} edits)")
        ax.axvline(0.4, color="grey", lw=0.8, ls=":")
        ax.axhline(0.94, color="grey", lw=0.8, ls="--", label="the paper's 94%")
        ax.set(xlabel="RECT keep fraction", ylabel="share of rewrite accuracy kept", ylim=(0, 1.05),
               title="RECT sweep, zsRE (SmolLM2-135M)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(folder / "sweep.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    drifts = _drifts(units)
    if drifts:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for k, d in sorted(drifts.items()):
            ns = sorted(d, key=int)
            label = "/".join(k.split("/")[1:3])
            axes[0].plot([int(n) for n in ns], [d[n]["l1_distance"] for n in ns], marker="o", label=label)
            axes[1].plot([int(n) for n in ns], [d[n]["share_rel_gt_0.077"] for n in ns], marker="o", label=label)
        axes[0].set(xlabel="sequential edits", ylabel="Manhattan distance |W - W0|", yscale="log")
        axes[1].set(xlabel="sequential edits", ylabel="share of elements with |dW/W| > 0.077")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        written.append(folder / "weight_change.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    base = [m["mean.score"] for m in _task_scores(units, "unedited/").values()]
    runs = {r: [m["mean.score"] for m in _task_scores(units, r + "/tasks/").values()] for r in _task_runs(units)}
    if runs:
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(runs) + 1.5))
        names = list(reversed(runs))  # barh draws bottom-up: the first run on top
        ax.barh(range(len(names)), [_mean(runs[n]) for n in names])
        ax.set_yticks(range(len(names)), names, fontsize=7)
        if base:
            ax.axvline(_mean(base), color="black", lw=1, label=f"unedited {_mean(base):.3f}")
            ax.legend(fontsize=8)
        ax.set(xlabel="rect-tasks-v1 mean score (mean over sample seeds)")
        fig.tight_layout()
        written.append(folder / "tasks.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", action="append", choices=["unedited", "single", "sequential", "batch", "sweep"])
    ap.add_argument("--editor", action="append", choices=EDITORS, help="default: all four")
    ap.add_argument("--reg", action="append", choices=[_reg_tag(r) for r in REGS],
                    help="with or without RECT (default: both)")
    ap.add_argument("--seeds", default="0,1", help="task-sample seeds")
    ap.add_argument("--sample", type=int, default=50, help="examples per task and seed")
    ap.add_argument("--tasks", action="append", help="rect-tasks to run (default: all eight)")
    ap.add_argument("--skip-tasks", action="store_true",
                    help="edit success and weight change only; a later run without it adds the tasks")
    ap.add_argument("--single-n", type=int, default=10)
    ap.add_argument("--seq-n", type=int, default=100)
    ap.add_argument("--sweep-batch", type=int, default=50)
    ap.add_argument("--mend", default=str(MEND_ARTIFACT), help="MEND artifact (bench/mend_train.py)")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--plots", default=str(ROOT / "docs" / "rect-study" / "paper"), help="folder for the report's PNGs")
    args = ap.parse_args()
    if args.report:
        report(Path(args.results))
        for p in plots(Path(args.results), Path(args.plots)):
            print(f"plot: {p}")
        return
    args.editors = args.editor or list(EDITORS)
    args.regs = [r for r in REGS if not args.reg or _reg_tag(r) in args.reg]
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    if "mend" in args.editors and not Path(args.mend).is_file():
        sys.exit(f"{args.mend}: no MEND artifact; run bench/mend_train.py first or leave mend out (--editor ...)")
    study = Study(args)
    for part in args.part or ["unedited", "sweep", "single", "batch", "sequential"]:
        getattr(study, part)()
    report(Path(args.results))


if __name__ == "__main__":
    main()
