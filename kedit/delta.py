"""Delta encodings (dense, low-rank, sparse, masked low-rank), their conversion to dense and their
algebra.

All deltas are in the parameter's *stored* layout (GPT-2 Conv1D weights are (d_in, d_out)).
Dense values are float32; low-rank products are formed in float64 and rounded once, so the
same factors give bit-identical dense deltas on any BLAS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch


@dataclass
class Dense:
    tensor: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)


class _Factors:
    """Shape and rank of the deltas built on factors u (rows × r) and v (r × cols)."""

    u: torch.Tensor
    v: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.u.shape[0], self.v.shape[1])

    @property
    def rank(self) -> int:
        return self.u.shape[1]


@dataclass
class LowRank(_Factors):
    """ΔW = u @ v with u (rows × r) and v (r × cols)."""

    u: torch.Tensor
    v: torch.Tensor


@dataclass
class Sparse:
    """ΔW.view(-1)[idx] = val, zero elsewhere."""

    idx: torch.Tensor
    val: torch.Tensor
    shape: tuple[int, ...]


@dataclass
class MaskedLowRank(_Factors):
    """ΔW = (u @ v) ⊙ mask: a low-rank delta of which only the masked elements are kept (what
    RECT makes of a MEMIT or ROME delta). Stored as the factors and the mask as a bitmap (one bit
    per element), so it costs the factors plus numel/8 bytes, where the same delta as sparse
    costs 8 bytes per kept element."""

    u: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor  # bool, the parameter's shape


Delta = Union[Dense, LowRank, Sparse, MaskedLowRank]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes, 8 elements per byte, first element in the highest bit."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, torch.zeros(pad, dtype=torch.uint8)]).view(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (flat * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of :func:`pack_bits`; ValueError if the bytes do not fit ``shape``."""
    n = numel(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 7) // 8:
        raise ValueError(f"a mask of {n} elements needs {(n + 7) // 8} uint8 bytes, got {packed.numel()} "
                         f"{str(packed.dtype).removeprefix('torch.')}")
    bits = (packed.to(torch.int32).unsqueeze(1) >> torch.arange(7, -1, -1, dtype=torch.int32)) & 1
    return bits.reshape(-1)[:n].to(torch.bool).view(shape)


def as_delta(x: Union[Delta, torch.Tensor]) -> Delta:
    if isinstance(x, torch.Tensor):
        return Dense(x.detach().to(torch.float32))
    return x


def to_dense(delta: Delta, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if isinstance(delta, Dense):
        return delta.tensor.to(dtype)
    if isinstance(delta, LowRank):
        return (delta.u.double() @ delta.v.double()).to(torch.float32).to(dtype)
    if isinstance(delta, MaskedLowRank):
        product = (delta.u.double() @ delta.v.double()).to(torch.float32)
        return torch.where(delta.mask, product, torch.zeros((), dtype=torch.float32)).to(dtype)
    out = torch.zeros(delta.shape, dtype=torch.float32).view(-1)
    out[delta.idx] = delta.val.to(torch.float32)
    return out.view(delta.shape).to(dtype)


def index_dtype(size: int) -> torch.dtype:
    """Flat indices are stored as int32 where they fit (most matrices), halving sparse diffs."""
    return torch.int32 if size < 2**31 else torch.int64


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def nbytes(delta: Delta) -> int:
    if isinstance(delta, Dense):
        return delta.tensor.numel() * 4
    if isinstance(delta, LowRank):
        return (delta.u.numel() + delta.v.numel()) * 4
    if isinstance(delta, MaskedLowRank):
        return (delta.u.numel() + delta.v.numel()) * 4 + (numel(delta.shape) + 7) // 8
    idx_bytes = 4 if index_dtype(numel(delta.shape)) == torch.int32 else 8
    return delta.idx.numel() * idx_bytes + delta.val.numel() * 4


def compact(delta: Delta) -> Delta:
    """The smallest exact encoding of ``delta``: low-rank factors, masked low-rank factors, flat
    sparse indices, or dense."""
    delta = as_delta(delta)
    if isinstance(delta, MaskedLowRank):
        delta = MaskedLowRank(delta.u.to(torch.float32).contiguous(), delta.v.to(torch.float32).contiguous(),
                              delta.mask.to(torch.bool).contiguous())
        other = compact(Dense(to_dense(delta)))  # the same values as sparse or dense
        return delta if nbytes(delta) < nbytes(other) else other
    if isinstance(delta, LowRank):
        delta = LowRank(delta.u.to(torch.float32).contiguous(), delta.v.to(torch.float32).contiguous())
        if nbytes(delta) < delta.shape[0] * delta.shape[1] * 4:
            return delta
        delta = Dense(to_dense(delta))
    if isinstance(delta, Sparse):
        return delta
    flat = delta.tensor.to(torch.float32).reshape(-1)
    idx = torch.nonzero(flat, as_tuple=True)[0]
    sparse = Sparse(idx, flat[idx].clone(), tuple(delta.tensor.shape))
    return sparse if nbytes(sparse) < nbytes(delta) else Dense(delta.tensor.to(torch.float32).contiguous())


def add(a: Delta, b: Delta) -> Delta:
    """a + b, staying low-rank or sparse where both are."""
    if a.shape != b.shape:
        raise ValueError(f"cannot add deltas of shapes {a.shape} and {b.shape}")
    if isinstance(a, LowRank) and isinstance(b, LowRank):
        return LowRank(torch.cat([a.u, b.u], dim=1), torch.cat([a.v, b.v], dim=0))
    if isinstance(a, Sparse) and isinstance(b, Sparse):
        idx = torch.cat([a.idx, b.idx])
        val = torch.cat([a.val, b.val]).double()
        uniq, inverse = torch.unique(idx, return_inverse=True)
        summed = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, val)
        return Sparse(uniq, summed.to(torch.float32), a.shape)
    return Dense((to_dense(a, torch.float64) + to_dense(b, torch.float64)).to(torch.float32))


def encoding_name(delta: Delta) -> str:
    return {Dense: "dense", LowRank: "lowrank", Sparse: "sparse", MaskedLowRank: "masked-lowrank"}[type(delta)]


def to_tensors(param: str, delta: Delta) -> dict[str, torch.Tensor]:
    if isinstance(delta, Dense):
        return {f"{param}::delta": delta.tensor.contiguous()}
    if isinstance(delta, LowRank):
        return {f"{param}::u": delta.u.contiguous(), f"{param}::v": delta.v.contiguous()}
    if isinstance(delta, MaskedLowRank):
        return {f"{param}::u": delta.u.contiguous(), f"{param}::v": delta.v.contiguous(),
                f"{param}::mask": pack_bits(delta.mask)}
    idx = delta.idx.to(index_dtype(numel(delta.shape))).contiguous()
    return {f"{param}::idx": idx, f"{param}::val": delta.val.contiguous()}


def from_tensors(param: str, encoding: str, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> Delta:
    """Rebuild a delta; KeyError or ValueError if the tensors do not fit the recorded shape."""
    if encoding == "dense":
        t = tensors[f"{param}::delta"]
        if tuple(t.shape) != shape:
            raise ValueError(f"{param}::delta has shape {tuple(t.shape)}, expected {shape}")
        return Dense(t)
    if encoding == "lowrank":
        u, v = tensors[f"{param}::u"], tensors[f"{param}::v"]
        if u.dim() != 2 or v.dim() != 2 or (u.shape[0], v.shape[1]) != shape or u.shape[1] != v.shape[0]:
            raise ValueError(f"{param}::u/v shapes {tuple(u.shape)}, {tuple(v.shape)} do not make {shape}")
        return LowRank(u, v)
    if encoding == "masked-lowrank":
        low = from_tensors(param, "lowrank", tensors, shape)
        return MaskedLowRank(low.u, low.v, unpack_bits(tensors[f"{param}::mask"], shape))
    if encoding == "sparse":
        idx, val = tensors[f"{param}::idx"].to(torch.int64), tensors[f"{param}::val"]
        if idx.shape != val.shape or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel(shape))):
            raise ValueError(f"{param}::idx/val are inconsistent with shape {shape}")
        return Sparse(idx, val, shape)
    raise ValueError(f"unknown encoding {encoding!r} for {param}")
