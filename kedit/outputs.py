"""Claiming an output path: never over an input of the same command, never over an existing
file without ``--overwrite``, and never by two processes at once."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Sequence

from .errors import InputError
from .locking import exclusive


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(out: str | os.PathLike, *, inputs: Sequence[str | os.PathLike] = (), overwrite: bool = False,
                 flag: str = "--out", folder: bool = False) -> Path:
    """Refuse ``out`` if it is one of ``inputs`` (always) or exists (unless ``overwrite``); a
    ``folder`` output also if it, or a folder above it, is a file."""
    out = Path(out)
    if folder:
        for parent in out.parents:
            if parent.exists() and not parent.is_dir():
                raise InputError(f"{flag} {out}: {parent} is a file, not a folder")
        if out.exists() and not out.is_dir():
            raise InputError(f"{flag} {out}: exists and is a file; {flag} names the folder to write")
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise InputError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    for p in inputs:
        if p is not None and (_same(out, Path(p)) or out.resolve() == Path(p).resolve()):
            raise InputError(f"{flag} {out}: is also an input of this command ({p}); write the result elsewhere")
    if out.exists() and not overwrite:
        if out.is_dir() and not any(out.iterdir()):
            return out
        raise InputError(f"{flag} {out}: already exists; pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def claimed(out: str | os.PathLike, *, inputs: Sequence[str | os.PathLike] = (), overwrite: bool = False,
            flag: str = "--out", folder: bool = False) -> Iterator[Path]:
    """Hold ``out`` for the block (see :func:`check_output`), so a second writer stops at once."""
    from .distributed import is_writer

    out = Path(out)
    if folder:  # a path under a file cannot hold a lock file beside it: refuse it first
        check_output(out, overwrite=overwrite, flag=flag, folder=True)
    if not is_writer():  # torchrun's other ranks check the same input, and rank 0 alone holds and writes it
        yield check_output(out, inputs=inputs, overwrite=overwrite, flag=flag, folder=folder)
        return
    with exclusive(out, f"the output {out.name}"):
        yield check_output(out, inputs=inputs, overwrite=overwrite, flag=flag, folder=folder)
