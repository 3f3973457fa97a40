"""``emmet``: equality-constrained batch editing (Gupta et al. 2024): min ‖ΔW‖ over the preserved
keys' statistics subject to (W + ΔW) K = V, per layer with MEMIT's residual spreading:
ΔW = R D⁻¹ Kᵀ C⁻¹ with C = λ C0 + μ I and D = Kᵀ C⁻¹ K + ε I (ε keeps large batches well posed).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from kedit.api import hookimpl
from kedit_plugins.memit import Memit, MemitOptions

if TYPE_CHECKING:
    import torch


class EmmetOptions(MemitOptions):
    emmet_lambda: float = Field(0.1, ge=0, description="ε: ridge on the n×n constraint matrix D")
    update_norm_lambda: float = Field(0.0, ge=0, description="μ: identity added to λ C0")


class Emmet(Memit):
    """EMMET: equality-constrained mass editing over MEMIT's layers and targets."""

    name = "emmet"
    Options = EmmetOptions

    def solve(self, layer: int, residual: "torch.Tensor", keys: "torch.Tensor", c0: "torch.Tensor",
              options: Any, call: Any = None) -> tuple["torch.Tensor", "torch.Tensor"]:
        from kedit_plugins.lte.solve import emmet_delta

        return emmet_delta(residual, keys, c0, options.mom2_update_weight, options.emmet_lambda,
                           options.update_norm_lambda)


@hookimpl
def register_editors(register):
    register(Emmet)
