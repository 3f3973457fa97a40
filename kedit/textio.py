"""Reading user files as text and JSON, so that bad bytes become one line naming file and line.

What is not UTF-8 text (Latin-1, UTF-16, binary), a line too long to be one edit, JSON nested
absurdly deep (which would overflow Python's stack) and the ``NaN``/``Infinity`` that Python's
``json`` accepts but JSON does not are all refused here, before anything is parsed further,
with an :class:`InputError` naming the file, the line and what to do. A UTF-8 byte-order mark is
accepted and dropped; CRLF line ends are the caller's to strip.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError

MAX_DEPTH = 64  # JSON nesting; specs need 3 or 4, and Python's parser overflows its stack near 1000
MAX_LINE_BYTES = 4 * 1024 * 1024  # one JSONL line; a spec is a few kB (README, Quickstart)

_UTF8_BOM = b"\xef\xbb\xbf"
_OTHER_BOMS = [(b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
               (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")]
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


class _NotFinite(ValueError):
    pass


def _open_bytes(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        return open(path, "rb")
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror})") from None


def _check_bom(head: bytes, path: Path) -> bytes:
    """``head`` without a UTF-8 byte-order mark; other Unicode encodings are refused by name."""
    if head.startswith(_UTF8_BOM):
        return head[len(_UTF8_BOM):]
    for bom, name in _OTHER_BOMS:
        if head.startswith(bom):
            raise InputError(f"{path}: {name} text (it starts with a {name} byte-order mark); kedit reads UTF-8: "
                             f"convert it, e.g. `iconv -f {name} -t UTF-8`")
    return head


def _decode(data: bytes, path: Path, line: int | None) -> str:
    """``data`` as UTF-8; ``line`` None means ``data`` is the whole file (the line is counted)."""
    def at(offset: int) -> str:
        newline = data.rfind(b"\n", 0, offset)
        lineno = line if line is not None else data.count(b"\n", 0, offset) + 1
        return f"{path}:{lineno}: not UTF-8 text (byte 0x{data[offset]:02x} at column {offset - newline}"

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{at(exc.start)}); save the file as UTF-8") from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise InputError(f"{at(nul)}, a NUL: binary data, or UTF-16/32 without a byte-order mark)") from None
    return text


def read_text(path: str | os.PathLike) -> str:
    """A whole file as UTF-8 text (a leading byte-order mark dropped)."""
    path = Path(path)
    with _open_bytes(path) as fh:
        data = fh.read()
    return _decode(_check_bom(data, path), path, None)


def iter_lines(path: str | os.PathLike, max_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line, read without ever holding more than ``max_bytes``
    of one line: a longer line is refused before the rest of it is read."""
    path = Path(path)
    with _open_bytes(path) as fh:
        lineno = 0
        while raw := fh.readline(max_bytes + 1):
            lineno += 1
            if len(raw) > max_bytes and not raw.endswith(b"\n"):
                raise InputError(f"{path}:{lineno}: line longer than {max_bytes / 2**20:g} MiB; one line holds one "
                                 "edit spec of a few kB (is this a JSONL file?)")
            if lineno == 1:
                raw = _check_bom(raw, path)
            yield lineno, _decode(raw, path, lineno)


def _line_of(bare: str, pattern: re.Pattern[str]) -> int | None:
    m = pattern.search(bare)
    return None if m is None else bare.count("\n", 0, m.start()) + 1


def _bare(text: str) -> str:
    return _STRING.sub('""', text)  # JSON strings hold no raw newline, so line numbers survive


def _too_deep(text: str) -> int | None:
    """The line where JSON ``text`` first nests deeper than MAX_DEPTH (brackets in strings aside)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:  # the common case: no need to look closer
        return None
    bare, depth = _bare(text), 0
    for m in _BRACKET.finditer(bare):
        if m.group() in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return bare.count("\n", 0, m.start()) + 1
        else:
            depth -= 1
    return None


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(text)
    return value


def _constant(text: str) -> Any:
    raise _NotFinite(text)


def loads(text: str, path: str | os.PathLike, line: int | None = None) -> Any:
    """Parse JSON from ``path`` (at ``line``, or a whole file when None): nesting at most
    MAX_DEPTH, numbers finite; every failure is an InputError naming file and line."""
    def at(lineno: int | None) -> str:
        return f"{path}:{line if line is not None else lineno or 1}"

    deep = _too_deep(text)
    if deep is not None:
        raise InputError(f"{at(deep)}: JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text, parse_float=_finite, parse_constant=_constant)
    except json.JSONDecodeError as exc:
        raise InputError(f"{at(exc.lineno)}: malformed JSON: {exc.msg} (column {exc.colno})") from None
    except _NotFinite as exc:
        raise InputError(f"{at(_line_of(_bare(text), re.compile(re.escape(str(exc)))))}: {exc} is not a JSON number "
                         "(numbers must be finite; use null or a string)") from None
    except RecursionError:
        raise InputError(f"{at(None)}: JSON nested too deeply to read") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise InputError(f"{at(None)}: unreadable JSON number ({exc})") from None


def read_json(path: str | os.PathLike) -> Any:
    """A whole JSON file, checked as :func:`loads` checks it."""
    return loads(read_text(path), path)
