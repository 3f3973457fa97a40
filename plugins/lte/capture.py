"""Reading activations at fact-token positions, with optional weight overrides (never in place)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch.func import functional_call

from kedit.arch import ArchSpec

from . import packed
from .prompts import Row, pad, pad_id


class _Stop(Exception):
    """Raised from the deepest hook: nothing after it is needed."""


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run(model: torch.nn.Module, overrides: Mapping[str, torch.Tensor] | None, ids: torch.Tensor,
        mask: torch.Tensor) -> Any:
    """Forward with some parameters replaced, leaving the model's own parameters untouched."""
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if overrides:
        return functional_call(model, dict(overrides), args=(), kwargs=kwargs, strict=False)
    return model(**kwargs)


@torch.no_grad()
def at_lookup(model: torch.nn.Module, tok: Any, arch: ArchSpec, rows: Sequence[Row], key_layers: Sequence[int] = (),
              block_layers: Sequence[int] = (), mlp_out_layers: Sequence[int] = (),
              overrides: Mapping[str, torch.Tensor] | None = None, batch_size: int = 64,
              fast: bool = True) -> dict[tuple[str, int], torch.Tensor]:
    """Activations at each row's lookup position: packed (:mod:`.packed`) where the block layout
    allows, else in one forward of the model per batch that stops after the deepest layer asked for.

    Returns ``{("key", l): (rows, d_k)}`` (input of layer l's MLP output matrix),
    ``{("block", l): (rows, d)}`` (output of block l) and ``{("mlp_out", l): (rows, d)}``.
    """
    wanted = [("key", l) for l in key_layers] + [("block", l) for l in block_layers] + [("mlp_out", l) for l in mlp_out_layers]
    if fast and packed.supported(model, arch, rows):
        return packed.at_lookup(model, arch, rows, wanted, overrides)
    order = {"key": 0, "mlp_out": 1, "block": 2}  # the order the hooks fire within a layer
    last = max(wanted, key=lambda w: (w[1], order[w[0]]))
    out: dict[tuple[str, int], list[torch.Tensor]] = {w: [] for w in wanted}
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids, mask = pad(chunk, pad_id(tok), device)
        r_idx = torch.arange(len(chunk), device=device)
        look = torch.tensor([r.lookup for r in chunk], device=device)
        handles = []

        def grab(kind: str, layer: int, tensor: torch.Tensor, r_idx=r_idx, look=look) -> None:
            out[(kind, layer)].append(tensor[r_idx, look].detach().double().cpu())
            if (kind, layer) == last:
                raise _Stop

        for kind, layer in wanted:
            if kind == "key":
                mod = model.get_submodule(arch.mlp_out.format(layer))
                handles.append(mod.register_forward_pre_hook(
                    lambda _m, args, k=kind, l=layer: grab(k, l, args[0])))
            else:
                path = arch.mlp_out.format(layer) if kind == "mlp_out" else f"{arch.layers}.{layer}"
                handles.append(model.get_submodule(path).register_forward_hook(
                    lambda _m, _a, o, k=kind, l=layer: grab(k, l, _first(o))))
        with hooks(handles), contextlib.suppress(_Stop):
            run(model, overrides, ids, mask)
    return {w: torch.cat(v) for w, v in out.items()}


def average_by_request(values: torch.Tensor, rows: Sequence[Row], n: int) -> torch.Tensor:
    """Weighted mean (``Row.weight``) over each request's rows: (rows, d) -> (n, d)."""
    idx = torch.tensor([r.request for r in rows])
    w = torch.tensor([r.weight for r in rows], dtype=values.dtype)
    total = torch.zeros(n, values.shape[1], dtype=values.dtype).index_add_(0, idx, values * w.unsqueeze(1))
    norm = torch.zeros(n, dtype=values.dtype).index_add_(0, idx, w).unsqueeze(1)
    return total / norm
