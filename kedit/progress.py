"""Progress that a person at a terminal and a log file can both read.

On a terminal, long work shows tqdm bars that redraw every half second with tqdm's ETA. When
stderr is not a terminal (a log, a CI job, ``2> run.log``), every stage prints one line when it
starts (what it is and how much work), a line a minute while it runs (done so far, elapsed, time
left), and one line when it ends (the time it took), so a log is never silent for long.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import IO, Any, Iterable, Iterator

HEARTBEAT_S = 60.0  # a running stage's line in a log, at most this often


def _fmt_s(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class LineBar:
    """The log form of a progress bar: a start line, a heartbeat, and a finishing line; the
    subset of tqdm's interface that kedit uses (iteration, ``update``, ``close``)."""

    def __init__(self, iterable: Iterable[Any] | None, total: float | None, desc: str, unit: str,
                 stream: IO[str], heartbeat: float = HEARTBEAT_S) -> None:
        self.iterable, self.desc, self.unit, self.stream, self.heartbeat = iterable, desc, unit, stream, heartbeat
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n, self.closed = total, 0.0, False
        self.start = self.last = time.perf_counter()
        work = f"{_count(total)} {_units(unit, total)}" if total is not None else "started"
        self._say(f"{desc}: {work}")

    def _say(self, text: str) -> None:
        print(f"kedit: {text}", file=self.stream, flush=True)

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LineBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.heartbeat:
            self.last = now
            elapsed = now - self.start
            left = ""
            if self.total and self.n:
                left = f", about {_fmt_s(elapsed * (self.total - self.n) / self.n)} left"
            done = f"{_count(self.n)}/{_count(self.total)}" if self.total is not None else _count(self.n)
            self._say(f"{self.desc}: {done} {_units(self.unit, self.total)} after {_fmt_s(elapsed)}{left}")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._say(f"{self.desc}: done, {_count(self.n)} {_units(self.unit, self.n)} in "
                  f"{_fmt_s(time.perf_counter() - self.start)}")


_PLURALS = {"tok": "tokens", "token": "tokens", "batch": "batches", "it": "items"}


def _units(unit: str, n: float | None) -> str:
    if n is not None and n == 1:
        return "token" if unit == "tok" else unit
    return _PLURALS.get(unit, unit if unit.endswith("s") else unit + "s")


def _count(x: float | None) -> str:
    if x is None:
        return "?"
    return f"{int(x):,}" if float(x).is_integer() else f"{x:,.1f}"


class _Silent:
    """A bar that shows nothing (``quiet``)."""

    def __init__(self, iterable: Iterable[Any] | None = None, **_: Any) -> None:
        self.iterable = iterable
        self.n = 0.0

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable if self.iterable is not None else ())

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def update(self, n: float = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass


class Progress:
    """kedit's reporter of long work, handed to editors and evaluators as ``context.progress``.

    Call it like ``tqdm``: ``progress(iterable, desc=..., unit=...)`` or
    ``progress(total=N, desc=...)`` with ``update``/``close``. :meth:`stage` times a step that has
    no natural count; :meth:`note` prints a one-line remark (say, that a step is slow only once).
    """

    def __init__(self, quiet: bool = False, stream: IO[str] | None = None, tty: bool | None = None,
                 heartbeat: float = HEARTBEAT_S) -> None:
        self.quiet = quiet
        self._stream = stream
        self._tty = tty
        self.heartbeat = heartbeat

    @property
    def stream(self) -> IO[str]:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def tty(self) -> bool:
        if self._tty is not None:
            return self._tty
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def __call__(self, iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", **_: Any) -> Any:
        if self.quiet:
            return _Silent(iterable)
        if self.tty:
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=desc, unit=unit, file=self.stream, leave=False,
                        mininterval=0.5, dynamic_ncols=True)
        return LineBar(iterable, total, desc, unit, self.stream, self.heartbeat)

    def note(self, text: str) -> None:
        if not self.quiet:
            print(f"kedit: {text}", file=self.stream, flush=True)

    def warn(self, text: str) -> None:
        """A one-line warning (a damaged cache being rebuilt, say): printed even when quiet, since
        quiet silences progress, not news that something was wrong."""
        print(f"kedit: warning: {text}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, desc: str) -> Iterator[None]:
        """A step without a count: ``desc …`` when it starts and ``desc: done in T`` when it ends
        (on a terminal only the finishing line, so fast steps do not flicker)."""
        t0 = time.perf_counter()
        if not self.quiet and not self.tty:
            self.note(f"{desc} …")
        yield
        if not self.quiet:
            self.note(f"{desc}: done in {_fmt_s(time.perf_counter() - t0)}")


SILENT = Progress(quiet=True)
