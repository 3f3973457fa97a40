"""Error types whose class decides the CLI exit code (2 = bad input, 1 = the work failed)."""
from __future__ import annotations


class KeditError(Exception):
    """The work itself failed (exit code 1)."""

    exit_code = 1


class InputError(KeditError):
    """Bad usage or bad input: a file, a field, an option, a model that does not match (exit code 2)."""

    exit_code = 2
