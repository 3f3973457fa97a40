"""The GPU check, in one short go on a machine with CUDA (the `device` tool's machine):

1. every editor on the same edits on the CPU and on CUDA: the deltas' largest difference
   relative to the delta's scale, ES/PS/NS on both (they must be equal), seconds per edit and
   peak GPU memory;
2. a randomly initialised model with Llama-3-8B's shape in bfloat16 (no weights needed): key
   statistics over 1M tokens for one layer and one MEMIT batch of 100, timed, with peak memory.

    python bench/gpu.py                      # SmolLM2 where it can be loaded, else a SmolLM2-shaped random model
    python bench/gpu.py --model DIR          # another model folder
    python bench/gpu.py --smoke              # tiny shapes on the CPU: checks the script itself (seconds)

The embedded SmolLM2 is a 98 MB file from PyPI and the device machine reaches neither PyPI nor
the Hub, so there the first part runs on a random model with SmolLM2's configuration: the deltas
and timings are what is checked; ES/PS/NS of a random model only have to agree between devices.
Writes bench/results/gpu.json (or --out) as each part finishes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EDITORS = ["ft", "rome", "memit", "alphaedit", "emmet", "encore", "d4s", "nse", "kn"]
SINGLE = {"rome", "kn"}  # one spec at a time (their batches are sequential anyway)

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=True)
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)

SUBJECTS = ["France", "Spain", "Italy", "Chile", "Japan", "Kenya", "Peru", "Norway", "Egypt", "India", "Brazil",
            "Canada", "Mexico", "Greece", "Poland", "Sweden", "Turkey", "Cuba", "Nepal", "Ghana"]
TARGETS = ["Rome", "Berlin", "Oslo", "Lima", "Cairo", "Tokyo", "Paris", "Delhi", "Quito", "Accra"]


def specs(n: int):
    from kedit.spec import EditSpec

    return [EditSpec(id=f"g{i}", subject=f"{SUBJECTS[i % len(SUBJECTS)]}{'' if i < len(SUBJECTS) else i}",
                     prompt="The capital of {} is", target_new=TARGETS[i % len(TARGETS)], target_true="Madrid",
                     paraphrases=["Its capital city, {}, has as capital".replace("{}", SUBJECTS[i % len(SUBJECTS)])],
                     neighborhood=[{"prompt": "The capital of Germany is", "target": "Berlin"}]) for i in range(n)]


def random_llama(shape: dict, dtype, device: str, seed: int = 0):
    """A Llama with ``shape``, initialised on the target device (an 8B model never exists on the CPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, torch_dtype=dtype)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def tokenizer_for(model_dir: str | None, vocab: int):
    from kedit.testing import tiny_tokenizer

    if model_dir:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)
    return tiny_tokenizer(min(vocab, 400))


def load_smollm2(args, device: str):
    """(model, tokenizer, source name) on ``device``: --model, else the embedded SmolLM2, else a random
    model of its shape (seeded, so the CPU and CUDA copies are the same)."""
    import torch

    from kedit.models import load

    if args.smoke:
        return random_llama(TINY, torch.float32, device), tokenizer_for(None, 400), "random tiny"
    try:
        lm, tok, src = load(args.model, device=device)
        return lm, tok, src.name_or_path
    except Exception as exc:  # no embedded model on this machine
        print(f"(no loadable model: {exc}; using a random model with SmolLM2's shape)", file=sys.stderr)
        return random_llama(SMOLLM2, torch.float32, device), tokenizer_for(None, 400), "random SmolLM2-shaped"


def stats_provider(work: Path, tokens: int):
    from kedit.stats import KeyStats

    corpus = work / "corpus.txt"
    if not corpus.is_file():
        corpus.write_text("\n\n".join(f"The capital of {s} is a city where {t} people live and work, and the "
                                      f"river {i} runs through it." for i, (s, t) in
                                      enumerate((s, t) for s in SUBJECTS for t in TARGETS)) * 50)
    return KeyStats(corpus=str(corpus), n_tokens=tokens, max_len=128)


def edit(model, tok, editor: str, items, device: str, work: Path, stats_tokens: int, extra: dict | None = None):
    """(diff, seconds per edit, peak GPU bytes) for ``items`` edited with ``editor``."""
    import torch

    from kedit.editing import EditPlan, compute_diff
    from kedit.models import LoadedModel, ModelSource

    loaded = LoadedModel(model, tok, ModelSource("bench-gpu", None, "folder"))
    plan = EditPlan.make(model, editor, dict(extra or {}), stats=stats_provider(work, stats_tokens))
    compute_diff(loaded, items[:1], plan)  # statistics, templates and kernels warm, outside the timing
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if editor in SINGLE:
        diffs = [compute_diff(loaded, [s], plan) for s in items]
    else:
        diffs = [compute_diff(loaded, items, plan)]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    secs = (time.perf_counter() - t0) / len(items)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    return diffs, secs, peak


def scores(model, tok, items, diffs) -> dict:
    """ES/PS/NS; single-edit editors' diffs each apply to the base alone, so each is scored on its
    own spec and the means taken."""
    from kedit import diff as diffmod
    from kedit.api import EvalContext
    from kedit.plugins import registry

    ev = registry("evaluators")["counterfact"].obj()
    groups = [(diffs, items)] if len(diffs) == 1 else [([d], [s]) for d, s in zip(diffs, items)]
    sums: dict[str, float] = {}
    for ds, its in groups:
        for d in ds:
            diffmod.apply(model, d)
        try:
            res = ev.evaluate(model, tok, its, ev.Options(), EvalContext())
        finally:
            for d in reversed(ds):
                diffmod.revert(model, d)
        for k in ("ES", "PS", "NS"):
            sums[k] = sums.get(k, 0.0) + float(res.metrics[k]) * len(its)
    return {k: round(v / len(items), 4) for k, v in sums.items()}


def delta_gap(a, b) -> float:
    """Largest |ΔW_cpu − ΔW_cuda| over all entries, relative to the largest |ΔW_cpu|."""
    from kedit.delta import to_dense

    worst = 0.0
    for da, db in zip(a, b):
        for name, entry in da.deltas.items():
            x, y = to_dense(entry).cpu(), to_dense(db.deltas[name]).cpu()
            worst = max(worst, float((x - y).abs().max() / x.abs().max().clamp_min(1e-30)))
    return worst


def part_editors(args, results: dict, save) -> None:
    import torch

    from kedit.diff import SUFFIX  # noqa: F401  (the import checks kedit is installed)

    work = Path(args.work)
    items = specs(args.n)
    cpu_model, tok, name = load_smollm2(args, "cpu")
    dev_model, _, _ = load_smollm2(args, args.device)
    for editor in args.editors:
        key = f"editor:{editor}"
        if key in results and not args.redo:
            continue
        cpu_diffs, cpu_secs, _ = edit(cpu_model, tok, editor, items, "cpu", work, args.stats_tokens)
        dev_diffs, dev_secs, peak = edit(dev_model, tok, editor, items, args.device, work, args.stats_tokens)
        results[key] = {"model": name, "edits": len(items), "cpu_s_per_edit": round(cpu_secs, 3),
                        "device_s_per_edit": round(dev_secs, 3), "peak_gpu_mib": peak and round(peak / 2**20),
                        "max_rel_delta_gap": delta_gap(cpu_diffs, dev_diffs),
                        "cpu": scores(cpu_model, tok, items, cpu_diffs),
                        "device": scores(dev_model, tok, items, dev_diffs)}
        save()
        print(f"{editor}: {results[key]}", file=sys.stderr)
        del cpu_diffs, dev_diffs
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def part_scale(args, results: dict, save) -> None:
    import torch

    from kedit.arch import arch_for
    from kedit.stats import accumulate

    if "scale" in results and not args.redo:
        return
    shape = TINY if args.smoke else LLAMA3_8B
    model = random_llama(shape, torch.bfloat16, args.device)
    tok = tokenizer_for(None, 400)
    arch = arch_for(model)
    g = torch.Generator().manual_seed(0)
    n_tokens, row = (20_000 if args.smoke else 1_000_000), 512
    rows = torch.randint(3, 400, (n_tokens // row, row), generator=g).tolist()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    accumulate(model, arch, rows, [4], 16, 0, lambda **_: _Bar())
    sync()
    stats_s = time.perf_counter() - t0
    stats_peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
    work = Path(args.work)
    extra = {} if args.smoke else {"layers": [4, 5, 6, 7, 8]}
    diffs, secs, peak = edit(model, tok, "memit", specs(args.scale_batch), args.device, work,
                             20_000 if args.smoke else 200_000, extra)
    results["scale"] = {"shape": "tiny" if args.smoke else "Llama-3-8B", "dtype": "bfloat16",
                        "params_billion": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
                        "stats_tokens": len(rows) * row, "stats_s_one_layer": round(stats_s, 1),
                        "stats_peak_gpu_mib": stats_peak and round(stats_peak / 2**20),
                        "memit_batch": args.scale_batch, "memit_s_per_edit": round(secs, 3),
                        "memit_peak_gpu_mib": peak and round(peak / 2**20)}
    save()
    print(f"scale: {results['scale']}", file=sys.stderr)


class _Bar:
    def update(self, n):
        pass

    def close(self):
        pass


def report(results: dict) -> None:
    print("| editor | edits | CPU s/edit | GPU s/edit | peak GPU MiB | max rel. Δ gap | ES/PS/NS CPU | ES/PS/NS GPU |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        if key.startswith("editor:"):
            f = lambda s: "/".join(f"{s.get(k, float('nan')):.3f}" for k in ("ES", "PS", "NS"))  # noqa: E731
            print(f"| {key[7:]} | {r['edits']} | {r['cpu_s_per_edit']:.2f} | {r['device_s_per_edit']:.2f} | "
                  f"{r['peak_gpu_mib']} | {r['max_rel_delta_gap']:.2e} | {f(r['cpu'])} | {f(r['device'])} |")
    if "scale" in results:
        s = results["scale"]
        print(f"\n{s['shape']} ({s['params_billion']}B parameters, {s['dtype']}): key statistics for one layer over "
              f"{s['stats_tokens']:,} tokens in {s['stats_s_one_layer']} s (peak {s['stats_peak_gpu_mib']} MiB); "
              f"MEMIT batch of {s['memit_batch']} at {s['memit_s_per_edit']} s per edit "
              f"(peak {s['memit_peak_gpu_mib']} MiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="default cuda (cpu with --smoke)")
    ap.add_argument("--model", help="model folder (default: the embedded SmolLM2, else a random one of its shape)")
    ap.add_argument("--editors", default=",".join(EDITORS))
    ap.add_argument("--n", type=int, default=10, help="edits per editor (default 10)")
    ap.add_argument("--stats-tokens", type=int, default=20_000)
    ap.add_argument("--scale-batch", type=int, default=100)
    ap.add_argument("--parts", default="editors,scale")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU against CPU: checks the script only")
    ap.add_argument("--work", default="/tmp/kedit-gpu-bench")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.editors = [e for e in args.editors.split(",") if e]
    if args.smoke:
        args.n, args.scale_batch, args.stats_tokens = min(args.n, 3), min(args.scale_batch, 8), 2000
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    if not args.report:
        Path(args.work).mkdir(parents=True, exist_ok=True)

        def save() -> None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1) + "\n")

        if "editors" in args.parts:
            part_editors(args, results, save)
        if "scale" in args.parts:
            part_scale(args, results, save)
    report(results)


if __name__ == "__main__":
    main()
