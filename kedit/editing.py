"""The edit pipeline: editor -> deltas -> regularizer chain -> encoded diff with provenance.

The host knows no particular method: :class:`EditPlan` binds a registered editor to its options
(validated, then resolved for the model once), the regularizer chain and the seed;
:func:`compute_diff` calls the editor through its class, checks it left the model untouched,
runs the regularizers (the host is their one owner; an editor that declares
``regularizes_in_loop`` gets them as ``context.regularize`` instead) and builds the diff.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from . import delta as D
from . import diff as diffmod
from .api import EditContext, StatsProvider
from .arch import arch_for
from .artifacts import read as read_artifact
from .errors import InputError, KeditError
from .hashing import tokenizer_sha256
from .limits import check_diff_budget
from .options import bind, validate
from .plugins import Registered, lookup
from .progress import SILENT, Progress
from .spec import EditSpec, specs_sha256

if TYPE_CHECKING:
    from .models import LoadedModel
    from .sequence import SequenceBase


@dataclass
class Reg:
    """A regularizer bound to its validated options."""

    entry: Registered
    options: Any

    def record(self) -> dict[str, Any]:
        return {"name": self.entry.name, "plugin": self.entry.plugin, "package": self.entry.package,
                "version": self.entry.version, "options": self.options.model_dump(mode="json")}


def resolve_regs(texts: Sequence[str]) -> list[Reg]:
    regs = []
    for text in texts:
        entry, values = bind("regularizers", "--reg", text)
        regs.append(Reg(entry, validate("regularizer", entry.name, entry.obj.Options, values)))
    return regs


def resolve_editor(name: str, raw_options: dict[str, Any]) -> tuple[Registered, Any]:
    """The registered editor and its validated (not yet model-resolved) options."""
    entry = lookup("editors", name)
    return entry, validate("editor", name, entry.obj.Options, raw_options)


@dataclass
class EditPlan:
    """What :func:`compute_diff` runs: an editor with options resolved for one model, the
    regularizer chain, the seed, the statistics provider and the progress reporter."""

    editor: Registered
    options: Any
    regs: list[Reg] = field(default_factory=list)
    reg_in_loop: bool = False
    seed: int = 0
    stats: StatsProvider | None = None
    progress: Progress = SILENT

    @staticmethod
    def check(editor: str, options: dict[str, Any] | None = None, regs: Sequence[str] = (),
              reg_in_loop: bool = False) -> tuple[Registered, Any, list[Reg]]:
        """Validate the editor, its options and the regularizers, before any model is loaded."""
        entry, opts = resolve_editor(editor, dict(options or {}))
        chain = resolve_regs(regs)
        if reg_in_loop and chain and not entry.obj.regularizes_in_loop:
            raise InputError(f"--reg-in-loop: editor {editor!r} does not solve layer by layer, so it cannot "
                             "regularize inside its loop; drop --reg-in-loop to regularize its result")
        return entry, opts, chain

    @classmethod
    def make(cls, model: torch.nn.Module, editor: str, options: dict[str, Any] | None = None,
             regs: Sequence[str] = (), reg_in_loop: bool = False, seed: int = 0,
             stats: StatsProvider | None = None, progress: Progress = SILENT) -> "EditPlan":
        """Validate everything and resolve the editor's options for ``model`` (once)."""
        entry, opts, chain = cls.check(editor, options, regs, reg_in_loop)
        resolved = entry.obj().resolve(opts, model)
        return cls(entry, resolved, chain, bool(reg_in_loop and chain), seed, stats, progress)

    def editor_record(self) -> dict[str, Any]:
        e = self.editor
        return {"name": e.name, "plugin": e.plugin, "package": e.package, "version": e.version,
                "options": self.options.model_dump(mode="json")}


@dataclass
class SequenceStep:
    """A batch inside a sequence: the sequence base, the editor's carried state (updated in
    place) and the per-batch data it keeps for single-edit removal."""

    base: "SequenceBase"
    state: dict[str, torch.Tensor]
    step_data: dict[str, torch.Tensor] | None = None


@dataclass
class Removal:
    """Take edits ``spec_ids`` out of a sequence, given every earlier batch's (ids, step data)."""

    spec_ids: list[str]
    steps: list[tuple[list[str], dict[str, torch.Tensor]]]


def _to_cpu(d: D.Delta) -> D.Delta:
    if isinstance(d, D.Dense):
        return D.Dense(d.tensor.detach().cpu().to(torch.float32))
    if isinstance(d, D.LowRank):
        return D.LowRank(d.u.detach().cpu(), d.v.detach().cpu())
    if isinstance(d, D.MaskedLowRank):
        return D.MaskedLowRank(d.u.detach().cpu(), d.v.detach().cpu(), d.mask.detach().cpu())
    return D.Sparse(d.idx.detach().cpu(), d.val.detach().cpu(), d.shape)


def _regularized(weight: torch.Tensor, d: D.Delta, regs: Sequence[Reg]) -> D.Delta:
    """The regularizer chain on the dense delta. Where the result keeps some elements of a
    low-rank delta unchanged and zeroes the rest (RECT does), it is that low-rank delta under a
    mask, which the diff stores as the factors and a bitmap; the host checks the values, not the
    regularizer's name."""
    if not regs:
        return d
    if isinstance(d, D.LowRank):  # the factors as the diff stores them, so the kept values are exact
        d = D.LowRank(d.u.to(torch.float32), d.v.to(torch.float32))
    dense = D.to_dense(d)
    w = weight.detach().cpu()
    out = dense
    for reg in regs:
        out = reg.entry.obj().apply(w, out, reg.options).to(torch.float32)
    if isinstance(d, D.LowRank):
        mask = out != 0
        if torch.equal(out, torch.where(mask, dense, torch.zeros((), dtype=torch.float32))):
            return D.MaskedLowRank(d.u, d.v, mask)
    return D.Dense(out)


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


def compute_diff(loaded: "LoadedModel", specs: list[EditSpec], plan: EditPlan, *, parents: Sequence[str] = (),
                 sequence: SequenceStep | None = None, removal: Removal | None = None) -> diffmod.Diff:
    """Run one edit and return its diff; the model is left exactly as it was.

    ``sequence`` places the edit inside a sequence (see :mod:`kedit.paradigms`). With ``removal``
    the diff instead takes those edits out of the sequence, through the editor's ``remove``."""
    check_diff_budget(specs)  # before the work, not when the header is written
    model, tokenizer, source = loaded
    editor = plan.editor
    seed = plan.seed
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    context = EditContext(arch=arch_for(model), seed=seed, device=str(next(model.parameters()).device),
                          progress=plan.progress, stats=plan.stats, generator=generator,
                          state=sequence.state if sequence else None, base=sequence.base if sequence else None,
                          step_data=sequence.step_data if sequence else None)
    params = dict(model.named_parameters())
    if plan.reg_in_loop:
        def regularize(name: str, d: Any) -> D.Delta:
            if name not in params:
                raise KeditError(f"editor {editor.name!r} regularized {name!r}, not a parameter of the model")
            return _regularized(params[name], _to_cpu(D.as_delta(d)), plan.regs)

        context.regularize = regularize
    versions = {n: p._version for n, p in params.items()}
    instance = editor.obj()
    for option in editor.obj.artifact_options:
        path = getattr(plan.options, option, None)
        if path is not None:
            context.artifacts[option] = read_artifact(path, model, tokenizer, editor=editor.name,
                                                      weight=lambda n: context.base_weight(model, n))
    if removal is not None:
        deltas = instance.remove(model, tokenizer, list(removal.spec_ids), list(removal.steps), plan.options, context)
    else:
        deltas = instance.edit(model, tokenizer, specs, plan.options, context)
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
        cpu = _to_cpu(D.as_delta(d))
        out[name] = cpu if plan.reg_in_loop else _regularized(params[name], cpu, plan.regs)
    stats = plan.stats
    record: dict[str, Any] = {
        "base": {**source.to_json(), "model_type": model.config.model_type},
        "parents": list(parents),
        "editor": plan.editor_record(),
        "regularizers": [r.record() for r in plan.regs],
        **({"regularized_in_loop": sorted(out)} if plan.reg_in_loop else {}),
        "seed": seed,
        "stats": stats.record() if stats is not None and stats.used else None,
        "tokenization": {"padding_side": "right", "tokenizer_sha256": tokenizer_sha256(tokenizer),
                         "target_prefix": "space"},
        "specs": {"count": len(specs), "sha256": specs_sha256(specs),
                  "records": [s.model_dump(mode="json", exclude_defaults=True) for s in specs]},
    }
    if removal is not None:
        record["removes"] = list(removal.spec_ids)
    if context.artifacts:
        record["artifacts"] = {k: a.record() for k, a in context.artifacts.items()}
    if context.report:
        record["report"] = context.report
    return diffmod.build({n: params[n].detach().cpu() for n in out}, out, record)
