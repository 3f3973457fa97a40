"""RECT on one MEMIT batch (the issue's target): ES/PS/NS and the perplexity increase of MEMIT on a
batch of N CounterFact edits, unregularized, with `rect:K` on the finished deltas (the paper's
way), and with `rect:K` inside MEMIT's layer loop (`--reg-in-loop`).

Perplexity: the first --ppl-tokens tokens of WikiText-2 test in 512-token windows. Key
statistics: WikiText-2 test (cached).

    python bench/rect_batch.py [--n 100] [--k 0.4] [--ppl-tokens 32768]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lte import DATA, ROOT, cases  # lte sets THP before it imports torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--k", type=float, default=0.4)
    ap.add_argument("--ppl-tokens", type=int, default=32768)
    ap.add_argument("--stats-tokens", type=int, default=300_000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rect_batch.json"))
    args = ap.parse_args()

    from kedit import diff as diffmod
    from kedit.atomic import atomic_write_text
    from kedit.config import RunConfig, StatsConfig
    from kedit.editing import EditPlan, compute_diff, regularize_diff, resolve_regs
    from kedit.evaluate import Evaluation, resolve_evaluators

    config = RunConfig(stats=StatsConfig(str(DATA / "wikitext2" / "wiki.test.raw"), args.stats_tokens), quiet=True)
    loaded = config.load()
    model, tok, _ = loaded
    specs = cases(args.n)
    stats = config.stats_provider()
    plan = EditPlan.make(model, "memit", {}, seed=config.seed, stats=stats)
    rect = resolve_regs([f"rect:{args.k}"])
    chosen = resolve_evaluators(["counterfact", f"perplexity:data={DATA / 'wikitext2' / 'wiki.test.raw'},"
                                                 f"max_tokens={args.ppl_tokens}"])
    t = time.perf_counter()
    plain = compute_diff(loaded, specs, plan)
    runs = {"memit": (plain, time.perf_counter() - t),
            f"memit + rect:{args.k} (after the solve)": (regularize_diff(model, plain, rect), 0.0)}
    t = time.perf_counter()
    runs[f"memit + rect:{args.k} (in the layer loop)"] = (
        compute_diff(loaded, specs, EditPlan.make(model, "memit", {}, [f"rect:{args.k}"], True, stats=stats)),
        time.perf_counter() - t)
    rows = []
    for label, (d, secs) in runs.items():
        ev = Evaluation(chosen, specs)
        ev.base(model, tok)
        diffmod.apply(model, d)
        ev.edited(model, tok)
        diffmod.revert(model, d)
        s = ev.summary()
        cf, ppl, ppl0 = s["metrics"]["counterfact"], s["metrics"]["perplexity"]["ppl"], s["base"]["perplexity"]["ppl"]
        rows.append({"label": label, "ES": cf["ES"], "PS": cf["PS"], "NS": cf["NS"], "NS_unedited": s["base"]["counterfact"]["NS"],
                     "ppl": ppl, "ppl_unedited": ppl0, "ppl_increase": ppl / ppl0 - 1, "edit_seconds": secs})
        print(f"{label}: ES {cf['ES']:.3f} ppl {ppl:.3f} (+{100 * (ppl / ppl0 - 1):.2f}%)", file=sys.stderr, flush=True)
    es0 = rows[0]["ES"]
    lines = [f"MEMIT, one batch of {args.n} CounterFact edits, SmolLM2 (CPU)", "",
             "| run | ES | ES / MEMIT's | PS | NS (unedited) | perplexity (unedited) | increase |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['ES']:.3f} | {r['ES'] / es0:.3f} | {r['PS']:.3f} | {r['NS']:.3f} ({r['NS_unedited']:.3f}) | "
                     f"{r['ppl']:.3f} ({r['ppl_unedited']:.3f}) | {100 * r['ppl_increase']:+.2f}% |")
    print("\n".join(lines))
    atomic_write_text(args.out, json.dumps({"n": args.n, "k": args.k, "ppl_tokens": args.ppl_tokens, "rows": rows}, indent=1) + "\n")
    print(f"wrote {Path(args.out)}", file=sys.stderr)


if __name__ == "__main__":
    main()
