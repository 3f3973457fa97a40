"""Sequential editing on the embedded SmolLM2 (the D4S and AlphaEdit protocol, scaled to the CPU):
N CounterFact edits in consecutive batches, per method, through `kedit apply --mode sequential`
(the library call behind it), with weight drift after every batch and ES/PS/NS evaluated
immediately after each batch (on its specs), every --every edits and at the end (on all specs so
far); forgetting = immediate − final.

Each method's chain folder is kept under --work; an interrupted run resumes from its last whole
batch (the chain is continued), so the bench can be run in pieces. Results: --out (JSON), then
plots of mean |ΔW| per layer and against edits, and of ES/PS/NS against edits (--plots).

    python bench/sequential.py [--methods d4s,memit,alphaedit] [--n 1000] [--batch 50] [--every 250]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lte import DATA, ROOT, cases  # lte sets THP before it imports torch


def run_method(method: str, spec_file: Path, work: Path, args) -> dict:
    from kedit.config import EditJob, RunConfig, StatsConfig
    from kedit.sequence import Chain
    from kedit.workflows import apply

    chain_dir = work / method.replace(":", "-").replace("+", "_")
    corpus = str(DATA / "wikitext2" / "wiki.test.raw")
    editor, _, reg = method.partition("+")
    t0 = time.perf_counter()
    config = RunConfig(stats=StatsConfig(corpus, args.stats_tokens), evaluators=("counterfact",), quiet=True)
    eval_at = ("immediate", f"every:{args.every}", "final")
    if (chain_dir / "chain.json").is_file():
        apply(EditJob(spec_file, continue_chain=str(chain_dir), eval_at=eval_at), config)
    else:
        apply(EditJob(spec_file, editor, regs=(reg,) if reg else (), mode="sequential", out=str(chain_dir),
                      batch_size=args.batch, eval_at=eval_at), config)
    rec = Chain.open(chain_dir).record
    print(f"{method}: {len(rec['steps'])} batches in {time.perf_counter() - t0:.0f}s this run", file=sys.stderr, flush=True)
    return {"method": method, "batch_size": rec["batch_size"], "steps": rec["steps"],
            "evaluation": rec.get("evaluation", []), "forgetting": rec.get("forgetting")}


def layer_of(name: str) -> int:
    return int(next(p for p in name.split(".") if p.isdigit()))


def tables(results: list[dict]) -> str:
    lines = ["| method | edits | ES | PS | NS | NS unedited | forgetting ES (imm − final) | mean \\|ΔW\\| | "
             "mean \\|W\\| | δ>0.077 | s per batch |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        last = r["steps"][-1]
        drift = list(last["drift"].values())
        final = ([p for p in r["evaluation"] if p["at"] in ("final", "every")] or r["evaluation"])[-1]
        m, b = final["metrics"]["counterfact"], final["base"]["counterfact"]
        gap = (r.get("forgetting") or {}).get("counterfact.ES", {}).get("gap")
        secs = sum(s["seconds"] for s in r["steps"]) / len(r["steps"])
        mean = {k: sum(x[k] for x in drift) / len(drift) for k in drift[0]}
        lines.append(f"| {r['method']} | {final['edits']} | {m['ES']:.3f} | {m['PS']:.3f} | {m['NS']:.3f} | {b['NS']:.3f} | "
                     f"{'-' if gap is None else f'{gap:+.3f}'} | {mean['mean_abs_dw']:.3e} | {mean['mean_abs_w']:.5f} | "
                     f"{mean['share_rel_gt_0.077']:.3f} | {secs:.0f} |")
    return "\n".join(lines)


def plots(results: list[dict], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        xs = [s["edits"] for s in r["steps"]]
        ys = [sum(d["mean_abs_dw"] for d in s["drift"].values()) / len(s["drift"]) for s in r["steps"]]
        axes[0].plot(xs, ys, marker=".", label=r["method"])
        final = r["steps"][-1]["drift"]
        layers = sorted(final, key=layer_of)
        axes[1].plot([layer_of(n) for n in layers], [final[n]["mean_abs_dw"] for n in layers], marker="o",
                     label=f"{r['method']} ({r['steps'][-1]['edits']} edits)")
    axes[0].set(xlabel="edits", ylabel="mean |ΔW| over the edited layers", title="Weight change against edits")
    axes[1].set(xlabel="layer", ylabel="mean |ΔW|", title="Per layer, after the last batch")
    from matplotlib.ticker import MaxNLocator

    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(folder / "delta_norm.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    for k, ax in zip(("ES", "PS", "NS"), axes):
        for r in results:
            pts = sorted((p for p in r["evaluation"] if p["at"] in ("every", "final")), key=lambda p: p["edits"])
            pts = list({p["edits"]: p for p in pts}.values())
            ax.plot([p["edits"] for p in pts], [p["metrics"]["counterfact"][k] for p in pts], marker="o", label=r["method"])
        whole = [p for r in results for p in r["evaluation"] if p["at"] in ("every", "final")]
        if whole:  # the unedited model on the most specs any point evaluated
            ref = max(whole, key=lambda p: p["edits"])
            ax.axhline(ref["base"]["counterfact"][k], color="grey", ls="--", lw=1, label=f"unedited ({ref['edits']} specs)")
        ax.set(xlabel="edits (all edits so far evaluated)", title=k, ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    out.append(folder / "edit_metrics.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="d4s,memit,alphaedit")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--stats-tokens", type=int, default=300_000)
    ap.add_argument("--work", default="/tmp/kedit-bench/sequential")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sequential.json"))
    ap.add_argument("--plots", default=str(ROOT / "docs" / "sequential"))
    ap.add_argument("--report-only", action="store_true", help="tables and plots from the chains as they are")
    args = ap.parse_args()

    from kedit.atomic import atomic_write_text
    from kedit.sequence import Chain
    from kedit.spec import write_specs

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    spec_file = work / f"counterfact-{args.n}.jsonl"
    if not spec_file.is_file():
        write_specs(spec_file, cases(args.n))
    results = []
    for method in [m for m in args.methods.split(",") if m]:
        if args.report_only:
            chain_dir = work / method.replace(":", "-").replace("+", "_")
            if not (chain_dir / "chain.json").is_file():
                continue
            rec = Chain.open(chain_dir).record
            # a run cut off mid-sequence has its points only in its steps
            points = rec.get("evaluation") or [p for s in rec["steps"] for p in s.get("eval", [])]
            results.append({"method": method, "batch_size": rec["batch_size"], "steps": rec["steps"],
                            "evaluation": points, "forgetting": rec.get("forgetting")})
        else:
            results.append(run_method(method, spec_file, work, args))
        results = [r for r in results if r["steps"]]
        atomic_write_text(args.out, json.dumps({"n": args.n, "batch": args.batch, "results": results}, indent=1) + "\n")
        if results and any(p["at"] in ("every", "final") for r in results for p in r["evaluation"]):
            print(tables(results), flush=True)
            for p in plots(results, Path(args.plots)):
                print(f"wrote {p}", file=sys.stderr)


if __name__ == "__main__":
    main()
