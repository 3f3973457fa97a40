"""The RECT paradigm study (Gu et al.) on the embedded SmolLM2: general ability after sequential
and batch editing, with and without the RECT regularizer.

General ability: the GLUE-style sets in ../shared/data/glue (zero-shot, answer-option
log-likelihood, `--sample` examples per set), scored as changes against the unedited model with
paired 95% intervals. Edit success: CounterFact ES/PS/NS on the specs edited so far. Edits: the
first CounterFact cases of ../shared/data/counterfact. Key statistics: WikiText-2 test (cached).

- sequential: one spec per edit, each computed on the model the previous edits left; evaluated
  after each count in --checkpoints. rome and memit, each with and without rect:K.
- batch: memit on the first N specs in one edit, for N in --batches; the RECT variant regularizes
  the same deltas (rect is applied after the editor, so the edit is computed once).

Results go to --out (a `kedit report` runs file), rewritten after every evaluation, so a partial
run is still a valid file.

    python bench/rect_study.py [--parts batch,seq-memit,seq-rome] [--checkpoints 1,10,50,100]
                               [--batches 10,50,100] [--sample 100] [--out bench/results/rect_study.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# bench/ is on sys.path when a bench runs as a script; lte sets THP before it imports torch.
from lte import DATA, ROOT, cases


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="batch,seq-memit,seq-rome")
    ap.add_argument("--checkpoints", default="1,10,50,100")
    ap.add_argument("--batches", default="10,50,100")
    ap.add_argument("--sample", type=int, default=100, help="examples per GLUE-style set")
    ap.add_argument("--rect", type=float, default=0.4)
    ap.add_argument("--stats-tokens", type=int, default=300_000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rect_study.json"))
    args = ap.parse_args()


    from kedit import diff as diffmod
    from kedit.atomic import atomic_write_text
    from kedit.config import RunConfig, StatsConfig
    from kedit.editing import EditPlan, compute_diff, regularize_diff, resolve_regs
    from kedit.evaluate import Evaluation, resolve_evaluators
    from kedit.sequence import BaseStats, SequenceBase

    checkpoints = [int(x) for x in args.checkpoints.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    config = RunConfig(stats=StatsConfig(str(DATA / "wikitext2" / "wiki.test.raw"), args.stats_tokens, 256), quiet=True)
    loaded = config.load()
    model, tok, _ = loaded
    specs = cases(max(checkpoints + batches))
    stats = config.stats_provider()
    glue = f"glue:data={DATA / 'glue'},sample={args.sample}"
    # Every edit of a sequence uses the unedited model's key statistics, as sequential MEMIT and
    # AlphaEdit do (the first call happens before any edit; the cache is keyed by the weights).
    seq_stats = BaseStats(stats, SequenceBase(model))
    out_path = Path(args.out)
    runs: list[dict] = json.loads(out_path.read_text())["runs"] if out_path.is_file() else []

    def save() -> None:
        """Write the runs, plus per method the batch sizes as one curve (x = edits in the batch)."""
        single = [r for r in runs if not r.get("aggregate")]
        methods = dict.fromkeys(r.get("method", r["label"].rsplit(" batch ", 1)[0]) for r in single
                                if r.get("paradigm") == "batch")
        agg = []
        for m in methods:
            pts = sorted((r for r in single if r.get("paradigm") == "batch"
                          and r.get("method", r["label"].rsplit(" batch ", 1)[0]) == m), key=lambda r: r["edits"])
            curve = [{"edits": r["edits"], "metrics": r["metrics"], "delta": r["delta"], "ci": r["ci"]} for r in pts]
            agg.append({**pts[-1], "label": f"{m} (one batch of N)", "curve": curve, "aggregate": True})
        runs[:] = single + agg
        atomic_write_text(out_path, json.dumps({"runs": runs}, indent=1) + "\n")

    def evaluate(edited_specs, diffs) -> dict:
        """Unedited (cached) vs the model with ``diffs`` applied; the model is restored after."""
        chosen = resolve_evaluators([glue, "counterfact"])
        ev = Evaluation(chosen, edited_specs, use_cache=True)
        ev.base(model, tok)
        for d in diffs:
            diffmod.apply(model, d)
        t = time.perf_counter()
        ev.edited(model, tok)
        for d in reversed(diffs):
            diffmod.revert(model, d)
        s = ev.summary()
        print(f"  evaluated in {time.perf_counter() - t:.0f}s: glue mean.acc {s['metrics']['glue']['mean.acc']:.3f} "
              f"(unedited {s['base']['glue']['mean.acc']:.3f}), ES {s['metrics']['counterfact']['ES']:.2f}",
              file=sys.stderr, flush=True)
        return s

    def record(label: str, summary: dict, extra: dict) -> None:
        runs[:] = [r for r in runs if r["label"] != label]
        runs.append({"label": label, **summary, **extra})
        save()

    for part in [p for p in args.parts.split(",") if p]:
        if part == "batch":
            plan = EditPlan.make(model, "memit", {}, seed=config.seed, stats=stats)
            rect = resolve_regs([f"rect:{args.rect}"])
            for n in batches:
                t = time.perf_counter()
                plain = compute_diff(loaded, specs[:n], plan)
                sec = time.perf_counter() - t
                regularized = regularize_diff(model, plain, rect)
                for name, d in [("memit", plain), (f"memit+rect:{args.rect}", regularized)]:
                    label = f"{name} batch {n}"
                    print(f"{label}: edit {sec:.0f}s", file=sys.stderr, flush=True)
                    record(label, evaluate(specs[:n], [d]), {"paradigm": "batch", "method": name, "edits": n,
                                                             "edit_seconds": sec})
        elif part.startswith("seq-"):
            method = part[4:]
            for regs in ([], [f"rect:{args.rect}"]):
                plan = EditPlan.make(model, method, {}, regs, seed=config.seed, stats=seq_stats)
                label = f"{method}{'+' + regs[0] if regs else ''} sequential"
                curve, diffs, t_edit = [], [], 0.0
                for i, spec in enumerate(specs[: max(checkpoints)], start=1):
                    t = time.perf_counter()
                    d = compute_diff(loaded, [spec], plan)
                    t_edit += time.perf_counter() - t
                    diffmod.apply(model, d)
                    diffs.append(d)
                    if i in checkpoints:
                        for x in reversed(diffs):
                            diffmod.revert(model, x)
                        print(f"{label}: {i} edits ({t_edit / i:.1f}s per edit)", file=sys.stderr, flush=True)
                        s = evaluate(specs[:i], diffs)
                        for x in diffs:
                            diffmod.apply(model, x)
                        curve.append({"edits": i, "metrics": s["metrics"], "delta": s["delta"], "ci": s["ci"]})
                        record(label, s, {"paradigm": "sequential", "edits": i, "curve": curve,
                                          "edit_seconds_per_edit": t_edit / i})
                for x in reversed(diffs):
                    diffmod.revert(model, x)
        else:
            raise SystemExit(f"unknown part {part!r}")
    save()
    print_tables(runs)
    print(f"\nwrote {out_path}; plots: kedit report {out_path} -o DIR")


def print_tables(runs: list[dict]) -> None:
    """Edit success and general-ability change per run (sequential runs: one row per checkpoint)."""
    rows = []
    for r in runs:
        if r.get("aggregate"):
            continue
        points = r.get("curve") or [{"edits": r["edits"], "metrics": r["metrics"], "delta": r["delta"], "ci": r["ci"]}]
        for p in points:
            rows.append((r["label"].replace(" sequential", "").rsplit(" batch ", 1)[0], r["paradigm"], p))
    tasks = [k[:-4] for k in rows[0][2]["metrics"]["glue"] if k.endswith(".acc") and k != "mean.acc"] if rows else []
    print("| method | paradigm | edits | ES | PS | NS | Δ mean acc (95% CI) | " + " | ".join(f"Δ {t}" for t in tasks) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(tasks))
    for method, paradigm, p in sorted(rows, key=lambda x: (x[1], x[0], x[2]["edits"])):
        cf, d, ci = p["metrics"]["counterfact"], p["delta"]["glue"], p["ci"]["glue"]
        mean = f"{d['mean.acc']:+.3f}" + (f" ({ci['mean.acc'][0]:+.3f}…{ci['mean.acc'][1]:+.3f})" if "mean.acc" in ci else "")
        per = " | ".join(f"{d[t + '.acc']:+.2f}" for t in tasks)
        print(f"| {method} | {paradigm} | {p['edits']} | {cf['ES']:.2f} | {cf['PS']:.2f} | {cf['NS']:.2f} | {mean} | {per} |")


if __name__ == "__main__":
    main()
