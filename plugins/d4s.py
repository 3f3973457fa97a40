"""``d4s``: Dump for Sequence (Huang et al. 2024). MEMIT's targets and keys, with per layer the
running sums S_RK = Σ R Kᵀ and S_KK = Σ K Kᵀ (float64) of every edit so far, so that each batch
of a sequence is solved as one batch over all of them, from the sequence's original weights:

    W_l = W0_l + S_RK_l (λ C0_l + S_KK_l)⁻¹

Every edit's z, keys and residual are computed on the original model (as the reference code
does by restoring W0 after each edit), so an edit's contribution to the sums depends on nothing
but the edit: memory stays O(1) in the number of edits, and removing one edit is exact
(subtract its terms and re-solve, :meth:`D4S.remove`). The residual is computed once and layer i
gets 1/(n_layers − i) of it (the reference's allocation, ``spread="reference"``), or 1/n_layers
(``spread="equal"``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from kedit.api import EditContext, EditSpec, InputError, hookimpl
from kedit_plugins.memit import Memit, MemitOptions

if TYPE_CHECKING:
    import torch


class D4SOptions(MemitOptions):
    spread: Literal["reference", "equal"] = Field(
        "reference", description="share of the residual per layer: reference = 1/(n_layers − i) of the full "
                                 "residual for the i-th layer (D4S's code; the shares add up to more than 1), "
                                 "equal = 1/n_layers each")


class D4S(Memit):
    """D4S: sequential MEMIT whose accumulated sums make a sequence equal one batch over all edits."""

    name = "d4s"
    Options = D4SOptions
    regularizes_in_loop = False  # one closed-form solve per layer from the sums; nothing to regularize in between

    def edit(self, model: "torch.nn.Module", tokenizer: Any, specs: list[EditSpec], options: Any,
             context: EditContext) -> dict[str, Any]:
        from kedit_plugins.lte import capture
        from kedit_plugins.lte.prompts import fact_row

        arch = context.arch
        layers = options.layers
        last = layers[-1]
        templates, vals = self.targets(model, tokenizer, specs, options, context, from_base=True)
        with context.at_base():
            key_rows = [fact_row(tokenizer, t, s, i, with_target=False) for i, s in enumerate(specs) for t in templates]
            plain_rows = [fact_row(tokenizer, "{}", s, i, with_target=False) for i, s in enumerate(specs)]
            acts = capture.at_lookup(model, tokenizer, arch, key_rows, key_layers=layers)
            h = capture.at_lookup(model, tokenizer, arch, plain_rows, block_layers=[last])[("block", last)]
        residual = (vals.z - h).T.double()  # (d, n), once for all layers
        state = context.state if context.state is not None else {}
        update: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(layers):
            keys = capture.average_by_request(acts[("key", layer)], key_rows, len(specs)).T.double()  # (d_k, n)
            share = 1.0 / (len(layers) - i) if options.spread == "reference" else 1.0 / len(layers)
            r = residual * share
            rk, kk = state.get(f"d4s.rk.{layer}"), state.get(f"d4s.kk.{layer}")
            update[f"d4s.rk.{layer}"] = r @ keys.T + (rk if rk is not None else 0)
            update[f"d4s.kk.{layer}"] = keys @ keys.T + (kk if kk is not None else 0)
            if context.step_data is not None:
                context.step_data[f"d4s.k.{layer}"] = keys.cpu()
                context.step_data[f"d4s.r.{layer}"] = r.cpu()
        deltas = self._solve_all(model, tokenizer, layers, update, options, context)
        state.update(update)
        return deltas

    def remove(self, model: "torch.nn.Module", tokenizer: Any, spec_ids: list[str],
               steps: list[tuple[list[str], dict[str, "torch.Tensor"]]], options: Any,
               context: EditContext) -> dict[str, Any]:
        """Subtract the edits' terms from the sums and re-solve: the result is the sequence's as if
        they had never been made (to float64 rounding)."""
        state = context.state
        if not state:
            raise InputError("d4s: no accumulated sums to remove an edit from (the chain holds no d4s state)")
        wanted, found = set(spec_ids), set()
        update = {k: v.clone() for k, v in state.items() if k.startswith("d4s.")}
        for ids, data in steps:
            cols = [j for j, sid in enumerate(ids) if sid in wanted]
            if not cols:
                continue
            if not data:
                raise InputError(f"d4s: the step holding {ids[cols[0]]!r} kept no per-edit data; it cannot be removed")
            found |= {ids[j] for j in cols}
            for layer in options.layers:
                k = data[f"d4s.k.{layer}"][:, cols].to(update[f"d4s.kk.{layer}"])
                r = data[f"d4s.r.{layer}"][:, cols].to(update[f"d4s.rk.{layer}"])
                update[f"d4s.rk.{layer}"] -= r @ k.T
                update[f"d4s.kk.{layer}"] -= k @ k.T
        if found != wanted:
            raise InputError(f"d4s: no per-edit data for {sorted(wanted - found)} in the chain")
        deltas = self._solve_all(model, tokenizer, options.layers, update, options, context)
        state.update(update)
        return deltas

    def _solve_all(self, model: "torch.nn.Module", tokenizer: Any, layers: list[int], sums: dict[str, "torch.Tensor"],
                   options: Any, context: EditContext) -> dict[str, "torch.Tensor"]:
        """Per layer, W0 + S_RK (λ C0 + S_KK)⁻¹ as a delta against the live weight."""
        import torch

        from kedit_plugins.lte.solve import spd_solve

        arch = context.arch
        c0 = context.need_stats().second_moment(model, tokenizer, layers)
        deltas = {}
        for layer in layers:
            rk, kk = sums[f"d4s.rk.{layer}"], sums[f"d4s.kk.{layer}"]
            moment = c0[layer].to(kk)
            total = spd_solve(options.mom2_update_weight * moment + kk, rk.T).T  # (d_out, d_in): S_RK A⁻¹, A symmetric
            name = arch.mlp_out_weight(layer)
            w0 = context.base_weight(model, name).double()
            live = model.get_parameter(name).detach().double()
            stored = total.T if arch.transposed else total
            deltas[name] = (w0 + stored.to(w0.device) - live).to(torch.float32)
        return deltas


@hookimpl
def register_editors(register):
    register(D4S)
