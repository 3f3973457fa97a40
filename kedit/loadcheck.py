"""Refusing a model folder that would load wrong: every way transformers would fail with a traceback,
or worse succeed with randomly initialised weights, becomes one InputError naming the file.

A config.json that is not JSON or names an unknown model_type, a folder without a tokenizer,
weights missing from (or extra to) what config.json describes, tensors whose shapes disagree
with it, and a truncated weights file are all bad input. Tied weights (an LM head tied to the
embeddings) are not missing: transformers leaves them out of its report.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

from .errors import InputError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
_SHOWN = 5  # names listed in a message before "and N more"


def brief(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line`` of an exception, for one-line messages."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0].strip() if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def name_list(names: Iterable[str], shown: int = _SHOWN) -> str:
    """``a, b, c, d, e and 7 more``, in natural order (layer 2 before layer 10)."""
    names = sorted(names, key=_natural)
    head = ", ".join(names[:shown])
    return f"{head} and {len(names) - shown} more" if len(names) > shown else head


def known_architectures() -> str:
    from .plugins import registry

    names = sorted(registry("architectures"))
    return f"kedit knows {', '.join(names) or '(none installed)'} (`kedit architectures` lists them)"


def read_config(target: str, folder: Path | None) -> Any:
    """The model's config, or an InputError: for a local ``folder`` one naming its config.json (not
    JSON, an unknown model_type); for a Hub id one saying it cannot be had."""
    from transformers import AutoConfig

    if folder is None:
        try:
            return AutoConfig.from_pretrained(target)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot load model {target!r}: {brief(exc)}") from None
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read it ({brief(exc)})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON, perhaps truncated (line {exc.lineno}, column {exc.colno}: "
                         f"{exc.msg})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type is not None:
        from transformers import CONFIG_MAPPING

        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
            import transformers

            raise InputError(f"{path}: model_type {model_type!r} is unknown to transformers "
                             f"{transformers.__version__}; {known_architectures()}")
    try:
        return AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a usable model config ({brief(exc)})") from None


def load_tokenizer(target: str, folder: Path | None) -> Any:
    """``AutoTokenizer`` for ``target``; for a local ``folder``, its errors become an InputError
    naming the folder (the tokenizers library raises plain ``Exception`` for a damaged file)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(target)
    except ImportError:
        raise
    except Exception as exc:
        if folder is None:
            if isinstance(exc, OSError):
                raise InputError(f"cannot load the tokenizer of {target!r}: {brief(exc)}") from None
            raise
        if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
            raise InputError(f"{folder}: no tokenizer in the model folder (none of {', '.join(_TOKENIZER_FILES)}); "
                             "save one with tokenizer.save_pretrained(FOLDER)") from None
        raise InputError(f"{folder}: cannot load its tokenizer; is a tokenizer file truncated or damaged? "
                         f"({brief(exc)})") from None


def check_loading_info(folder: str, info: dict[str, Any]) -> None:
    """Refuse weights that transformers would fill in at random (missing) or drop (unexpected)."""
    missing, unexpected = set(info.get("missing_keys") or ()), set(info.get("unexpected_keys") or ())
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing from the checkpoint ({name_list(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} in the checkpoint but not in the model ({name_list(unexpected)})")
    raise InputError(f"{folder}: the weights do not match config.json: {'; '.join(parts)}; the checkpoint is "
                     "incomplete or config.json describes another model")


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the headers of the folder's safetensors files (no data is read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            for name in fh.keys():
                shapes[name] = tuple(fh.get_slice(name).get_shape())
    return shapes


def shape_mismatches(folder: Path, config: Any) -> list[str]:
    """``name: [checkpoint shape] in the checkpoint, [shape] by config.json`` for each disagreeing
    tensor, comparing the checkpoint's headers with the model config.json builds (on the meta
    device: nothing is allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    want = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    have = checkpoint_shapes(folder)
    bad = sorted((n for n in have.keys() & want.keys() if have[n] != want[n]), key=_natural)
    return [f"{n} is {list(have[n])} in the checkpoint but {list(want[n])} by config.json" for n in bad]


def size_mismatch_error(folder: Path, config: Any, exc: BaseException) -> InputError:
    """Rephrase transformers' size-mismatch RuntimeError, naming the tensors and their shapes."""
    try:
        found = shape_mismatches(folder, config)
    except Exception:  # the details are a courtesy; the refusal stands without them
        found = []
    if not found:
        return InputError(f"{folder}: tensor shapes in the checkpoint do not match config.json ({brief(exc)})")
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return InputError(f"{folder}: tensor shapes do not match config.json: {found[0]}{more}; config.json "
                      "describes another model (a wrong intermediate_size or hidden_size?)")
