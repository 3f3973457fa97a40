"""Architecture registry: where a model family keeps its MLP output matrices, keyed by ``config.model_type``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ArchSpec:
    """How one ``model_type`` lays out the matrix that locate-then-edit methods change.

    ``mlp_out`` is a module path template with ``{}`` for the layer index.  ``transposed`` is
    True when the weight is stored as (d_in, d_out), as GPT-2's Conv1D does, instead of
    torch.nn.Linear's (d_out, d_in). ``block`` names a block layout that the locate-then-edit
    machinery can run packed (``"llama"``: pre-norm RMSNorm, rotary attention, gated MLP, with
    the parameter names of transformers' Llama); leave it empty for any other layout.
    """

    model_type: str
    layers: str
    mlp_out: str
    transposed: bool = False
    final_norm: str = ""  # the norm before the unembedding; the unembedding is model.get_output_embeddings()
    block: str = ""  # a decoder-block layout kedit can run packed ("llama"); "" = only the model's own forward

    def mlp_out_weight(self, layer: int) -> str:
        return self.mlp_out.format(layer) + ".weight"

    def to_out_in(self, weight: "torch.Tensor") -> "torch.Tensor":
        """View a stored weight as (d_out, d_in), the layout the math is written in."""
        return weight.t() if self.transposed else weight

    def from_out_in(self, matrix: "torch.Tensor") -> "torch.Tensor":
        """Inverse of :meth:`to_out_in`: bring a (d_out, d_in) matrix to the stored layout."""
        return matrix.t() if self.transposed else matrix


def num_layers(config) -> int:
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, attr, None) is not None:
            return int(getattr(config, attr))
    raise InputError(f"cannot tell the number of layers of a {config.model_type!r} model")


def arch_for(model_or_config) -> ArchSpec:
    """The registered ArchSpec for a model (or config); unknown families name the model's
    config.json (when it came from a folder) and list what is supported."""
    from .plugins import registry

    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    where = _config_file(config)
    if not model_type:
        raise InputError(f"{where}: the model's config has no model_type")
    reg = registry("architectures")
    if model_type not in reg:
        known = ", ".join(sorted(reg)) or "(none installed)"
        raise InputError(f"{where}: no architecture registered for model_type {model_type!r}; available: {known} "
                         "(`kedit architectures` lists them; a plugin can register more)")
    return reg[model_type].obj


def _config_file(config) -> str:
    folder = getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "")
    if folder and Path(folder).is_dir():
        return str(Path(folder) / "config.json")
    return f"model {folder!r}" if folder else "the model"


def resolve_layer(layer: int, config) -> int:
    """Accept negative layer indices (``-1`` = last) and check the range."""
    n = num_layers(config)
    idx = layer + n if layer < 0 else layer
    if not 0 <= idx < n:
        raise InputError(f"layer {layer} is out of range for a model with {n} layers")
    return idx
