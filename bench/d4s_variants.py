"""D4S variants from one D4S chain, without re-editing: D4S's result after t edits is a function of
its sums S_RK, S_KK (every z, key and residual is computed on the original model), so another
residual spread or another λ gives W0 + (c_l S_RK_l)(λ' C0_l + S_KK_l)⁻¹ from the saved state,
where c_l rescales layer l's share of the residual. This is exactly what `d4s` with those
options computes (its z, keys and residuals would be the same), at the cost of one solve per
layer instead of the whole sequence.

    python bench/d4s_variants.py [--chain /tmp/kedit-bench/sequential/d4s] [--lambdas 2000,8000]
"""
from __future__ import annotations

import argparse
import json
import sys

from lte import ROOT  # lte sets THP before it imports torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chain", default="/tmp/kedit-bench/sequential/d4s")
    ap.add_argument("--lambdas", default="2000,8000")
    ap.add_argument("--spreads", default="reference,equal")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "d4s_variants.json"))
    args = ap.parse_args()

    import torch

    from kedit.arch import arch_for
    from kedit.atomic import atomic_write_text
    from kedit.config import RunConfig, StatsConfig
    from kedit.evaluate import Evaluation, resolve_evaluators, specs_from_diffs
    from kedit.sequence import Chain
    from kedit_plugins.lte.solve import spd_solve

    chain = Chain.open(args.chain)
    rec = chain.record
    layers = rec["options"]["layers"] or [4, 5, 6, 7, 8]
    state = chain.state()
    specs = specs_from_diffs(chain.diffs())
    # chains from before the built-in corpus recorded no corpus for model-sampled text
    config = RunConfig(model=rec.get("model"), seed=rec["seed"],
                       stats=StatsConfig(rec["stats"]["corpus"] or "sampled", rec["stats"]["n_tokens"]), quiet=True)
    model, tok, _ = config.load()
    arch = arch_for(model)
    stats = config.stats_provider()
    c0 = stats.second_moment(model, tok, layers)
    base = {l: model.get_parameter(arch.mlp_out_weight(l)).detach().clone() for l in layers}
    chosen = resolve_evaluators(["counterfact"])
    ev0 = Evaluation(chosen, specs)
    ev0.base(model, tok)
    rows = []
    n = len(layers)
    for spread in args.spreads.split(","):
        for lam in (float(x) for x in args.lambdas.split(",")):
            dw_means = {}
            for i, l in enumerate(layers):
                scale = 1.0 if spread == "reference" else (n - i) / n  # equal share 1/n over the reference 1/(n−i)
                rk, kk = state[f"d4s.rk.{l}"] * scale, state[f"d4s.kk.{l}"]
                total = spd_solve(lam * c0[l] + kk, rk.T).T
                stored = arch.from_out_in(total)
                p = model.get_parameter(arch.mlp_out_weight(l))
                with torch.no_grad():
                    p.copy_((base[l].double() + stored).to(p.dtype))
                dw_means[l] = float((p.detach().double() - base[l].double()).abs().mean())
            ev = Evaluation(chosen, specs)
            ev.base_runs, ev.fingerprint = ev0.base_runs, ev0.fingerprint
            ev.edited(model, tok)
            s = ev.summary()
            m = s["metrics"]["counterfact"]
            row = {"spread": spread, "lambda": lam, "edits": len(specs), "ES": m["ES"], "PS": m["PS"], "NS": m["NS"],
                   "NS_unedited": s["base"]["counterfact"]["NS"], "mean_abs_dw": sum(dw_means.values()) / n,
                   "mean_abs_dw_per_layer": dw_means}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "mean_abs_dw_per_layer"}), file=sys.stderr, flush=True)
    with torch.no_grad():
        for l in layers:
            model.get_parameter(arch.mlp_out_weight(l)).copy_(base[l])
    lines = [f"D4S after {len(specs)} edits (batches of {rec['batch_size']}), variants re-solved from the chain's sums", "",
             "| spread | λ | ES | PS | NS (unedited) | mean \\|ΔW\\| |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['spread']} | {r['lambda']:.0f} | {r['ES']:.3f} | {r['PS']:.3f} | {r['NS']:.3f} ({r['NS_unedited']:.3f}) | "
                     f"{r['mean_abs_dw']:.3e} |")
    print("\n".join(lines))
    atomic_write_text(args.out, json.dumps({"chain": str(args.chain), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
