"""What plugin authors subclass: editors, regularizers, evaluators and spec importers.

Each plugin class declares ``name`` and a pydantic ``Options`` model (``extra="forbid"``, so a
mistyped ``-o`` key fails instead of being ignored).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
from pydantic import BaseModel, ConfigDict

from .arch import ArchSpec
from .spec import EditSpec


class Options(BaseModel):
    """Base for plugin options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def _no_progress(iterable: Iterable[Any], **_: Any) -> Iterable[Any]:
    return iterable


@dataclass
class EditContext:
    """What the host hands an editor besides the model and the specs."""

    arch: ArchSpec
    seed: int = 0
    device: str = "cpu"
    progress: Callable[..., Iterable[Any]] = _no_progress
    stats: Any = None  # key-statistics provider (locate-then-edit methods)
    # State a method carries across the batches of a sequence (D4S sums, AlphaEdit's key sums):
    # ``{name: tensor}``, updated in place by the editor; the host saves it beside the chain, so a
    # later process continues the sequence exactly. None outside sequences.
    state: dict[str, torch.Tensor] | None = None
    # The unedited model behind a sequence (:class:`kedit.sequence.SequenceBase`): ``weight(name)``
    # gives a parameter's value before the sequence's first edit. None when the model is the base.
    base: Any = None
    # Tensors an editor wants kept beside this batch's diff (D4S's per-edit keys and residuals,
    # which make single-edit removal exact); handed back to :meth:`Editor.remove`.
    step_data: dict[str, torch.Tensor] | None = None
    # Set when the host asks for regularizers inside the editor's loop (``--reg-in-loop``): an
    # editor that solves layer by layer passes each layer's delta through it before computing the
    # next layer, so later layers see (and make up for) what a regularizer removed. Deltas it
    # returned are not regularized again.
    regularize: Callable[[str, Any], Any] | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)

    def at_base(self) -> Any:
        """A context manager in which the model holds the sequence base's weights (a no-op outside
        sequences): for what a sequence must compute once, from the base (context templates)."""
        import contextlib

        return self.base.reverted() if self.base is not None else contextlib.nullcontext()

    def base_weight(self, model: torch.nn.Module, name: str) -> torch.Tensor:
        """A parameter's value before the sequence's first edit (the live value outside sequences)."""
        return self.base.weight(name) if self.base is not None else model.get_parameter(name).detach()


class Editor(ABC):
    """Computes weight deltas for a list of edit specs.

    ``edit`` must leave ``model`` exactly as it found it and return
    ``{parameter name: delta}`` with each delta in the parameter's stored layout (a float32
    tensor, or a :mod:`kedit.delta` encoding such as ``LowRank``).
    """

    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options

    def resolve(self, options: Any, model: torch.nn.Module) -> Any:
        """Fill options left unset (layers, family defaults) for this model; the host records the
        result in the diff's manifest, so a diff says exactly what was run."""
        return options

    @abstractmethod
    def edit(self, model: torch.nn.Module, tokenizer: Any, specs: list[EditSpec],
             options: Any, context: EditContext) -> dict[str, Any]:
        ...

    def remove(self, model: torch.nn.Module, tokenizer: Any, spec_ids: list[str],
               steps: list[tuple[list[str], dict[str, torch.Tensor]]], options: Any,
               context: EditContext) -> dict[str, Any]:
        """Deltas (against the live model) that make a sequence's result as if the edits
        ``spec_ids`` had never been made; ``steps`` are each earlier batch's spec ids and
        ``step_data``. Only methods whose result is a function of per-edit sums can do this."""
        from .errors import InputError

        raise InputError(f"editor {self.name!r} cannot remove single edits from a sequence (d4s can)")


class Regularizer(ABC):
    """Maps ``(weight, delta, options) -> delta`` before the diff is encoded.

    ``primary`` names the option that ``--reg NAME:VALUE`` sets.
    """

    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    primary: ClassVar[str | None] = None

    @abstractmethod
    def apply(self, weight: torch.Tensor, delta: torch.Tensor, options: Any) -> torch.Tensor:
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
    progress: Callable[..., Iterable[Any]] = _no_progress
    scorer: Any = None  # kedit.scoring.TeacherForced for this model state, shared by all evaluators
    reference: Any = None  # what this evaluator's ``reference`` returned on the unedited model


class Evaluator(ABC):
    """Scores a model on edit specs, or on data its options point to.

    ``protocol`` names exactly how the numbers are made, so numbers from different protocols are
    never compared by accident; change it whenever the numbers would change. An evaluator that
    compares against the unedited model (KL, argmax agreement) computes what it needs in
    ``reference``; the host runs that once on the unedited model, caches it by the model's
    content hash, and passes it back as ``context.reference``.
    """

    name: ClassVar[str]
    protocol: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options
    primary: ClassVar[str | None] = None
    uses_specs: ClassVar[bool] = True  # False for data-set evaluators (perplexity, glue)
    data_kind: ClassVar[str] = "file"  # which of several --data paths fills a ``data`` option: "file" or "folder"

    def reference(self, model: torch.nn.Module, tokenizer: Any, specs: list[EditSpec], options: Any,
                  context: EvalContext) -> Any:
        return None

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, tokenizer: Any, specs: list[EditSpec], options: Any,
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
