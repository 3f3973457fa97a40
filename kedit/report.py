"""``kedit report``: tables and PNG plots from result JSON files.

A results file holds one run (the output of ``kedit eval --json`` or ``kedit apply --json
--eval``), a list of runs, or ``{"runs": [...]}``. A run has ``metrics`` and optionally
``label``, ``base``, ``delta``, ``ci``, ``info``, ``protocols`` and ``curve``, a list of
``{"edits": N, "metrics": {...}}`` points for sequential editing; a run with ``"aggregate": true``
(a curve assembled from other runs) is drawn in the curves only.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Sequence

from .atomic import atomic_path, atomic_write_text
from .errors import InputError
from .textio import read_json

HOST_CURVES = ("drift",)  # the host's own weight-drift records, drawn in curves whatever the evaluators


def display(runs: list[dict[str, Any]], ev: str) -> dict[str, Any]:
    """How evaluator ``ev``'s metrics are shown (:meth:`kedit.api.Evaluator.display`): as the
    results recorded it, else as the installed evaluator declares it, else plainly."""
    for r in runs:
        d = (r.get("display") or {}).get(ev)
        if d:
            return d
    from .plugins import registry

    entry = registry("evaluators").get(ev)
    return entry.obj.display() if entry is not None else {}


def _evaluators(runs: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(ev for r in runs for ev in r["metrics"]))


def task_evaluators(runs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(evaluator, task metric suffix) for the evaluators that report per-task scores."""
    return [(ev, t) for ev in _evaluators(runs) if (t := display(runs, ev).get("task_metric"))]


def load_runs(paths: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for path in paths:
        p = Path(path)
        data = read_json(p)
        items = data["runs"] if isinstance(data, dict) and "runs" in data else data if isinstance(data, list) else [data]
        for i, run in enumerate(items):
            if not isinstance(run, dict) or not isinstance(run.get("metrics"), dict):
                raise InputError(f"{p}: run {i + 1} has no \"metrics\" object (is this a kedit results file?)")
            run = dict(run)
            run.setdefault("label", p.stem if len(items) == 1 else f"{p.stem}[{i}]")
            runs.append(run)
    if not runs:
        raise InputError("no runs in the given results files")
    return runs


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) < 1000 else f"{x:.4g}"
    return str(x)


def _cell(run: dict[str, Any], ev: str, m: str) -> str:
    v = run["metrics"].get(ev, {}).get(m)
    d = (run.get("delta") or {}).get(ev, {}).get(m)
    ci = (run.get("ci") or {}).get(ev, {}).get(m)
    text = _fmt(v)
    if d is not None:
        text += f" ({d:+.3f}" + (f" ± {(ci[1] - ci[0]) / 2:.3f}" if ci else "") + ")"
    return text


def common_base(runs: list[dict[str, Any]], ev: str) -> dict[str, Any] | None:
    """The unedited model's values, when every run that has them agrees (same specs, same data);
    None when they differ, so no single 'unedited' row misrepresents the others."""
    bases = [r["base"][ev] for r in runs if (r.get("base") or {}).get(ev)]
    if not bases or any(b != bases[0] for b in bases[1:]):
        return None
    return bases[0]


def _groups(metrics: list[str]) -> list[tuple[str, list[str]]]:
    """``sst2.acc``, ``sst2.f1``, ... -> one table per suffix, columns named by prefix."""
    if metrics and all("." in m for m in metrics):
        suffixes = list(dict.fromkeys(m.rsplit(".", 1)[1] for m in metrics))
        return [(sfx, [m for m in metrics if m.endswith("." + sfx)]) for sfx in suffixes]
    return [("", metrics)]


def tables(runs: list[dict[str, Any]]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per evaluator (and per metric kind for dotted names such as
    ``sst2.acc``). Cells are ``value (change ± half-width of its 95% CI)``."""
    out = []
    evaluators = list(dict.fromkeys(ev for r in runs for ev in r["metrics"]))
    for ev in evaluators:
        metrics = list(dict.fromkeys(m for r in runs for m in r["metrics"].get(ev, {})))
        base = common_base(runs, ev)
        for suffix, cols in _groups(metrics):
            rows = []
            if base:
                rows.append(["unedited"] + [_fmt(base.get(m)) for m in cols])
            for r in runs:
                if ev in r["metrics"]:
                    rows.append([r["label"]] + [_cell(r, ev, m) for m in cols])
            header = ["run"] + [m.rsplit(".", 1)[0] if suffix else m for m in cols]
            out.append((f"{ev} ({suffix})" if suffix else ev, header, rows))
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def bars(ax, xs: list[float], vals: list[float | None], width: float, label: str, color: Any = None,
         err: list[list[float]] | None = None) -> Any:
    """Bars that show their values: each labelled with its number (``n/a`` where missing), a bar
    of 0 drawn as a visible line at 0 in its colour (an empty slot would read as missing), and
    95% intervals as error bars where given."""
    heights = [v if v is not None else 0 for v in vals]
    container = ax.bar(xs, heights, width, label=label, color=color, yerr=err, capsize=2 if err else 0,
                       error_kw={"elinewidth": 0.8, "ecolor": "0.3", "alpha": 0.8})
    face = container.patches[0].get_facecolor() if container.patches else color
    zeros = [x for x, v in zip(xs, vals) if v == 0]
    if zeros:
        ax.hlines([0] * len(zeros), [x - width / 2 for x in zeros], [x + width / 2 for x in zeros], colors=[face],
                  linewidth=2.5, zorder=3)
    ax.bar_label(container, labels=["n/a" if v is None else f"{v:.2f}" for v in vals], fontsize=6, padding=1,
                 rotation=90 if width < 0.12 else 0)
    return container


def plot_edit_metrics(runs: list[dict[str, Any]], path: Path) -> bool:
    """Grouped bars: the metrics evaluators declare as fractions of edits, one bar per run."""
    keys = [(ev, m) for ev in _evaluators(runs) for m in display(runs, ev).get("edit_metrics", [])
            if any(r["metrics"].get(ev, {}).get(m) is not None for r in runs)]
    if not keys:
        return False
    series = []
    bases = {ev: common_base(runs, ev) for ev, _ in keys}
    if all(bases[ev] for ev, _ in keys):
        series.append(("unedited", [bases[ev].get(m) for ev, m in keys], None))
    series += [(r["label"], [r["metrics"].get(ev, {}).get(m) for ev, m in keys], r) for r in runs]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(keys) * max(1, len(series)) / 2.5), 4))
    width = 0.8 / len(series)
    for i, (label, vals, r) in enumerate(series):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(keys))]
        # a run without edits carries the interval of its values; an edited run's is of its change
        cis = [(r.get("ci", {}).get(ev, {}).get(m) if r is not None and not r.get("delta") else None) for ev, m in keys]
        err = None
        if any(cis):
            err = [[max(0, v - c[0]) if c and v is not None else 0 for v, c in zip(vals, cis)],
                   [max(0, c[1] - v) if c and v is not None else 0 for v, c in zip(vals, cis)]]
        bars(ax, xs, vals, width, label, err=err)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{m}\n({ev})" for ev, m in keys], fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("fraction")
    ax.set_title("Edit metrics per run")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save(fig, path)
    plt.close(fig)
    return True


def plot_drift(runs: list[dict[str, Any]], path: Path, ev: str, metric: str) -> bool:
    """General-ability drift on evaluator ``ev``'s tasks: the score per task (``TASK.metric``)
    with its chance level, and the change against the unedited model with 95% intervals."""
    with_tasks = [r for r in runs if ev in r["metrics"]]
    if not with_tasks:
        return False
    sfx = "." + metric
    tasks = list(dict.fromkeys(k[:-len(sfx)] for r in with_tasks for k in r["metrics"][ev] if k.endswith(sfx)
                               and k != "mean" + sfx))
    if not tasks:
        return False
    info = next((r.get("info", {}).get(ev) for r in with_tasks if r.get("info", {}).get(ev)), {}) or {}
    has_delta = any((r.get("delta") or {}).get(ev) for r in with_tasks)
    plt = _plt()
    fig, axes = plt.subplots(1, 2 if has_delta else 1, figsize=(14 if has_delta else 8, 4.2), squeeze=False)
    ax = axes[0][0]
    series = []
    base = common_base(with_tasks, ev)
    if base:
        series.append(("unedited", base, None))
    series += [(r["label"], r["metrics"][ev], r) for r in with_tasks]
    width = 0.8 / len(series)
    palette = [f"C{i}" for i in range(10)] if len(series) <= 10 else [plt.cm.tab20(i % 20) for i in range(len(series))]
    color = {label: palette[i] for i, (label, _, _) in enumerate(series)}
    for i, (label, metrics, _) in enumerate(series):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(tasks))]
        bars(ax, xs, [metrics.get(t + sfx) for t in tasks], width, label, color=color[label])
    for k, t in enumerate(tasks):
        chance = (info.get(t) or {}).get("chance")
        if chance is not None:
            ax.hlines(chance, k - 0.45, k + 0.45, colors="black", linestyles="dashed", linewidth=1,
                      label="chance" if k == 0 else None)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=30, fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel(metric)
    ax.set_title(f"{ev}: {metric} per task (dashed: chance)")
    ax.grid(axis="y", alpha=0.3)
    if not has_delta:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if has_delta:
        ax = axes[0][1]
        edited = [s for s in series if s[2] is not None and (s[2].get("delta") or {}).get(ev)]
        width = 0.8 / len(edited)
        for i, (label, _, r) in enumerate(edited):
            xs = [k + (i - (len(edited) - 1) / 2) * width for k in range(len(tasks))]
            d = [r["delta"][ev].get(t + sfx) or 0 for t in tasks]
            ci = [r.get("ci", {}).get(ev, {}).get(t + sfx) for t in tasks]
            err = [[max(0, v - c[0]) if c else 0 for v, c in zip(d, ci)], [max(0, c[1] - v) if c else 0 for v, c in zip(d, ci)]]
            bars(ax, xs, d, width, label, color=color[label], err=err)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels(tasks, rotation=30, fontsize=8)
        ax.set_ylabel(f"{metric} change vs unedited")
        ax.set_title("Change vs unedited, paired 95% CI")
        ax.grid(axis="y", alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save(fig, path)
    plt.close(fig)
    return True


def curve_metrics(runs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    keys = []
    for r in runs:
        for point in r.get("curve") or []:
            for ev, ms in point["metrics"].items():
                for m in ms:
                    if (ev, m) not in keys:
                        keys.append((ev, m))
    preferred = [k for k in keys if k[0] in HOST_CURVES or k[1] in display(runs, k[0]).get("headline", [])]
    return preferred or keys[:6]


def plot_curves(runs: list[dict[str, Any]], path: Path) -> bool:
    """Sequential runs: each metric against the number of edits, one line per run."""
    curved = [r for r in runs if r.get("curve")]
    keys = curve_metrics(curved)
    if not curved or not keys:
        return False
    plt = _plt()
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for n, (ev, m) in enumerate(keys):
        ax = axes[n // cols][n % cols]
        for r in curved:
            pts = [(p["edits"], p["metrics"].get(ev, {}).get(m)) for p in r["curve"]]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=r["label"])
        ax.set_title(f"{ev}: {m}", fontsize=9)
        ax.set_xlabel("edits")
        xs = sorted({p["edits"] for r in curved for p in r["curve"]})
        if xs and xs[0] > 0 and xs[-1] / xs[0] >= 20:
            ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs], fontsize=8)
        ax.minorticks_off()
        base = (common_base(curved, ev) or {}).get(m)
        if base is not None:
            ax.axhline(base, color="black", linestyle="dashed", linewidth=0.8, label="unedited" if n == 0 else None)
        ax.grid(alpha=0.3)
    for n in range(len(keys), rows * cols):
        axes[n // cols][n % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def write_report(paths: Sequence[str | os.PathLike], out: str | os.PathLike,
                 title: str = "kedit evaluation report") -> list[Path]:
    """Write ``index.md``, ``index.html`` and the PNGs into ``out``; returns the files written."""
    runs = load_runs(paths)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    figures = []
    # Runs marked "aggregate" (a curve assembled from other runs) only feed the curves.
    plain = [r for r in runs if not r.get("aggregate")] or runs
    if plot_edit_metrics(plain, folder / "edit_metrics.png"):
        figures.append(("edit_metrics.png", "Edit metrics per run"))
    for i, (ev, metric) in enumerate(task_evaluators(plain)):
        name = "drift.png" if i == 0 else f"drift-{ev}.png"
        if plot_drift(plain, folder / name, ev, metric):
            figures.append((name, f"General-ability drift ({ev})"))
    if plot_curves(runs, folder / "curves.png"):
        figures.append(("curves.png", "Metrics against the number of edits"))
    protocols = {ev: p for r in runs for ev, p in (r.get("protocols") or {}).items()}
    md = [f"# {title}", "", f"{len(runs)} run(s): " + ", ".join(f"`{r['label']}`" for r in runs), "",
          "Cells: value (change against the unedited model ± half-width of its paired 95% interval). An "
          "'unedited' row appears where all runs share one unedited baseline.", ""]
    htm = [f"<h1>{html.escape(title)}</h1>"]
    for name, caption in figures:
        md += [f"![{caption}]({name})", ""]
        htm.append(f"<figure><img src='{name}' alt='{html.escape(caption)}'><figcaption>{html.escape(caption)}"
                   "</figcaption></figure>")
    for title_, header, rows in tables(plain):
        ev = title_.split(" ", 1)[0]
        md += [f"## {title_}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(row) + " |" for row in rows]
        if ev in protocols:
            md += ["", f"Protocol: {protocols[ev]}"]
        md.append("")
        htm.append(f"<h2>{html.escape(title_)}</h2><table border=1 cellpadding=4><tr>"
                   + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
                   + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
                   + "</table>" + (f"<p><small>Protocol: {html.escape(protocols[ev])}</small></p>" if ev in protocols else ""))
    for ev, _ in task_evaluators(runs):
        chance = next((r["info"][ev] for r in runs if (r.get("info") or {}).get(ev)), None)
        if chance:
            md += [f"## Chance levels of the {ev} tasks", "", "| task | n | chance | majority class |",
                   "|---|---|---|---|"]
            md += [f"| {t} | {i.get('n')} | {_fmt(i.get('chance'))} | {_fmt(i.get('majority'))} |"
                   for t, i in chance.items() if isinstance(i, dict)]
            md.append("")
    written = [folder / n for n, _ in figures]
    atomic_write_text(folder / "index.md", "\n".join(md) + "\n")
    atomic_write_text(folder / "index.html", "<!doctype html><meta charset='utf-8'><title>" + html.escape(title)
                      + "</title><body style='font-family:sans-serif;max-width:1100px'>" + "\n".join(htm) + "</body>")
    return [folder / "index.md", folder / "index.html", *written]
