"""The fast path of the v* optimisation for rotary decoder stacks (llama, mistral, qwen2).

δ is added at the fact token at the output of layer L. Under causal attention nothing before the
fact token changes, and nothing at layers ≤ L changes at all. So the prompts run once, keeping
the layer-L output of the fact token and every later position, and every layer's keys/values of
the positions before the fact token; each optimisation step then runs only the fact token and
the positions after it through the layers above L, attending to the cached prefix. Context-
template prefixes are most of each prompt, so most of the work disappears, exactly.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch.func import functional_call

from kedit.arch import ArchSpec

from .capture import _first, hooks
from .prompts import Row, pad

SUPPORTED = {"llama", "mistral", "qwen2"}


class _PrefixKV:
    """Quacks like a transformers Cache for one forward: prepends the frozen prefix keys/values."""

    def __init__(self, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor]):
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return (torch.cat([self.keys[layer_idx], key_states], dim=2),
                torch.cat([self.values[layer_idx], value_states], dim=2))


def supported(model: torch.nn.Module, overrides: Mapping[str, torch.Tensor] | None, arch: ArchSpec, layer: int) -> bool:
    if model.config.model_type not in SUPPORTED or getattr(model.config, "sliding_window", None):
        return False
    prefix = f"{arch.layers}."
    return not any(int(k[len(prefix):].split(".")[0]) > layer for k in (overrides or {}) if k.startswith(prefix))


class SuffixRunner:
    """Final hidden states of the suffix positions (fact token onwards) given a per-row δ."""

    def __init__(self, model: torch.nn.Module, arch: ArchSpec, rows: Sequence[Row], layer: int, pad_id: int,
                 overrides: Mapping[str, torch.Tensor] | None = None):
        device = next(model.parameters()).device
        self.backbone = model.base_model
        self.layer = layer
        ids, mask = pad(rows, pad_id, device)
        look = torch.tensor([r.lookup for r in rows], device=device)
        lengths = torch.tensor([len(r.ids) for r in rows], device=device)
        self.lookup = look
        captured: dict[str, torch.Tensor] = {}
        block = model.get_submodule(f"{arch.layers}.{layer}")
        handle = block.register_forward_hook(lambda _m, _a, o: captured.__setitem__("h", _first(o).detach()))
        prefix = model.base_model_prefix + "."
        inner = {k.removeprefix(prefix): v for k, v in (overrides or {}).items()}
        with torch.no_grad(), hooks([handle]):
            kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": True}
            out = (functional_call(self.backbone, inner, args=(), kwargs=kwargs, strict=False) if inner
                   else self.backbone(**kwargs))
        cache = out.past_key_values
        n_rows = len(rows)
        self.s_len = lengths - look  # suffix lengths
        s_max, p_max = int(self.s_len.max()), int(look.max())
        s_idx = torch.arange(s_max, device=device)
        gather = (look.unsqueeze(1) + s_idx).clamp(max=ids.shape[1] - 1)  # (B, S) positions in the full rows
        self.h0 = captured["h"][torch.arange(n_rows, device=device).unsqueeze(1), gather]  # (B, S, d)
        self.positions = look.unsqueeze(1) + s_idx
        self.keys, self.values = {}, {}
        n_layers = len(model.get_submodule(arch.layers))
        for j in range(layer + 1, n_layers):
            cl = cache.layers[j] if hasattr(cache, "layers") else None
            k, v = (cl.keys, cl.values) if cl is not None else cache[j]
            self.keys[j], self.values[j] = k[:, :, :p_max].detach(), v[:, :, :p_max].detach()
        p_ok = torch.arange(p_max, device=device).unsqueeze(0) < look.unsqueeze(1)  # (B, P)
        causal = s_idx.unsqueeze(0) <= s_idx.unsqueeze(1)  # (S_q, S_k)
        s_ok = causal.unsqueeze(0) & (s_idx.unsqueeze(0) < self.s_len.unsqueeze(1)).unsqueeze(1)  # (B, S_q, S_k)
        s_ok = s_ok | torch.eye(s_max, dtype=torch.bool, device=device).unsqueeze(0)  # padded queries see themselves
        self.mask = torch.cat([p_ok.unsqueeze(1).expand(-1, s_max, -1), s_ok], dim=2).unsqueeze(1)
        self.layers = [model.get_submodule(f"{arch.layers}.{j}") for j in range(layer + 1, n_layers)]
        self.pe = self.backbone.rotary_emb(self.h0, self.positions)
        self.rows = torch.arange(n_rows, device=device)

    def hidden(self, delta_rows: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states (B, S, d) of the suffix positions with ``delta_rows`` (B, d) added at
        the fact token (suffix position 0) of the layer-L output."""
        h = self.h0.index_put((self.rows, torch.zeros_like(self.rows)), self.h0[:, 0] + delta_rows.to(self.h0.dtype))
        cache = _PrefixKV(self.keys, self.values)
        for block in self.layers:
            h = _first(block(h, attention_mask=self.mask, position_ids=self.positions, past_key_values=cache,
                             position_embeddings=self.pe))
        return self.backbone.norm(h)

    def suffix_index(self, rows: Sequence[Row], row: int, position: int) -> int:
        return position - rows[row].lookup
