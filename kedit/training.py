"""``kedit train``: run an editor's training (MEND's hypernetwork) and write the artifact.

The host owns what every trainer needs and none should write twice: reading the data (a spec
file or any importer's format), the run's identity (editor, resolved options, data sha256, the
base tensors by content, seed), checkpoints that make an interrupted run continue where it
stopped and end with the same tensors, and the artifact's provenance metadata.

A checkpoint lives in ``OUT.partial/`` beside the artifact and is used only by a run with the
same identity; the folder goes once the artifact is written.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from . import artifacts
from .api import TrainContext
from .errors import InputError
from .options import validate
from .plugins import lookup
from .progress import SILENT, Progress

CHECKPOINT = "checkpoint.safetensors"


def read_training_data(path: str | Path, importer: str | None) -> tuple[list[Any], str]:
    """Specs from a spec file (JSONL) or an importer's format, and the sha256 of the file's bytes."""
    from .spec import import_specs, read_specs

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--data {path}: no such file")
    digest = artifacts.file_sha256(path)
    if importer is None:
        return read_specs(path), digest
    records = lookup("spec_importers", importer).obj().read(path)
    specs, _ = import_specs(records, skip_invalid=True)
    if not specs:
        raise InputError(f"--data {path}: the {importer!r} importer found no valid records")
    return specs, digest


def _load_checkpoint(folder: Path, run_key: str) -> dict[str, Any] | None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = folder / CHECKPOINT
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("run_key") != run_key:
        return None
    return {"step": int(meta["step"]), "tensors": load_file(str(path)), "state": json.loads(meta["state"])}


def train(editor: str, data: str | Path, out: str | Path, loaded: Any, options: dict[str, Any] | None = None,
          importer: str | None = None, seed: int = 0, overwrite: bool = False,
          progress: Progress = SILENT) -> dict[str, Any]:
    """Train ``editor`` on ``data`` for the model in ``loaded`` and write the artifact to ``out``."""
    from safetensors.torch import save_file

    from . import __version__
    from .atomic import atomic_path

    entry = lookup("editors", editor)
    if entry.obj.TrainOptions is None:
        trainable = [n for n, e in _editors().items() if e.obj.TrainOptions is not None]
        raise InputError(f"editor {editor!r} is not trained; trainable editors: {', '.join(trainable) or 'none'}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists (--overwrite replaces it)")
    opts = validate("editor", editor, entry.obj.TrainOptions, dict(options or {}))
    model, tokenizer, source = loaded
    specs, data_sha = read_training_data(data, importer)
    instance = entry.obj()
    opts = instance.resolve_training(opts, model)
    options_json = opts.model_dump(mode="json")
    from .evaluate import model_fingerprint
    from .hashing import json_sha256, tokenizer_sha256

    run_key = json_sha256({"editor": editor, "options": options_json, "data": data_sha, "seed": seed,
                           "tokenizer": tokenizer_sha256(tokenizer),
                           "weights": model_fingerprint(model)})
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)

    def checkpoint(step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        with atomic_path(partial / CHECKPOINT, "checkpoint") as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                      metadata={"run_key": run_key, "step": str(step), "state": json.dumps(state)})

    torch.manual_seed(seed)
    context = TrainContext(seed=seed, progress=progress, generator=torch.Generator().manual_seed(seed),
                           resume=_load_checkpoint(partial, run_key), checkpoint=checkpoint)
    t0 = time.perf_counter()
    tensors = instance.train(model, tokenizer, specs, opts, context)
    if not context.base_tensors:
        raise InputError(f"editor {editor!r} trained without naming the base tensors its artifact depends on")
    meta = {"editor": editor, "plugin": entry.plugin, "package": entry.package, "editor_version": entry.version,
            "options": options_json, "seed": seed,
            "data": {"file": Path(data).name, "sha256": data_sha, "records": len(specs), "importer": importer},
            "base": {**artifacts.base_record(model, tokenizer, context.base_tensors), "model": source.to_json()},
            "code": {"kedit": __version__, "torch": torch.__version__},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "resumed_at": context.resume["step"] if context.resume else None,
            "seconds": round(time.perf_counter() - t0, 1), "report": context.report}
    artifacts.write(out, tensors, meta)
    shutil.rmtree(partial, ignore_errors=True)
    return {"artifact": str(out), "sha256": artifacts.file_sha256(out), **meta}


def _editors() -> dict[str, Any]:
    from .plugins import registry

    return registry("editors")
