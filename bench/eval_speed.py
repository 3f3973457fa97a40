"""Evaluation speed and the unedited SmolLM2's scores (CPU), uncached.

    python bench/eval_speed.py [--n 100] [--sample 100] [--json PATH]

Rows: counterfact + token-acc on the first N CounterFact cases (the ≤ 30 s target), the
GLUE-style suite at --sample examples per set (the ≤ 5 min target), neighborhood-kl, fluency
(greedy, 100 new tokens, the specs' edit prompts) and perplexity (WikiText-2, 32,768 tokens).
Then the unedited model's accuracy per set with its chance level and majority-class share.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# bench/ is on sys.path when a bench runs as a script; lte sets THP before it imports torch.
from lte import DATA, cases


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--sample", type=int, default=100)
    ap.add_argument("--json", help="also write the summaries here")
    args = ap.parse_args()

    from kedit.evaluate import Evaluation, resolve_evaluators
    from kedit.models import load

    model, tok, _ = load(None)
    specs = cases(args.n)
    groups = [("counterfact + token-acc", ["counterfact,token-acc"]),
              ("glue (8 sets)", [f"glue:data={DATA / 'glue'},sample={args.sample}"]),
              ("neighborhood-kl", ["neighborhood-kl"]),
              ("fluency", ["fluency"]),
              ("perplexity", [f"perplexity:data={DATA / 'wikitext2' / 'wiki.test.raw'}"])]
    rows, results = [], {}
    for label, names in groups:
        ev = Evaluation(resolve_evaluators(names), specs, use_cache=False)
        t = time.perf_counter()
        ev.base(model, tok)
        sec = time.perf_counter() - t
        s = ev.summary()
        results[label] = s
        rows.append((label, sec, s["metrics"]))
        print(f"{label}: {sec:.1f}s {json.dumps(s['metrics'])}", file=sys.stderr, flush=True)
    print(f"threads: {torch.get_num_threads()}, torch {torch.__version__}, {len(specs)} specs\n")
    print("| evaluators | seconds | metrics |")
    print("|---|---|---|")
    for label, sec, metrics in rows:
        flat = ", ".join(f"{k} {v:.3f}" for ev in metrics.values() for k, v in ev.items() if v is not None and "." not in k)
        print(f"| {label} | {sec:.1f} | {flat or 'see below'} |")
    glue = results["glue (8 sets)"]
    print("\n| set | n | accuracy | 95% CI | macro-F1 | chance | majority class | most-predicted share |")
    print("|---|---|---|---|---|---|---|---|")
    for task, info in glue["info"]["glue"].items():
        m = glue["metrics"]["glue"]
        lo, hi = glue["ci"]["glue"][f"{task}.acc"]
        print(f"| {task} | {info['n']} | {m[task + '.acc']:.2f} | {lo:.2f}–{hi:.2f} | {m[task + '.f1']:.2f} | "
              f"{info['chance']:.2f} | {info['majority']:.2f} | {info['most_predicted_share']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
