"""The edit pipeline: editor -> deltas -> regularizer chain -> encoded diff with provenance.

The host knows no particular method: it validates options, calls the editor through its
registered class, checks the editor left the model untouched, runs the regularizers and builds
the diff.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import delta as D
from . import diff as diffmod
from .api import EditContext
from .arch import arch_for
from .errors import InputError, KeditError
from .models import ModelSource
from .options import bind, validate
from .plugins import Registered, lookup
from .spec import EditSpec, specs_sha256


@dataclass
class Reg:
    """A regularizer bound to its validated options."""

    entry: Registered
    options: Any

    def record(self) -> dict[str, Any]:
        return {"name": self.entry.name, "plugin": self.entry.plugin, "package": self.entry.package,
                "version": self.entry.version, "options": self.options.model_dump(mode="json")}


def resolve_editor(name: str, raw_options: dict[str, Any]) -> tuple[Registered, Any]:
    entry = lookup("editors", name)
    return entry, validate("editor", name, entry.obj.Options, raw_options)


def resolve_regs(texts: Sequence[str]) -> list[Reg]:
    regs = []
    for text in texts:
        entry, values = bind("regularizers", "--reg", text)
        regs.append(Reg(entry, validate("regularizer", entry.name, entry.obj.Options, values)))
    return regs


def tokenizer_sha256(tok: Any) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def progress_bar(quiet: bool):
    """A tqdm factory on stderr, silent when ``quiet`` or when stderr is not a terminal."""
    from tqdm.auto import tqdm

    def bar(iterable=None, **kw):
        return tqdm(iterable, file=sys.stderr, disable=quiet or not sys.stderr.isatty(), leave=False, **kw)

    return bar


def _to_cpu(d: D.Delta) -> D.Delta:
    if isinstance(d, D.Dense):
        return D.Dense(d.tensor.detach().cpu().to(torch.float32))
    if isinstance(d, D.LowRank):
        return D.LowRank(d.u.detach().cpu(), d.v.detach().cpu())
    return D.Sparse(d.idx.detach().cpu(), d.val.detach().cpu(), d.shape)


def _regularized(weight: torch.Tensor, d: D.Delta, regs: Sequence[Reg]) -> D.Delta:
    if not regs:
        return d
    dense = D.to_dense(d)
    w = weight.detach().cpu()
    for reg in regs:
        dense = reg.entry.obj().apply(w, dense, reg.options).to(torch.float32)
    return D.Dense(dense)


def regularize_diff(model: torch.nn.Module, diff: diffmod.Diff, regs: Sequence[Reg]) -> diffmod.Diff:
    """The same edit with a regularizer chain run on its deltas, without recomputing the edit
    (regularizers only see the weights and the deltas). ``model`` is the diff's base."""
    if diff.manifest.get("regularizers"):
        raise InputError(f"diff {diff.id} is already regularized; regularize the unregularized edit")
    params = dict(model.named_parameters())
    out = {name: _regularized(params[name], d, regs) for name, d in diff.deltas.items()}
    record = {k: v for k, v in diff.manifest.items() if k not in ("schema", "created", "kedit", "entries", "id", "eval")}
    record["base"] = {k: v for k, v in record["base"].items() if k != "tensors"}
    record["regularizers"] = [r.record() for r in regs]
    return diffmod.build({n: params[n].detach().cpu() for n in out}, out, record)


def compute_diff(model: torch.nn.Module, tokenizer: Any, source: ModelSource, specs: list[EditSpec],
                 editor: Registered, options: Any, regs: Sequence[Reg] = (), seed: int = 0,
                 parents: Sequence[str] = (), state: dict[str, torch.Tensor] | None = None, quiet: bool = True,
                 stats: Any = None, base: Any = None,
                 step_data: dict[str, torch.Tensor] | None = None, remove: Sequence[str] | None = None,
                 steps: Sequence[Any] = (), reg_in_loop: bool = False) -> diffmod.Diff:
    """Run one edit and return its diff; ``model`` is left exactly as it was.

    ``state``, ``base`` and ``step_data`` are a sequence's (see :mod:`kedit.sequence`). With
    ``remove`` (spec ids) the diff instead takes those edits out of the sequence, through the
    editor's ``remove`` with the sequence's per-step data ``steps``."""
    arch = arch_for(model)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if stats is None:
        from .stats import KeyStats

        stats = KeyStats(seed=seed, quiet=quiet)
    context = EditContext(arch=arch, seed=seed, device=str(next(model.parameters()).device),
                          progress=progress_bar(quiet), state=state, generator=generator, stats=stats,
                          base=base, step_data=step_data)
    params = dict(model.named_parameters())
    in_loop: set[str] = set()
    if reg_in_loop and regs:
        def regularize(name: str, d: Any) -> D.Delta:
            if name not in params:
                raise KeditError(f"editor {editor.name!r} regularized {name!r}, not a parameter of the model")
            in_loop.add(name)
            return _regularized(params[name], _to_cpu(D.as_delta(d)), regs)

        context.regularize = regularize
    versions = {n: p._version for n, p in model.named_parameters()}
    instance = editor.obj()
    options = instance.resolve(options, model)
    if remove is not None:
        deltas = instance.remove(model, tokenizer, list(remove), list(steps), options, context)
    else:
        deltas = instance.edit(model, tokenizer, specs, options, context)
    changed = [n for n, p in model.named_parameters() if p._version != versions[n]]
    if changed:
        raise KeditError(f"editor {editor.name!r} (package {editor.package}) changed the model in place "
                         f"({changed[0]}); editors must return deltas")
    if not deltas:
        raise KeditError(f"editor {editor.name!r} returned no deltas")
    out: dict[str, D.Delta] = {}
    for name, d in deltas.items():
        if name not in params:
            raise KeditError(f"editor {editor.name!r} returned a delta for {name!r}, not a parameter of the model")
        out[name] = _to_cpu(D.as_delta(d)) if name in in_loop else _regularized(params[name], _to_cpu(D.as_delta(d)), regs)
    record = {
        "base": {**source.to_json(), "model_type": model.config.model_type},
        "parents": list(parents),
        "editor": {"name": editor.name, "plugin": editor.plugin, "package": editor.package,
                   "version": editor.version, "options": options.model_dump(mode="json")},
        "regularizers": [r.record() for r in regs],
        **({"regularized_in_loop": sorted(in_loop)} if in_loop else {}),
        "seed": seed,
        "stats": stats.record() if getattr(stats, "used", True) else None,
        "tokenization": {"padding_side": "right", "tokenizer_sha256": tokenizer_sha256(tokenizer),
                         "target_prefix": "space"},
        "specs": {"count": len(specs), "sha256": specs_sha256(specs),
                  "records": [s.model_dump(mode="json", exclude_defaults=True) for s in specs]},
    }
    if remove is not None:
        record["removes"] = list(remove)
    base = {n: params[n].detach().cpu() for n in out}
    return diffmod.build(base, out, record)
