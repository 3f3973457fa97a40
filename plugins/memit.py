"""``memit``: batch edits spread over several layers (Meng et al. 2023).

z = v_init + δ is optimised at the output of the last edited layer L. Then, layer by layer,
keys K and the residual R = Z − H_L are recomputed on the partly edited model, R is divided over
the layers still to go, and ΔW_l = R_l Kᵀ (λ C0 + K Kᵀ)⁻¹ (float64, Cholesky). AlphaEdit, EMMET
and NSE reuse everything here and change only :meth:`Memit.solve` (with what :meth:`Memit.begin`
prepares for one call, passed along as a value).
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from kedit.api import EditContext, Editor, EditSpec, Options, hookimpl, num_layers, resolve_layer
from kedit_plugins.lte.options import ROTARY, ValueOptions, default_weight_decay

if TYPE_CHECKING:
    import torch

    from kedit_plugins.lte.values import Values


class MemitOptions(ValueOptions, Options):
    layers: list[int] | None = Field(None, min_length=1, description="edited layers; default: 13%–27% of the depth (4–8 of 30 for SmolLM2)")
    mom2_update_weight: float | None = Field(
        None, gt=0, description="λ: weight of the preserved keys' statistics C0; default 2000 for rotary decoders "
                                "(measured on SmolLM2, docs/locate-then-edit.md), 15000 otherwise (GPT-J's value)")
    clamp_norm_factor: float | None = Field(
        None, gt=0, description="the norm cap: ‖δ‖ ≤ clamp_norm_factor · ‖v_init‖; default 4 for rotary decoders "
                                "(EasyEdit's Llama value), 0.75 otherwise")
    key_average: Literal["grouped", "uniform"] = Field(
        "grouped", description="how a request's key is averaged over the context templates: grouped = within each "
                               "template group, then over groups, so the plain prompt weighs 1/2 (the reference "
                               "code); uniform = one mean over all six templates")


TEMPLATE_GROUPS = ((10, 5),)  # "{}" plus five 10-token samples, as in the MEMIT reference


def family_defaults(options: Any, config) -> Any:
    """Fill the options left unset with the defaults of the model's family."""
    rotary = config.model_type in ROTARY
    fill = {"mom2_update_weight": 2000.0 if rotary else 15000.0, "clamp_norm_factor": 4.0 if rotary else 0.75,
            "v_weight_decay": default_weight_decay(config)}
    return options.model_copy(update={k: v for k, v in fill.items() if getattr(options, k) is None})


def default_layers(config) -> list[int]:
    n = num_layers(config)
    lo, hi = round(0.13 * n), round(0.27 * n)
    return list(range(lo, max(hi, lo) + 1))


class Memit(Editor):
    """MEMIT: batch edit spread over several layers' MLP output matrices."""

    name = "memit"
    Options = MemitOptions
    regularizes_in_loop = True

    def resolve(self, options: Any, model: "torch.nn.Module") -> Any:
        options = family_defaults(options, model.config)
        layers = sorted({resolve_layer(l, model.config) for l in (options.layers or default_layers(model.config))})
        return options.model_copy(update={"layers": layers})

    def edit(self, model: "torch.nn.Module", tokenizer: Any, specs: list[EditSpec], options: Any,
             context: EditContext) -> dict[str, Any]:
        layers = options.layers
        templates, vals = self.targets(model, tokenizer, specs, options, context)
        c0 = context.need_stats().second_moment(model, tokenizer, layers)
        key_rows = self.key_rows(tokenizer, specs, templates, options)
        overrides: dict[str, torch.Tensor] = {}
        call = self.begin(model, tokenizer, specs, layers, c0, options, context)
        deltas = self.spread(model, tokenizer, specs, templates, vals.z, layers, c0, options, context, overrides, call)
        self.end(model, tokenizer, specs, layers, key_rows, overrides, context, call)
        return deltas

    def targets(self, model: "torch.nn.Module", tokenizer: Any, specs: list[EditSpec], options: Any,
                context: EditContext, from_base: bool = False) -> tuple[list[str], "Values"]:
        """Context templates (always the sequence base's, so a sequence keeps them in any process)
        and z at the last edited layer, on the live model or, ``from_base``, on the sequence's
        original one (D4S, NSE)."""
        from kedit_plugins.lte import values
        from kedit_plugins.lte.prompts import context_templates

        with context.at_base():
            templates = context_templates(model, tokenizer, TEMPLATE_GROUPS, seed=context.seed)
        with context.at_base() if from_base else contextlib.nullcontext():
            vals = values.optimize(model, tokenizer, context.arch, specs, templates, "block", options.layers[-1],
                                   options, progress=context.progress)
        context.report["targets"] = vals.report()
        return templates, vals

    @staticmethod
    def key_rows(tokenizer: Any, specs: list[EditSpec], templates: list[str], options: Any) -> list[Any]:
        """Every spec in every context template, weighted as ``options.key_average`` says."""
        from kedit_plugins.lte.prompts import key_rows, template_weights

        return key_rows(tokenizer, specs, templates, template_weights(TEMPLATE_GROUPS, options.key_average))

    def spread(self, model: "torch.nn.Module", tokenizer: Any, specs: list[EditSpec], templates: list[str],
               z: "torch.Tensor", layers: list[int], c0: dict[int, "torch.Tensor"], options: Any,
               context: EditContext, overrides: dict[str, "torch.Tensor"], call: Any = None) -> dict[str, Any]:
        """One MEMIT pass: layer by layer, keys and the residual Z − H_L on the model as edited so
        far (``overrides``, updated), the residual's share for the layer, and :meth:`solve`."""
        from kedit.delta import to_dense
        from kedit_plugins.lte import capture
        from kedit_plugins.lte.prompts import fact_row
        from kedit_plugins.lte.solve import stored_lowrank

        arch, last = context.arch, layers[-1]
        key_rows = self.key_rows(tokenizer, specs, templates, options)
        plain_rows = [fact_row(tokenizer, "{}", s, i, with_target=False) for i, s in enumerate(specs)]
        deltas: dict[str, Any] = {}
        for i, layer in enumerate(layers):
            acts = capture.at_lookup(model, tokenizer, arch, key_rows, key_layers=[layer], overrides=overrides)
            keys = capture.average_by_request(acts[("key", layer)], key_rows, len(specs)).T  # (d_k, n)
            h = capture.at_lookup(model, tokenizer, arch, plain_rows, block_layers=[last], overrides=overrides)
            residual = (z - h[("block", last)]).T / (len(layers) - i)  # (d, n)
            u, v = self.solve(layer, residual, keys, c0[layer], options, call)
            pname = arch.mlp_out_weight(layer)
            deltas[pname] = stored_lowrank(arch, u, v)
            if context.regularize is not None:  # --reg-in-loop: later layers make up for what it removes
                deltas[pname] = context.regularize(pname, deltas[pname])
            w = overrides.get(pname, model.get_parameter(pname).detach())
            overrides[pname] = w + to_dense(deltas[pname]).to(w.device, w.dtype)
        return deltas

    def begin(self, model, tokenizer, specs, layers, c0, options, context) -> Any:
        """What one call's solves share (AlphaEdit's null-space bases); handed to :meth:`solve`
        and :meth:`end` as ``call``."""
        return None

    def end(self, model, tokenizer, specs, layers, key_rows, overrides, context, call: Any = None) -> None:
        """Update carried state after the edit (AlphaEdit's key sums)."""

    def solve(self, layer: int, residual: "torch.Tensor", keys: "torch.Tensor", c0: "torch.Tensor",
              options: Any, call: Any = None) -> tuple["torch.Tensor", "torch.Tensor"]:
        from kedit_plugins.lte.solve import memit_delta

        return memit_delta(residual, keys, c0, options.mom2_update_weight)


@hookimpl
def register_editors(register):
    register(Memit)
