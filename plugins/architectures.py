"""Built-in architecture specs for the common decoder families."""
from __future__ import annotations

from kedit import hookimpl
from kedit.arch import ArchSpec

BUILTIN = (
    ArchSpec("gpt2", "transformer.h", "transformer.h.{}.mlp.c_proj", transposed=True, final_norm="transformer.ln_f"),
    ArchSpec("gptj", "transformer.h", "transformer.h.{}.mlp.fc_out", final_norm="transformer.ln_f"),
    ArchSpec("gpt_neox", "gpt_neox.layers", "gpt_neox.layers.{}.mlp.dense_4h_to_h",
             final_norm="gpt_neox.final_layer_norm"),
    ArchSpec("llama", "model.layers", "model.layers.{}.mlp.down_proj", final_norm="model.norm",
             block="llama"),
    ArchSpec("mistral", "model.layers", "model.layers.{}.mlp.down_proj", final_norm="model.norm",
             block="llama"),
    ArchSpec("qwen2", "model.layers", "model.layers.{}.mlp.down_proj", final_norm="model.norm",
             block="llama"),
)


@hookimpl
def register_architectures(register):
    for spec in BUILTIN:
        register(spec)
