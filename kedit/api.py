"""The public plugin API: everything a plugin author needs, importable from this one module.

    from kedit.api import hookimpl, Editor, Options, EditContext, LowRank

Editors, regularizers, evaluators and spec importers subclass the classes here and declare
``name`` and a pydantic ``Options`` model (``extra="forbid"``, so a mistyped ``-o`` key fails
instead of being ignored). Importing this module loads neither torch nor transformers, so
``kedit --help`` and ``kedit editors`` stay fast however many plugins are installed; plugins
should import heavy libraries inside the methods that use them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator

from pydantic import BaseModel, ConfigDict

from . import hookimpl
from .arch import ArchSpec, arch_for, num_layers, resolve_layer
from .errors import InputError, KeditError
from .spec import EditSpec, Probe

if TYPE_CHECKING:
    import torch

    from .delta import Dense, LowRank, Sparse
    from .progress import Progress
    from .scoring import target_ids

__all__ = [
    "hookimpl", "Options", "Editor", "EditContext", "TrainContext", "Regularizer", "Evaluator", "EvalContext", "EvalResult",
    "SpecImporter", "StatsProvider", "SequenceView", "ArchSpec", "arch_for", "num_layers", "resolve_layer",
    "EditSpec", "Probe", "InputError", "KeditError", "Dense", "LowRank", "Sparse", "target_ids",
]


def __getattr__(name: str) -> Any:
    # Re-exports that need torch are resolved on first use, so importing kedit.api stays light.
    if name in ("Dense", "LowRank", "Sparse"):
        from . import delta

        return getattr(delta, name)
    if name == "target_ids":
        from .scoring import target_ids

        return target_ids
    raise AttributeError(name)


class Options(BaseModel):
    """Base for plugin options: unknown keys are errors. The host validates every plugin's
    options strictly (:func:`kedit.options.validate`): no bool/number coercion, no numbers in
    strings, finite floats only."""

    model_config = ConfigDict(extra="forbid")


class StatsProvider(ABC):
    """Key second moments C0 = E[k kᵀ] of the input of an MLP output matrix, per layer: what
    locate-then-edit editors preserve. The host makes one from the run configuration
    (:class:`kedit.stats.KeyStats`) and, inside a sequence, wraps it so every batch sees the
    sequence base's moments (:class:`kedit.sequence.BaseStats`)."""

    @abstractmethod
    def second_moment(self, model: "torch.nn.Module", tokenizer: Any, layers: list[int]) -> dict[int, "torch.Tensor"]:
        """E[k kᵀ] (float64, d_k × d_k) for each layer; read-only (shared with a cache)."""

    @property
    @abstractmethod
    def used(self) -> bool:
        """Whether an editor asked for any layer: the diff records statistics only then."""

    @abstractmethod
    def record(self) -> dict[str, Any]:
        """What the diff's manifest records: the corpus (and its licence), its hash, the token
        count and the cache keys."""


class SequenceView(ABC):
    """The unedited model behind a sequence of edits, as an editor sees it."""

    @abstractmethod
    def weight(self, name: str) -> "torch.Tensor":
        """``name``'s value before the sequence's first edit."""

    @abstractmethod
    def reverted(self) -> Any:
        """A context manager in which the model holds the sequence base's weights."""


def _no_progress(iterable: Iterable[Any] | None = None, **_: Any) -> Any:
    from .progress import SILENT

    return SILENT(iterable)


@dataclass
class EditContext:
    """What the host hands an editor besides the model, the specs and its resolved options."""

    arch: ArchSpec
    seed: int = 0
    device: str = "cpu"
    progress: "Progress | Callable[..., Any]" = _no_progress
    stats: StatsProvider | None = None
    # State a method carries across the batches of a sequence (D4S sums, AlphaEdit's key sums):
    # ``{name: tensor}``, updated in place by the editor; the host saves it beside the chain, so a
    # later process continues the sequence exactly. None outside sequences.
    state: dict[str, "torch.Tensor"] | None = None
    # The unedited model behind a sequence. None when the model is the base.
    base: SequenceView | None = None
    # Tensors an editor wants kept beside this batch's diff (D4S's per-edit keys and residuals,
    # which make single-edit removal exact); handed back to :meth:`Editor.remove`.
    step_data: dict[str, "torch.Tensor"] | None = None
    # Set by the host for an editor that declares ``regularizes_in_loop`` when the run asks for
    # regularizers inside the editor's loop (``--reg-in-loop``): the editor passes each layer's
    # delta through it before computing the next layer, so later layers see (and make up for)
    # what a regularizer removed. The host then does not regularize the returned deltas again.
    regularize: Callable[[str, Any], Any] | None = None
    generator: "torch.Generator | None" = None
    # What the editor found while editing that a reader of the diff should see (AlphaEdit's kept
    # null-space dimensions, how hard the targets were optimised): JSON values, recorded in the
    # manifest under ``report``.
    report: dict[str, Any] = field(default_factory=dict)

    # Trained artifacts named by the editor's ``artifact_options``, loaded and checked by the host.
    artifacts: dict[str, Any] = field(default_factory=dict)

    def at_base(self) -> Any:
        """A context manager in which the model holds the sequence base's weights (a no-op outside
        sequences): for what a sequence must compute once, from the base (context templates)."""
        import contextlib

        return self.base.reverted() if self.base is not None else contextlib.nullcontext()

    def base_weight(self, model: "torch.nn.Module", name: str) -> "torch.Tensor":
        """A parameter's value before the sequence's first edit (the live value outside sequences)."""
        return self.base.weight(name) if self.base is not None else model.get_parameter(name).detach()

    def need_stats(self) -> StatsProvider:
        if self.stats is None:
            raise KeditError("this editor needs key statistics, but the host gave it no statistics provider")
        return self.stats


@dataclass
class TrainContext:
    """What the host hands :meth:`Editor.train`."""

    seed: int = 0
    progress: "Progress | Callable[..., Any]" = _no_progress
    generator: "torch.Generator | None" = None
    # The last checkpoint of an interrupted run of the same training (same editor, options, data,
    # base and seed): ``{"step": int, "tensors": {...}, "state": {...}}``; None for a fresh run.
    resume: dict[str, Any] | None = None
    # checkpoint(step, tensors, state): save progress atomically (tensors: weights and optimizer
    # moments; state: JSON values such as the curve so far).
    checkpoint: Callable[[int, dict[str, "torch.Tensor"], dict[str, Any]], None] = lambda *a: None
    # Parameter names whose base values the artifact depends on; set by the editor, recorded
    # (by content hash) in the artifact so that it is never applied to another base model.
    base_tensors: list[str] = field(default_factory=list)
    # The training curve and validation results: JSON values recorded in the artifact's metadata.
    report: dict[str, Any] = field(default_factory=dict)


class Editor(ABC):
    """Computes weight deltas for a list of edit specs.

    ``edit`` must leave ``model`` exactly as it found it and return ``{parameter name: delta}``
    with each delta in the parameter's stored layout (a float32 tensor, or a :mod:`kedit.delta`
    encoding such as ``LowRank``). ``options`` arrive validated and resolved for the model by
    :meth:`resolve`, which the host calls once. Anything that lives for one call travels as
    values, never on the instance.
    """

    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    # True for an editor that solves layer by layer and calls ``context.regularize`` on each
    # layer's delta when the host sets it (``--reg-in-loop``); others refuse that flag.
    regularizes_in_loop: ClassVar[bool] = False
    # Options that name a trained artifact (a path) the editor reads, e.g. MEND's "artifact". The
    # host loads each one set (:func:`kedit.artifacts.read`), refuses one trained for another
    # base model, hands it over as ``context.artifacts[option]`` and records its sha256 in the
    # diff's manifest.
    artifact_options: ClassVar[tuple[str, ...]] = ()
    # An editor that must be trained first sets ``TrainOptions`` and implements :meth:`train`;
    # ``kedit train EDITOR`` then runs it (seeded, resumable, writing an artifact).
    TrainOptions: ClassVar[type[Options] | None] = None

    def resolve(self, options: Any, model: "torch.nn.Module") -> Any:
        """Fill options left unset (layers, family defaults) for this model; the host records the
        result in the diff's manifest, so a diff says exactly what was run."""
        return options

    @abstractmethod
    def edit(self, model: "torch.nn.Module", tokenizer: Any, specs: list[EditSpec],
             options: Any, context: EditContext) -> dict[str, Any]:
        ...

    def resolve_training(self, options: Any, model: "torch.nn.Module") -> Any:
        """Fill training options left unset for this model (as :meth:`resolve` does for editing)."""
        return options

    def train(self, model: "torch.nn.Module", tokenizer: Any, specs: list[EditSpec], options: Any,
              context: "TrainContext") -> dict[str, "torch.Tensor"]:
        """Train what :meth:`edit` will read and return its tensors; the host writes them as an
        artifact, with ``context.base_tensors`` as the base it belongs to. Save progress with
        ``context.checkpoint`` and continue from ``context.resume``, so an interrupted run goes on
        where it stopped and ends with the same tensors."""
        raise InputError(f"editor {self.name!r} is not trained (`kedit train` runs editors that are)")

    def remove(self, model: "torch.nn.Module", tokenizer: Any, spec_ids: list[str],
               steps: list[tuple[list[str], dict[str, "torch.Tensor"]]], options: Any,
               context: EditContext) -> dict[str, Any]:
        """Deltas (against the live model) that make a sequence's result as if the edits
        ``spec_ids`` had never been made; ``steps`` are each earlier batch's spec ids and
        ``step_data``. Only methods whose result is a function of per-edit sums can do this."""
        raise InputError(f"editor {self.name!r} cannot remove single edits from a sequence (d4s can)")


class Regularizer(ABC):
    """Maps ``(weight, delta, options) -> delta`` before the diff is encoded.

    ``primary`` names the option that ``--reg NAME:VALUE`` sets.
    """

    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    primary: ClassVar[str | None] = None

    @abstractmethod
    def apply(self, weight: "torch.Tensor", delta: "torch.Tensor", options: Any) -> "torch.Tensor":
        ...


@dataclass
class EvalResult:
    """What an evaluator returns.

    ``samples`` holds, for a metric that is a mean over items (specs, test examples, text
    windows), the per-item values in a fixed order: the host derives confidence intervals from
    them, paired between the unedited and the edited model. ``info`` carries what a reader needs
    to judge a number (sample sizes, chance levels) and is not compared.
    """

    metrics: dict[str, float]
    samples: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalContext:
    """What the host hands an evaluator besides the model, the specs and its options."""

    seed: int = 0
    progress: "Progress | Callable[..., Any]" = _no_progress
    scorer: Any = None  # kedit.scoring.TeacherForced for this model state, shared by all evaluators
    reference: Any = None  # what this evaluator's ``reference`` returned on the unedited model


class Evaluator(ABC):
    """Scores a model on edit specs, or on data its options point to.

    ``protocol`` names exactly how the numbers are made, so numbers from different protocols are
    never compared by accident; change it whenever the numbers would change. An evaluator that
    compares against the unedited model (KL, argmax agreement) computes what it needs in
    ``reference``; the host runs that once on the unedited model, caches it by the model's
    content hash, and passes it back as ``context.reference``.

    How results are shown is declared, not guessed by name: ``default`` evaluators run when
    ``kedit eval`` is given specs and no ``--evaluator``; ``edit_metrics`` are fractions of edits
    drawn side by side per run; ``task_metric`` (say ``"acc"``) marks metrics named
    ``TASK.acc`` as per-task scores whose ``info[TASK]["chance"]`` is the chance level;
    ``headline`` metrics come first in curves against the number of edits.
    """

    name: ClassVar[str]
    protocol: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options
    primary: ClassVar[str | None] = None
    uses_specs: ClassVar[bool] = True  # False for data-set evaluators (perplexity, glue)
    data_kind: ClassVar[str] = "file"  # which of several --data paths fills a ``data`` option: "file" or "folder"
    default: ClassVar[bool] = False
    edit_metrics: ClassVar[tuple[str, ...]] = ()
    task_metric: ClassVar[str | None] = None
    headline: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def display(cls) -> dict[str, Any]:
        """The declarations above, as results files carry them for ``kedit report``."""
        return {"edit_metrics": list(cls.edit_metrics), "task_metric": cls.task_metric,
                "headline": list(cls.headline)}

    def reference(self, model: "torch.nn.Module", tokenizer: Any, specs: list[EditSpec], options: Any,
                  context: EvalContext) -> Any:
        return None

    @abstractmethod
    def evaluate(self, model: "torch.nn.Module", tokenizer: Any, specs: list[EditSpec], options: Any,
                 context: EvalContext) -> EvalResult | dict[str, float]:
        ...


class SpecImporter(ABC):
    """Converts a public data format into edit specs.

    ``read`` yields ``(location, record)`` pairs, each record a dict in the canonical spec form;
    the host validates them, so every importer gets the same error messages and ``--skip-invalid``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""

    @abstractmethod
    def read(self, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        ...
