"""One process against N on this machine (torch.distributed, gloo on the CPU): key statistics,
a MEMIT batch edit (statistics from the cache, so the edit alone), and an evaluation, each
through the command line exactly as a user runs it, with a check that the results are equal.

    python bench/scaling.py                      # ~10 minutes on 2 cores; needs ../shared/data
    python bench/scaling.py --nproc 1,2 --report

One process uses all the cores (torch's threads); N processes get cores/N threads each, so the
table shows what splitting the work buys over threading it, on the same cores. Results are merged
into bench/results/scaling.json as each row finishes (rerun to fill in what is missing; --redo to
measure again). Nothing else CPU-heavy may run meanwhile (compare within one run).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results" / "scaling.json"


def kedit(argv: list[str], cache: Path, threads: int | None = None) -> tuple[dict, float]:
    env = {**os.environ, "KEDIT_CACHE_DIR": str(cache)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kedit", *argv, "--json", "-q"], env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"kedit {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", default="1,2", help="process counts to compare (default 1,2)")
    ap.add_argument("--stats-tokens", type=int, default=100_000)
    ap.add_argument("--edits", type=int, default=100, help="CounterFact cases in the MEMIT batch (and evaluated)")
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    counts = [int(x) for x in args.nproc.split(",")]
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="kedit-scaling-"))
    specs = work / "cf.jsonl"
    if not args.report:
        subprocess.run([sys.executable, "-m", "kedit", "import", "counterfact",
                        str(DATA / "counterfact" / "counterfact-train.json"), "-o", str(specs),
                        "--limit", str(args.edits)], check=True, capture_output=True)
    layers = "4,5,6,7,8"
    wiki = str(DATA / "wikipedia" / "enwiki_sample_plaintext.jsonl")
    tasks = {
        "stats": ["stats", "compute", "--layers", layers, "--corpus", wiki, "--tokens", str(args.stats_tokens)],
        "memit": ["apply", str(specs), "--plugin", "memit", "--corpus", wiki, "--stats-tokens",
                  str(args.stats_tokens)],
        "eval": ["eval", "--specs", str(specs), "--evaluator", "counterfact,token-acc,perplexity", "--data",
                 str(DATA / "wikitext2" / "wiki.test.raw"), "--no-cache"],
    }
    runs = [(task, n, None) for task in tasks for n in counts]
    if max(counts) > 1:  # one process with the threads of one of N: the same arithmetic, so the same diff id
        runs.append(("memit", 1, max(1, cores // max(counts))))
    for task, n, threads in runs:
        argv = tasks[task]
        key = f"{task}@{n}" + (f"x{threads}t" if threads else "")
        if args.report or (key in results and not args.redo):
            continue
        cache = work / f"cache{n}"
        if task == "memit":  # statistics ahead of time, so the row times the edit alone
            kedit(tasks["stats"], cache)
        out = ["--out", str(work / f"{key}.kedit.safetensors")] if task == "memit" else []
        res, secs = kedit(argv + out + (["--nproc", str(n)] if n > 1 else []), cache, threads)
        digest = {"stats": lambda r: {k: v["file"].rsplit("/", 1)[-1] for k, v in r["layers"].items()},
                  "memit": lambda r: r["id"],
                  "eval": lambda r: r["metrics"]}[task](res)
        results[key] = {"seconds": round(secs, 2), "result": digest,
                        "threads_per_process": threads or max(1, cores // n),
                        "when": time.strftime("%Y-%m-%d %H:%M")}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(f"{key}: {secs:.1f} s", file=sys.stderr)
    print("| work | " + " | ".join(f"{n} process{'es' if n > 1 else ''}" for n in counts) + " | speed-up | equal |")
    print("|---|" + "---|" * (len(counts) + 2))
    what = {"stats": f"key statistics, 5 layers, {args.stats_tokens:,} tokens (incl. model load)",
            "memit": f"MEMIT batch of {args.edits} (incl. load and before/after scoring)",
            "eval": f"eval: counterfact, token-acc, perplexity on {args.edits} specs, unedited"}
    for task in tasks:
        got = [results.get(f"{task}@{n}") for n in counts]
        if not all(got):
            continue
        equal = all(g["result"] == got[0]["result"] for g in got)
        print(f"| {what[task]} | " + " | ".join(f"{g['seconds']:.1f} s" for g in got) +
              f" | {got[0]['seconds'] / got[-1]['seconds']:.2f}× | {'yes' if equal else 'NO'} |")
        for key, r in results.items():
            if key.startswith(f"{task}@1x") and got[-1]:
                same = r["result"] == got[-1]["result"]
                print(f"| {what[task]}, 1 process at {r['threads_per_process']} thread(s) | {r['seconds']:.1f} s | "
                      f"{got[-1]['seconds']:.1f} s | {r['seconds'] / got[-1]['seconds']:.2f}× | "
                      f"{'yes' if same else 'NO'} |")
    print(f"\n({cores} cores; one process runs {cores} threads, N processes {max(1, cores // max(counts))} each. "
          "\"equal\": the same cache files, diff id or metrics.)")


if __name__ == "__main__":
    main()
