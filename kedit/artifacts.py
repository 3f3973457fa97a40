"""Trained artifacts: what an editor that must be trained first (MEND) reads at edit time.

An artifact is one safetensors file whose metadata says what it was made from: the editor, its
training options, the training data's sha256, the seed, the code versions, and the base model
it belongs to, as the sha256 of every base tensor the editor reads or edits and of the tokenizer.
:func:`read` refuses an artifact whose base does not match the model at hand, so a hypernetwork
trained for one model is never applied to another, and a diff made with it records the
artifact's sha256 (its provenance stays complete).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .cache import file_sha256  # noqa: F401  (re-exported: artifacts are named by it)
from .errors import InputError

if TYPE_CHECKING:
    import torch

FORMAT = "kedit-artifact/1"


@dataclass
class Artifact:
    path: Path
    sha256: str
    tensors: dict[str, "torch.Tensor"]
    meta: dict[str, Any]

    def record(self) -> dict[str, Any]:
        """What a diff's manifest says about the artifact it was made with."""
        return {"sha256": self.sha256, "file": self.path.name, "editor": self.meta.get("editor"),
                "data_sha256": self.meta.get("data", {}).get("sha256"), "created": self.meta.get("created")}


def base_record(model: "torch.nn.Module", tokenizer: Any, names: list[str]) -> dict[str, Any]:
    """The identity of the base an artifact belongs to: the tensors it depends on, by content."""
    from .hashing import tensor_sha256, tokenizer_sha256

    return {"model_type": model.config.model_type, "tokenizer_sha256": tokenizer_sha256(tokenizer),
            "tensors": {n: tensor_sha256(model.get_parameter(n)) for n in sorted(names)}}


def write(path: str | os.PathLike, tensors: Mapping[str, "torch.Tensor"], meta: Mapping[str, Any]) -> Path:
    """Write atomically; ``meta`` travels as JSON in the safetensors header."""
    from safetensors.torch import save_file

    from .atomic import atomic_path

    path = Path(path)
    with atomic_path(path, "artifact") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": FORMAT, "meta": json.dumps(dict(meta), sort_keys=True)})
    return path


def read(path: str | os.PathLike, model: "torch.nn.Module | None" = None, tokenizer: Any = None,
         editor: str | None = None, weight: "Callable[[str], torch.Tensor] | None" = None) -> Artifact:
    """Load an artifact; with ``model`` (and ``tokenizer``) check that it was trained for this base.
    ``weight(name)`` gives the base tensors to check (a sequence's base, not its edited live weights)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .hashing import tensor_sha256, tokenizer_sha256

    path = Path(path)
    if not path.is_file():
        raise InputError(f"artifact {path}: no such file")
    try:
        with safe_open(str(path), "pt") as fh:
            header = fh.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file, named
        raise InputError(f"artifact {path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    if header.get("format") != FORMAT:
        raise InputError(f"artifact {path}: not a kedit artifact (format {header.get('format')!r}, expected {FORMAT!r}; "
                         "make one with `kedit train`)")
    meta = json.loads(header["meta"])
    if editor is not None and meta.get("editor") != editor:
        raise InputError(f"artifact {path}: trained for editor {meta.get('editor')!r}, not {editor!r}")
    if model is not None:
        base = meta.get("base", {})
        if base.get("model_type") != model.config.model_type:
            raise InputError(f"artifact {path}: trained for a {base.get('model_type')!r} model, "
                             f"this one is {model.config.model_type!r}")
        params = dict(model.named_parameters())
        for name, digest in base.get("tensors", {}).items():
            if name not in params:
                raise InputError(f"artifact {path}: trained for another base model (it has {name}, this one does not)")
            have = tensor_sha256(weight(name) if weight is not None else params[name])
            if have != digest:
                raise InputError(f"artifact {path}: trained for another base model ({name} differs: "
                                 f"sha256 {digest[:12]}…, this model's {have[:12]}…)")
        if tokenizer is not None and base.get("tokenizer_sha256") not in (None, tokenizer_sha256(tokenizer)):
            raise InputError(f"artifact {path}: trained with another tokenizer")
    return Artifact(path, file_sha256(path), tensors, meta)
