"""The evaluation runner: evaluators on the unedited model (cached by its content hash) and on
the edited one, and the comparison between the two with paired confidence intervals.

Results are plain JSON: ``metrics`` maps evaluator -> metric -> value on the model evaluated
(the edited one when there are edits), ``base`` the same on the unedited model, ``delta`` their
difference and ``ci`` a 95% interval (of the difference when there is a base, else of the value).
"""
from __future__ import annotations

import hashlib
import io
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .api import EvalContext, EvalResult
from .cache import cache_root, file_sha256, read_checked, write_checked
from .errors import InputError, KeditError
from .hashing import json_sha256, tokenizer_sha256
from .options import bind, validate
from .plugins import Registered, registry
from .progress import SILENT, Progress
from .scoring import TeacherForced
from .spec import EditSpec, parse_record, specs_sha256

Z95 = 1.959963984540054


@dataclass
class Chosen:
    """An evaluator bound to its validated options."""

    entry: Registered
    options: Any

    @property
    def name(self) -> str:
        return self.entry.name


def split_eval_list(text: str) -> list[str]:
    """``counterfact,glue:sample=50,seed=1,fluency`` -> ``["counterfact", "glue:sample=50,seed=1",
    "fluency"]``: a comma piece with ``=`` but no ``:`` continues the previous evaluator's options."""
    out: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if out and "=" in piece and ":" not in piece.split("=", 1)[0] and ":" in out[-1]:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def default_evaluators() -> list[str]:
    """The evaluators that declare themselves ``default``: what ``kedit eval`` runs on specs."""
    return [name for name, r in sorted(registry("evaluators").items()) if getattr(r.obj, "default", False)]


def resolve_evaluators(texts: Sequence[str], data: Sequence[str] = ()) -> list[Chosen]:
    """Parse ``NAME``, ``NAME:VALUE`` (the primary option) or ``NAME:K=V,...``; ``data`` paths
    fill the ``data`` option of each evaluator that has one and was not given one."""
    chosen: list[Chosen] = []
    for text in [t for raw in texts for t in split_eval_list(raw)]:
        entry, values = bind("evaluators", "evaluator", text)
        cls, name = entry.obj, entry.name
        if "data" in cls.Options.model_fields and "data" not in values and data:
            values["data"] = data[0] if len(data) == 1 else _pick_data(cls, name, data)
        chosen.append(Chosen(entry, validate("evaluator", name, cls.Options, values)))
    if len({c.name for c in chosen}) != len(chosen):
        raise InputError("an evaluator is named twice; give each once (with all its options)")
    return chosen


def _pick_data(cls: type, name: str, data: Sequence[str]) -> str:
    """With several --data paths, each evaluator takes the one path of its ``data_kind``
    (``"file"`` or ``"folder"``)."""
    kind = getattr(cls, "data_kind", "file")
    pick = [d for d in data if Path(d).is_dir() == (kind == "folder")]
    if len(pick) != 1:
        raise InputError(f"several --data paths given; say which one {name!r} reads with {name}:data=PATH")
    return pick[0]


def sample_indices(n: int, sample: int | None, seed: int, task: str) -> list[int]:
    """Record indices of a data-set evaluator's sample: all of them, or ``sample`` drawn with the
    evaluation seed and the task's name (so each task's draw is independent), in file order."""
    idx = list(range(n))
    if sample is not None and sample < n:
        idx = sorted(random.Random(f"{seed}:{task}").sample(idx, sample))
    return idx


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes): the cache key of
    results on this exact model."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def path_sha256(path: Path) -> str:
    """Content hash of a file, or of a folder's files (relative names and bytes)."""
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(path) if path.is_dir() else ''}|{file_sha256(f)}|".encode())
    return h.hexdigest()


def options_key(options: Any) -> dict[str, Any]:
    """An evaluator's options as a cache key sees them: every option that names an existing file
    or folder is replaced by the hash of its content, so moving data keeps the cache and
    changing it misses."""
    out: dict[str, Any] = {}
    for key, value in options.model_dump(mode="json").items():
        if isinstance(value, str) and value and Path(value).exists():
            out[key] = {"content_sha256": path_sha256(Path(value))}
        else:
            out[key] = value
    return out


def mean_ci(values: Sequence[float], change: bool = False) -> tuple[float, float] | None:
    """95% interval of a mean that stays inside the values' range; None for fewer than two values.

    Scores in [0, 1] (proportions, token accuracies) take Wilson's score interval at the sample
    size whose binomial variance matches the observed one (for 0/1 values that is about n, i.e.
    Wilson's interval itself); changes in [-1, 1] the same on (x + 1) / 2. The normal
    approximation, which runs past 0 or 1 near the ends ([0.877, 1.04]), is left for unbounded
    metrics. ``change``: the values are paired differences (edited − unedited), never read as
    0/1 outcomes even when they all are 0 or 1."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    n = len(vals)
    if n < 2:
        return None
    mean = sum(vals) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    if not change and all(v in (0.0, 1.0) for v in vals):  # a proportion: Wilson's interval, also when all are equal
        return _wilson(mean, math.sqrt(mean * (1 - mean)), n) if 0 < mean < 1 else _wilson_ends(mean, n)
    if not change and min(vals) >= 0.0 and max(vals) <= 1.0:
        return _wilson(mean, sd, n)
    if min(vals) >= -1.0 and max(vals) <= 1.0:
        lo, hi = _wilson((mean + 1) / 2, sd / 2, n)
        return (2 * lo - 1, 2 * hi - 1)
    half = Z95 * sd / math.sqrt(n)
    return (mean - half, mean + half)


def _wilson_ends(p: float, n: int) -> tuple[float, float]:
    """Wilson's interval when every one of ``n`` trials came out the same (``p`` is 0 or 1)."""
    z2 = Z95 * Z95
    return (0.0, z2 / (n + z2)) if p == 0 else (n / (n + z2), 1.0)


def _wilson(p: float, sd: float, n: int) -> tuple[float, float]:
    """Wilson's interval for a mean ``p`` in [0, 1] whose standard error is ``sd / sqrt(n)``."""
    se2 = sd * sd / n
    if se2 == 0.0:
        return (p, p)
    n_eff = max(p * (1 - p) / se2, 1e-9)  # the binomial sample size with this standard error
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n_eff)) / (1 + z2 / n_eff)
    half = Z95 * math.sqrt(p * (1 - p) / n_eff + z2 / (4 * n_eff * n_eff)) / (1 + z2 / n_eff)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _clean(x: Any) -> Any:
    """JSON has no NaN: a metric that could not be measured is None."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return x


@dataclass
class _Run:
    result: EvalResult
    reference: Any = None
    seconds: float = 0.0
    cached: bool = False


def _read_run(path: Path) -> "_Run | str":
    """A cached base run if its file is intact (its checksum holds) and readable; else why not."""
    data, problem = read_checked(path)
    if data is None:
        return problem
    try:
        blob = torch.load(io.BytesIO(data), weights_only=True)  # plain containers and tensors only
        return _Run(EvalResult(**blob["result"]), blob["reference"], blob["seconds"], cached=True)
    except Exception as exc:  # intact bytes of an unexpected layout: recomputed, never trusted
        return f"unreadable: {type(exc).__name__}"


@dataclass
class Evaluation:
    """Evaluators on one set of specs; call :meth:`base` on the unedited model, then (when there
    are edits) :meth:`edited` on the edited one, then :meth:`summary`."""

    chosen: list[Chosen]
    specs: list[EditSpec]
    seed: int = 0
    progress: Progress = SILENT
    use_cache: bool = True
    base_runs: dict[str, _Run] = field(default_factory=dict)
    edited_runs: dict[str, _Run] = field(default_factory=dict)
    fingerprint: str | None = None
    tokenizer: str | None = None

    def _context(self, scorer: TeacherForced, reference: Any = None) -> EvalContext:
        return EvalContext(seed=self.seed, progress=self.progress, scorer=scorer, reference=reference)

    def _key(self, c: Chosen) -> str:
        """The base result's cache key: the model's and tokenizer's content, the evaluator (name,
        package, version, protocol), its options with data paths replaced by data hashes, the
        specs and the seed. (v3: the cached files carry a checksum.)"""
        return json_sha256({"v": 3, "model": self.fingerprint, "tokenizer": self.tokenizer, "evaluator": c.name,
                            "package": c.entry.package, "version": c.entry.version, "protocol": c.entry.obj.protocol,
                            "options": options_key(c.options),
                            "specs": specs_sha256(self.specs) if c.entry.obj.uses_specs else None, "seed": self.seed})

    def _call(self, c: Chosen, model, tok, scorer: TeacherForced, reference: Any, with_reference: bool) -> _Run:
        torch.manual_seed(self.seed)
        instance = c.entry.obj()
        t0 = time.perf_counter()
        with self.progress.stage(f"evaluating {c.name} on the {'unedited' if with_reference else 'edited'} model"):
            if with_reference:
                reference = instance.reference(model, tok, self.specs, c.options, self._context(scorer))
            res = instance.evaluate(model, tok, self.specs, c.options, self._context(scorer, reference))
        if isinstance(res, dict):
            res = EvalResult(metrics=dict(res))
        if not isinstance(res, EvalResult):
            raise KeditError(f"evaluator {c.name!r} (package {c.entry.package}) returned {type(res).__name__}, "
                             "not an EvalResult or a dict of metrics")
        return _Run(res, reference, time.perf_counter() - t0)

    def base(self, model: torch.nn.Module, tok: Any) -> None:
        """Evaluate the unedited model (from the cache when this exact model, evaluator, options,
        data and specs were evaluated before) and keep each evaluator's reference."""
        self.fingerprint = model_fingerprint(model)
        self.tokenizer = tokenizer_sha256(tok)
        scorer = TeacherForced(model, tok)
        for c in self.chosen:
            path = cache_root() / "eval" / f"{self._key(c)}.pt"
            if self.use_cache and path.is_file():
                cached = _read_run(path)
                if isinstance(cached, _Run):
                    self.base_runs[c.name] = cached
                    continue
                self.progress.warn(f"evaluation cache file {path} is damaged ({cached}); recomputing it")
                path.unlink(missing_ok=True)
            if self.use_cache:
                self.progress.note(f"{c.name} on the unedited model is computed once per model, data, options and "
                                   f"specs, then read from {path.parent}")
            run = self._call(c, model, tok, scorer, None, with_reference=True)
            self.base_runs[c.name] = run
            from .distributed import is_writer

            if self.use_cache and is_writer():  # every rank holds the same run; rank 0 caches it
                r = run.result
                buf = io.BytesIO()
                torch.save({"result": {"metrics": r.metrics, "samples": r.samples, "info": r.info},
                            "reference": run.reference, "seconds": run.seconds}, buf)
                write_checked(path, buf.getvalue())

    def edited(self, model: torch.nn.Module, tok: Any) -> None:
        if not self.base_runs:
            raise KeditError("Evaluation.edited called before Evaluation.base")
        scorer = TeacherForced(model, tok)
        for c in self.chosen:
            self.edited_runs[c.name] = self._call(c, model, tok, scorer, self.base_runs[c.name].reference,
                                                  with_reference=False)

    def summary(self) -> dict[str, Any]:
        """The JSON block described in the module docstring."""
        have_edit = bool(self.edited_runs)
        out: dict[str, Any] = {"metrics": {}, "protocols": {}, "ci": {}, "info": {}, "seconds": {}, "display": {}}
        if have_edit:
            out["base"], out["delta"] = {}, {}
        for c in self.chosen:
            b = self.base_runs[c.name]
            e = self.edited_runs.get(c.name)
            shown = e or b
            out["protocols"][c.name] = c.entry.obj.protocol
            out["display"][c.name] = c.entry.obj.display()
            out["metrics"][c.name] = {k: _clean(v) for k, v in shown.result.metrics.items()}
            out["info"][c.name] = shown.result.info
            out["seconds"][c.name] = {"base": round(b.seconds, 3), "base_cached": b.cached,
                                      **({"edited": round(e.seconds, 3)} if e else {})}
            ci: dict[str, Any] = {}
            if e:
                out["base"][c.name] = {k: _clean(v) for k, v in b.result.metrics.items()}
                out["delta"][c.name] = {k: _clean(e.result.metrics[k] - v) for k, v in b.result.metrics.items()
                                        if k in e.result.metrics and v is not None and e.result.metrics[k] is not None}
                for k, after in e.result.samples.items():
                    before = b.result.samples.get(k)
                    if before is not None and len(before) == len(after):
                        ci[k] = mean_ci([x - y for x, y in zip(after, before)], change=True)
            else:
                for k, vals in b.result.samples.items():
                    ci[k] = mean_ci(vals)
            out["ci"][c.name] = {k: list(v) for k, v in ci.items() if v is not None}
        return out


def evaluate_chain(chosen: list[Chosen], specs: list[EditSpec], model: torch.nn.Module, tok: Any,
                   diffs: Sequence[Any] = (), seed: int = 0, progress: Progress = SILENT,
                   use_cache: bool = True) -> dict[str, Any]:
    """Evaluate ``model`` as given (the base) and, if ``diffs`` are given, with them applied."""
    from . import diff as diffmod

    ev = Evaluation(chosen, specs, seed=seed, progress=progress, use_cache=use_cache)
    ev.base(model, tok)
    for d in diffs:
        diffmod.apply(model, d)
    if diffs:
        ev.edited(model, tok)
    return {**ev.summary(), "fingerprint": ev.fingerprint}


def specs_from_diffs(diffs: Sequence[Any]) -> list[EditSpec]:
    """The specs a chain of diffs records, in order (for ``kedit eval --diff`` without ``--specs``)."""
    out: list[EditSpec] = []
    for d in diffs:
        for i, rec in enumerate((d.manifest.get("specs") or {}).get("records") or []):
            out.append(parse_record(rec, f"{d.path or d.id}: recorded spec {i}"))
    return out

