"""Hyperparameter sweeps on the embedded SmolLM2 (CPU), for choosing defaults by measurement.

    python bench/sweep.py lambda --n 100 --values 2000,5000,10000,20000 [--methods memit,emmet]
    python bench/sweep.py layers --method memit --n 50 --windows 1-5,4-8,7-11,11-15
    python bench/sweep.py layers --method rome --n 10 --layers 2,4,5,6,8,11,15
    python bench/sweep.py tokens --n 100 --tokens 20000,100000,300000 [--methods memit]
    python bench/sweep.py corpus --n 100 --corpora builtin,sampled,PATH... [--tokens 20000] [--methods memit,memit+rect:0.4]

Cases, scores and perplexity are those of bench/lte.py. In the λ sweep the target values z do
not depend on λ (only the solve does), so they are optimised once per method and layer and reused; every
other step (keys, solve, scoring) runs for each λ; likewise across statistics token budgets and
corpora. ``rome`` edits each case on the unedited model. A method ``NAME+REG`` runs NAME with the
regularizer REG after the solve (``memit+rect:0.4``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kedit.cli import tune_runtime  # noqa: E402  (light: no torch)

tune_runtime()  # as the kedit command does; must precede torch's import

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lte import DATA, cases, single_edits  # noqa: E402


def _memo_values():
    """Reuse z across a λ sweep: same model, specs, layer and value options give the same z."""
    from kedit_plugins.lte import values

    real, memo = values.optimize, {}

    def optimize(model, tok, arch, specs, templates, site, layer, opts, **kw):
        key = (tuple(s.id for s in specs), tuple(templates), site, layer,
               json.dumps(opts.model_dump(include=set(values.ValueOptions.model_fields)), sort_keys=True))
        if key not in memo:
            memo[key] = real(model, tok, arch, specs, templates, site, layer, opts, **kw)
        return memo[key]

    values.optimize = optimize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["lambda", "layers", "tokens", "corpus"])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--values", default="2000,5000,10000,20000", help="λ values (lambda sweep)")
    ap.add_argument("--methods", default="memit", help="methods of the λ sweep")
    ap.add_argument("--method", default="memit", help="method of the layer sweep")
    ap.add_argument("--windows", default="1-5,4-8,7-11,11-15", help="memit layer windows")
    ap.add_argument("--layers", default="2,4,5,6,8,11,15", help="rome layers")
    ap.add_argument("--stats-tokens", type=int, default=300_000)
    ap.add_argument("--tokens", default="20000,100000,300000", help="statistics budgets (tokens sweep; the first "
                    "one in the corpus sweep)")
    ap.add_argument("--corpora", default="builtin,sampled", help="statistics corpora (corpus sweep): builtin, sampled "
                    "or a file")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()

    from dataclasses import replace

    from kedit import diff as diffmod
    from kedit.config import RunConfig, StatsConfig
    from kedit.editing import EditPlan, compute_diff
    from kedit.scoring import perplexity
    from kedit_plugins.edit_metrics import counterfact_scores

    config = RunConfig(stats=StatsConfig(str(DATA / "wikitext2" / "wiki.test.raw"), args.stats_tokens, 256))
    loaded = config.load()
    model, tok, _ = loaded
    specs = cases(args.n)
    text = (DATA / "wikitext2" / "wiki.test.raw").read_text()[:20_000]
    stats = config.stats_provider()
    base = counterfact_scores(model, tok, specs)
    base_ppl = perplexity(model, tok, text)
    rows = [{"config": "unedited", **base, "ppl_change": 0.0, "s": 0.0}]
    print(json.dumps(rows[-1]), file=sys.stderr)

    def batch(method: str, raw: dict, label: str, key_stats=stats) -> None:
        method, _, reg = method.partition("+")
        plan = EditPlan.make(model, method, raw, [reg] if reg else [], seed=config.seed, stats=key_stats)
        t = time.perf_counter()
        d = compute_diff(loaded, specs, plan)
        sec = time.perf_counter() - t
        diffmod.apply(model, d)
        scores, ppl = counterfact_scores(model, tok, specs), perplexity(model, tok, text)
        diffmod.revert(model, d)
        rows.append({"config": label, **scores, "ppl_change": ppl / base_ppl - 1, "s": sec})
        print(json.dumps(rows[-1]), file=sys.stderr)

    _memo_values()
    if args.what == "lambda":
        for method in args.methods.split(","):
            for lam in args.values.split(","):
                batch(method, {"mom2_update_weight": float(lam)}, f"{method} λ={lam}")
    elif args.what == "tokens":
        for n_tokens in args.tokens.split(","):
            budget = replace(config, stats=replace(config.stats, n_tokens=int(n_tokens))).stats_provider()
            for method in args.methods.split(","):
                batch(method, {}, f"{method}, statistics over {int(n_tokens):,} tokens", budget)
    elif args.what == "corpus":
        n_tokens = int(args.tokens.split(",")[0])
        for corpus in args.corpora.split(","):
            budget = replace(config, stats=StatsConfig(corpus, n_tokens, 256)).stats_provider()
            name = Path(corpus).name if Path(corpus).exists() else corpus
            for method in args.methods.split(","):
                batch(method, {}, f"{method}, statistics: {n_tokens:,} tokens of {name}", budget)
    elif args.method == "rome":
        for layer in args.layers.split(","):
            plan = EditPlan.make(model, "rome", {"layer": int(layer)}, seed=config.seed, stats=stats)
            scores, sec = single_edits(loaded, specs, plan)
            rows.append({"config": f"rome layer {layer}", **scores, "ppl_change": float("nan"), "s": sec})
            print(json.dumps(rows[-1]), file=sys.stderr)
    else:
        for window in args.windows.split(","):
            lo, hi = (int(x) for x in window.split("-"))
            batch(args.method, {"layers": list(range(lo, hi + 1))}, f"{args.method} layers {window}")

    what = "s per edit (median)" if args.what == "layers" and args.method == "rome" else "s for the batch"
    print(f"\nSmolLM2, CounterFact first {len(specs)} cases\n")
    print(f"| config | ES | PS | NS | ppl change | {what} |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ppl = "–" if r["ppl_change"] != r["ppl_change"] else f"{100 * r['ppl_change']:+.2f}%"
        print(f"| {r['config']} | {r['ES']:.3f} | {r['PS']:.3f} | {r['NS']:.3f} | {ppl} | {r['s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
