"""``kn``: knowledge neurons (Dai et al., ACL 2022), the editing baseline of ROME and RECT.

1. **Attribution.** For every MLP intermediate neuron (the input of each layer's MLP output
   matrix: ``act(gate) * up`` in a gated MLP, ``gelu(fc)`` in GPT-2) the integrated gradient of
   the probability of the fact's current answer, at the position that predicts each answer
   token: the neuron's activation a is scaled by α = 0, 1/(m-1), …, 1 (m = ``steps``), the
   gradients of P(answer token) are summed and multiplied by a / m, and the scores are averaged
   over the answer's tokens. The answer is ``target_true`` when the spec has one, else the
   unedited model's greedy continuation. Only the scaled position changes, so each prompt
   prefix runs once and the Riemann steps run as a batch of single tokens against its cache.
2. **Selection.** Per prompt, the neurons scoring above ``adaptive_threshold`` × that prompt's
   largest score (coarse neurons); across prompts, those coarse in more than ``p`` of them. The
   prompts are the edit prompt alone (``prompts=edit``, the default: how ROME's and EasyEdit's
   baselines, and so the RECT paper, run KN; agreement is then trivially met), or the edit prompt
   filled into the six context templates (``prompts=templates``: the paper's several phrasings of
   one fact, without the spec's paraphrases, which evaluation uses; six times the cost).
3. **Edit.** Each selected neuron's value vector (its column of the MLP output matrix) gains
   ``scale`` × the input embedding of the new target and loses ``scale`` × that of the unedited
   model's greedy answer; for a target of several tokens each token's embedding is added once
   (the reference code's rule). The delta is sparse: only those columns change.

The reference attributes the *gate* projection's output on Llama models; kedit attributes the
true intermediate activation, the vector the MLP output matrix reads, on every architecture.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from kedit.api import EditContext, Editor, EditSpec, InputError, Options, hookimpl, num_layers, resolve_layer

if TYPE_CHECKING:
    import torch

    from kedit.delta import Sparse

TEMPLATE_GROUPS = ((10, 5),)


class KNOptions(Options):
    layers: list[int] | None = Field(None, description="layers whose neurons are attributed; default: all")
    steps: int = Field(20, ge=2, description="Riemann steps of the integrated gradients (α from 0 to 1)")
    batch_size: int = Field(160, ge=1, description="single-token rows per forward pass (steps × layers are batched)")
    adaptive_threshold: float = Field(
        0.2, gt=0, le=1, description="coarse neurons: attribution above this share of the prompt's largest")
    p: float = Field(0.4, ge=0, lt=1, description="keep neurons coarse in more than this share of the prompts")
    prompts: Literal["edit", "templates"] = Field(
        "edit", description="edit: the edit prompt alone (as ROME's and EasyEdit's baselines); templates: the edit "
                            "prompt in the six context templates, so that prompt agreement p selects (6x the cost)")
    scale: float = Field(2.0, gt=0, description="multiple of a one-token target's embedding added to each neuron")
    max_neurons: int | None = Field(
        None, ge=1, description="keep at most this many neurons per edit, the highest mean attribution first")


class KN(Editor):
    """Knowledge neurons: integrated-gradient attribution, then the selected value vectors moved."""

    name = "kn"
    Options = KNOptions

    def resolve(self, options: KNOptions, model: "torch.nn.Module") -> KNOptions:
        n = num_layers(model.config)
        layers = list(range(n)) if options.layers is None else sorted({resolve_layer(x, model.config)
                                                                       for x in options.layers})
        return options.model_copy(update={"layers": layers})

    def edit(self, model: "torch.nn.Module", tokenizer: Any, specs: list[EditSpec],
             options: KNOptions, context: EditContext) -> dict[str, "Sparse"]:
        arch = context.arch
        emb = model.get_input_embeddings().weight.detach()
        columns: dict[int, dict[int, torch.Tensor]] = {}  # layer -> neuron -> change of its value vector
        selected: list[int] = []
        templates = ["{}"]
        if options.prompts == "templates":
            from kedit_plugins.lte.prompts import context_templates

            with context.at_base():
                templates = context_templates(model, tokenizer, TEMPLATE_GROUPS, seed=context.seed)
        for spec in context.progress(specs, desc="kn", unit="edit"):
            new = _target_ids(tokenizer, spec.target_new)
            prompt = spec.text
            old = _greedy(model, tokenizer, prompt, len(new))
            answer = _target_ids(tokenizer, spec.target_true) if spec.target_true else old
            scores = [attribute(model, tokenizer, arch, t.replace("{}", prompt), answer, options)
                      for t in templates]
            neurons = select(scores, options.adaptive_threshold, options.p, options.max_neurons)
            if not neurons:
                # all attributions <= 0 (a model that gives the answer no probability to attribute,
                # e.g. one broken by earlier edits): there is no neuron to move, so no edit to make
                import torch

                from kedit.errors import KeditError

                top = max(float(torch.nan_to_num(s, nan=float("-inf")).max()) for s in scores)
                raise KeditError(f"kn: no neuron passes the selection for edit {spec.id or prompt!r} (largest "
                                 f"attribution {top:.3g}; a neuron must score above adaptive_threshold × the "
                                 f"largest, which needs a positive largest): the edit cannot be made")
            selected.append(len(neurons))
            if len(new) == 1:
                change = options.scale * (emb[new[0]].double() - emb[old[0]].double())
            else:
                change = emb[new].double().sum(0) - emb[old].double().sum(0)
            for li, i in neurons:
                layer = options.layers[li]
                col = columns.setdefault(layer, {})
                col[i] = col.get(i, 0) + change
        context.report["kn"] = {"neurons_per_edit": selected}
        return {arch.mlp_out_weight(layer): _sparse(model, arch, layer, cols) for layer, cols in sorted(columns.items())}


def _target_ids(tokenizer: Any, text: str) -> list[int]:
    from kedit.scoring import target_ids

    ids = target_ids(tokenizer, text)
    if not ids:
        raise InputError(f"target {text!r} tokenizes to nothing")
    return ids


def _greedy(model: "torch.nn.Module", tokenizer: Any, prompt: str, n: int) -> list[int]:
    """The unedited model's greedy continuation of ``prompt``, ``n`` tokens."""
    import torch

    from kedit.scoring import prompt_ids

    ids = prompt_ids(tokenizer, prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out], device=model.device)).logits[0, -1]
            out.append(int(logits.argmax()))
    return out


def attribute(model: "torch.nn.Module", tokenizer: Any, arch: Any, prompt: str, answer: list[int],
              options: KNOptions) -> "torch.Tensor":
    """Integrated-gradient scores (len(layers), d_ff) of P(answer) for ``prompt``, averaged over
    the answer's tokens (teacher-forced)."""
    import torch

    from kedit.scoring import prompt_ids

    ids = prompt_ids(tokenizer, prompt)
    device = model.device
    m = options.steps
    alphas = torch.linspace(0, 1, m, device=device)
    layers = options.layers
    per_chunk = max(1, options.batch_size // m)
    total = None
    for j, tok in enumerate(answer):
        seq = ids + answer[:j]
        prefix, last = seq[:-1], seq[-1]
        cache = None
        with torch.no_grad():
            if prefix:
                cache = model(torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1).cache
        rows = []
        for c in range(0, len(layers), per_chunk):
            chunk = layers[c:c + per_chunk]
            rows.append(_ig_chunk(model, arch, cache, last, tok, chunk, alphas))
        scores = torch.cat(rows)
        total = scores if total is None else total + scores
    return total / len(answer)


def _ig_chunk(model: "torch.nn.Module", arch: Any, cache: Any, last: int, answer_tok: int,
              layers: list[int], alphas: "torch.Tensor") -> "torch.Tensor":
    """IG scores for ``layers`` at one position: block b of the batch scales layer ``layers[b]``'s
    activation by ``alphas``; every other layer of that block runs unchanged."""
    import torch

    m = len(alphas)
    b = len(layers) * m
    leaves: dict[int, torch.Tensor] = {}
    base: dict[int, torch.Tensor] = {}

    def pre_hook(layer: int, block: int):
        def hook(_module, args):
            x = args[0]  # (b, 1, d_ff)
            a = x[block * m].detach()  # α = 0 row holds the unchanged activation too: lower layers are unscaled
            leaf = (alphas[:, None, None].to(a.dtype) * a).requires_grad_(True)
            base[layer], leaves[layer] = a[0], leaf
            x = torch.cat([x[:block * m], leaf, x[(block + 1) * m:]])
            return (x, *args[1:])
        return hook

    handles = [model.get_submodule(arch.mlp_out.format(layer)).register_forward_pre_hook(pre_hook(layer, k))
               for k, layer in enumerate(layers)]
    try:
        kv = None
        if cache is not None:
            kv = copy.deepcopy(cache)
            kv.batch_repeat_interleave(b)
        with torch.enable_grad():
            logits = model(torch.full((b, 1), last, device=alphas.device), cache=kv, use_cache=kv is not None).logits
            prob = torch.softmax(logits[:, -1].float(), dim=-1)[:, answer_tok]
            grads = torch.autograd.grad(prob.sum(), [leaves[layer] for layer in layers])
    finally:
        for h in handles:
            h.remove()
    return torch.stack([g[:, 0].double().sum(0) * base[layer].double() / m for g, layer in zip(grads, layers)])


def select(scores: list["torch.Tensor"], adaptive_threshold: float, p: float,
           max_neurons: int | None = None) -> list[tuple[int, int]]:
    """(layer index, neuron) pairs coarse in more than ``p`` of the prompts, by falling mean score."""
    import torch

    counts = torch.zeros_like(scores[0], dtype=torch.long)
    for s in scores:
        counts += (s > adaptive_threshold * s.max()).long()
    keep = counts > p * len(scores)
    mean = torch.stack(scores).mean(0)
    idx = torch.nonzero(keep)
    order = torch.argsort(mean[keep], descending=True, stable=True)
    idx = idx[order][: max_neurons]
    return [(int(li), int(i)) for li, i in idx]


def _sparse(model: "torch.nn.Module", arch: Any, layer: int, cols: dict[int, "torch.Tensor"]) -> "Sparse":
    """The changed value vectors as a sparse delta in the weight's stored layout."""
    import torch

    from kedit.delta import Sparse, index_dtype

    shape = tuple(model.get_parameter(arch.mlp_out_weight(layer)).shape)
    neurons = sorted(cols)
    vals = torch.stack([cols[i] for i in neurons]).float()  # (k, d_model)
    d_model = vals.shape[1]
    n = torch.tensor(neurons, dtype=torch.long)
    r = torch.arange(d_model, dtype=torch.long)
    # (d_ff, d_model) stored: neuron i is row i; (d_model, d_ff): neuron i is column i
    flat = n[:, None] * shape[1] + r[None, :] if arch.transposed else r[None, :] * shape[1] + n[:, None]
    flat, v = flat.reshape(-1), vals.reshape(-1)
    order = torch.argsort(flat)
    size = shape[0] * shape[1]
    return Sparse(idx=flat[order].to(index_dtype(size)), val=v[order].contiguous(), shape=shape)


@hookimpl
def register_editors(register):
    register(KN)
