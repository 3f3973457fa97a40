"""Lifelong (sequential) editing on the embedded SmolLM2, in the D4S paper's protocols, resumable.

Protocols (``--protocol``):

- ``zsre``: ../shared/data/zsre, one edit at a time (``--batch 1``), all edits so far re-evaluated
  every ``--every`` edits with EasyEdit's teacher-forced token accuracies (rewrite = reliability,
  rephrase = generalization, locality), as the D4S reference does;
- ``counterfact``: the first N CounterFact cases (the same cases as bench/lte.py), batches of 50,
  ES/PS/NS on all edits so far every ``--every`` edits;
- ``mqd-tf``, ``mqd-mc``, ``mqd-dg``, ``mqd-mixed``: the same CounterFact facts as MQD-style
  true/false, multiple-choice, open or mixed questions (``kedit import mqd-*``), ES/PS/NS plus the
  GLUE-style suite's mean accuracy.

Every checkpoint also records WikiText-2 perplexity (statistics come from other text: the
Wikipedia sample, all of it, ~658k tokens), and per edited layer mean |W| and mean |ΔW| against
the unedited model (D4S's L1 analysis).

Each run (protocol × method) lives in ``--work/PROTOCOL/LABEL``: at every checkpoint the edited
matrices, the editor's carried state and ``run.json`` (the commit point, written last) are saved,
so ``--continue`` resumes a run cut off anywhere from its last checkpoint, in a later session too.
Results are merged into ``bench/results/lifelong.json`` (one entry per protocol and label); a run
whose checkpoint is gone is not restarted over a stored result unless ``--replace`` says so (or
``--results`` names another file). ``--reg rect:0.4`` runs a regularizer chain on every step's
deltas, as ``kedit apply --reg`` does. ``--retry R`` edits again, after each batch and up to R
rounds, the requests whose new target is not yet the most probable continuation of their prompt.
``--offset K`` runs on the cases after the first K (another slice of the same data).

    python bench/lifelong.py --protocol zsre --method memit --method d4s --n 1000 --batch 1 --every 100
    python bench/lifelong.py --protocol zsre --method 'd4s:keys=reference' --n 1000 --batch 1 --continue
    python bench/lifelong.py --protocol counterfact --method 'memit:layers=[3,4,5,6,7,8,9,10,11]' --n 1000
    python bench/lifelong.py --report            # tables, correlations and plots from the results
    python bench/lifelong.py --protocol counterfact --n 200 --every 100 --results bench/results/lifelong_200.json \
        --method 'memit:stop_at_most_probable=true' --reg rect:0.4     # the 200-edit perplexity study

Method texts are ``EDITOR[:KEY=VALUE,...]`` (values in JSON: lists, numbers, true/false; anything
else is a string).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch

from lte import DATA, ROOT  # lte sets the runtime up before torch is imported

from kedit.sequence import SequenceBase  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "lifelong.json"
WIKI = DATA / "wikipedia" / "enwiki_sample_plaintext.jsonl"
WIKITEXT = DATA / "wikitext2" / "wiki.test.raw"
PROTOCOLS = ("zsre", "counterfact", "mqd-tf", "mqd-mc", "mqd-dg", "mqd-mixed")


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """``d4s:keys=reference,layers=[3,4]`` -> ("d4s", {"keys": "reference", "layers": [3, 4]})."""
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for piece in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", rest):
        piece = piece.strip(", ")
        if not piece:
            continue
        key, eq, value = piece.partition("=")
        if not eq:
            raise SystemExit(f"--method {text!r}: {piece!r} is not KEY=VALUE")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return name, options


def label_of(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")


def load_specs(protocol: str, n: int, offset: int = 0) -> list[Any]:
    from kedit.plugins import lookup
    from kedit.spec import import_specs

    if protocol == "zsre":
        path, importer = DATA / "zsre" / "zsre_mend_train-1k.json", "zsre"
    else:
        path, importer = DATA / "counterfact" / "counterfact-train.json", \
            "counterfact" if protocol == "counterfact" else protocol
    records = lookup("spec_importers", importer).obj().read(path)
    specs, _ = import_specs(records, skip_invalid=True)
    if protocol == "counterfact" or protocol.startswith("mqd"):
        # the cases bench/lte.py and bench/sequential.py use: prompts that contain the subject
        specs = [s for s in specs if "{}" in s.prompt]
    return specs[offset:offset + n]


def default_batch(protocol: str) -> int:
    """zsRE runs one edit at a time (the D4S paper's protocol); the others in batches of 50."""
    return 1 if protocol == "zsre" else 50


def evaluators(protocol: str, args) -> list[str]:
    ppl = f"perplexity:data={WIKITEXT},max_tokens={args.ppl_tokens}"
    if protocol == "zsre":
        return ["token-acc", ppl]
    out = ["counterfact", ppl]
    if protocol.startswith("mqd") and args.glue_sample:
        out.append(f"glue:data={DATA / 'glue'},sample={args.glue_sample}")
    return out


class FixedBase(SequenceBase):
    """The unedited model behind a long run, kept as copies of the edited tensors (a thousand
    diffs would not fit in memory) instead of the applied diffs."""

    def __init__(self, model: "torch.nn.Module", originals: dict[str, "torch.Tensor"]) -> None:
        super().__init__(model, [])
        self._weights = dict(originals)
        self._sigma: dict[str, float] = {}

    def weight(self, name: str) -> "torch.Tensor":
        if name not in self._weights:
            self._weights[name] = self.model.get_parameter(name).detach().clone()
        return self._weights[name]

    def top_singular(self, name: str) -> float:
        """W0's largest singular value, once per matrix: it does not change along the run."""
        import torch

        if name not in self._sigma:
            self._sigma[name] = float(torch.linalg.matrix_norm(self.weight(name).double().cpu(), ord=2))
        return self._sigma[name]

    def keep(self, names) -> None:
        """Copy ``names`` before anything changes them."""
        for n in names:
            self.weight(n)

    @contextlib.contextmanager
    def reverted(self) -> Iterator["torch.nn.Module"]:
        params = {n: self.model.get_parameter(n) for n in self._weights}
        live = {n: p.data for n, p in params.items()}
        try:
            for n, p in params.items():
                p.data = self._weights[n]
            yield self.model
        finally:
            for n, p in params.items():
                p.data = live[n]


def save_checkpoint(run_dir: Path, record: dict, model: torch.nn.Module, base, state: dict) -> None:
    """Weights and state under checkpoint-numbered names, then run.json (the commit point), then
    the previous checkpoint's files go."""
    from safetensors.torch import save_file

    from kedit.atomic import atomic_path, atomic_write_text

    edits = record["edits"]
    files = {"weights": f"weights-{edits:05d}.safetensors", "state": f"state-{edits:05d}.safetensors"}
    with atomic_path(run_dir / files["weights"], "checkpoint") as tmp:
        save_file({n: model.get_parameter(n).detach().contiguous() for n in sorted(base._weights)}, str(tmp))
    with atomic_path(run_dir / files["state"], "checkpoint") as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    old = record.get("files")
    record["files"] = files
    atomic_write_text(run_dir / "run.json", json.dumps(record, indent=1) + "\n")
    if old:
        for name in old.values():
            if name not in files.values():
                (run_dir / name).unlink(missing_ok=True)


def stored_edits(path: Path, protocol: str, label: str) -> int:
    """How many edits ``path`` already holds for this run (0 if none): a fresh run must not
    silently replace a longer one whose checkpoint is gone."""
    if not path.is_file():
        return 0
    return int(json.loads(path.read_text())["runs"].get(f"{protocol}/{label}", {}).get("edits", 0))


def merge_result(protocol: str, label: str, record: dict, path: Path) -> None:
    from kedit.atomic import atomic_write_text

    results = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    keep = {k: record[k] for k in ("protocol", "label", "editor", "options", "resolved", "n", "batch", "regs",
                                   "reg_in_loop", "edits", "points", "seconds", "stats", "unedited") if k in record}
    results["runs"][f"{protocol}/{label}"] = keep
    atomic_write_text(path, json.dumps(results, indent=1) + "\n")


def run_label(protocol: str, method: str, args) -> str:
    """The run's folder and results key: the method, then only what differs from the protocol's
    defaults (regularizers, batch, statistics, retries, offset)."""
    parts = [label_of(method), *(f"+{label_of(r)}" for r in args.reg), "-in-loop" if args.reg_in_loop else ""]
    if args.batch != default_batch(protocol):
        parts.append(f"-b{args.batch}")
    if args.stats_corpus != str(WIKI):
        parts.append(f"-stats={label_of(Path(args.stats_corpus).name)}")
    if args.stats_tokens != 1_000_000:
        parts.append(f"-{args.stats_tokens}tok")
    if args.retry:
        parts.append(f"-retry{args.retry}")
    if args.offset:
        parts.append(f"-from{args.offset}")
    return "".join(parts)


def run(protocol: str, method: str, args) -> dict:
    import torch
    from safetensors.torch import load_file

    from kedit import diff as diffmod
    from kedit.config import RunConfig
    from kedit.editing import EditPlan, SequenceStep, compute_diff
    from kedit.evaluate import resolve_evaluators
    from kedit.models import load
    from kedit.sequence import BaseStats
    from kedit.stats import KeyStats

    editor, options = parse_method(method)
    label = run_label(protocol, method, args)
    run_dir = Path(args.work) / protocol / label
    record_path = run_dir / "run.json"
    if record_path.is_file() and not args.continue_:
        raise SystemExit(f"{run_dir} holds a run already: --continue resumes it (or remove the folder)")
    stored = stored_edits(Path(args.results), protocol, label)
    if stored and not record_path.is_file() and not args.replace:
        raise SystemExit(f"{args.results} already holds {protocol}/{label} ({stored} edits) and its checkpoint is not "
                         f"in {run_dir}, so this run would replace it from 0 edits: pass --replace, or --results "
                         "another file")
    resumed = json.loads(record_path.read_text()) if record_path.is_file() else None
    if resumed is not None:  # checked before the model loads, so a wrong folder fails in a second
        missing = sorted({"editor", "options", "batch", "files", "edits", "points"} - set(resumed))
        if missing:
            raise SystemExit(f"{record_path}: not a checkpoint of this bench (missing {', '.join(missing)}); remove "
                             "the folder to start the run from 0 edits")
        if (resumed["editor"], resumed["options"], resumed["batch"], resumed.get("regs", [])) != \
                (editor, options, args.batch, args.reg):  # --retry and --offset are spelled out in the label
            raise SystemExit(f"{run_dir}: made with {resumed['editor']} {resumed['options']} batch "
                             f"{resumed['batch']} regularizers {resumed.get('regs', [])}")
    run_dir.mkdir(parents=True, exist_ok=True)
    specs = load_specs(protocol, args.n, args.offset)
    loaded = load(None, quiet=True)
    model, tok, _ = loaded
    config = RunConfig(quiet=True, seed=0)
    stats = KeyStats(corpus=args.stats_corpus, n_tokens=args.stats_tokens)
    plan = EditPlan.make(model, editor, options, regs=args.reg, reg_in_loop=args.reg_in_loop, seed=0, stats=stats)
    if resumed is not None and resumed.get("resolved"):  # a default changed since: resume as the run was made
        now, then = plan.options.model_dump(mode="json"), resumed["resolved"]
        changed = {k: then[k] for k in sorted(set(now) & set(then)) if now[k] != then[k]}
        if changed:
            print(f"{protocol}/{label}: resuming with the options it was made with, "
                  f"{', '.join(f'{k}={v!r}' for k, v in changed.items())} (a default changed since)",
                  file=sys.stderr, flush=True)
            plan = EditPlan.make(model, editor, {**options, **changed}, regs=args.reg, reg_in_loop=args.reg_in_loop,
                                 seed=0, stats=stats)
    chosen = resolve_evaluators(evaluators(protocol, args))
    originals: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    if resumed is not None:
        record = resumed
        weights = load_file(str(run_dir / record["files"]["weights"]))
        state = {k: v for k, v in load_file(str(run_dir / record["files"]["state"])).items()}
        with torch.no_grad():
            for n, w in weights.items():
                originals[n] = model.get_parameter(n).detach().clone()
                model.get_parameter(n).copy_(w)
        record["n"] = max(record["n"], args.n)
        print(f"{protocol}/{label}: resuming at {record['edits']} edits", file=sys.stderr, flush=True)
    else:
        record = {"protocol": protocol, "label": label, "editor": editor, "options": options, "n": args.n,
                  "batch": args.batch, "regs": list(args.reg), "reg_in_loop": args.reg_in_loop, "edits": 0,
                  "points": [], "seconds": 0.0, "files": None,
                  "resolved": plan.options.model_dump(mode="json"),
                  "stats": {"corpus": args.stats_corpus, "n_tokens_requested": args.stats_tokens}}
    base = FixedBase(model, originals)
    plan = EditPlan(plan.editor, plan.options, plan.regs, plan.reg_in_loop, seed=0, stats=BaseStats(stats, base))
    if record["edits"] == 0 and not record["points"]:  # the unedited model, once per protocol and n
        first = f"from{args.offset}-" if args.offset else ""
        unedited = Path(args.work) / protocol / \
            f"unedited-{first}{args.n}-{label_of(','.join(evaluators(protocol, args)))}.json"
        if not unedited.is_file():
            from kedit.atomic import atomic_write_text

            atomic_write_text(unedited, json.dumps(point(chosen, specs, loaded, base, 0, config, set())) + "\n")
        record["unedited"] = json.loads(unedited.read_text())
        record["points"] = []
    targets: list[dict] = []
    while record["edits"] < min(args.n, len(specs)):
        start = record["edits"]
        stop = min(len(specs), (start // args.every + 1) * args.every, args.n)
        t0 = time.perf_counter()
        for i in range(start, stop, args.batch):
            batch = todo = specs[i:min(i + args.batch, stop)]
            for round_ in range(args.retry + 1):
                d = compute_diff(loaded, todo, plan, sequence=SequenceStep(base, state))
                base.keep(d.deltas)
                diffmod.apply(model, d)
                targets.append(d.manifest.get("report", {}).get("targets", {}))
                if round_ < args.retry:
                    todo = not_yet_most_probable(model, tok, todo)
                    record["retried"] = record.get("retried", 0) + len(todo)
                    if not todo:
                        break
            if args.verbose:
                print(f"  {i + len(batch)} edits, {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
        record["seconds"] += time.perf_counter() - t0
        record["edits"] = stop
        p = point(chosen, specs[:stop], loaded, base, stop, config, set(base._weights))
        p["edit_seconds"] = round(record["seconds"], 1)
        p["targets"] = summarize_targets(targets)
        if args.retry:
            p["retried"] = record.get("retried", 0)
        targets = []
        record["points"].append(p)
        save_checkpoint(run_dir, record, model, base, state)
        merge_result(protocol, label, record, Path(args.results))
        print(f"{protocol}/{label}: {line(p)}", file=sys.stderr, flush=True)
    merge_result(protocol, label, record, Path(args.results))
    return record


def not_yet_most_probable(model: "torch.nn.Module", tok: Any, specs: list[Any]) -> list[Any]:
    """The requests whose new target is not yet the argmax, token by token (teacher forced), after
    their prompt on the edited model: the ones ``--retry`` edits again."""
    from kedit.scoring import TeacherForced

    scores = TeacherForced(model, tok).score([(s.text, s.target_new) for s in specs])
    return [s for s, sc in zip(specs, scores) if sc.token_acc < 1.0]


def summarize_targets(reports: list[dict]) -> dict:
    reports = [r for r in reports if r]
    if not reports:
        return {}
    n = sum(r["requests"] for r in reports)
    stopped: dict[str, int] = {}
    for r in reports:
        for k, v in r["stopped"].items():
            stopped[k] = stopped.get(k, 0) + v
    return {"steps_mean": sum(r["steps_mean"] * r["requests"] for r in reports) / n,
            "delta_ratio_mean": sum(r["delta_ratio_mean"] * r["requests"] for r in reports) / n, "stopped": stopped}


def point(chosen, specs, loaded, base, edits: int, config, names: set[str]) -> dict:
    from kedit.paradigms import evaluate_point
    from kedit.sequence import drift

    t0 = time.perf_counter()
    p = evaluate_point(chosen, specs, loaded, base, "every", edits, config)
    out = {"edits": edits, "metrics": p["metrics"], "base": p["base"], "eval_seconds": round(time.perf_counter() - t0, 1)}
    if names:
        out["drift"] = {n: {"mean_abs_w": v["mean_abs_w"], "mean_abs_dw": v["mean_abs_dw"],
                            "base_mean_abs_w": float(base.weight(n).double().abs().mean()),
                            **spectral(loaded.model.get_parameter(n), base.weight(n), base.top_singular(n))}
                        for n, v in drift(loaded.model, base, sorted(names)).items()}
    return out


def spectral(w: "torch.Tensor", w0: "torch.Tensor", top0: float) -> dict[str, float]:
    """ΔW's two largest singular values over W0's largest: the mean |W| of a layer averages over
    ~900k entries and hardly moves when one direction runs away (sequential MEMIT on zsRE: ΔW's
    top singular value 14× W0's at 998 edits, mean |W| +48%), so the top two are kept beside it.
    ``top0`` is W0's largest singular value."""
    import torch

    s = torch.linalg.svdvals((w.detach().double() - w0.double()).cpu())
    return {"dw_sigma1_ratio": float(s[0]) / top0, "dw_sigma2_ratio": float(s[1]) / top0}


def spectral_of(p: dict) -> float | None:
    """The largest dw_sigma1_ratio over the edited layers; None for checkpoints from before it was recorded."""
    vals = [x["dw_sigma1_ratio"] for x in (p.get("drift") or {}).values() if "dw_sigma1_ratio" in x]
    return max(vals) if vals else None


def layer_mean(p: dict, key: str) -> float:
    """A drift figure (``mean_abs_w``, ``mean_abs_dw``, ``base_mean_abs_w``) averaged over the edited layers."""
    d = p.get("drift") or {}
    return sum(x[key] for x in d.values()) / max(len(d), 1)


def headline(p: dict) -> dict[str, float]:
    m = p["metrics"]
    out = {}
    if "token-acc" in m:
        out.update(rewrite=m["token-acc"]["reliability"], rephrase=m["token-acc"]["generalization"],
                   locality=m["token-acc"]["locality"])
    if "counterfact" in m:
        out.update(ES=m["counterfact"]["ES"], PS=m["counterfact"]["PS"], NS=m["counterfact"]["NS"])
    if "glue" in m:
        out["glue"] = m["glue"]["mean.acc"]
    out["ppl"] = m["perplexity"]["ppl"]
    return out


def line(p: dict) -> str:
    h = headline(p)
    w, dw = layer_mean(p, "mean_abs_w"), layer_mean(p, "mean_abs_dw")
    return f"{p['edits']} edits " + " ".join(f"{k} {v:.3f}" for k, v in h.items()) + \
        f" mean|W| {w:.5f} mean|ΔW| {dw:.2e} ({p.get('edit_seconds', 0):.0f}s editing)"


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Rank correlation: a run whose accuracy sits at the floor while its norm keeps growing has a
    weak Pearson r although the two never move apart (ties get their mean rank)."""
    def ranks(v: list[float]) -> list[float]:
        at: dict[float, list[int]] = {}
        for i, x in enumerate(sorted(v)):
            at.setdefault(x, []).append(i)
        return [sum(at[x]) / len(at[x]) for x in v]
    return pearson(ranks(xs), ranks(ys))


def pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sx = math.sqrt(sum((x - mx) ** 2 for x in xs))
    sy = math.sqrt(sum((y - my) ** 2 for y in ys))
    if sx == 0 or sy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (sx * sy)


def correlations(xs: list[float], ys: list[float]) -> str:
    c, rho = pearson(xs, ys), spearman(xs, ys)
    return f"{'n/a' if c is None else f'{c:+.3f}'} ({'n/a' if rho is None else f'{rho:+.3f}'})"


def report(args) -> None:
    """Markdown tables per protocol, the L1-norm / accuracy correlation and plots."""
    results = json.loads(Path(args.results).read_text())["runs"]
    by_protocol: dict[str, list[dict]] = {}
    for key, r in results.items():  # key: "protocol/label", so --only mqd-tf/ picks a protocol
        if (args.only and args.only not in key) or (args.skip and args.skip in key):
            continue
        by_protocol.setdefault(r["protocol"], []).append(r)
    if not by_protocol:
        raise SystemExit(f"{args.results}: no run matches --only {args.only!r} / --skip {args.skip!r} "
                         f"(runs: {', '.join(sorted(results))})")
    for protocol, runs in sorted(by_protocol.items()):
        acc_key = "rewrite" if protocol == "zsre" else "ES"
        print(f"\n### {protocol}\n")
        cols = list(headline(runs[0]["unedited"]).keys())
        print("| method | edits | " + " | ".join(cols) + " | ppl increase | mean \\|W\\| growth | mean \\|ΔW\\| | "
              "max σ1(ΔW)/σ1(W0) | v* steps | s per edit |")
        print("|---|---|" + "---|" * (len(cols) + 6))
        for r in sorted(runs, key=lambda r: r["label"]):
            u = headline(r["unedited"])
            for p in r["points"]:
                if not args.all_points and p is not r["points"][-1] and p["edits"] % args.table_every:
                    continue
                h = headline(p)
                w, dw, base_w = (layer_mean(p, k) for k in ("mean_abs_w", "mean_abs_dw", "base_mean_abs_w"))
                steps = p.get("targets", {}).get("steps_mean")
                sig = spectral_of(p)
                print(f"| {r['label']} | {p['edits']} | " + " | ".join(f"{h[c]:.3f}" for c in cols) +
                      f" | {100 * (h['ppl'] / u['ppl'] - 1):+.1f}% | {100 * (w / base_w - 1):+.2f}% | {dw:.2e} | "
                      f"{'-' if sig is None else f'{sig:.2f}'} | "
                      f"{'-' if steps is None else f'{steps:.1f}'} | {p['edit_seconds'] / p['edits']:.2f} |")
        shown = set()
        for r in runs:  # the unedited model on as many specs as each run's last checkpoint
            last = r["points"][-1] if r["points"] else r["unedited"]
            if last["edits"] not in shown:
                shown.add(last["edits"])
                u = headline({"metrics": last["base"]}) if "base" in last and last["edits"] else headline(last)
                print(f"| unedited ({last['edits'] or r['n']} specs) | 0 | " + " | ".join(f"{u[c]:.3f}" for c in cols)
                      + " | | | | | | |")
        print(f"\nPearson r (Spearman ρ) between the edited layers' mean |W| and {acc_key} across checkpoints:")
        pooled_x, pooled_y = [], []
        for r in sorted(runs, key=lambda r: r["label"]):
            xs = [layer_mean(p, "mean_abs_w") for p in r["points"]]
            ys = [headline(p)[acc_key] for p in r["points"]]
            pooled_x += xs
            pooled_y += ys
            print(f"- {r['label']}: {correlations(xs, ys)} ({len(xs)} checkpoints)")
        print(f"- all runs pooled: {correlations(pooled_x, pooled_y)} ({len(pooled_x)} checkpoints)")
        if args.plots:
            plot(protocol, runs, acc_key, Path(args.plots) / f"{Path(args.results).stem}_{protocol}.png")


def plot(protocol: str, runs: list[dict], acc_key: str, out: Path) -> None:
    """Accuracy and perplexity against edits, and accuracy against the L1 norm; the file is named
    after the results file, so another study's plots never overwrite lifelong.json's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    spectral_runs = any(spectral_of(p) is not None for r in runs for p in r["points"])
    # Beyond a few runs an in-axes legend hides the L1 panel's points; put it under the panels.
    below = len(runs) > 6
    legend_h = 0.22 * -(-len(runs) // 4) if below else 0.0  # inches: a line per four labels
    fig, axes = plt.subplots(1, 4 if spectral_runs else 3,
                             figsize=(20 if spectral_runs else 15, 4 + legend_h))
    top = 0.0  # the largest perplexity increase plotted, in %
    for i, r in enumerate(sorted(runs, key=lambda r: r["label"])):
        style = {"marker": "o", "label": r["label"], "linestyle": ("-", "--", ":")[i // 10 % 3]}  # 10 colours a cycle
        xs = [p["edits"] for p in r["points"]]
        w = [layer_mean(p, "mean_abs_w") for p in r["points"]]
        acc = [headline(p)[acc_key] for p in r["points"]]
        ppl = [headline(p)["ppl"] / headline(r["unedited"])["ppl"] - 1 for p in r["points"]]
        axes[0].plot(xs, acc, **style)
        axes[1].plot(xs, [100 * v for v in ppl], **style)
        top = max([top, *(100 * v for v in ppl)])
        axes[2].plot(w, acc, **style)
        if spectral_runs:
            sig = [(e, v) for e, v in zip(xs, map(spectral_of, r["points"])) if v is not None]
            axes[3].plot([e for e, _ in sig], [v for _, v in sig], **style)
    axes[0].set(xlabel="edits", ylabel=acc_key, title=f"{protocol}: {acc_key} on all edits so far")
    axes[1].set(xlabel="edits", ylabel="perplexity increase (%)", title="WikiText-2 perplexity")
    if top > 1000:
        axes[1].set_yscale("symlog", linthresh=10)  # a collapsed run (×100) would flatten the others
    axes[2].set(xlabel="mean |W| of the edited layers", ylabel=acc_key, title="L1 norm against accuracy")
    if spectral_runs:
        axes[3].set(xlabel="edits", ylabel="max over layers of σ1(ΔW) / σ1(W0)", title="spectral norm of the update")
        axes[3].set_yscale("log")
        axes[3].set_xlim(axes[0].get_xlim())  # runs from before it was recorded have their last point only
    for ax in axes:
        ax.grid(alpha=0.3)
    if below:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, legend_h / (4 + legend_h) + 0.02, 1, 1))
    else:
        axes[2].legend(fontsize=7)
        fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", choices=PROTOCOLS, default="zsre")
    ap.add_argument("--method", action="append", default=[], help="EDITOR[:KEY=VALUE,...]; repeat for several")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--offset", type=int, default=0, help="skip this many cases first (another slice of the "
                                                          "data; part of the run's label)")
    ap.add_argument("--batch", type=int, default=None, help="edits per step (default: 1 for zsre, 50 otherwise)")
    ap.add_argument("--every", type=int, default=None, help="checkpoint and evaluate every N edits "
                                                            "(default: 100 for zsre, 250 otherwise)")
    ap.add_argument("--continue", dest="continue_", action="store_true", help="resume runs from their checkpoint")
    ap.add_argument("--replace", action="store_true", help="start a run afresh even though --results holds it "
                                                           "(its checkpoint is gone)")
    ap.add_argument("--reg", action="append", default=[], help="regularizer NAME[:VALUE] run on every step's "
                                                               "deltas, e.g. rect:0.4; repeat for a chain")
    ap.add_argument("--retry", type=int, default=0, help="after each batch, edit again (up to this many rounds) "
                                                         "the requests whose target is not yet the most probable "
                                                         "continuation of their prompt on the edited model")
    ap.add_argument("--reg-in-loop", action="store_true", help="regularize inside the editor's layer loop")
    ap.add_argument("--stats-corpus", default=str(WIKI), help="statistics corpus: a file, or builtin (kedit's "
                                                              "default); default: the Wikipedia sample")
    ap.add_argument("--stats-tokens", type=int, default=1_000_000, help="tokens for C0 (default: all of the "
                                                                        "Wikipedia sample, ~658k)")
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--glue-sample", type=int, default=50)
    ap.add_argument("--work", default=os.environ.get("KEDIT_BENCH_WORK", "/tmp/kedit-bench/lifelong"))
    ap.add_argument("--results", default=str(RESULTS), help="where results are merged (and --report reads)")
    ap.add_argument("--only", default=None, help="--report: only runs whose PROTOCOL/LABEL contains this text")
    ap.add_argument("--skip", default=None, help="--report: leave out runs whose PROTOCOL/LABEL contains this text")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--all-points", action="store_true", help="--report: every checkpoint, not only the table's")
    ap.add_argument("--table-every", type=int, default=250)
    ap.add_argument("--plots", default=str(ROOT / "docs" / "sequential"))
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if args.report:
        report(args)
        return
    args.batch = args.batch or default_batch(args.protocol)
    args.every = args.every or (100 if args.protocol == "zsre" else 250)
    if args.every % args.batch:
        raise SystemExit("--every must be a multiple of --batch")
    for method in args.method or ["memit"]:
        run(args.protocol, method, args)


if __name__ == "__main__":
    main()
