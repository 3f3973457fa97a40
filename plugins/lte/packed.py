"""Packed forward of rotary decoder blocks (``ArchSpec.block == "llama"``: llama, mistral, qwen2),
written out from their math so that three exact savings are possible:

- **Packing.** The linear layers, nearly all of the FLOPs, run on the real tokens only; attention
  runs per row on a padded gather, which costs little at these lengths.
- **Shared heads.** Rows filled into the same context template start with the same tokens. Their
  keys/values are computed once per template (the longest common prefix of the template's rows,
  cut before the earliest fact token) and every row attends to its template's copy.
- **Suffix only** (:class:`ValueRunner`). δ is added at the fact token of layer L's output, so no
  earlier position and no layer ≤ L changes. The prompts run once; each optimisation step runs
  only the fact token and the positions after it through the layers above L, against the cached
  keys/values of the positions before it.

Tests compare every path with the model's own forward (values and gradients).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from kedit.arch import ArchSpec, num_layers

from .prompts import Row

BLOCKS = {"llama"}


def supported(model: torch.nn.Module, arch: ArchSpec, rows: Sequence[Row] = ()) -> bool:
    """Whether the packed path is exact for this model: a known block layout, and no sliding
    window shorter than the rows."""
    if arch.block not in BLOCKS:
        return False
    config = model.config
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    longest = max((len(r.ids) for r in rows), default=0)
    return window is None or window > longest


@dataclass
class Layout:
    """Where each live token sits: row ``row[t]``, slot ``slot[t]`` among that row's live tokens,
    absolute position ``pos[t]``; tokens are stored row-major."""

    row: torch.Tensor
    slot: torch.Tensor
    pos: torch.Tensor
    lens: torch.Tensor
    width: int

    @staticmethod
    def spans(starts: Sequence[int], ends: Sequence[int], device: torch.device | str = "cpu") -> "Layout":
        """Row b's live tokens are its positions ``starts[b] .. ends[b] - 1``."""
        lens = [max(0, e - s) for s, e in zip(starts, ends)]
        row = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens, dtype=torch.long))
        offsets = torch.tensor([0] + lens[:-1], dtype=torch.long).cumsum(0)
        slot = torch.arange(int(sum(lens))) - offsets[row]
        pos = torch.tensor(starts, dtype=torch.long)[row] + slot
        return Layout(row.to(device), slot.to(device), pos.to(device), torch.tensor(lens, device=device),
                      max(lens, default=0))

    @property
    def n_rows(self) -> int:
        return len(self.lens)

    def keep(self, mask: torch.Tensor) -> "Layout":
        """The tokens where ``mask`` holds; they must be a leading part of each row's live tokens."""
        lens = torch.bincount(self.row[mask], minlength=self.n_rows)
        return Layout(self.row[mask], self.slot[mask], self.pos[mask], lens, int(lens.max()) if len(lens) else 0)

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """(T, ...) packed -> (B, width, ...) padded with zeros."""
        out = t.new_zeros(self.n_rows, self.width, *t.shape[1:])
        return out.index_put((self.row, self.slot), t)

    def self_mask(self) -> torch.Tensor:
        """(B, S, S): causal among each row's live tokens; padded queries see themselves, so no
        softmax row is empty."""
        s = torch.arange(self.width, device=self.lens.device)
        causal = (s.unsqueeze(0) <= s.unsqueeze(1)).unsqueeze(0) & (s < self.lens.unsqueeze(1)).unsqueeze(1)
        return causal | torch.eye(self.width, dtype=torch.bool, device=s.device).unsqueeze(0)


@dataclass
class Prefix:
    """Cached keys/values each row attends to before its live tokens: (B, kv_heads, P, head_dim)
    and the valid length per row."""

    k: torch.Tensor
    v: torch.Tensor
    length: torch.Tensor

    def rows(self, idx: torch.Tensor) -> "Prefix":
        return Prefix(self.k[idx], self.v[idx], self.length[idx])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Stack:
    """One model's decoder stack, with some parameters optionally replaced (never in place)."""

    def __init__(self, model: torch.nn.Module, arch: ArchSpec, overrides: Mapping[str, torch.Tensor] | None = None):
        from transformers.activations import ACT2FN

        config = model.config
        self.arch = arch
        self.p = {n: t.detach() for n, t in model.named_parameters()}
        self.p.update({n: t.detach() for n, t in (overrides or {}).items()})
        self.n_layers = num_layers(config)
        self.nh = config.num_attention_heads
        self.kvh = getattr(config, "num_key_value_heads", None) or self.nh
        self.dh = getattr(config, "head_dim", None) or config.hidden_size // self.nh
        self.eps = config.rms_norm_eps
        self.act = ACT2FN[config.hidden_act]
        block0 = model.get_submodule(f"{arch.layers}.0")
        self.scaling = getattr(block0.self_attn, "scaling", self.dh ** -0.5)
        self.rotary = model.base_model.rotary_emb
        self.embedding = model.get_input_embeddings()
        self.device = next(model.parameters()).device

    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.p[name + ".weight"], self.p.get(name + ".bias"))

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.p[name] * h.to(x.dtype)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, self.arch.final_norm + ".weight")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)

    def rope(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(x, pos.unsqueeze(0))
        return cos[0].unsqueeze(1), sin[0].unsqueeze(1)

    def _attend(self, q, k, v, lay: Layout, prefix: Prefix | None) -> torch.Tensor:
        b, s, rep = lay.n_rows, lay.width, self.nh // self.kvh
        # query head h uses key/value head h // rep: group the queries by key/value head
        qq = lay.pad(q).view(b, s, self.kvh, rep, self.dh).permute(0, 2, 3, 1, 4).reshape(b, self.kvh, rep * s, self.dh)
        kk, vv = lay.pad(k).transpose(1, 2), lay.pad(v).transpose(1, 2)
        mask = lay.self_mask()
        if prefix is not None:
            p = prefix.k.shape[2]
            kk, vv = torch.cat([prefix.k, kk], 2), torch.cat([prefix.v, vv], 2)
            seen = (torch.arange(p, device=mask.device) < prefix.length.unsqueeze(1)).unsqueeze(1)
            mask = torch.cat([seen.expand(b, s, p), mask], 2)
        out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask.repeat(1, rep, 1).unsqueeze(1),
                                             scale=self.scaling)
        out = out.view(b, self.kvh, rep, s, self.dh).permute(0, 3, 1, 2, 4).reshape(b, s, self.nh * self.dh)
        return out[lay.row, lay.slot]

    def layer(self, j: int, x: torch.Tensor, lay: Layout, rope, prefix: Prefix | None = None,
              keep: torch.Tensor | None = None):
        """Block ``j`` on packed tokens: (new x, (k, v) of the live tokens, MLP key, MLP output).
        With ``keep`` (token indices), only those tokens go on after attention: the last layer
        needs every token's keys/values but only the outputs that are read."""
        pre = f"{self.arch.layers}.{j}."
        h = self._norm(x, pre + "input_layernorm.weight")
        q = self._lin(h, pre + "self_attn.q_proj").view(-1, self.nh, self.dh)
        k = self._lin(h, pre + "self_attn.k_proj").view(-1, self.kvh, self.dh)
        v = self._lin(h, pre + "self_attn.v_proj").view(-1, self.kvh, self.dh)
        cos, sin = rope
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        a = self._attend(q, k, v, lay, prefix)
        if keep is not None:
            x, a = x[keep], a[keep]
        x = x + self._lin(a, pre + "self_attn.o_proj")
        h = self._norm(x, pre + "post_attention_layernorm.weight")
        key = self.act(self._lin(h, pre + "mlp.gate_proj")) * self._lin(h, pre + "mlp.up_proj")
        out = self._lin(key, pre + "mlp.down_proj")
        return x + out, (k, v), key, out


@dataclass
class _Heads:
    group: torch.Tensor  # (B,) the row's template group
    length: torch.Tensor  # (B,) tokens of the row covered by its group's head
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, (G, kv_heads, H, head_dim)

    def prefix(self, j: int) -> Prefix | None:
        if not self.kv:
            return None
        k, v = self.kv[j]
        return Prefix(k[self.group], v[self.group], self.length)


def _shared_heads(stack: Stack, rows: Sequence[Row], upto: int) -> _Heads:
    """Group rows by their template head; a group's shared tokens are the longest common prefix
    of its rows' ids, cut at the earliest fact token. Their keys/values run once per group."""
    groups: dict[str, list[int]] = {}
    for b, r in enumerate(rows):
        groups.setdefault(r.head, []).append(b)
    heads, group, length = [], [0] * len(rows), [0] * len(rows)
    for members in groups.values():
        first = rows[members[0]].ids
        n = min(rows[b].lookup for b in members)
        for b in members[1:]:
            ids = rows[b].ids
            m = 0
            while m < n and ids[m] == first[m]:
                m += 1
            n = m
        if n == 0:
            continue
        for b in members:
            group[b], length[b] = len(heads), n
        heads.append(first[:n])
    dev = stack.device
    kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    if heads:
        lay = Layout.spans([0] * len(heads), [len(h) for h in heads], dev)
        x = stack.embed(torch.tensor([t for h in heads for t in h], device=dev))
        rope = stack.rope(x, lay.pos)
        for j in range(upto + 1):
            x, (k, v), _, _ = stack.layer(j, x, lay, rope)
            kv.append((lay.pad(k).transpose(1, 2), lay.pad(v).transpose(1, 2)))
    return _Heads(torch.tensor(group, device=dev), torch.tensor(length, device=dev), kv)


def _live(stack: Stack, rows: Sequence[Row], starts: Sequence[int], ends: Sequence[int]):
    lay = Layout.spans(starts, ends, stack.device)
    ids = torch.tensor([t for r, s, e in zip(rows, starts, ends) for t in r.ids[s:e]], dtype=torch.long,
                       device=stack.device)
    x = stack.embed(ids)
    return lay, x, stack.rope(x, lay.pos)


@torch.no_grad()
def at_lookup(model: torch.nn.Module, arch: ArchSpec, rows: Sequence[Row], wanted: Sequence[tuple[str, int]],
              overrides: Mapping[str, torch.Tensor] | None = None) -> dict[tuple[str, int], torch.Tensor]:
    """Activations at each row's fact token: ``("key", l)`` (input of layer l's MLP output
    matrix), ``("mlp_out", l)`` and ``("block", l)`` (output of block l), as (rows, ·) float64 on
    the CPU. Only positions up to the fact token run."""
    stack = Stack(model, arch, overrides)
    deepest = max(l for _, l in wanted)
    heads = _shared_heads(stack, rows, deepest)
    lay, x, rope = _live(stack, rows, heads.length.tolist(), [r.lookup + 1 for r in rows])
    look = torch.tensor([r.lookup for r in rows], device=stack.device)
    at = lay.pos == look[lay.row]  # one token per row, in row order
    out: dict[tuple[str, int], torch.Tensor] = {}
    for j in range(deepest + 1):
        x, _, key, mlp = stack.layer(j, x, lay, rope, heads.prefix(j))
        for kind, t in (("key", key), ("mlp_out", mlp), ("block", x)):
            if (kind, j) in wanted:
                out[(kind, j)] = t[at].double().cpu()
    return out


@dataclass
class _Plan:
    """The suffix batch of one set of active rows (rebuilt only when a request stops)."""

    key: tuple[int, ...]
    lay: Layout
    src: torch.Tensor  # packed index into h0 of each suffix token
    offset: torch.Tensor  # (rows,) first packed token of each active row, -1 otherwise
    prefixes: dict[int, Prefix]
    first: torch.Tensor  # packed indices of the fact tokens
    rope: tuple[torch.Tensor, torch.Tensor]


class ValueRunner:
    """The v* forward: the prompts run once here; :meth:`hidden` then runs the suffixes only."""

    def __init__(self, model: torch.nn.Module, arch: ArchSpec, rows: Sequence[Row], layer: int,
                 overrides: Mapping[str, torch.Tensor] | None = None):
        stack = self.stack = Stack(model, arch, overrides)
        self.layer = layer
        dev = stack.device
        look = [r.lookup for r in rows]
        ends = [max([r.lookup, *r.target_pos]) + 1 for r in rows]  # nothing after the last target counts
        self.look = torch.tensor(look, device=dev)
        self.ends = ends
        with torch.no_grad():
            heads = _shared_heads(stack, rows, stack.n_layers - 1)
            lay, x, rope = _live(stack, rows, heads.length.tolist(), ends)
            p_max = max(look)
            self.prefix: dict[int, Prefix] = {}
            for j in range(stack.n_layers):
                if j <= layer or len(x):
                    x, (k, v), _, mlp = stack.layer(j, x, lay, rope, heads.prefix(j))
                if j == layer:
                    at = lay.pos == self.look[lay.row]
                    self.site = {"block": x[at].double(), "mlp_out": mlp[at].double()}
                    after = lay.pos >= self.look[lay.row]
                    self.h0 = x[after]  # suffix tokens, row-major
                    before = ~after  # only these matter to the layers above
                    lay, x, rope = lay.keep(before), x[before], (rope[0][before], rope[1][before])
                elif j > layer:
                    # the prefix each suffix attends to: its head's keys/values, then its own tokens before the fact token
                    pk = torch.zeros(len(rows), p_max, stack.kvh, stack.dh, dtype=x.dtype, device=dev)
                    pv = torch.zeros_like(pk)
                    hp = heads.prefix(j)
                    if hp is not None:
                        width = min(hp.k.shape[2], p_max)
                        pk[:, :width], pv[:, :width] = hp.k.transpose(1, 2)[:, :width], hp.v.transpose(1, 2)[:, :width]
                    if len(x):
                        pk[lay.row, lay.pos], pv[lay.row, lay.pos] = k, v
                    self.prefix[j] = Prefix(pk.transpose(1, 2).contiguous(), pv.transpose(1, 2).contiguous(), self.look)
        suffix_len = [e - lk for e, lk in zip(ends, look)]
        self.suffix_start = torch.tensor([0] + suffix_len[:-1], device=dev).cumsum(0)
        self._plan: _Plan | None = None

    def plan(self, active_rows: torch.Tensor) -> torch.Tensor:
        """Prepare :meth:`hidden` for ``active_rows`` (sorted row indices); returns ``offset``: row
        r's suffix slot s is packed token ``offset[r] + s``."""
        key = tuple(active_rows.tolist())
        if self._plan is None or self._plan.key != key:
            lay = Layout.spans(self.look[active_rows].tolist(), [self.ends[i] for i in key], self.stack.device)
            offset = torch.full_like(self.look, -1)
            offset[active_rows] = torch.tensor([0] + lay.lens.tolist()[:-1], device=self.look.device).cumsum(0)
            self._plan = _Plan(key, lay, src=self.suffix_start[active_rows][lay.row] + lay.slot, offset=offset,
                               prefixes={j: p.rows(active_rows) for j, p in self.prefix.items()},
                               first=torch.nonzero(lay.slot == 0).squeeze(1), rope=self.stack.rope(self.h0, lay.pos))
        return self._plan.offset

    def hidden(self, delta_rows: torch.Tensor, active_rows: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states of the packed suffix tokens ``need`` (see :meth:`plan`) with
        ``delta_rows`` (one per active row) added at the fact token of layer L's output."""
        self.plan(active_rows)
        p = self._plan
        x = self.h0[p.src]
        x = x.index_put((p.first,), x[p.first] + delta_rows.to(x.dtype))
        top = self.stack.n_layers - 1
        for j in range(self.layer + 1, top + 1):
            x, _, _, _ = self.stack.layer(j, x, p.lay, p.rope, p.prefixes[j], keep=need if j == top else None)
        if self.layer == top:
            x = x[need]
        return self.stack.final_norm(x)
