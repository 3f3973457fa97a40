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

_TOKENIZER_HASH_VERSION = 3  # bump when what goes into tokenizer_sha256 changes

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


def _core_text(tok: Any) -> str:
    """A fast tokenizer's serialized state less its per-call settings, as text. The library writes
    ``version``, ``truncation`` and ``padding`` first and everything else after them, so the text
    from ``"added_tokens"`` on is taken as it is (re-serializing a 50k-entry vocabulary canonically
    costs a quarter of a second; this costs the serialization alone); any other layout falls back
    to the canonical form."""
    text = tok.backend_tokenizer.to_str()
    cut = text.find(',"added_tokens":')
    if cut > 0:
        try:
            head = json.loads(text[:cut] + "}")
        except ValueError:
            head = None
        if isinstance(head, dict) and set(head) <= {"version", *_CALL_STATE}:
            return '{"version":' + json.dumps(head.get("version")) + text[cut:]  # still the JSON it was
    core = json.loads(text)
    for key in _CALL_STATE:
        core.pop(key, None)
    return json.dumps(core, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def tokenizer_sha256(tok: Any) -> str:
    """Stable content hash of a tokenizer: the same before and after any call with
    ``padding=``/``truncation=``, in every process.

    It covers what decides how ``tok`` turns text into ids and back: the vocabulary, merges,
    normalizer, pre-tokenizer, post-processor, decoder and added tokens of a fast tokenizer (its
    serialized state less padding and truncation; the vocabulary of a slow one), the special
    tokens the host relies on (bos, eos, unk) and the flags that add or strip them. The pad token
    is left out: kedit masks padding everywhere, and :func:`kedit.models.prepare_tokenizer` sets
    it in place on loading."""
    if getattr(tok, "backend_tokenizer", None) is not None:
        core = _core_text(tok)
    else:  # a slow (Python) tokenizer: its vocabulary is what can be read generically
        core = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False)
    special = {name: str(getattr(tok, name, None)) for name in ("bos_token", "eos_token", "unk_token")}
    flags = {name: getattr(tok, name, None) for name in ("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces")}
    extra = {"v": _TOKENIZER_HASH_VERSION, "special": special,
             "flags": {k: v for k, v in flags.items() if isinstance(v, (bool, type(None)))}}
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    h.update(core.encode())
    return h.hexdigest()


def json_sha256(obj: Any) -> str:
    """sha256 of an object's canonical JSON (sorted keys): the form every cache key takes."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                     default=str).encode()).hexdigest()
