"""One run configuration and one edit job: what the CLI, the Python API and the benches build.

:class:`RunConfig` says *where and how* work runs (which model, the seed, the statistics, the
evaluators, and the device, dtype and process group that later work fills in); :class:`EditJob`
says *what* to edit. Both are plain frozen dataclasses, checked when made, so a bad value fails
before any model is loaded.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from .errors import InputError

Mode = Literal["batch", "sequential"]
MAX_SEED = 2**63 - 1  # torch and Python generators take it; above 2**64 torch fails deep inside


DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a CUDA device, else ``cpu``; a CUDA device that is
    not there is an input error, not a crash deep inside a run."""
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available (torch {torch.__version__} sees none); "
                         "use --device cpu or auto")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def _strs(values: Sequence[Any] | None) -> tuple[str, ...]:
    return tuple(str(v) for v in (values or ()))


@dataclass(frozen=True)
class StatsConfig:
    """Key statistics (C0 = E[k kᵀ]) for the editors that ask for them.

    ``corpus``: a .txt/.json/.jsonl file, ``hf:NAME[:CONFIG]`` (online), ``builtin`` (the
    corpus shipped with kedit, the default) or ``sampled`` (text sampled from the model).
    ``n_tokens`` None takes the corpus kind's default budget.
    """

    corpus: str | None = None
    n_tokens: int | None = None
    max_len: int | None = None
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("n_tokens", "max_len", "batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"statistics {name} {value!r}: must be a whole number of at least 1")

    def to_json(self) -> dict[str, Any]:
        return {"corpus": self.corpus, "n_tokens": self.n_tokens, "max_len": self.max_len,
                "batch_size": self.batch_size}


@dataclass(frozen=True)
class RunConfig:
    """Where and how a job runs.

    ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when there is one). ``dtype``: the
    weights' dtype (solves stay float64 and deltas float32 whatever it is; a diff records the
    dtype of the tensors it was computed against). ``device_map="auto"`` spreads a model that does
    not fit one device over the available ones (accelerate) and then decides placement instead of
    ``device``. ``group`` (a ``torch.distributed`` process group) is carried for the
    multi-process work; none is accepted yet.
    """

    model: str | None = None
    seed: int = 0
    stats: StatsConfig = field(default_factory=StatsConfig)
    evaluators: tuple[str, ...] = ()
    data: tuple[str, ...] = ()
    use_cache: bool = True
    quiet: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    device_map: str | None = None
    group: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "evaluators", _strs(self.evaluators))
        object.__setattr__(self, "data", _strs(self.data))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"seed {self.seed!r}: must be a whole number from 0 to {MAX_SEED}")
        if not re.fullmatch(r"cpu|cuda|cuda:\d+|auto", str(self.device)):
            raise InputError(f"device {self.device!r}: expected cpu, cuda, cuda:N or auto")
        if self.dtype not in DTYPES:
            raise InputError(f"dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.device_map not in (None, "auto"):
            raise InputError(f"device map {self.device_map!r}: only 'auto' (accelerate's placement) is supported")
        if self.group is not None:
            raise InputError("a torch.distributed process group is not supported yet")

    def progress(self):
        """The progress reporter for this run (see :mod:`kedit.progress`)."""
        from .progress import Progress

        return Progress(quiet=self.quiet)

    def placement(self) -> dict[str, Any]:
        """Keyword arguments of :func:`kedit.models.load`: the device (``auto`` resolved), dtype and device map."""
        return {"device": resolve_device(self.device), "dtype": self.dtype, "device_map": self.device_map}

    def load(self):
        """``(model, tokenizer, source)`` as :class:`kedit.models.LoadedModel`."""
        from .models import load

        return load(self.model, progress=self.progress(), **self.placement())

    def stats_provider(self):
        """A fresh key-statistics provider for this run (see :class:`kedit.api.StatsProvider`)."""
        from .stats import KeyStats

        s = self.stats
        return KeyStats(corpus=s.corpus, n_tokens=s.n_tokens, max_len=s.max_len, seed=self.seed,
                        batch_size=s.batch_size, progress=self.progress())


@dataclass(frozen=True)
class EditJob:
    """What to edit: a spec file, an editor with its options, regularizers, and how to proceed.

    ``mode="batch"`` makes one diff (on top of the chain ``after``); ``"sequential"`` edits in
    batches of ``batch_size`` and writes a chain folder (or one diff with ``squash``);
    ``continue_chain`` resumes a chain with the editor, options and batch size it recorded.
    """

    specs: str | os.PathLike
    editor: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    regs: tuple[str, ...] = ()
    reg_in_loop: bool = False
    mode: Mode = "batch"
    batch_size: int | None = None
    squash: bool = False
    after: tuple[str, ...] = ()
    continue_chain: str | None = None
    out: str | None = None
    eval_at: tuple[str, ...] = ()
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "specs", Path(self.specs))
        object.__setattr__(self, "options", dict(self.options or {}))
        for name in ("regs", "after", "eval_at"):
            object.__setattr__(self, name, _strs(getattr(self, name)))
        if self.continue_chain is not None:
            object.__setattr__(self, "continue_chain", str(self.continue_chain))
        if self.out is not None:
            object.__setattr__(self, "out", str(self.out))
        if self.mode not in ("batch", "sequential"):
            raise InputError(f"--mode {self.mode!r}: expected batch or sequential")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise InputError(f"--batch-size {self.batch_size!r}: must be a whole number of at least 1")
        if not self.sequential and (self.batch_size is not None or self.squash or self.eval_at):
            raise InputError("--batch-size, --squash and --eval-at belong to --mode sequential "
                             "(--mode batch edits all specs at once)")
        if self.sequential and self.after:
            raise InputError("--after goes with --mode batch; a sequence continues a chain with --continue CHAIN")
        if self.editor is None and self.continue_chain is None:
            raise InputError("kedit apply needs --plugin EDITOR (see `kedit editors`), or --continue CHAIN")

    @property
    def sequential(self) -> bool:
        return self.mode == "sequential" or self.continue_chain is not None
