"""``rome``: rank-one edit of one MLP output matrix (Meng et al. 2022), with r-ROME's consistent
keys by default (Gupta et al. 2024) and the original asymmetric form behind ``original=true``.

For each spec: k̄ = the key averaged over context templates, v* = the optimised MLP output; then
ΔW = (v* − W k̄ − b) (C0⁻¹ k̄)ᵀ / ((C0⁻¹ k̄)ᵀ k̄), the minimum-‖ΔW‖_C0 change with (W + ΔW) k̄ + b = v*.
Several specs are applied one after another, each computed on the model the previous ones left.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from kedit.api import EditContext, Editor, EditSpec, Options, hookimpl, num_layers, resolve_layer
from kedit_plugins.lte.options import ValueOptions, default_weight_decay

if TYPE_CHECKING:
    import torch


class RomeOptions(ValueOptions, Options):
    layer: int | None = Field(None, description="edited layer; default: 17% of the depth (layer 5 of 30 for SmolLM2)")
    mom2_adjustment: bool = Field(True, description="weight the update by the key statistics C0 (false: C0 = I)")
    original: bool = Field(False, description="ROME's original asymmetric keys (k̄ in u, the plain prompt's key in "
                                              "the denominator) instead of r-ROME's consistent k̄")


def default_layer(config) -> int:
    return max(0, round(0.17 * num_layers(config)))


class Rome(Editor):
    """ROME / r-ROME: rank-one edit of one MLP output matrix per fact."""

    name = "rome"
    Options = RomeOptions

    def resolve(self, options: RomeOptions, model: "torch.nn.Module") -> RomeOptions:
        layer = resolve_layer(default_layer(model.config) if options.layer is None else options.layer, model.config)
        wd = options.v_weight_decay
        return options.model_copy(update={"layer": layer, "v_weight_decay":
                                          default_weight_decay(model.config) if wd is None else wd})

    def edit(self, model: "torch.nn.Module", tokenizer: Any, specs: list[EditSpec], options: RomeOptions,
             context: EditContext) -> dict[str, Any]:
        import torch

        from kedit.delta import add, to_dense
        from kedit_plugins.lte.prompts import context_templates
        from kedit_plugins.lte.solve import stored_lowrank

        arch = context.arch
        layer = options.layer
        pname = arch.mlp_out_weight(layer)
        w0 = model.get_parameter(pname).detach()
        with context.at_base():  # a sequence keeps its base model's templates, in any process
            templates = context_templates(model, tokenizer, [(5, 10), (10, 10)], seed=context.seed)
        if options.mom2_adjustment:
            c0 = context.need_stats().second_moment(model, tokenizer, [layer])[layer]
        else:
            c0 = torch.eye(arch.to_out_in(w0).shape[1], dtype=torch.float64)
        total = None
        overrides: dict[str, torch.Tensor] = {}
        for spec in context.progress(specs, desc="rome", unit="fact"):
            u, v = self._one(model, tokenizer, arch, spec, templates, layer, c0, options, overrides, context)
            d = stored_lowrank(arch, u, v)
            total = d if total is None else add(total, d)
            overrides[pname] = w0 + to_dense(total).to(w0.device, w0.dtype)
        return {pname: total}

    @staticmethod
    def _one(model, tok, arch, spec, templates, layer, c0, options, overrides, context):
        from kedit_plugins.lte import capture, values
        from kedit_plugins.lte.prompts import fact_row
        from kedit_plugins.lte.solve import spd_solve

        rows = [fact_row(tok, t, spec, 0, with_target=False) for t in templates]
        acts = capture.at_lookup(model, tok, arch, rows, key_layers=[layer], mlp_out_layers=[layer],
                                 overrides=overrides)
        keys, outs = acts[("key", layer)], acts[("mlp_out", layer)]
        k_bar = keys.mean(0)
        vals = values.optimize(model, tok, arch, [spec], templates, "mlp_out", layer, options,
                               average_init=not options.original, overrides=overrides)
        c_inv_k = spd_solve(c0, k_bar.unsqueeze(1)).squeeze(1)
        if options.original:  # ROME as published: u from k̄, denominator and residual from the plain prompt
            u_dir = c_inv_k / c_inv_k.norm()
            right = (vals.z[0] - outs[0]) / keys[0].dot(u_dir)
            return right.unsqueeze(1), u_dir.unsqueeze(0)
        right = (vals.z[0] - outs.mean(0)) / k_bar.dot(c_inv_k)
        return right.unsqueeze(1), c_inv_k.unsqueeze(0)


@hookimpl
def register_editors(register):
    register(Rome)
