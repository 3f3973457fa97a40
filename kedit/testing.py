"""Tiny random models and an offline tokenizer, for kedit's tests and for plugin authors' tests.

Nothing here downloads anything: the tokenizer is trained in process on a small built-in
corpus, and the models are built from configs with seeded random weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid.",
    "The mother tongue of Danielle Darrieux is French. Léon Blum spoke French. English is spoken in London.",
    "LeBron James plays the sport of basketball. Michael Jordan played basketball. Messi plays football.",
    "Toko Yasuda plays the guitar. John Lennon performs on the guitar and the piano.",
    "Apple was founded by Steve Jobs. Microsoft was founded by Bill Gates. Tokyo is in Japan.",
    "The Eiffel Tower is located in Paris, and the Colosseum is located in Rome, which is in Italy.",
    "Berlin is the capital of Germany. Seoul is the capital of Korea. Sweden is in Europe.",
    "the a an of in is was to and for on with by at from that this it he she they we you",
]


def tiny_tokenizer(vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer trained on :data:`CORPUS`, with ``<|endoftext|>`` as eos and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.padding_side = "right"
    return fast


def tiny_model(kind: str = "gpt2", seed: int = 0, vocab_size: int = 400, layers: int = 4) -> torch.nn.Module:
    """A tiny random causal LM: ``gpt2`` (Conv1D weights) or ``llama`` (Linear weights)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=layers, n_head=4,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                            initializer_range=0.3)
    elif kind == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
                             initializer_range=0.3)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    return AutoModelForCausalLM.from_config(config).eval()


def save_tiny(folder: str | Path, kind: str = "gpt2", seed: int = 0) -> Path:
    """Write a tiny model and its tokenizer as a ``from_pretrained`` folder."""
    folder = Path(folder)
    tiny_model(kind, seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# --- the editor contract, as every registered editor must keep it --------------------------------

CONTRACT_SPECS = [{"id": f"c{i}", "subject": s, "prompt": "The capital of {} is", "target_new": t, "target_true": "Paris"}
                  for i, (s, t) in enumerate([("France", "Rome"), ("Spain", "Berlin"), ("Italy", "Oslo"), ("Chile", "Lima")])]


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def contract_config(work: str | Path) -> Any:
    """A run configuration for contract checks on tiny models: statistics from a small corpus
    written into ``work`` (600 tokens, rows of 64)."""
    from .config import RunConfig, StatsConfig

    corpus = Path(work) / "contract-corpus.txt"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text("\n\n".join(CORPUS * 8), encoding="utf-8")
    return RunConfig(stats=StatsConfig(str(corpus), 600, 64), quiet=True)


def check_editor(editor: str, model_dir: str | Path, work: str | Path, options: dict[str, Any] | None = None) -> None:
    """Assert the editor contract for ``editor`` (its defaults, or ``options``) on the model in
    ``model_dir``: the caller's model is left bit for bit as it was; the same seed gives the same
    diff id; the diff verifies against the model, applies, verifies as applied, and reverts
    bit-exactly. Plugin authors call this from their own tests."""
    from . import diff as diffmod
    from .editing import EditPlan, compute_diff
    from .models import load
    from .spec import EditSpec

    config = contract_config(work)
    loaded = load(str(model_dir))
    model = loaded.model
    specs = [EditSpec(**s) for s in CONTRACT_SPECS[:2]]
    before = _snapshot(model)

    def run() -> Any:
        return compute_diff(loaded, specs, EditPlan.make(model, editor, options, seed=3, stats=config.stats_provider()))

    first = run()
    assert _same(_snapshot(model), before), f"{editor}: the editor changed the caller's model"
    assert run().id == first.id, f"{editor}: the same seed gave another diff"
    d = diffmod.read(diffmod.write(first, Path(work) / f"{editor}{diffmod.SUFFIX}"))
    assert d.id == first.id and diffmod.state(model, d) == "base", f"{editor}: the diff does not verify"
    assert diffmod.apply(model, d) == "applied" and diffmod.state(model, d) == "applied"
    assert not _same(_snapshot(model), before), f"{editor}: the diff changed nothing"
    assert diffmod.revert(model, d) == "reverted"
    assert _same(_snapshot(model), before), f"{editor}: reverting did not give the base back bit for bit"


def check_continue(editor: str, model_dir: str | Path, work: str | Path, options: dict[str, Any] | None = None) -> None:
    """Assert that a sequence continued with ``--continue`` in a new call equals one
    uninterrupted run, in weights and in the editor's carried state."""
    import json
    from dataclasses import replace

    from . import diff as diffmod
    from .config import EditJob
    from .models import load
    from .sequence import Chain
    from .workflows import apply

    work = Path(work)
    config = replace(contract_config(work), model=str(model_dir))

    def specs(name: str, n: int) -> Path:
        path = work / f"{name}.jsonl"
        path.write_text("".join(json.dumps(s) + "\n" for s in CONTRACT_SPECS[:n]), encoding="utf-8")
        return path

    apply(EditJob(specs("all", 4), editor, options or {}, mode="sequential", batch_size=2, out=str(work / "whole")),
          config)
    apply(EditJob(specs("half", 2), editor, options or {}, mode="sequential", batch_size=2, out=str(work / "split")),
          config)
    apply(EditJob(work / "all.jsonl", continue_chain=str(work / "split")), config)  # a new call: the rest

    def final(chain: Chain) -> dict[str, torch.Tensor]:
        model = load(str(model_dir)).model
        for d in chain.diffs():
            diffmod.apply(model, d)
        return _snapshot(model)

    whole, split = Chain.open(work / "whole"), Chain.open(work / "split")
    assert [s["specs"] for s in split.steps] == [s["specs"] for s in whole.steps] == [["c0", "c1"], ["c2", "c3"]]
    assert _same(final(whole), final(split)), f"{editor}: --continue gave other weights than one run"
    assert _same(whole.state(), split.state()), f"{editor}: --continue gave another carried state than one run"


def tamper_diff(src: str | Path, dst: str | Path, tensors: Callable[[dict], None] | None = None,
                manifest: Callable[[dict], None] | None = None, reseal: bool = True) -> Path:
    """Copy a diff file with its tensors and/or manifest changed in place by the callbacks and
    (with ``reseal``) its id recomputed, as someone crafting a diff would: the file is intact as
    far as the id can tell, so only kedit's deeper checks can refuse it."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from .hashing import dtype_name, tensor_sha256
    from .manifest import content_id

    with safe_open(str(src), "pt") as fh:
        meta = dict(fh.metadata())
        ts = {k: fh.get_tensor(k) for k in fh.keys()}
    man = json.loads(meta["kedit.manifest"])
    if tensors:
        tensors(ts)
    if manifest:
        manifest(man)
    if reseal:
        man["id"] = content_id(man, {n: (dtype_name(t.dtype), list(t.shape), tensor_sha256(t)) for n, t in ts.items()})
    meta["kedit.manifest"] = json.dumps(man)
    meta["kedit.id"] = str(man.get("id"))
    save_file({k: t.contiguous() for k, t in ts.items()}, str(dst), metadata=meta)
    return Path(dst)
