"""``alphaedit``: MEMIT's targets with the update projected onto the null space of the preserved
keys' statistics (Fang et al. 2025), so that ΔW k = 0 for keys in the preserved subspace.

ΔW = R Kᵀ Û (Ûᵀ (K Kᵀ + Cp) Û + L2 I)⁻¹ Ûᵀ, with Û the eigenvectors of C0 whose eigenvalues are
below ``nullspace_threshold`` × the largest eigenvalue (a relative threshold: the reference's
absolute 2e-2 keeps all directions or none depending on the statistics' scale), and Cp the sum of
K Kᵀ over earlier edits of a sequence, carried in the sequence state as ``alphaedit.kk.LAYER``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from kedit.api import hookimpl
from kedit_plugins.memit import Memit, MemitOptions

if TYPE_CHECKING:
    import torch


class AlphaEditOptions(MemitOptions):
    nullspace_threshold: float = Field(1e-2, gt=0, lt=1, description="eigenvalues of C0 below this fraction of the "
                                                                     "largest span the null space the update lives in")
    L2: float = Field(10.0, ge=0, description="ridge on the projected normal equations")


class AlphaEdit(Memit):
    """AlphaEdit: MEMIT with the update confined to the preserved keys' null space."""

    name = "alphaedit"
    Options = AlphaEditOptions

    def begin(self, model, tokenizer, specs, layers, c0, options, context) -> dict[str, Any]:
        """Per layer, the null-space basis Û of C0 and the carried K Kᵀ of earlier edits."""
        from kedit_plugins.lte.solve import null_space_basis

        state = context.state if context.state is not None else {}
        return {"basis": {l: null_space_basis(c0[l], options.nullspace_threshold) for l in layers},
                "prior": {l: state.get(f"alphaedit.kk.{l}") for l in layers}}

    def solve(self, layer: int, residual: "torch.Tensor", keys: "torch.Tensor", c0: "torch.Tensor",
              options: Any, call: Any = None) -> tuple["torch.Tensor", "torch.Tensor"]:
        from kedit_plugins.lte.solve import alphaedit_delta

        return alphaedit_delta(residual, keys, call["basis"][layer], call["prior"].get(layer), options.L2)

    def end(self, model, tokenizer, specs, layers, key_rows, overrides, context, call: Any = None) -> None:
        from kedit_plugins.lte import capture

        if context.state is None:
            return
        acts = capture.at_lookup(model, tokenizer, context.arch, key_rows, key_layers=layers, overrides=overrides)
        for layer in layers:
            k = capture.average_by_request(acts[("key", layer)], key_rows, len(specs)).T
            prior = context.state.get(f"alphaedit.kk.{layer}")
            context.state[f"alphaedit.kk.{layer}"] = k @ k.T + (prior if prior is not None else 0)


@hookimpl
def register_editors(register):
    register(AlphaEdit)
