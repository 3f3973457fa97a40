"""Core figures for the closing note of the core issue: model load times (first, dequantizing the
embedded GGUF into an empty cache, and cached), the `ft` edit of specs/facts.jsonl, and diff sizes
per encoding (dense ft, low-rank, sparse after rect:0.4).

    python bench/core.py            # prints a Markdown table; takes ~2 minutes on 2 cores
"""
from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    import torch

    from kedit import delta as D
    from kedit import diff as diffmod
    from kedit.config import EditJob, RunConfig
    from kedit.models import load
    from kedit.workflows import apply

    rows = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["KEDIT_CACHE_DIR"] = cache
        _, first = timed(lambda: load(None))
        _, cached = timed(lambda: load(None))
        rows += [("model load, first (dequantize GGUF + write fp32 cache)", f"{first:.1f} s"),
                 ("model load, cached fp32 safetensors", f"{cached:.2f} s")]
        with tempfile.TemporaryDirectory() as out:
            config = RunConfig(quiet=True)
            res, secs = timed(lambda: apply(EditJob(ROOT / "specs" / "facts.jsonl", "ft",
                                                    out=Path(out) / f"ft{diffmod.SUFFIX}"), config))
            rows += [(f"`ft` on specs/facts.jsonl ({res['count']} specs), incl. load and before/after scoring",
                      f"{secs:.1f} s"),
                     ("facts changed (P(new) > P(old) after)", f"{res['changed']}/{res['count']}"),
                     ("diff size, dense (ft, one 576×1536 matrix)", f"{res['bytes'] / 1024:.0f} KiB")]
            res, _ = timed(lambda: apply(EditJob(ROOT / "specs" / "facts.jsonl", "ft", regs=("rect:0.4",),
                                                 out=Path(out) / f"rect{diffmod.SUFFIX}"), config))
            rows += [("diff size, sparse (ft + rect:0.4)", f"{res['bytes'] / 1024:.0f} KiB"),
                     ("facts changed with rect:0.4", f"{res['changed']}/{res['count']}")]
            model, _, _ = load(None)
            name = "model.layers.10.mlp.down_proj.weight"
            w = model.get_parameter(name).detach()
            g = torch.Generator().manual_seed(0)
            low = D.LowRank(torch.randn(w.shape[0], 10, generator=g), torch.randn(10, w.shape[1], generator=g) * 1e-3)
            d = diffmod.build({name: w}, {name: low}, {"base": {"name_or_path": "bench"}})
            p = diffmod.write(d, Path(out) / f"low{diffmod.SUFFIX}")
            rows.append(("diff size, low rank (rank 10, e.g. a 10-fact MEMIT-style layer delta)",
                         f"{p.stat().st_size / 1024:.0f} KiB"))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows.append(("peak RSS of this run", f"{rss:.0f} MiB"))
    print(f"threads: {torch.get_num_threads()}, python {sys.version.split()[0]}, torch {torch.__version__}\n")
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
