"""Content hashes: what a diff records about the exact base it applies to, and what cache keys
are made of. A key hashes content (weights, vocabulary and rules, data bytes, options), never
state that changes while a program runs.
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_TOKENIZER_HASH_VERSION = 2  # bump when what goes into tokenizer_sha256 changes

# Parts of a fast tokenizer's serialized state that are per-call settings, not tokenization:
# ``tok(..., padding=True, truncation=True)`` turns them on in place and they stay on.
_CALL_STATE = ("padding", "truncation")


def tensor_sha256(t: "torch.Tensor") -> str:
    """sha256 of the raw bytes of a CPU, contiguous, native-dtype copy of ``t``."""
    import torch

    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def dtype_name(dtype: "torch.dtype") -> str:
    return str(dtype).removeprefix("torch.")


def tokenizer_state(tok: Any) -> dict[str, Any]:
    """What decides how ``tok`` turns text into ids and back: the vocabulary, merges, normalizer,
    pre-tokenizer, post-processor, decoder and added tokens of a fast tokenizer (its serialized
    state less padding and truncation), the special tokens the host relies on (bos, eos, unk) and
    the flags that add or strip them. The pad token is left out: kedit masks padding everywhere,
    and :func:`kedit.models.prepare_tokenizer` sets it in place on loading."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        core = json.loads(backend.to_str())
        for key in _CALL_STATE:
            core.pop(key, None)
    else:  # a slow (Python) tokenizer: its vocabulary is what can be read generically
        core = {"vocab": sorted(tok.get_vocab().items())}
    special = {name: str(getattr(tok, name, None)) for name in ("bos_token", "eos_token", "unk_token")}
    flags = {name: getattr(tok, name, None) for name in ("add_bos_token", "add_eos_token",
                                                          "clean_up_tokenization_spaces")}
    return {"v": _TOKENIZER_HASH_VERSION, "core": core, "special": special,
            "flags": {k: v for k, v in flags.items() if isinstance(v, (bool, type(None)))}}


def tokenizer_sha256(tok: Any) -> str:
    """Stable content hash of a tokenizer (see :func:`tokenizer_state`): the same before and
    after any call with ``padding=``/``truncation=``, in every process."""
    blob = json.dumps(tokenizer_state(tok), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def json_sha256(obj: Any) -> str:
    """sha256 of an object's canonical JSON (sorted keys): the form every cache key takes."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                     default=str).encode()).hexdigest()
