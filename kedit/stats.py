"""Key statistics for locate-then-edit editors: C0 = E[k kᵀ] of the MLP output matrix's inputs.

ROME/MEMIT-style editors need, per edited layer, the second moment of the keys k (the input of
``arch.mlp_out``) over the tokens of a text corpus.  The reference code makes one data pass per
layer; here every requested layer is collected in ONE pass that stops right after the deepest
requested layer, so later layers and the LM head never run.  Results are cached in memory and on
disk under a content key (the weights that can influence the keys, the tokenizer's vocabulary
and rules, the corpus's content hash and the budget), so an edit above layer l never invalidates
layer l, and a renamed folder never serves stale statistics.

Each statistics file carries its shape, token count and the sha256 of its bytes; a file that
does not verify (truncated, altered, of another width, non-finite, or written before checksums)
is recomputed with a warning, never used.

The default corpus is the built-in one (:mod:`kedit.corpus`): real text shipped with kedit, so
the first run needs no data and samples nothing. ``sampled`` draws text from the model itself
(seeded top-k sampling from short prompts; slow on a CPU, cached on disk).
"""
from __future__ import annotations

import itertools
import json
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from .api import StatsProvider
from .arch import ArchSpec, arch_for, num_layers, resolve_layer
from .atomic import atomic_path, atomic_write_text
from .cache import cache_root, check_file_record, file_sha256, write_file_record
from .corpus import BUILTIN, SAMPLED, Corpus, open_corpus, read_documents
from .errors import InputError, KeditError
from .hashing import dtype_name, json_sha256, tensor_sha256, tokenizer_sha256
from .progress import SILENT, Progress

if TYPE_CHECKING:
    from pathlib import Path

    import torch

__all__ = ["KeyStats", "parse_layers", "fingerprints", "pack_rows", "accumulate", "sample_documents",
           "read_documents"]

SEED_PROMPTS = ("The", "In", "A", "It", "This", "When", "He", "She", "On", "After", "There", "We")
SAMPLE_BATCH = 64  # sequences generated at once: big enough for efficient GEMMs in each decode step
DEFAULT_MAX_LEN = 256  # tokens per packed row, unless the model's context is shorter
_VERSION = 2  # bump when what goes into a cache key or a cached file changes meaning

DEFAULT_TOKENS = 100_000  # from a corpus file or a Hub data set
DEFAULT_BUILTIN_TOKENS = 20_000  # ≈ 13 × d_k for SmolLM2; the reference notes put ~10 × d_k at ~95% of full quality
DEFAULT_SAMPLED_TOKENS = 20_000  # sampling costs minutes on a CPU: kept as small as the built-in budget
# --mode sequential with the built-in corpus: all of it (567k tokens with SmolLM2's tokenizer). The
# budget's cost grows with the sequence (docs/sequential.md: 0.8 perplexity points on one batch of
# 100, 3.9 after 200 sequential edits), and ~4.5 min once per model and layer set is small beside it.
SEQUENCE_BUILTIN_TOKENS = 600_000


def default_budget(corpus: str | None, sequence: bool = False) -> int:
    """The token budget when none is asked for: per corpus kind, and for a new sequence all of the
    built-in corpus (:data:`SEQUENCE_BUILTIN_TOKENS`)."""
    corpus = BUILTIN if corpus is None else str(corpus)
    if sequence and corpus == BUILTIN:
        return SEQUENCE_BUILTIN_TOKENS
    return {BUILTIN: DEFAULT_BUILTIN_TOKENS, SAMPLED: DEFAULT_SAMPLED_TOKENS}.get(corpus, DEFAULT_TOKENS)


class _Stop(Exception):
    """Raised by the deepest layer's hook: nothing after it is needed, so the forward ends there."""


def parse_layers(text: str | None, config: Any) -> list[int]:
    """``"3,4,-1"`` -> sorted layer indices (negatives count from the end), checked against the model."""
    if not text or not text.strip():
        raise InputError("stats compute needs --layers, e.g. --layers 3,4,5,6,7 (all layers at once is rarely wanted)")
    try:
        raw = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--layers {text!r}: expected comma-separated integers such as 3,4,5") from None
    return sorted({resolve_layer(i, config) for i in raw})


def _layer_index(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def fingerprints(model: "torch.nn.Module", arch: ArchSpec, layers: Iterable[int]) -> dict[int, str]:
    """Per layer l, sha256 over the hashes of every parameter that can influence the keys at l.

    That is every parameter not inside a layer above l (embeddings and heads included); each
    tensor is hashed once however many layers are asked for.
    """
    import hashlib

    layers = sorted(set(layers))
    prefix = arch.layers + "."
    digests = [(n, idx, tensor_sha256(p)) for n, p in model.named_parameters()
               if (idx := _layer_index(n, prefix)) is None or idx <= layers[-1]]
    out = {}
    for layer in layers:
        h = hashlib.sha256(f"{model.config.model_type}\n".encode())
        for name, idx, digest in digests:
            if idx is None or idx <= layer:
                h.update(f"{name}={digest}\n".encode())
        out[layer] = h.hexdigest()
    return out


def pack_rows(tokenizer: Any, docs: Iterable[str], n_tokens: int, max_len: int) -> list[list[int]]:
    """One token stream (eos between documents) cut into rows of ``max_len``; at most ``n_tokens`` in all."""
    sep = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    stream: list[int] = []
    docs = iter(docs)
    while len(stream) < n_tokens and (chunk := list(itertools.islice(docs, 256))):
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            stream += ids + sep
    stream = stream[:n_tokens]
    if not stream:
        raise InputError("the corpus has no tokens")
    return [stream[i:i + max_len] for i in range(0, len(stream), max_len)]


def accumulate(model: "torch.nn.Module", arch: ArchSpec, rows: list[list[int]], layers: list[int],
               batch_size: int, pad_id: int, bar: Callable[..., Any]) -> tuple[dict[int, "torch.Tensor"], int]:
    """Σ k kᵀ / count for every layer in one pass over ``rows``; returns (moments on CPU, count).

    Per batch the product is float32 (fast BLAS); the running sum is float64 so 10⁵-10⁷ tokens add
    up without drift.  Padding positions (only in the last, partial row) are masked out.
    """
    import torch

    device = next(model.parameters()).device
    deepest = max(layers)
    acc: dict[int, torch.Tensor] = {}
    flat_mask: list[torch.Tensor | None] = [None]

    def make_hook(layer: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            keys = args[0]
            x = keys.reshape(-1, keys.shape[-1])
            if flat_mask[0] is not None:
                x = x[flat_mask[0]]
            x = x.float()
            if layer not in acc:
                acc[layer] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            acc[layer].add_(x.T @ x)
            if layer == deepest:
                raise _Stop
        return hook

    from .distributed import all_reduce_sum, rank_and_size

    rank, size = rank_and_size()  # under torchrun each rank takes every size-th batch
    starts = list(range(0, len(rows), batch_size))[rank::size]
    was_training, count, handles = model.training, 0, []
    n_tokens = sum(len(r) for s in starts for r in rows[s:s + batch_size])
    progress = bar(total=n_tokens, desc=f"key statistics, layers {_span(layers)}" +
                   (f" (rank {rank} of {size})" if size > 1 else ""), unit="tok")
    try:
        for layer in layers:
            module = model.get_submodule(arch.mlp_out.format(layer))
            handles.append(module.register_forward_pre_hook(make_hook(layer)))
        model.eval()
        with torch.no_grad():
            for start in starts:
                batch = rows[start:start + batch_size]
                width = max(len(r) for r in batch)
                ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in batch], dtype=torch.long)
                mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in batch])
                flat_mask[0] = None if bool(mask.all()) else mask.reshape(-1).to(device)
                count += int(mask.sum())
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.long().to(device), use_cache=False)
                except _Stop:
                    progress.update(int(mask.sum()))
                    continue
                raise KeditError(f"the forward pass never reached {arch.mlp_out.format(deepest)}")
    finally:
        progress.close()
        for h in handles:
            h.remove()
        model.train(was_training)
    if size > 1:  # the same batches as one process, so only the float64 summation order differs
        for layer in layers:
            if layer not in acc:  # a rank with no batch still takes part
                d_k = _d_k(model, arch, layer)
                acc[layer] = torch.zeros(d_k, d_k, dtype=torch.float64, device=device)
        total = torch.tensor([float(count)], dtype=torch.float64, device=device)
        all_reduce_sum([acc[layer] for layer in sorted(acc)] + [total])
        count = int(total.item())
    return {layer: (a / count).cpu() for layer, a in acc.items()}, count


def _span(layers: Sequence[int]) -> str:
    layers = sorted(layers)
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}–{layers[-1]}"
    return ",".join(map(str, layers))


def sample_documents(model: "torch.nn.Module", tokenizer: Any, n_tokens: int, max_len: int, seed: int,
                     bar: Callable[..., Any]) -> list[str]:
    """Seeded top-k text from the model (the global RNG is left as it was). Progress advances
    with every decoding step (by the sequences still running), not once per batch."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    eos = tokenizer.eos_token_id
    counted = [0]

    class _Tick(LogitsProcessor):
        def __init__(self, prompt_len: int) -> None:
            self.prompt_len = prompt_len

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            gen = input_ids[:, self.prompt_len:]
            running = int((~(gen == eos).any(dim=1)).sum()) if eos is not None and gen.shape[1] else len(gen)
            counted[0] += running
            progress.update(running)
            return scores

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    docs: list[str] = []
    total, i = 0, 0
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    was_training = model.training
    target = n_tokens + max_len  # a margin: re-tokenizing the decoded text may merge tokens
    progress = bar(total=target, desc="sampling a statistics corpus from the model", unit="tok")
    model.eval()
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            while total < target:
                prompt = SEED_PROMPTS[i % len(SEED_PROMPTS)]
                i += 1
                n_seq = min(SAMPLE_BATCH, -(-(target - total) // max_len))  # no big last batch
                enc = tokenizer([prompt] * n_seq, return_tensors="pt").to(device)
                out = model.generate(**enc, do_sample=True, top_k=50, top_p=1.0, temperature=1.0,
                                     max_new_tokens=max_len, pad_token_id=pad,
                                     logits_processor=LogitsProcessorList([_Tick(enc["input_ids"].shape[1])]))
                for row in out[:, enc["input_ids"].shape[1]:].tolist():
                    if eos in row:
                        row = row[:row.index(eos)]
                    docs.append(prompt + tokenizer.decode(row, skip_special_tokens=True))
                    total += len(row) + 1
                if min(total, target) > counted[0]:  # the separators the steps did not count
                    progress.update(min(total, target) - counted[0])
                    counted[0] = min(total, target)
    finally:
        progress.close()
        model.train(was_training)
    return docs


def _d_k(model: "torch.nn.Module", arch: ArchSpec, layer: int) -> int:
    """The key width at ``layer``: the input size of its MLP output matrix."""
    return int(arch.to_out_in(model.get_submodule(arch.mlp_out.format(layer)).weight).shape[1])


def write_moment(path: "Path", moment: "torch.Tensor", count: int, meta: dict[str, str]) -> None:
    """Save a moment with what :func:`read_moment` checks: its shape, dtype, token count and the
    sha256 of its bytes (in the safetensors metadata)."""
    from safetensors.torch import save_file

    moment = moment.contiguous()
    meta = {**meta, "count": str(count), "shape": ",".join(map(str, moment.shape)), "dtype": dtype_name(moment.dtype),
            "sha256": tensor_sha256(moment)}
    with atomic_path(path) as tmp:
        save_file({"mom2": moment}, str(tmp), metadata=meta)


def read_moment(path: "Path", key: str, d_k: int) -> "tuple[torch.Tensor, int] | str":
    """``(moment, count)`` from a statistics file if it is intact and fits (d_k × d_k float64,
    finite, the recorded checksum, a positive count, this cache key); otherwise why not, in a few
    words. A file written before checksums were recorded is never trusted: it is recomputed."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
            moment = fh.get_tensor("mom2")
    except Exception as exc:  # safetensors raises its own errors for truncated or garbled files
        return f"cannot be read ({type(exc).__name__}), perhaps truncated"
    if "sha256" not in meta:
        return "was written without a checksum (by an older kedit)"
    try:
        count = int(meta["count"])
    except (KeyError, ValueError):
        return "has no token count"
    if meta.get("key") != key:
        return "belongs to another cache key"
    if moment.dtype != torch.float64 or tuple(moment.shape) != (d_k, d_k):
        return f"holds a {dtype_name(moment.dtype)} {'×'.join(map(str, moment.shape))} matrix, not float64 {d_k}×{d_k}"
    if tensor_sha256(moment) != meta["sha256"]:
        return "does not match its checksum"
    if count < 1:
        return f"records {count} tokens"
    if not bool(torch.isfinite(moment).all()):
        return "holds non-finite values"
    return moment, count


class KeyStats(StatsProvider):
    """The host's key-statistics provider, made from the run's :class:`kedit.config.StatsConfig`.

    ``corpus``: a .txt/.json/.jsonl file, ``hf:NAME[:CONFIG]`` (online only), ``builtin`` or
    None (the built-in corpus), or ``sampled`` (text sampled from the model). The returned
    tensors are shared with the in-memory cache: read them, do not modify them in place.
    """

    def __init__(self, corpus: str | None = None, n_tokens: int | None = None, max_len: int | None = None,
                 seed: int = 0, batch_size: int = 16, progress: Progress | None = None) -> None:
        corpus = BUILTIN if corpus is None else str(corpus)
        if n_tokens is None:
            n_tokens = default_budget(corpus)
        self._max_len_given = max_len is not None
        max_len = DEFAULT_MAX_LEN if max_len is None else max_len
        if n_tokens < 1 or max_len < 1 or batch_size < 1:
            raise InputError("key statistics need n_tokens, max_len and batch_size of at least 1")
        self.corpus, self.n_tokens, self.max_len = corpus, n_tokens, max_len
        self.seed, self.batch_size = seed, batch_size
        self.progress = progress if progress is not None else SILENT
        self._source: Corpus | None = None
        self._rows: dict[str, list[list[int]]] = {}  # tokenizer sha -> packed rows
        self._memory: dict[str, tuple["torch.Tensor", int]] = {}  # cache key -> (moment, count)
        self._served: dict[int, str] = {}
        self._used: int | None = None
        self.last: dict[int, dict[str, Any]] = {}  # per layer of the last call: source, seconds, d_k, tokens, file

    def _open(self, model: "torch.nn.Module", tokenizer: Any, tok_sha: str, full_fp: str | None) -> Corpus:
        if self._source is not None:
            return self._source
        if self.corpus != SAMPLED:
            self._source = open_corpus(self.corpus, self.progress)
            return self._source
        assert full_fp is not None
        key = json_sha256([_VERSION, full_fp, tok_sha, self.seed, self.n_tokens, self.max_len, SEED_PROMPTS,
                           SAMPLE_BATCH])
        path = cache_root() / "corpora" / f"sampled-{key[:40]}.jsonl"
        if path.is_file() and (problem := check_file_record(path)) is not None:
            self.progress.warn(f"the sampled statistics corpus {path} is damaged or unverified ({problem}); "
                               "sampling it again")
            path.unlink(missing_ok=True)
        if not path.is_file():
            self.progress.note(f"sampling {self.n_tokens:,} tokens of statistics text from the model: minutes on a "
                               f"CPU, once per model and seed (cached in {path.parent}); the built-in corpus "
                               "(--corpus builtin, the default) or --corpus FILE skips it")
            docs = sample_documents(model, tokenizer, self.n_tokens, self.max_len, self.seed, self.progress)
            atomic_write_text(path, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
            write_file_record(path)
        docs_list = read_documents(path)
        self._source = Corpus(SAMPLED, lambda: docs_list, file_sha256(path),
                              {"kind": "model-sampled", "model_fingerprint": full_fp, "seed": self.seed,
                               "sampler": f"top_k=50, temperature=1, {SAMPLE_BATCH} per batch, "
                                          f"max_new_tokens={self.max_len}",
                               "prompts": list(SEED_PROMPTS), "path": str(path)})
        return self._source

    def _key(self, module: str, fp: str, tok_sha: str) -> str:
        assert self._source is not None
        return json_sha256({"v": _VERSION, "module": module, "model": fp, "tokenizer": tok_sha,
                            "corpus": self._source.sha256, "n_tokens": self.n_tokens, "max_len": self.max_len,
                            "seed": self.seed if self.corpus == SAMPLED else None})

    def cache_keys(self, model: "torch.nn.Module", tokenizer: Any, layers: Sequence[int]) -> dict[int, str]:
        """The cache key of each layer's moment for this model and tokenizer (computing nothing)."""
        layers = sorted({resolve_layer(int(x), model.config) for x in layers})
        return self._keys(model, tokenizer, layers, tokenizer_sha256(tokenizer))

    def _keys(self, model: "torch.nn.Module", tokenizer: Any, layers: list[int], tok_sha: str) -> dict[int, str]:
        arch = arch_for(model)
        self._fit_context(model)
        last = num_layers(model.config) - 1
        need_full = self.corpus == SAMPLED and self._source is None
        fps = fingerprints(model, arch, layers + ([last] if need_full else []))
        self._open(model, tokenizer, tok_sha, fps[last] if need_full else None)
        return {layer: self._key(arch.mlp_out.format(layer), fps[layer], tok_sha) for layer in layers}

    def _fit_context(self, model: "torch.nn.Module") -> None:
        context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if context and self.max_len > context and not self._max_len_given:
            self.max_len = context  # the default row length, shortened for a model with a short context
        if context and self.max_len > context:
            raise InputError(f"max_len {self.max_len} exceeds the model's context of {context} positions")

    def second_moment(self, model: "torch.nn.Module", tokenizer: Any, layers: list[int]) -> dict[int, "torch.Tensor"]:
        """E[k kᵀ] (float64, d_k×d_k, normalised by the token count) for each layer.

        Layers found neither in memory nor on disk are computed together in one forward pass
        that stops after the deepest of them.
        """
        arch = arch_for(model)
        layers = sorted({resolve_layer(int(x), model.config) for x in layers})
        tok_sha = tokenizer_sha256(tokenizer)
        keys = self._keys(model, tokenizer, layers, tok_sha)
        files = {layer: cache_root() / "stats" / f"mom2-{keys[layer]}.safetensors" for layer in layers}
        self.last = {}
        for layer in layers:
            t0, key, source = time.perf_counter(), keys[layer], "memory"
            if key not in self._memory and files[layer].is_file():
                moment = read_moment(files[layer], key, _d_k(model, arch, layer))
                if isinstance(moment, str):
                    self.progress.warn(f"key statistics file {files[layer]} {moment}; recomputing it")
                else:
                    self._memory[key], source = moment, "disk"
            if key in self._memory:
                self.last[layer] = {"source": source, "seconds": time.perf_counter() - t0}
        missing = [layer for layer in layers if layer not in self.last]
        if missing:
            assert self._source is not None
            if tok_sha not in self._rows:
                self._rows[tok_sha] = pack_rows(tokenizer, self._source.documents(), self.n_tokens, self.max_len)
            name = self._source.describe.get("name") or self._source.describe.get("path") or self.corpus
            self.progress.note(f"computing key statistics for layers {_span(missing)} from {self.n_tokens:,} tokens of "
                               f"{name}: once per model, layers and corpus (cached in {cache_root() / 'stats'}); "
                               "--stats-tokens sets the budget, `kedit stats compute` does it ahead of time")
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
            t0 = time.perf_counter()
            moments, count = accumulate(model, arch, self._rows[tok_sha], missing, self.batch_size, pad,
                                        self.progress)
            from .distributed import barrier, rank_and_size

            for layer in missing:
                meta = {"count": str(count), "module": arch.mlp_out.format(layer), "key": keys[layer],
                        "corpus_sha256": str(self._source.sha256), "corpus": json.dumps(self._source.describe),
                        "n_tokens": str(self.n_tokens), "max_len": str(self.max_len), "seed": str(self.seed)}
                if rank_and_size()[0] == 0:  # every rank holds the same result; one writes the cache
                    write_moment(files[layer], moments[layer], count, meta)
                self._memory[keys[layer]] = (moments[layer], count)
                self.last[layer] = {"source": "computed", "seconds": time.perf_counter() - t0}
            barrier()
        out = {}
        for layer in layers:
            out[layer], self._used = self._memory[keys[layer]]
            self._served[layer] = keys[layer]
            self.last[layer].update(d_k=out[layer].shape[0], tokens=self._used, file=str(files[layer]))
        return out

    @property
    def used(self) -> bool:
        """Whether any layer was served: the host records statistics only for editors that asked for them."""
        return bool(self._served)

    def record(self) -> dict[str, Any]:
        """What the diff manifest records: corpus (source, licence) and its sha256, tokens used,
        max_len, seed, cache keys."""
        source = self._source
        return {"corpus": source.describe if source is not None else {"spec": self.corpus},
                "corpus_sha256": source.sha256 if source is not None else None, "n_tokens": self._used,
                "n_tokens_requested": self.n_tokens, "max_len": self.max_len, "seed": self.seed,
                "layers": {str(layer): key for layer, key in sorted(self._served.items())}}
