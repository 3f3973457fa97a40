"""Hook specifications. Every built-in and third-party plugin extends kedit only through these."""
from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("kedit")


@hookspec
def register_editors(register: Callable[[type], None]) -> None:
    """Register editor classes: each has a ``name``, a pydantic ``Options`` model and
    ``edit(model, tokenizer, specs, options, context) -> {parameter name: delta}``.
    Editors return deltas and never change the model they are given."""


@hookspec
def register_regularizers(register: Callable[[type], None]) -> None:
    """Register regularizers: a ``name``, an ``Options`` model, a ``primary`` class attribute
    naming the option that ``--reg name:VALUE`` sets, and ``apply(weight, delta, options) -> delta``,
    run on every edited parameter before the diff is encoded."""


@hookspec
def register_evaluators(register: Callable[[type], None]) -> None:
    """Register evaluators: a ``name``, an ``Options`` model and
    ``evaluate(model, tokenizer, specs, options) -> {metric: value}``."""


@hookspec
def register_architectures(register: Callable[[Any], None]) -> None:
    """Register :class:`kedit.arch.ArchSpec` objects, one per ``config.model_type``, that say
    where a model's MLP output matrices live and how they are stored."""


@hookspec
def register_spec_importers(register: Callable[[type], None]) -> None:
    """Register spec importers: a ``name`` and ``read(path) -> iterable of (location, record)``
    that map a public data format (CounterFact, zsRE, ...) to canonical spec dicts, which the
    host validates into EditSpecs."""


@hookspec
def register_commands(subparsers: Any) -> None:
    """Add subcommands to the ``kedit`` command line (an ``argparse`` subparsers object).
    A command sets ``func`` with ``set_defaults(func=callable(args) -> int)``."""
