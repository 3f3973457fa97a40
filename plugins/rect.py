"""``rect``: RECT (Gu et al.) keeps the top-k fraction of a delta's elements ranked by relative
change |ΔW| / (|W| + eps) and zeroes the rest, the elements that harm general abilities most
being those with large relative change."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from kedit.api import Options, Regularizer, hookimpl

if TYPE_CHECKING:
    import torch


class RectOptions(Options):
    k: float = Field(0.4, gt=0, le=1, description="fraction of elements kept (0.4 keeps the top 40%)")
    eps: float = Field(1e-8, ge=0, description="added to |W| so zero weights do not divide by zero")


class Rect(Regularizer):
    """RECT: keep the top-k fraction of elements by relative change |ΔW|/|W|, zero the rest."""

    name = "rect"
    Options = RectOptions
    primary = "k"

    def apply(self, weight: "torch.Tensor", delta: "torch.Tensor", options: RectOptions) -> "torch.Tensor":
        import torch

        rel = (delta.abs().double() / (weight.abs().double() + options.eps)).reshape(-1)
        keep = int(round(options.k * rel.numel()))
        out = torch.zeros_like(delta).reshape(-1)
        if keep:
            # Exactly `keep` elements survive; ties are broken by index, deterministically.
            idx = torch.argsort(rel, descending=True, stable=True)[:keep]
            out[idx] = delta.reshape(-1)[idx]
        return out.view_as(delta)


@hookimpl
def register_regularizers(register):
    register(Rect)
