"""Every built-in ArchSpec points at a real module of its family, with the layout it claims."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from kedit.arch import arch_for, resolve_layer
from kedit.errors import InputError

D, FF = 32, 64
CONFIGS = {
    "gpt2": GPT2Config(n_embd=D, n_inner=FF, n_layer=2, n_head=4, vocab_size=100),
    "gptj": GPTJConfig(n_embd=D, n_inner=FF, n_layer=2, n_head=4, rotary_dim=4, vocab_size=100),
    "gpt_neox": GPTNeoXConfig(hidden_size=D, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=4, vocab_size=100),
    "llama": LlamaConfig(hidden_size=D, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=4, vocab_size=100),
    "mistral": MistralConfig(hidden_size=D, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=100),
    "qwen2": Qwen2Config(hidden_size=D, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100),
}


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_builtin_arch_specs_match_real_models(model_type):
    model = AutoModelForCausalLM.from_config(CONFIGS[model_type])
    arch = arch_for(model)
    assert arch.model_type == model_type == model.config.model_type
    w = model.get_parameter(arch.mlp_out_weight(1))
    assert tuple(arch.to_out_in(w).shape) == (D, FF)  # (d_out = hidden, d_in = MLP width)
    assert model.get_submodule(arch.layers)[1] is not None
    if arch.final_norm:
        assert isinstance(model.get_submodule(arch.final_norm), torch.nn.Module)


def test_unknown_family_and_layer_range():
    class Cfg:
        model_type = "mamba"

    with pytest.raises(InputError, match="no architecture registered for model_type 'mamba'.*llama"):
        arch_for(Cfg())
    assert resolve_layer(-1, CONFIGS["llama"]) == 1
    with pytest.raises(InputError, match="layer 5 is out of range for a model with 2 layers"):
        resolve_layer(5, CONFIGS["llama"])
