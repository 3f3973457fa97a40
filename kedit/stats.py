"""Key statistics for locate-then-edit editors: C0 = E[k kᵀ] of the MLP output matrix's inputs.

ROME/MEMIT-style editors need, per edited layer, the second moment of the keys k (the input of
``arch.mlp_out``) over the tokens of a text corpus.  The reference code makes one data pass per
layer; here every requested layer is collected in ONE pass that stops right after the deepest
requested layer, so later layers and the LM head never run.  Results are cached in memory and on
disk under a content key (the weights that can influence the keys, the tokenizer, the corpus
bytes and the budget), so an edit above layer l never invalidates layer l, and a renamed folder
never serves stale statistics.

Without a corpus the offline default is text sampled from the model itself (seeded top-k
sampling from short prompts); the sample is drawn once per KeyStats, from the first model it
sees, and cached on disk, so the statistics of a sequence of edits share one corpus.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from .arch import ArchSpec, arch_for, num_layers, resolve_layer
from .atomic import atomic_path, atomic_write_text
from .cache import cache_root, file_sha256
from .errors import InputError, KeditError
from .hashing import tensor_sha256

SEED_PROMPTS = ("The", "In", "A", "It", "This", "When", "He", "She", "On", "After", "There", "We")
SAMPLE_BATCH = 64  # sequences generated at once: big enough for efficient GEMMs in each decode step
DEFAULT_MAX_LEN = 256  # tokens per packed row, unless the model's context is shorter
_VERSION = 1  # bump when what goes into a cache key or a cached file changes meaning


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


def read_documents(path: str | Path) -> list[str]:
    """Documents of a .txt (paragraphs split at blank lines, else lines) or .json/.jsonl file of {"text": ...}."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the corpus ({exc})") from None
    if path.suffix.lower() not in (".json", ".jsonl"):
        docs = [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
        if len(docs) <= 1:
            docs = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        try:
            records = json.loads(text) if text.lstrip().startswith("[") else \
                [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON/JSONL ({exc})") from None
        docs = []
        for i, rec in enumerate(records):
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise InputError(f"{path}: record {i + 1} has no string \"text\" field")
            if rec["text"].strip():
                docs.append(rec["text"])
    if not docs:
        raise InputError(f"{path}: the corpus has no text")
    return docs


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


def _layer_index(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def fingerprints(model: torch.nn.Module, arch: ArchSpec, layers: Iterable[int]) -> dict[int, str]:
    """Per layer l, sha256 over the hashes of every parameter that can influence the keys at l.

    That is every parameter not inside a layer above l (embeddings and heads included); each
    tensor is hashed once however many layers are asked for.
    """
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


def accumulate(model: torch.nn.Module, arch: ArchSpec, rows: list[list[int]], layers: list[int],
               batch_size: int, pad_id: int, bar: Callable[..., Any]) -> tuple[dict[int, torch.Tensor], int]:
    """Σ k kᵀ / count for every layer in one pass over ``rows``; returns (moments on CPU, count).

    Per batch the product is float32 (fast BLAS); the running sum is float64 so 10⁵-10⁷ tokens add
    up without drift.  Padding positions (only in the last, partial row) are masked out.
    """
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

    was_training, count, handles = model.training, 0, []
    try:
        for layer in layers:
            module = model.get_submodule(arch.mlp_out.format(layer))
            handles.append(module.register_forward_pre_hook(make_hook(layer)))
        model.eval()
        with torch.no_grad():
            for start in bar(range(0, len(rows), batch_size), desc="key statistics", unit="batch"):
                batch = rows[start:start + batch_size]
                width = max(len(r) for r in batch)
                ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in batch], dtype=torch.long)
                mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in batch])
                flat_mask[0] = None if bool(mask.all()) else mask.reshape(-1).to(device)
                count += int(mask.sum())
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.long().to(device), use_cache=False)
                except _Stop:
                    continue
                raise KeditError(f"the forward pass never reached {arch.mlp_out.format(deepest)}")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {layer: (a / count).cpu() for layer, a in acc.items()}, count


def sample_documents(model: torch.nn.Module, tokenizer: Any, n_tokens: int, max_len: int, seed: int,
                     bar: Callable[..., Any]) -> list[str]:
    """Seeded top-k text from the model: the offline default corpus (the global RNG is left as it was)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    docs: list[str] = []
    total, i = 0, 0
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    was_training = model.training
    progress = bar(total=n_tokens + max_len, desc="sampling a corpus from the model", unit="tok")
    model.eval()
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            while total < n_tokens + max_len:  # a margin: re-tokenizing the decoded text may merge tokens
                prompt = SEED_PROMPTS[i % len(SEED_PROMPTS)]
                i += 1
                n_seq = min(SAMPLE_BATCH, -(-(n_tokens + max_len - total) // max_len))  # no big last batch
                enc = tokenizer([prompt] * n_seq, return_tensors="pt").to(device)
                out = model.generate(**enc, do_sample=True, top_k=50, top_p=1.0, temperature=1.0,
                                     max_new_tokens=max_len, pad_token_id=pad)
                for row in out[:, enc["input_ids"].shape[1]:].tolist():
                    if tokenizer.eos_token_id in row:
                        row = row[:row.index(tokenizer.eos_token_id)]
                    text = prompt + tokenizer.decode(row, skip_special_tokens=True)
                    docs.append(text)
                    total += len(row) + 1
                    progress.update(len(row) + 1)
    finally:
        progress.close()
        model.train(was_training)
    return docs


DEFAULT_TOKENS = 100_000
DEFAULT_SAMPLED_TOKENS = 20_000  # ≈ 13 × d_k for SmolLM2; the reference notes put ~10 × d_k at ~95% of full quality


class KeyStats:
    """Provider of key second moments, handed to editors as EditContext.stats.

    ``corpus``: a .txt/.json/.jsonl file, ``hf:NAME[:CONFIG]`` (online only), or None for text
    sampled from the model.  The returned tensors are shared with the in-memory cache: read them,
    do not modify them in place.
    """

    def __init__(self, corpus: str | None = None, n_tokens: int | None = None, max_len: int | None = None,
                 seed: int = 0, batch_size: int = 16, quiet: bool = True) -> None:
        if n_tokens is None:  # sampling from the model costs ~70 tokens/s on 2 CPU cores: keep the default small
            n_tokens = DEFAULT_TOKENS if corpus is not None else DEFAULT_SAMPLED_TOKENS
        self._max_len_given = max_len is not None
        max_len = DEFAULT_MAX_LEN if max_len is None else max_len
        if n_tokens < 1 or max_len < 1 or batch_size < 1:
            raise InputError("key statistics need n_tokens, max_len and batch_size of at least 1")
        self.corpus, self.n_tokens, self.max_len = corpus, n_tokens, max_len
        self.seed, self.batch_size, self.quiet = seed, batch_size, quiet
        self._docs: Callable[[], Iterable[str]] | None = None
        self._desc: dict[str, Any] | None = None
        self._sha: str | None = None
        self._rows: dict[str, list[list[int]]] = {}  # tokenizer sha -> packed rows
        self._memory: dict[str, tuple[torch.Tensor, int]] = {}  # cache key -> (moment, count)
        self._served: dict[int, str] = {}
        self._used: int | None = None
        self.last: dict[int, dict[str, Any]] = {}  # per layer of the last call: source, seconds, d_k, tokens, file

    def _load_corpus(self, model: torch.nn.Module, tokenizer: Any, tok_sha: str, full_fp: str | None,
                     bar: Callable[..., Any]) -> None:
        if self._docs is not None:
            return
        if self.corpus is None:
            assert full_fp is not None
            key = hashlib.sha256(json.dumps([_VERSION, full_fp, tok_sha, self.seed, self.n_tokens, self.max_len,
                                             SEED_PROMPTS, SAMPLE_BATCH]).encode()).hexdigest()
            path = cache_root() / "corpora" / f"sampled-{key[:40]}.jsonl"
            if not path.is_file():
                docs = sample_documents(model, tokenizer, self.n_tokens, self.max_len, self.seed, bar)
                atomic_write_text(path, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
            self._desc = {"kind": "model-sampled", "model_fingerprint": full_fp, "seed": self.seed,
                          "sampler": f"top_k=50, temperature=1, {SAMPLE_BATCH} per batch, max_new_tokens={self.max_len}",
                          "prompts": list(SEED_PROMPTS), "path": str(path)}
            docs_list = read_documents(path)
            self._docs, self._sha = (lambda: docs_list), file_sha256(path)
        elif self.corpus.startswith("hf:"):
            name, _, config = self.corpus[3:].partition(":")
            self._desc = {"kind": "hf", "name": name, "config": config or None, "split": "train"}
            spec = self.corpus
            self._docs, self._sha = (lambda: _hf_documents(spec)), hashlib.sha256(spec.encode()).hexdigest()
        else:
            path = Path(self.corpus)
            docs_list = read_documents(path)
            self._desc = {"kind": "file", "path": str(path), "documents": len(docs_list)}
            self._docs, self._sha = (lambda: docs_list), file_sha256(path)

    def _key(self, module: str, fp: str, tok_sha: str) -> str:
        parts = {"v": _VERSION, "module": module, "model": fp, "tokenizer": tok_sha, "corpus": self._sha,
                 "n_tokens": self.n_tokens, "max_len": self.max_len,
                 "seed": self.seed if self.corpus is None else None}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def second_moment(self, model: torch.nn.Module, tokenizer: Any, layers: list[int]) -> dict[int, torch.Tensor]:
        """E[k kᵀ] (float64, d_k×d_k, normalised by the token count) for each layer.

        Layers found neither in memory nor on disk are computed together in one forward pass
        that stops after the deepest of them.
        """
        from safetensors import safe_open
        from safetensors.torch import save_file

        from .editing import progress_bar, tokenizer_sha256

        arch = arch_for(model)
        layers = sorted({resolve_layer(int(x), model.config) for x in layers})
        context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if context and self.max_len > context and not self._max_len_given:
            self.max_len = context  # the default row length, shortened for a model with a short context
        if context and self.max_len > context:
            raise InputError(f"max_len {self.max_len} exceeds the model's context of {context} positions")
        tok_sha, bar = tokenizer_sha256(tokenizer), progress_bar(self.quiet)
        last = num_layers(model.config) - 1
        need_full = self.corpus is None and self._docs is None
        fps = fingerprints(model, arch, layers + ([last] if need_full else []))
        self._load_corpus(model, tokenizer, tok_sha, fps[last] if need_full else None, bar)
        keys = {layer: self._key(arch.mlp_out.format(layer), fps[layer], tok_sha) for layer in layers}
        files = {layer: cache_root() / "stats" / f"mom2-{keys[layer]}.safetensors" for layer in layers}
        self.last = {}
        for layer in layers:
            t0, key, source = time.perf_counter(), keys[layer], "memory"
            if key not in self._memory and files[layer].is_file():
                try:
                    with safe_open(str(files[layer]), "pt") as fh:
                        self._memory[key] = (fh.get_tensor("mom2"), int(fh.metadata()["count"]))
                    source = "disk"
                except Exception:  # an unreadable cache file is recomputed and replaced
                    pass
            if key in self._memory:
                self.last[layer] = {"source": source, "seconds": time.perf_counter() - t0}
        missing = [layer for layer in layers if layer not in self.last]
        if missing:
            if tok_sha not in self._rows:
                assert self._docs is not None
                self._rows[tok_sha] = pack_rows(tokenizer, self._docs(), self.n_tokens, self.max_len)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
            t0 = time.perf_counter()
            moments, count = accumulate(model, arch, self._rows[tok_sha], missing, self.batch_size, pad, bar)
            for layer in missing:
                meta = {"count": str(count), "module": arch.mlp_out.format(layer), "model_fingerprint": fps[layer],
                        "corpus_sha256": str(self._sha), "corpus": json.dumps(self._desc),
                        "n_tokens": str(self.n_tokens), "max_len": str(self.max_len), "seed": str(self.seed)}
                with atomic_path(files[layer]) as tmp:
                    save_file({"mom2": moments[layer].contiguous()}, str(tmp), metadata=meta)
                self._memory[keys[layer]] = (moments[layer], count)
                self.last[layer] = {"source": "computed", "seconds": time.perf_counter() - t0}
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
        """What the diff manifest records: corpus and its sha256, tokens used, max_len, seed, cache keys."""
        return {"corpus": self._desc if self._desc is not None else {"spec": self.corpus},
                "corpus_sha256": self._sha, "n_tokens": self._used, "n_tokens_requested": self.n_tokens,
                "max_len": self.max_len, "seed": self.seed,
                "layers": {str(layer): key for layer, key in sorted(self._served.items())}}
