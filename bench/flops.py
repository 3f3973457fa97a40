"""Achieved GFLOP/s of the v* optimisation loop against a plain fp32 matmul on the same machine.

    python bench/flops.py [--method memit|rome] [--n 100] [--steps 6]

The loop runs ``--steps`` Adam steps with early stop off, so every request runs every step.
FLOPs are counted by torch's FlopCounterMode (matmuls and attention, forward and backward) in one
run; a second, uncounted run is timed. The one-off prompt pass (the cached prefix) is counted and
timed apart from the steps.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kedit.cli import tune_runtime  # noqa: E402  (light: no torch)

tune_runtime()  # as the kedit command does; must precede torch's import

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lte import cases  # noqa: E402


def matmul_gflops(m: int, k: int, n: int, reps: int = 10) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=["memit", "rome"], default="memit")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()

    from kedit.arch import arch_for
    from kedit.models import load
    from kedit_plugins.lte import packed, values
    from kedit_plugins.lte.prompts import context_templates, fact_row, kl_row

    model, tok, _ = load(None)
    arch = arch_for(model)
    n = 1 if args.method == "rome" else args.n
    specs = cases(n)
    groups, site, layer = ([(5, 10), (10, 10)], "mlp_out", 5) if args.method == "rome" else ([(10, 5)], "block", 8)
    templates = context_templates(model, tok, groups, seed=0)
    opts = values.ValueOptions(v_steps=args.steps, early_stop_loss=0.0)
    rows = [fact_row(tok, t, s, i, with_target=True) for i, s in enumerate(specs) for t in templates]
    rows += [kl_row(tok, s, i) for i, s in enumerate(specs)]

    def run():
        return values.optimize(model, tok, arch, specs, templates, site, layer, opts, average_init=args.method == "rome")

    with FlopCounterMode(display=False) as fc:
        packed.ValueRunner(model, arch, rows, layer)
    setup_flops = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        run()
    total_flops = fc.get_total_flops()
    run()  # warm-up: first touches of fresh memory
    t = time.perf_counter()
    packed.ValueRunner(model, arch, rows, layer)
    setup_s = time.perf_counter() - t
    t = time.perf_counter()
    run()
    total_s = time.perf_counter() - t
    loop_flops, loop_s = total_flops - setup_flops, total_s - setup_s
    tokens = sum(max([r.lookup, *r.target_pos]) + 1 - r.lookup for r in rows)

    print(f"threads: {torch.get_num_threads()}, torch {torch.__version__}; {args.method}, {n} request(s), "
          f"{len(rows)} rows, {tokens} suffix tokens per step, {args.steps} steps\n")
    print("| what | GFLOP | s | GFLOP/s |")
    print("|---|---|---|---|")
    print(f"| prompt pass (once) | {setup_flops / 1e9:.1f} | {setup_s:.2f} | {setup_flops / 1e9 / setup_s:.1f} |")
    print(f"| optimisation loop ({args.steps} steps) | {loop_flops / 1e9:.1f} | {loop_s:.2f} | "
          f"{loop_flops / 1e9 / loop_s:.1f} |")
    hidden = model.config.hidden_size
    inter = model.config.intermediate_size
    print(f"| plain fp32 matmul {tokens}×{hidden} @ {hidden}×{inter} | – | – | {matmul_gflops(tokens, hidden, inter):.1f} |")
    print(f"| plain fp32 matmul 2048×2048 @ 2048×2048 | – | – | {matmul_gflops(2048, 2048, 2048):.1f} |")


if __name__ == "__main__":
    main()
