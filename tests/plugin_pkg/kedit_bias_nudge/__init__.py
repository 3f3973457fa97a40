"""``nudge``: a rank-one edit of one MLP output matrix, the worked example of docs/writing-a-plugin.md.

For each spec, let k be the input of the layer's MLP output matrix W at the last prompt token
and d the unit unembedding (lm_head) row of the first token of `` target_new``. Adding
``scale * outer(d, k) / ||k||^2`` to W (in the (d_out, d_in) layout) adds exactly ``scale * d`` to
the residual stream at that token, which raises the logit of the new target.
"""
from __future__ import annotations

from pydantic import Field

# Everything a plugin needs comes from kedit.api. What needs torch (torch itself, the delta
# encodings, the tokenization helpers) is imported inside the methods that use it, so that
# `kedit --help` and `kedit editors` stay fast with the plugin installed.
from kedit.api import Editor, Options, hookimpl, resolve_layer


class NudgeOptions(Options):  # extra="forbid": a mistyped `-o` key is an error
    layer: int = Field(-1, description="layer whose MLP output matrix is edited (negative counts from the end)")
    scale: float = Field(5.0, description="length of the push added to the residual stream at the last prompt token")


class Nudge(Editor):
    """Rank-one push of the residual stream toward the new target's unembedding."""

    name = "nudge"
    Options = NudgeOptions

    def resolve(self, options, model):
        # Options left to the model (here: a negative layer index) are resolved once by the host,
        # and the diff's manifest records the resolved values.
        return options.model_copy(update={"layer": resolve_layer(options.layer, model.config)})

    def edit(self, model, tokenizer, specs, options, context):
        import torch

        with torch.no_grad():
            return self._edit(model, tokenizer, specs, options, context)

    def _edit(self, model, tokenizer, specs, options, context):
        import torch

        from kedit.api import LowRank, target_ids

        layer = options.layer
        pname = context.arch.mlp_out_weight(layer)  # e.g. "transformer.h.3.mlp.c_proj.weight"
        module = model.get_submodule(pname.removesuffix(".weight"))
        d_out, d_in = context.arch.to_out_in(model.get_parameter(pname)).shape
        unembed = model.get_output_embeddings().weight  # (vocab, hidden), tied or not
        device = next(model.parameters()).device

        keys = []  # a forward pre-hook only *reads* the matrix's input; the weights are untouched
        handle = module.register_forward_pre_hook(lambda _m, args: keys.append(args[0][0, -1].detach()))
        us, vs = [], []
        try:
            for spec in specs:
                keys.clear()
                ids = tokenizer(spec.text, return_tensors="pt")["input_ids"].to(device)
                model(input_ids=ids)
                k = keys[0].double()  # (d_in,)
                d = unembed[target_ids(tokenizer, spec.target_new)[0]].double()
                us.append(options.scale * d / d.norm())  # column of u: (d_out,)
                vs.append(k / k.dot(k))  # row of v: (d_in,), so (u v) k = scale * d
        finally:
            handle.remove()  # never leave hooks behind on the caller's model

        u = torch.stack(us, dim=1).float().cpu()  # (d_out, n): one rank-one term per spec
        v = torch.stack(vs, dim=0).float().cpu()  # (n, d_in)
        assert u.shape[0] == d_out and v.shape[1] == d_in
        # Deltas are in the *stored* layout. GPT-2's Conv1D stores W as (d_in, d_out), so the delta
        # is (u v)^T = v^T u^T; for dense deltas `context.arch.from_out_in(u @ v)` does the same.
        if context.arch.transposed:
            u, v = v.T, u.T
        return {pname: LowRank(u.contiguous(), v.contiguous())}


@hookimpl
def register_editors(register):
    register(Nudge)
