"""``ft``: constrained fine-tuning of one MLP output matrix (FT-L / FT-M in the reference notes).

Only the delta of the chosen matrix is a free variable; the model runs with ``W0 + delta``
through ``torch.func.functional_call``, so the caller's model is never touched. After every
Adam step the delta is clamped elementwise to ``[-norm_constraint, norm_constraint]``, the
L-infinity bound that keeps plain fine-tuning from wrecking locality.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from kedit.api import EditContext, Editor, EditSpec, Options, hookimpl, num_layers, resolve_layer

if TYPE_CHECKING:
    import torch


class FTOptions(Options):
    layer: int | None = Field(None, description="layer whose MLP output matrix is tuned; default: 1/3 of the depth")
    steps: int = Field(25, ge=1, description="Adam steps")
    lr: float = Field(5e-3, gt=0, description="Adam learning rate")
    norm_constraint: float | None = Field(
        2e-2, gt=0, description="L-infinity bound on each weight's change; null = unconstrained")
    objective: Literal["target", "prompt_last"] = Field(
        "target", description="'target': teacher-forced NLL of the target tokens (FT-M); "
                              "'prompt_last': all target tokens scored at the last prompt position (FT-L)")
    batch_size: int = Field(16, ge=1, description="specs per optimisation mini-batch")
    early_stop_loss: float = Field(1e-2, ge=0, description="stop when the mean loss falls below this")


def default_layer(config) -> int:
    return max(0, num_layers(config) // 3)


class FT(Editor):
    """Constrained fine-tuning of one MLP output matrix (FT-L / FT-M)."""

    name = "ft"
    Options = FTOptions

    def resolve(self, options: FTOptions, model: "torch.nn.Module") -> FTOptions:
        layer = resolve_layer(default_layer(model.config) if options.layer is None else options.layer, model.config)
        return options.model_copy(update={"layer": layer})

    def edit(self, model: "torch.nn.Module", tokenizer: Any, specs: list[EditSpec],
             options: FTOptions, context: EditContext) -> dict[str, "torch.Tensor"]:
        import torch
        from torch.func import functional_call

        from kedit.scoring import target_logprobs

        pname = context.arch.mlp_out_weight(options.layer)
        w0 = model.get_parameter(pname).detach()
        params = {n: p.detach() for n, p in model.named_parameters()}
        delta = torch.zeros_like(w0, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=options.lr)
        batches = [self._batch(tokenizer, specs[i:i + options.batch_size], options.objective, w0.device)
                   for i in range(0, len(specs), options.batch_size)]
        for _ in context.progress(range(options.steps), desc="ft", unit="step"):
            total = 0.0
            for ids, mask, spans in batches:
                logits = functional_call(model, {**params, pname: w0 + delta}, args=(),
                                         kwargs={"input_ids": ids, "attention_mask": mask}).logits
                loss = torch.stack([-lp.mean() for lp in target_logprobs(logits, spans)]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                if options.norm_constraint is not None:
                    with torch.no_grad():
                        delta.clamp_(-options.norm_constraint, options.norm_constraint)
                total += loss.item() * len(spans)
            if total / len(specs) < options.early_stop_loss:
                break
        return {pname: delta.detach().to(torch.float32)}

    @staticmethod
    def _batch(tokenizer: Any, specs: list[EditSpec], objective: str, device: "torch.device"):
        from kedit.scoring import teacher_forced_batch

        ids, mask, spans = teacher_forced_batch(tokenizer, [s.text for s in specs], [s.target_new for s in specs])
        if objective == "prompt_last":
            spans = [([pos[0]] * len(toks), toks) for pos, toks in spans]
        return ids.to(device), mask.to(device), spans


@hookimpl
def register_editors(register):
    register(FT)
