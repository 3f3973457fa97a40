"""``mend``: Model Editor Networks with Gradient Decomposition (Mitchell et al., ICLR 2022).

The fine-tuning gradient of a linear map is a sum of rank-one terms, one per token: δ uᵀ, with u
the map's input and δ the loss gradient at its output. MEND trains a small network g per edited
matrix that maps each token's normalised (u, δ) to (ũ, δ̃); the edit is ΔW = −α Σ_t δ̃_t ũ_tᵀ,
with α a learned step per matrix. g is a residual MLP of one low-rank hidden layer whose output
layer starts at zero, so training starts from (normalised) plain gradient descent.

Training (``kedit train mend``) minimises c_edit · NLL(new target | paraphrase and edit prompt,
edited model) + c_loc · KL(p_unedited ‖ p_edited) on the record's locality prompt, over edits drawn
from the training records; the last ``validation`` records are held out and report single-edit
success. The artifact holds g, α and the input normalisers, and records (by content hash) the
edited matrices of the base model it was trained for; ``kedit apply --plugin mend -o artifact
PATH`` refuses it for any other base.

Edits are batched as in MEND: the loss is summed over the batch's edits before the gradient is
decomposed. The delta of each matrix is low rank: one rank-one term per token of the batch's
teacher-forced rows.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pydantic import Field

from kedit.api import (
    EditContext,
    Editor,
    EditSpec,
    InputError,
    Options,
    TrainContext,
    hookimpl,
    num_layers,
    resolve_layer,
)

if TYPE_CHECKING:
    import torch

    from kedit.delta import LowRank


class MendOptions(Options):
    artifact: str | None = Field(None, description="the trained hypernetwork (`kedit train mend --out PATH`); required")


class MendTrainOptions(Options):
    layers: list[int] | None = Field(None, description="layers whose MLP output matrices are edited; default: the last "
                                                       "three (the paper's choice of the last blocks)")
    rank: int = Field(64, ge=1, description="width of g's low-rank hidden layer (the paper: 1920 on GPT-2 XL)")
    steps: int = Field(1500, ge=1, description="training steps (1,500 fit the 60-minute budget on 2 CPU cores)")
    batch_size: int = Field(4, ge=1, description="edits per training step")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate of g (the paper: 1e-6 over ~100k steps on a GPU)")
    lr_lr: float = Field(1e-4, gt=0, description="Adam learning rate of the per-matrix steps α")
    edit_lr: float = Field(1e-4, gt=0, description="initial α")
    c_edit: float = Field(0.1, ge=0, description="weight of the edit loss")
    c_loc: float = Field(1.0, ge=0, description="weight of the locality KL")
    validation: int = Field(100, ge=0, description="records held out at the end of the data for validation")
    validate_every: int = Field(500, ge=1, description="steps between validations (and one at the end)")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints (an interrupted run resumes)")
    log_every: int = Field(25, ge=1, description="steps between points of the training curve")


class Mend(Editor):
    """MEND: a trained network turns the fine-tuning gradient's rank-one factors into an edit."""

    name = "mend"
    Options = MendOptions
    TrainOptions = MendTrainOptions
    artifact_options = ("artifact",)

    def resolve_training(self, options: MendTrainOptions, model: "torch.nn.Module") -> MendTrainOptions:
        if options.checkpoint_every % options.log_every:
            raise InputError(f"mend training: checkpoint_every ({options.checkpoint_every}) must be a multiple of "
                             f"log_every ({options.log_every}), so a resumed run's curve equals an uninterrupted one's")
        n = num_layers(model.config)
        layers = [n - 3, n - 2, n - 1] if options.layers is None else [resolve_layer(x, model.config)
                                                                        for x in options.layers]
        return options.model_copy(update={"layers": sorted(set(x for x in layers if x >= 0))})

    def edit(self, model: "torch.nn.Module", tokenizer: Any, specs: list[EditSpec], options: MendOptions,
             context: EditContext) -> dict[str, "LowRank"]:
        art = context.artifacts.get("artifact")
        if art is None:
            raise InputError("mend needs its trained network: `kedit train mend --data … --out PATH`, then "
                             "`-o artifact PATH`")
        names = art.meta["report"]["names"]
        net = {k: v.to(next(model.parameters()).device) for k, v in art.tensors.items()}
        rows = _rows(tokenizer, [(s.text, s.target_new) for s in specs], model)
        factors = _factors(model, context.arch, names, rows)
        import torch

        from kedit.delta import LowRank

        out = {}
        with torch.no_grad():
            for j, name in enumerate(names):
                u, d = factors[name]
                ut, dt = _g(net, j, u, d)
                left = -net[f"{j}.alpha"] * dt.t()  # (d_out, T)
                if context.arch.transposed:  # stored (d_in, d_out)
                    out[name] = LowRank(u=ut.t().float().contiguous(), v=left.t().float().contiguous())
                else:
                    out[name] = LowRank(u=left.float().contiguous(), v=ut.float().contiguous())
        context.report["mend"] = {"tokens": int(factors[names[0]][0].shape[0])}
        return out

    def train(self, model: "torch.nn.Module", tokenizer: Any, specs: list[EditSpec], options: MendTrainOptions,
              context: TrainContext) -> dict[str, "torch.Tensor"]:
        import torch

        from kedit.api import arch_for

        arch = arch_for(model)
        names = [arch.mlp_out_weight(layer) for layer in options.layers]
        context.base_tensors = list(names)
        if len(specs) <= options.validation:
            raise InputError(f"mend training: {len(specs)} records, but validation holds out {options.validation}")
        train_specs = specs[: len(specs) - options.validation]
        val_specs = specs[len(specs) - options.validation:]
        dims = []
        for name in names:
            w = arch.to_out_in(model.get_parameter(name))
            dims.append((w.shape[1], w.shape[0]))  # (d_in, d_out)
        if context.resume is not None:
            net = {k: v.clone() for k, v in context.resume["tensors"].items() if not k.startswith("adam.")}
            step0 = context.resume["step"]
            curve = context.resume["state"]["curve"]
        else:
            net = _init(dims, options, context.generator)
            step0, curve = 0, []
        params = [net[k] for k in sorted(net) if _trained(k)]
        for p in params:
            p.requires_grad_(True)
        groups = [{"params": [net[k] for k in sorted(net) if _trained(k) and not k.endswith("alpha")], "lr": options.lr},
                  {"params": [net[k] for k in sorted(net) if k.endswith("alpha")], "lr": options.lr_lr}]
        opt = torch.optim.Adam(groups)
        if context.resume is not None:
            _load_adam(opt, params, context.resume["tensors"])
        order = _order(len(train_specs), options, context.seed)
        base = {n: p.detach() for n, p in model.named_parameters()}
        window: list[tuple[float, float]] = []
        for step in context.progress(range(step0, options.steps), desc="mend training", unit="step"):
            batch = [train_specs[i] for i in order(step)]
            edit_rows = _rows(tokenizer, [(s.text, s.target_new) for s in batch], model)
            factors = _factors(model, arch, names, edit_rows)
            with torch.no_grad():
                for j, name in enumerate(names):
                    _observe(net, j, torch.cat(factors[name], dim=1))
            deltas = {}
            for j, name in enumerate(names):
                ut, dt = _g(net, j, *factors[name])
                dw = -net[f"{j}.alpha"] * (dt.t() @ ut)  # (d_out, d_in)
                deltas[name] = arch.from_out_in(dw)
            gen_rows = _rows(tokenizer, [(s.paraphrases[0] if s.paraphrases else s.text, s.target_new) for s in batch]
                             + [(s.text, s.target_new) for s in batch], model)
            loc = [_locality(s, batch, k) for k, s in enumerate(batch)]
            loc_rows = _rows(tokenizer, loc, model)
            with torch.no_grad():
                p_loc = _logprobs(model, base, {}, loc_rows)
            l_edit = _nll(model, base, deltas, gen_rows)
            q_loc = _logprobs(model, base, deltas, loc_rows)
            l_loc = (p_loc.exp() * (p_loc - q_loc)).sum(-1).mean()
            loss = options.c_edit * l_edit + options.c_loc * l_loc
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 100.0)
            opt.step()
            window.append((float(l_edit.detach()), float(l_loc.detach())))
            done = step + 1
            if done % options.log_every == 0 or done == options.steps:
                curve.append({"step": done, "edit_nll": sum(w[0] for w in window) / len(window),
                              "loc_kl": sum(w[1] for w in window) / len(window)})
                window = []
            if val_specs and (done % options.validate_every == 0 or done == options.steps):
                curve[-1].update({f"val_{k}": v for k, v in _validate(model, tokenizer, arch, names, net,
                                                                         val_specs).items()})
            if done % options.checkpoint_every == 0 and done < options.steps:
                context.checkpoint(done, {**{k: v.detach() for k, v in net.items()}, **_adam_state(opt, params)},
                                   {"curve": curve})
        final = {k: v.detach().clone() for k, v in net.items()}
        context.report.update({"curve": curve, "names": names,
                               "validation": {k.removeprefix("val_"): v for k, v in curve[-1].items()
                                              if k.startswith("val_")} if curve else {}})
        return final


# --- the network: per matrix j, tensors "j.A" (r, D), "j.a" (r), "j.B" (D, r), "j.b" (D), "j.alpha",
# and the input normaliser's Welford sums "j.count", "j.mean", "j.m2" (float64, not trained) ---

def _trained(key: str) -> bool:
    return key.split(".", 1)[1] in ("A", "a", "B", "b", "alpha")


def _init(dims: list[tuple[int, int]], options: MendTrainOptions, generator: "torch.Generator") -> dict:
    import torch

    net = {}
    for j, (d_in, d_out) in enumerate(dims):
        size = d_in + d_out
        bound = 1 / math.sqrt(size)
        net[f"{j}.A"] = (torch.rand(options.rank, size, generator=generator) * 2 - 1) * bound
        net[f"{j}.a"] = torch.zeros(options.rank)
        net[f"{j}.B"] = torch.zeros(size, options.rank)  # g starts as the identity
        net[f"{j}.b"] = torch.zeros(size)
        net[f"{j}.alpha"] = torch.tensor(options.edit_lr)
        net[f"{j}.count"] = torch.zeros((), dtype=torch.float64)
        net[f"{j}.mean"] = torch.zeros(size, dtype=torch.float64)
        net[f"{j}.m2"] = torch.zeros(size, dtype=torch.float64)
    return net


def _observe(net: dict, j: int, x: "torch.Tensor") -> None:
    """Fold a batch of token rows into the normaliser (Chan et al.'s parallel Welford update)."""
    x = x.double()
    n, mean, m2 = net[f"{j}.count"], net[f"{j}.mean"], net[f"{j}.m2"]
    k = x.shape[0]
    bmean = x.mean(0)
    bm2 = ((x - bmean) ** 2).sum(0)
    total = n + k
    d = bmean - mean
    net[f"{j}.mean"] = mean + d * k / total
    net[f"{j}.m2"] = m2 + bm2 + d ** 2 * n * k / total
    net[f"{j}.count"] = total


def _g(net: dict, j: int, u: "torch.Tensor", d: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """(ũ, δ̃) for token rows u (T, d_in), δ (T, d_out)."""
    import torch

    x = torch.cat([u, d], dim=1)
    n = net[f"{j}.count"]
    mean = net[f"{j}.mean"].float()
    std = (net[f"{j}.m2"] / (n - 1).clamp_min(1)).sqrt().float().clamp_min(1e-6) if float(n) > 1 else torch.ones_like(mean)
    z = (x - mean) / std
    h = z + torch.relu(z @ net[f"{j}.A"].t() + net[f"{j}.a"]) @ net[f"{j}.B"].t() + net[f"{j}.b"]
    return h[:, : u.shape[1]], h[:, u.shape[1]:]


def _adam_state(opt: "torch.optim.Optimizer", params: list) -> dict:
    import torch

    out = {}
    for i, p in enumerate(params):
        st = opt.state.get(p)
        if st:
            out[f"adam.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(())
            out[f"adam.{i}.exp_avg"] = st["exp_avg"].detach()
            out[f"adam.{i}.exp_avg_sq"] = st["exp_avg_sq"].detach()
    return out


def _load_adam(opt: "torch.optim.Optimizer", params: list, tensors: dict) -> None:
    import torch

    for i, p in enumerate(params):
        if f"adam.{i}.step" in tensors:
            opt.state[p] = {"step": torch.tensor(float(tensors[f"adam.{i}.step"])),
                            "exp_avg": tensors[f"adam.{i}.exp_avg"].clone(),
                            "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].clone()}


def _order(n: int, options: MendTrainOptions, seed: int):
    """Record indices of step s's batch: a seeded permutation per epoch, so a resumed run sees the
    same batches as an uninterrupted one."""
    import torch

    cache: dict[int, list[int]] = {}

    def batch(step: int) -> list[int]:
        out = []
        for k in range(step * options.batch_size, (step + 1) * options.batch_size):
            epoch, pos = divmod(k, n)
            if epoch not in cache:
                cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
            out.append(cache[epoch][pos])
        return out
    return batch


def _locality(spec: EditSpec, batch: list[EditSpec], k: int) -> tuple[str, str]:
    """The record's locality probe, or another edit of the batch's prompt with its old answer."""
    if spec.neighborhood:
        return spec.neighborhood[0].prompt, spec.neighborhood[0].target
    other = batch[(k + 1) % len(batch)]
    return other.text, other.target_true or other.target_new


# --- model passes ---

def _rows(tokenizer: Any, pairs: list[tuple[str, str]], model: "torch.nn.Module"):
    from kedit.scoring import teacher_forced_batch

    ids, mask, spans = teacher_forced_batch(tokenizer, [p for p, _ in pairs], [t for _, t in pairs])
    device = next(model.parameters()).device
    return ids.to(device), mask.to(device), spans


def _factors(model: "torch.nn.Module", arch: Any, names: list[str], rows) -> dict[str, tuple]:
    """Per edited matrix, the inputs u (T, d_in) and output gradients δ (T, d_out) of the summed
    per-edit mean NLL, over the rows' real tokens."""
    import torch

    from kedit.scoring import target_logprobs

    ids, mask, spans = rows
    inputs: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def fn(_m, args, out):
            inputs[name] = args[0].detach()
            z = torch.zeros_like(out, requires_grad=True)
            outs[name] = z
            return out + z
        return fn

    for name in names:
        handles.append(model.get_submodule(name.removesuffix(".weight")).register_forward_hook(hook(name)))
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = torch.stack([-lp.mean() for lp in target_logprobs(logits, spans)]).sum()
            grads = torch.autograd.grad(loss, [outs[n] for n in names])
    finally:
        for h in handles:
            h.remove()
    live = mask.bool()
    return {n: (inputs[n][live].float(), g[live].float()) for n, g in zip(names, grads)}


def _forward(model: "torch.nn.Module", base: dict, deltas: dict, rows):
    from torch.func import functional_call

    ids, mask, _ = rows
    params = {**base, **{n: base[n] + d for n, d in deltas.items()}}
    return functional_call(model, params, args=(), kwargs={"input_ids": ids, "attention_mask": mask,
                                                           "use_cache": False}).logits


def _nll(model, base, deltas, rows) -> "torch.Tensor":
    import torch

    from kedit.scoring import target_logprobs

    logits = _forward(model, base, deltas, rows)
    return torch.stack([-lp.mean() for lp in target_logprobs(logits, rows[2])]).mean()


def _logprobs(model, base, deltas, rows) -> "torch.Tensor":
    """Log-distributions over the vocabulary at every target position of the rows."""
    import torch

    logits = _forward(model, base, deltas, rows)
    return torch.cat([torch.log_softmax(logits[i, pos].float(), -1) for i, (pos, _) in enumerate(rows[2])])


def _validate(model, tokenizer, arch, names, net, specs: list[EditSpec]) -> dict[str, float]:
    """Single edits of held-out records: token accuracy of the new target on the edit prompt
    (edit success) and its paraphrase, and agreement with the unedited model on the locality probe."""
    import torch

    base = {n: p.detach() for n, p in model.named_parameters()}
    es, ps, loc = [], [], []
    frozen = {k: v.detach() for k, v in net.items()}
    for s in specs:
        factors = _factors(model, arch, names, _rows(tokenizer, [(s.text, s.target_new)], model))
        with torch.no_grad():
            deltas = {}
            for j, name in enumerate(names):
                ut, dt = _g(frozen, j, *factors[name])
                deltas[name] = arch.from_out_in(-frozen[f"{j}.alpha"] * (dt.t() @ ut))
            es.append(_token_acc(model, base, deltas, tokenizer, s.text, s.target_new))
            if s.paraphrases:
                ps.append(_token_acc(model, base, deltas, tokenizer, s.paraphrases[0], s.target_new))
            if s.neighborhood:
                p, t = s.neighborhood[0].prompt, s.neighborhood[0].target
                rows = _rows(tokenizer, [(p, t)], model)
                before = _forward(model, base, {}, rows)[0, rows[2][0][0]].argmax(-1)
                after = _forward(model, base, deltas, rows)[0, rows[2][0][0]].argmax(-1)
                loc.append(float((before == after).float().mean()))
    out = {"edit_success": sum(es) / len(es)}
    if ps:
        out["paraphrase"] = sum(ps) / len(ps)
    if loc:
        out["locality"] = sum(loc) / len(loc)
    return out


def _token_acc(model, base, deltas, tokenizer, prompt: str, target: str) -> float:
    rows = _rows(tokenizer, [(prompt, target)], model)
    pos, toks = rows[2][0]
    pred = _forward(model, base, deltas, rows)[0, pos].argmax(-1).tolist()
    return sum(int(a == b) for a, b in zip(pred, toks)) / len(toks)


@hookimpl
def register_editors(register):
    register(Mend)
