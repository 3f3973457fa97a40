"""Locate-then-edit bench on the embedded SmolLM2 (CPU): quality, speed and memory.

CounterFact cases: the first N of ../shared/data/counterfact/counterfact-train.json whose prompt
contains the subject (template = prompt with the subject replaced by {}). Scored as in
docs/evaluation.md (ES/PS/NS by probability comparison). `rome` and `kn` edit each case on the
unedited model; the MEMIT family edits all N in one batch. Perplexity: first 20k characters of WikiText-2.
Key statistics: WikiText-2 test, cached after the first run (their time is reported separately).

    python bench/lte.py [--n 100] [--methods rome,memit,alphaedit,emmet] [--stats-tokens 300000]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

from kedit.cli import tune_runtime  # noqa: E402  (light: no torch)

tune_runtime()  # as the kedit command does; must precede torch's import
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SINGLE = ("rome", "kn")  # edited one case at a time on the unedited model
NO_STATS = ("kn", "ft")  # editors that read no key statistics


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cases(n: int):
    from kedit.plugins import lookup
    from kedit.spec import import_specs

    records = lookup("spec_importers", "counterfact").obj().read(DATA / "counterfact" / "counterfact-train.json")
    specs, _ = import_specs(records, skip_invalid=True)
    return specs[:n]


def single_edits(loaded, specs, plan) -> tuple[dict[str, float], float]:
    """Each spec edited alone on the unedited model: mean ES/PS/NS and the median seconds per edit."""
    from kedit import diff as diffmod
    from kedit.editing import compute_diff
    from kedit_plugins.edit_metrics import counterfact_scores

    model, tok, _ = loaded
    per, times = [], []
    for spec in specs:
        t = time.perf_counter()
        d = compute_diff(loaded, [spec], plan)
        times.append(time.perf_counter() - t)
        diffmod.apply(model, d)
        per.append(counterfact_scores(model, tok, [spec]))
        diffmod.revert(model, d)
    return {k: statistics.fmean(p[k] for p in per) for k in ("ES", "PS", "NS")}, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--methods", default="rome,memit,alphaedit,emmet")
    ap.add_argument("--stats-tokens", type=int, default=300_000)
    ap.add_argument("--rome-n", type=int, default=None, help="cases for the single-edit methods, rome and kn (default: --n)")
    ap.add_argument("-o", "--option", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()

    from kedit import diff as diffmod
    from kedit.config import RunConfig, StatsConfig
    from kedit.editing import EditPlan, compute_diff
    from kedit.options import parse_pairs
    from kedit.scoring import perplexity
    from kedit_plugins.edit_metrics import counterfact_scores

    config = RunConfig(stats=StatsConfig(str(DATA / "wikitext2" / "wiki.test.raw"), args.stats_tokens, 256))
    loaded = config.load()
    model, tok, _ = loaded
    specs = cases(args.n)
    text = (DATA / "wikitext2" / "wiki.test.raw").read_text()[:20_000]
    stats = config.stats_provider()
    t = time.perf_counter()
    base_scores = counterfact_scores(model, tok, specs)
    base_ppl = perplexity(model, tok, text)
    rows = [{"method": "unedited", "n": len(specs), **base_scores, "ppl": base_ppl, "ppl_change": 0.0,
             "s_per_edit": 0.0, "rss_mib": rss_mib()}]
    print(f"unedited scored in {time.perf_counter() - t:.1f}s: {base_scores}, ppl {base_ppl:.3f}", file=sys.stderr)
    extra = parse_pairs(args.option)
    for method in args.methods.split(","):
        plan = EditPlan.make(model, method, {k.split(".", 1)[1]: v for k, v in extra.items()
                                             if k.startswith(method + ".")}, seed=config.seed, stats=stats)
        layers = getattr(plan.options, "layers", None) or [plan.options.layer]
        t = time.perf_counter()
        if method not in NO_STATS:
            stats.second_moment(model, tok, layers)
        stats_s = time.perf_counter() - t
        if method in SINGLE:
            scores, sec = single_edits(loaded, specs[: args.rome_n or len(specs)], plan)
            ppl = float("nan")
            label = f"{method} (single edits, median s)"
        else:
            t = time.perf_counter()
            d = compute_diff(loaded, specs, plan)
            sec = (time.perf_counter() - t) / len(specs)
            diffmod.apply(model, d)
            scores = counterfact_scores(model, tok, specs)
            ppl = perplexity(model, tok, text)
            diffmod.revert(model, d)
            label = f"{method} (one batch)"
        n = min(len(specs), args.rome_n or len(specs)) if method in SINGLE else len(specs)
        rows.append({"method": label, "n": n, **scores, "ppl": ppl,
                     "ppl_change": (ppl / base_ppl - 1) if ppl == ppl else float("nan"),
                     "s_per_edit": sec, "stats_s": stats_s, "layers": layers, "rss_mib": rss_mib()})
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"threads: {torch.get_num_threads()}, torch {torch.__version__}\n")
    print("| method | n | ES | PS | NS | ppl change | s per edit | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ppl = "–" if r["ppl_change"] != r["ppl_change"] else f"{100 * r['ppl_change']:+.2f}%"
        print(f"| {r['method']} | {r['n']} | {r['ES']:.3f} | {r['PS']:.3f} | {r['NS']:.3f} | {ppl} | "
              f"{r['s_per_edit']:.2f} | {r['rss_mib']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
