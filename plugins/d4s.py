"""``d4s``: Dump for Sequence (Huang et al. 2024). MEMIT's targets and keys, with per layer the
running sums S_RK = Σ R Kᵀ and S_KK = Σ K Kᵀ (float64) of every edit so far, so that each batch
of a sequence is solved as one batch over all of them, from the sequence's original weights:

    W_l = W0_l + S_RK_l (λ C0_l + S_KK_l)⁻¹

As in the reference code (which restores W0 after every edit and writes W0 + ΔW into each layer
as its loop moves up), every edit's z is optimised on the original model W0. Two choices are
options:

- ``keys``: ``reference`` (the default) takes layer i's keys on W0 with the accumulated solution
  already written into the edited layers below i, as the reference's layer loop does; ``base``
  takes every layer's keys from W0 itself.
- ``residual``: ``per_layer`` (the default) recomputes H_L with the layers below i solved and
  gives layer i 1/(n_layers − i) of what is left, as MEMIT does; ``once`` computes R = Z − H_L
  once and gives layer i ``spread`` of it (the reference: 1/(n_layers − i), 2.28× the residual
  in all for five layers).

The defaults are MEMIT's allocation because it is the one that holds on SmolLM2 in both of the
paper's protocols (docs/sequential.md): after 998 instance-sequential zsRE edits rewrite
accuracy 0.490 against 0.177 and a third of the perplexity increase (+39.9% against ×2.04);
after 1,000 CounterFact edits with early stopping +12.3% perplexity against +24.1%.

With ``keys=base`` and ``residual=once`` (the reference's allocation with base keys) an edit's
terms depend on nothing but the edit, so memory stays O(1) in the number of edits, a sequence of
single edits is exactly one batch of them, and removing one edit is exact (subtract its terms and
re-solve, :meth:`D4S.remove`); in the other modes an edit's terms depend on the edits before it,
and removal is refused.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from kedit.api import EditContext, EditSpec, InputError, hookimpl
from kedit_plugins.memit import Memit, MemitOptions

if TYPE_CHECKING:
    import torch


class D4SOptions(MemitOptions):
    keys: Literal["base", "reference"] = Field(
        "reference", description="keys of layer i: reference = on the original weights plus the accumulated solution "
                                 "already written into the edited layers below i (the reference code's loop); base = "
                                 "on the original weights (with residual=once: exact single-edit removal)")
    residual: Literal["once", "per_layer"] = Field(
        "per_layer", description="per_layer = recomputed with the layers below i solved, layer i taking "
                                 "1/(n_layers − i) of what is left (MEMIT's allocation); once = R = Z − H_L on the "
                                 "original model, layer i taking `spread` of it (the reference's allocation)")
    spread: Literal["reference", "equal"] = Field(
        "reference", description="with residual=once, the share of R per layer: reference = 1/(n_layers − i) for the "
                                 "i-th layer (the shares add up to more than 1), equal = 1/n_layers each")


class D4S(Memit):
    """D4S: sequential MEMIT whose accumulated sums solve each batch against every edit so far."""

    name = "d4s"
    Options = D4SOptions
    regularizes_in_loop = False  # one closed-form solve per layer from the sums; nothing to regularize in between

    @staticmethod
    def exact_removal(options: Any) -> bool:
        return options.keys == "base" and options.residual == "once"

    def edit(self, model: "torch.nn.Module", tokenizer: Any, specs: list[EditSpec], options: Any,
             context: EditContext) -> dict[str, Any]:
        from kedit_plugins.lte import capture
        from kedit_plugins.lte.prompts import fact_row

        arch = context.arch
        layers, last = options.layers, options.layers[-1]
        templates, vals = self.targets(model, tokenizer, specs, options, context, from_base=True)
        key_rows = self.key_rows(tokenizer, specs, templates, options)
        plain_rows = [fact_row(tokenizer, "{}", s, i, with_target=False) for i, s in enumerate(specs)]
        c0 = context.need_stats().second_moment(model, tokenizer, layers)
        state = context.state if context.state is not None else {}
        update: dict[str, torch.Tensor] = {}
        deltas: dict[str, Any] = {}
        solved: dict[str, torch.Tensor] = {}  # W0 + the new solution, for the layers done (keys=reference)
        with context.at_base():
            if options.keys == "base":
                acts = capture.at_lookup(model, tokenizer, arch, key_rows, key_layers=layers)
            if options.residual == "once":
                h = capture.at_lookup(model, tokenizer, arch, plain_rows, block_layers=[last])[("block", last)]
                residual = (vals.z - h).T.double()  # (d, n), once for all layers
            for i, layer in enumerate(layers):
                if options.keys == "reference":
                    acts = capture.at_lookup(model, tokenizer, arch, key_rows, key_layers=[layer], overrides=solved)
                keys = capture.average_by_request(acts[("key", layer)], key_rows, len(specs)).T.double()  # (d_k, n)
                if options.residual == "once":
                    share = 1.0 / (len(layers) - i) if options.spread == "reference" else 1.0 / len(layers)
                    r = residual * share
                else:
                    h = capture.at_lookup(model, tokenizer, arch, plain_rows, block_layers=[last],
                                          overrides=solved)[("block", last)]
                    r = (vals.z - h).T.double() / (len(layers) - i)
                rk, kk = state.get(f"d4s.rk.{layer}"), state.get(f"d4s.kk.{layer}")
                update[f"d4s.rk.{layer}"] = r @ keys.T + (rk if rk is not None else 0)
                update[f"d4s.kk.{layer}"] = keys @ keys.T + (kk if kk is not None else 0)
                if context.step_data is not None and self.exact_removal(options):
                    context.step_data[f"d4s.k.{layer}"] = keys.cpu()
                    context.step_data[f"d4s.r.{layer}"] = r.cpu()
                name, weight = self._solve(model, layer, update, c0[layer], options, context)
                solved[name] = weight.to(model.get_parameter(name).dtype)
                deltas[name] = weight
        deltas = {name: self._against_live(model, name, weight) for name, weight in deltas.items()}  # live weights
        state.update(update)
        return deltas

    def remove(self, model: "torch.nn.Module", tokenizer: Any, spec_ids: list[str],
               steps: list[tuple[list[str], dict[str, "torch.Tensor"]]], options: Any,
               context: EditContext) -> dict[str, Any]:
        """Subtract the edits' terms from the sums and re-solve: the result is the sequence's as if
        they had never been made (to float64 rounding)."""
        if not self.exact_removal(options):
            raise InputError(f"d4s: exact removal of an edit needs keys=base and residual=once; this chain was made "
                             f"with keys={options.keys}, residual={options.residual}, where an edit's terms depend on "
                             "the edits before it, so subtracting them would not give the sequence without it "
                             "(a chain made with -o keys base -o residual once can remove single edits)")
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
        c0 = context.need_stats().second_moment(model, tokenizer, options.layers)
        deltas = {}
        for layer in options.layers:
            name, weight = self._solve(model, layer, update, c0[layer], options, context)
            deltas[name] = self._against_live(model, name, weight)
        state.update(update)
        return deltas

    @staticmethod
    def _solve(model: "torch.nn.Module", layer: int, sums: dict[str, "torch.Tensor"], c0: "torch.Tensor",
               options: Any, context: EditContext) -> tuple[str, "torch.Tensor"]:
        """Layer ``layer``'s weight W0 + S_RK (λ C0 + S_KK)⁻¹ in its stored layout (float64)."""
        from kedit_plugins.lte.solve import spd_solve

        rk, kk = sums[f"d4s.rk.{layer}"], sums[f"d4s.kk.{layer}"]
        total = spd_solve(options.mom2_update_weight * c0.to(kk) + kk, rk.T).T  # (d_out, d_in): S_RK A⁻¹, A symmetric
        name = context.arch.mlp_out_weight(layer)
        w0 = context.base_weight(model, name).double()
        stored = total.T if context.arch.transposed else total
        return name, w0 + stored.to(w0.device)

    @staticmethod
    def _against_live(model: "torch.nn.Module", name: str, weight: "torch.Tensor") -> "torch.Tensor":
        import torch

        live = model.get_parameter(name).detach()
        return (weight.double() - live.double()).to(torch.float32)


@hookimpl
def register_editors(register):
    register(D4S)
