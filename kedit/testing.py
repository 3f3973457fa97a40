"""Tiny random models and an offline tokenizer, for kedit's tests and for plugin authors' tests.

Nothing here downloads anything: the tokenizer is trained in process on a small built-in
corpus, and the models are built from configs with seeded random weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

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
