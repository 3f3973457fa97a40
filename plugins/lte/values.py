"""Target values v* (ROME) / z (MEMIT family): optimise a vector δ per request, added at the fact
token of the edit site, so that the model predicts the new target (ROME's v*, Meng et al. 2022,
which MEMIT reuses).

All requests are optimised together in one batched loop: the losses are separable, each request
has its own δ row, and early stop and the norm clamp are applied per request (a finished
request's δ is frozen, Adam's momentum included). Vocabulary logits are computed only at the
target positions and the KL positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from torch.func import functional_call

from kedit.arch import ArchSpec
from kedit.spec import EditSpec

from . import packed
from .capture import _first, hooks
from .options import ROTARY, ValueOptions, default_weight_decay  # noqa: F401  (re-exported)
from .prompts import Row, fact_row, kl_row, pad, pad_id


@dataclass
class Values:
    z: torch.Tensor  # (n, d) float64: v_init + δ
    v_init: torch.Tensor  # (n, d) float64
    steps: list[int]  # steps each request ran
    nll: list[float]  # final NLL of the new target, per request
    stopped: list[str]  # why each request stopped: "loss", "most-probable" or "steps"

    def report(self) -> dict:
        """What a diff's manifest records about the targets: how hard they were optimised."""
        ratio = ((self.z - self.v_init).norm(dim=1) / self.v_init.norm(dim=1).clamp_min(1e-12)).tolist()
        return {"requests": len(self.steps), "steps_mean": sum(self.steps) / max(len(self.steps), 1),
                "steps_max": max(self.steps, default=0),
                "delta_ratio_mean": sum(ratio) / max(len(ratio), 1), "delta_ratio_max": max(ratio, default=0.0),
                "stopped": {k: self.stopped.count(k) for k in sorted(set(self.stopped))}}


def _site_module(model: torch.nn.Module, arch: ArchSpec, site: str, layer: int) -> torch.nn.Module:
    path = arch.mlp_out.format(layer) if site == "mlp_out" else f"{arch.layers}.{layer}"
    return model.get_submodule(path)


def optimize(model: torch.nn.Module, tok: Any, arch: ArchSpec, specs: Sequence[EditSpec], templates: Sequence[str],
             site: Literal["block", "mlp_out"], layer: int, opts: ValueOptions,
             average_init: bool = False, overrides: dict[str, torch.Tensor] | None = None,
             progress: Callable[..., Any] = lambda x, **_: x, fast: bool = True) -> Values:
    """Optimise one δ per spec at ``site`` of ``layer``; ``average_init`` takes v_init as the mean
    over the templates (r-ROME) instead of the plain prompt's value; ``fast`` uses the exact
    packed suffix-only forward (:mod:`.packed`) where the architecture allows it.

    With ``opts.v_chunk`` the requests run ``v_chunk`` at a time: the losses are separable and
    Adam is elementwise, so this is the same optimisation with a fraction of the memory (the
    activations kept for the backward pass grow with the requests in flight); only the float32
    rounding of the batched products can differ. The chunks are also the unit that ranks share
    under torch.distributed, so there the result is the one process's, bit for bit."""
    from kedit.distributed import gather, my_share

    chunk = opts.v_chunk or len(specs)
    starts = list(range(0, len(specs), chunk))
    if len(starts) <= 1:
        return _optimize(model, tok, arch, specs, templates, site, layer, opts, average_init, overrides, progress, fast)
    # under torchrun each rank optimises every size-th chunk; one process computes them all alike
    mine = {u: _optimize(model, tok, arch, specs[starts[u]:starts[u] + chunk], templates, site, layer, opts,
                         average_init, overrides, progress, fast) for u in my_share(len(starts))}
    parts = gather(mine, len(starts))
    return Values(torch.cat([p.z for p in parts]), torch.cat([p.v_init for p in parts]),
                  [x for p in parts for x in p.steps], [x for p in parts for x in p.nll],
                  [x for p in parts for x in p.stopped])


def _optimize(model: torch.nn.Module, tok: Any, arch: ArchSpec, specs: Sequence[EditSpec], templates: Sequence[str],
              site: Literal["block", "mlp_out"], layer: int, opts: ValueOptions, average_init: bool,
              overrides: dict[str, torch.Tensor] | None, progress: Callable[..., Any], fast: bool) -> Values:
    n = len(specs)
    device = next(model.parameters()).device
    rows: list[Row] = []
    for i, spec in enumerate(specs):
        rows += [fact_row(tok, t, spec, i, with_target=True) for t in templates]
    n_fact = len(rows)
    rows += [kl_row(tok, spec, i) for i, spec in enumerate(specs)]
    row_req = torch.tensor([r.request for r in rows], device=device)
    row_look = torch.tensor([r.lookup for r in rows], device=device)
    plain = torch.tensor([i * len(templates) for i in range(n)], device=device)  # template "{}" comes first

    sel = [(j, p, t) for j, r in enumerate(rows[:n_fact]) for p, t in zip(r.target_pos, r.targets)]
    sel_row = torch.tensor([s[0] for s in sel], device=device)
    sel_pos = torch.tensor([s[1] for s in sel], device=device)
    sel_tok = torch.tensor([s[2] for s in sel], device=device)
    # weight of each target token in its request's mean NLL: 1/len(target) per row, 1/rows per request
    sel_w = torch.tensor([1.0 / len(rows[j].targets) / len(templates) for j, _, _ in sel], device=device)
    sel_req = row_req[sel_row]
    kl_rows = torch.arange(n_fact, len(rows), device=device)  # request i's KL row is n_fact + i

    weight_decay = opts.v_weight_decay
    if weight_decay is None:
        weight_decay = default_weight_decay(model.config)
    d = model.config.hidden_size
    delta = torch.zeros(n, d, device=device, requires_grad=True)
    if fast and packed.supported(model, arch, rows):
        runner = packed.ValueRunner(model, arch, rows, layer, overrides)
        init_rows = runner.site[site]

        def final_hidden(delta_req, active):
            """Final hidden states at the selected targets and KL positions of the active requests only."""
            act_rows = torch.nonzero(active[row_req]).squeeze(1)
            offset = runner.plan(act_rows)
            s = active[sel_req]
            need_sel = offset[sel_row[s]] + sel_pos[s] - row_look[sel_row[s]]
            h = runner.hidden(delta_req[row_req[act_rows]], act_rows, torch.cat([need_sel, offset[kl_rows[active]]]))
            return h[: len(need_sel)], h[len(need_sel):]
    else:
        init_rows, final_hidden = _full_forward(model, tok, arch, rows, site, layer, overrides, sel_row, sel_pos,
                                                kl_rows, row_req)

    if average_init:
        v_init = torch.zeros(n, d, dtype=torch.float64, device=device).index_add_(
            0, row_req[:n_fact], init_rows[:n_fact]) / len(templates)
    else:
        v_init = init_rows[plain]
    v_norm = v_init.norm(dim=1).float()

    unembed = model.get_output_embeddings()
    opt = torch.optim.Adam([delta], lr=opts.v_lr)
    active = torch.ones(n, dtype=torch.bool, device=device)
    steps = [0] * n
    stopped = ["steps"] * n
    init_kl: torch.Tensor | None = None
    nll_req = torch.zeros(n, device=device)
    for step in progress(range(opts.v_steps), desc=f"v* layer {layer}", unit="step"):
        # finished requests are frozen and no longer run at all
        s_mask, act = active[sel_req], torch.nonzero(active).squeeze(1)
        h_sel, h_kl = final_hidden(delta, active)
        logp = torch.log_softmax(unembed(h_sel).float(), dim=-1)
        tok_lp = logp[torch.arange(len(h_sel), device=device), sel_tok[s_mask]]
        nll = torch.zeros(n, device=device).index_add(0, sel_req[s_mask], -tok_lp * sel_w[s_mask])
        kl_logp = torch.log_softmax(unembed(h_kl).float(), dim=-1)
        if init_kl is None:
            init_kl = kl_logp.detach()
        kl = torch.zeros(n, device=device).index_put((act,), (kl_logp.exp() * (kl_logp - init_kl[act])).sum(dim=1))
        wd = weight_decay * delta.norm(dim=1) / v_norm**2
        loss = nll + opts.kl_factor * kl + wd
        nll_req[act] = nll.detach()[act]
        for i in act.tolist():
            steps[i] = step + 1
        by_loss = active & (loss.detach() < opts.early_stop_loss)
        top = torch.zeros_like(active)
        if opts.stop_at_most_probable:  # every target token of every template is already the argmax
            miss = (logp.argmax(dim=-1) != sel_tok[s_mask]).to(logp.dtype)
            misses = torch.zeros(n, device=device, dtype=logp.dtype).index_add(0, sel_req[s_mask], miss)
            top = active & (misses == 0) & ~by_loss
        for why, mask in (("loss", by_loss), ("most-probable", top)):
            for i in torch.nonzero(mask).squeeze(1).tolist():
                stopped[i] = why
        active &= ~(by_loss | top)
        if not bool(active.any()) or step == opts.v_steps - 1:
            break
        (grad,) = torch.autograd.grad((loss * active).sum(), [delta])
        frozen = delta.detach()[~active].clone()
        delta.grad = grad
        opt.step()
        with torch.no_grad():
            delta[~active] = frozen
            limit = opts.clamp_norm_factor * v_norm
            norms = delta.norm(dim=1).clamp_min(1e-12)
            delta.mul_(torch.clamp(limit / norms, max=1.0).unsqueeze(1))
    z = v_init + delta.detach().double()
    return Values(z.cpu(), v_init.cpu(), steps, nll_req.cpu().tolist(), stopped)


def _full_forward(model, tok, arch, rows, site, layer, overrides, sel_row, sel_pos, kl_rows, row_req):
    """The reference path for any architecture: the whole padded batch through the model's own
    forward, with δ added by a hook."""
    device = next(model.parameters()).device
    ids, mask = pad(rows, pad_id(tok), device)
    all_rows = torch.arange(len(rows), device=device)
    row_look = torch.tensor([r.lookup for r in rows], device=device)
    site_module = _site_module(model, arch, site, layer)
    captured: dict[str, torch.Tensor] = {}
    holder: dict[str, torch.Tensor] = {}

    def add_delta(_m, _args, out):
        h = _first(out)
        captured.setdefault("init", h[all_rows, row_look].detach().double())
        h = h.index_put((all_rows, row_look), h[all_rows, row_look] + holder["rows"].to(h.dtype))
        return (h, *out[1:]) if isinstance(out, tuple) else h

    backbone = model.base_model
    prefix = model.base_model_prefix + "."
    inner = {k.removeprefix(prefix): v for k, v in (overrides or {}).items()}

    def final_hidden(delta_req, active):
        holder["rows"] = delta_req[row_req]
        handle = site_module.register_forward_hook(add_delta)
        with hooks([handle]):
            kwargs = {"input_ids": ids, "attention_mask": mask}
            out = (functional_call(backbone, inner, args=(), kwargs=kwargs, strict=False) if inner
                   else backbone(**kwargs))
        h = out.last_hidden_state
        s = active[row_req[sel_row]]
        return h[sel_row[s], sel_pos[s]], h[kl_rows[active], row_look[kl_rows[active]]]

    with torch.no_grad():
        final_hidden(torch.zeros(int(row_req.max()) + 1, model.config.hidden_size, device=device),
                     torch.ones(int(row_req.max()) + 1, dtype=torch.bool, device=device))
    return captured["init"], final_hidden
