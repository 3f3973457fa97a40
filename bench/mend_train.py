"""Train MEND for the embedded SmolLM2 on zsRE and plot its training curve.

    python bench/mend_train.py [--out ~/.cache/kedit/artifacts/mend-smollm2-zsre.safetensors] [-o KEY VALUE ...]

The last ``validation`` (100) of the 1,000 zsRE records are held out: they are never trained on,
and ``bench/rect_study.py`` edits only those with MEND. Interrupted runs continue where they
stopped (the same command). Prints the curve's table and writes ``docs/mend/curve.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lte import DATA, ROOT  # lte sets the runtime up before torch is imported

ZSRE = DATA / "zsre" / "zsre_mend_train-1k.json"
DEFAULT_OUT = Path(os.environ.get("KEDIT_CACHE_DIR", Path.home() / ".cache" / "kedit")) / "artifacts" / \
    "mend-smollm2-zsre.safetensors"


def plot(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [c["step"] for c in curve]
    axes[0].plot(steps, [c["edit_nll"] for c in curve], label="edit NLL (paraphrase + edit prompt)")
    axes[0].plot(steps, [c["loc_kl"] for c in curve], label="locality KL")
    axes[0].set(xlabel="step", yscale="log", title="training losses (means over log windows)")
    axes[0].legend()
    val = [c for c in curve if "val_edit_success" in c]
    for key, label in (("val_edit_success", "edit success"), ("val_paraphrase", "paraphrase"),
                       ("val_locality", "locality")):
        axes[1].plot([c["step"] for c in val], [c.get(key) for c in val], marker="o", label=label)
    axes[1].set(xlabel="step", ylim=(0, 1.02), title="held-out single edits (token accuracy)")
    axes[1].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("-o", "--option", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=str(ROOT / "docs" / "mend" / "curve.png"))
    args = ap.parse_args()

    from kedit import artifacts
    from kedit.models import load
    from kedit.options import parse_pairs
    from kedit.progress import Progress
    from kedit.training import train

    out = Path(args.out)
    if not out.is_file():
        t = time.perf_counter()
        train("mend", ZSRE, out, load(None, quiet=True), parse_pairs(args.option), importer="zsre", seed=args.seed,
              progress=Progress())
        print(f"trained in {(time.perf_counter() - t) / 60:.1f} min", file=sys.stderr)
    meta = artifacts.read(out).meta
    curve = meta["report"]["curve"]
    print(f"artifact {out} ({meta['seconds'] / 60:.1f} min of training"
          + (f", resumed at step {meta['resumed_at']}" if meta["resumed_at"] else "") + ")")
    print("options: " + json.dumps(meta["options"]))
    print("\n| step | edit NLL | locality KL | val edit success | val paraphrase | val locality |")
    print("|---|---|---|---|---|---|")
    for c in curve:
        if "val_edit_success" in c:
            print(f"| {c['step']} | {c['edit_nll']:.3f} | {c['loc_kl']:.4f} | {c['val_edit_success']:.3f} | "
                  f"{c.get('val_paraphrase', float('nan')):.3f} | {c.get('val_locality', float('nan')):.3f} |")
    plot(curve, Path(args.plot))
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
