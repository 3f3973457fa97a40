"""The first run of a fresh install, and how fast the light commands answer.

    python bench/first_run.py [--runs 3] [--json bench/results/first_run.json]

1. The design card's command, ``kedit apply specs/facts.jsonl --plugin memit --reg rect:0.4``, in
   a new process with an empty cache (``KEDIT_CACHE_DIR`` in a temporary folder): the wall time,
   and where it went, read from kedit's own log lines (stderr is not a terminal, so every stage
   prints ``…: done in T``). Then the same command again on the warm cache.
2. ``kedit --help``, ``kedit plugins``, ``kedit editors`` and ``kedit diff show DIFF``: the median
   wall time of ``--runs`` fresh processes each.

Run it on a quiet machine: every figure is a wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DONE = re.compile(r"^kedit: (?P<stage>.+?): done(?:, (?P<work>.+?))? in (?P<t>[0-9.]+) (?P<unit>s|min|h)$")
UNIT = {"s": 1.0, "min": 60.0, "h": 3600.0}


def kedit(*args: str, env: dict[str, str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kedit.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)
    return time.perf_counter() - t, proc


def stages(stderr: str) -> list[tuple[str, float]]:
    out = []
    for line in stderr.splitlines():
        m = DONE.match(line.strip())
        if m:
            out.append((m["stage"], float(m["t"]) * UNIT[m["unit"]]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3, help="processes per light command")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    results: dict = {"command": "kedit apply specs/facts.jsonl --plugin memit --reg rect:0.4", "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "KEDIT_CACHE_DIR": str(work / "cache")}
        env.pop("KEDIT_LOAD_PLUGINS", None)
        (work / "specs").mkdir()
        (work / "specs" / "facts.jsonl").write_bytes((ROOT / "specs" / "facts.jsonl").read_bytes())
        for label in ("empty cache", "warm cache"):
            secs, proc = kedit("apply", "specs/facts.jsonl", "--plugin", "memit", "--reg", "rect:0.4",
                               "--out", f"{label.split()[0]}.kedit.safetensors", env=env, cwd=work)
            if proc.returncode != 0:
                raise SystemExit(f"kedit apply failed:\n{proc.stderr}")
            changed = re.search(r"changed (\d+)/(\d+) facts", proc.stdout)
            results[label] = {"seconds": round(secs, 1), "stages": stages(proc.stderr),
                              "changed": changed.group(0) if changed else None}
            print(f"{label}: {secs:.1f} s", file=sys.stderr, flush=True)
        diff = str(work / "empty.kedit.safetensors")
        light = {}
        for argv in (["--help"], ["plugins"], ["editors"], ["diff", "show", diff]):
            times = []
            for _ in range(args.runs):
                secs, proc = kedit(*argv, env=env, cwd=work)
                if proc.returncode != 0:
                    raise SystemExit(f"kedit {' '.join(argv)} failed:\n{proc.stderr}")
                times.append(secs)
            name = "kedit " + " ".join(a if a != diff else "DIFF" for a in argv)
            light[name] = round(statistics.median(times), 2)
        results["light"] = light
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        results["python_startup_s"] = round(time.perf_counter() - t, 2)

    print(f"\n`{results['command']}`, {results['cpus']} CPUs\n")
    print("| run | wall s | changed |\n|---|---|---|")
    for label in ("empty cache", "warm cache"):
        r = results[label]
        print(f"| {label} | {r['seconds']:.1f} | {r['changed']} |")
    print("\nWhere the time of the empty-cache run went (kedit's own stage lines; nested stages overlap):\n")
    print("| stage | s |\n|---|---|")
    for stage, secs in results["empty cache"]["stages"]:
        print(f"| {stage} | {secs:.1f} |")
    print(f"\nLight commands (median of {args.runs} fresh processes; `python -c pass` takes "
          f"{results['python_startup_s']:.2f} s):\n")
    print("| command | wall s |\n|---|---|")
    for name, secs in light.items():
        print(f"| `{name}` | {secs:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
