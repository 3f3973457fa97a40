"""Closed-form solves (float64, Cholesky) and the stored-layout low-rank encoding of their results."""
from __future__ import annotations

from collections import OrderedDict

import torch

from kedit.arch import ArchSpec
from kedit.delta import LowRank


def cholesky(a: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of a symmetric PSD matrix, adding the smallest ridge that makes it work."""
    a = (a + a.T) / 2
    jitter = 0.0
    scale = float(a.diagonal().abs().mean()) or 1.0
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(a + jitter * torch.eye(a.shape[0], dtype=a.dtype, device=a.device))
        if int(info) == 0:
            return factor
        jitter = scale * 1e-10 if jitter == 0 else jitter * 100
    raise ValueError("matrix is not positive definite even with a ridge")


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a⁻¹ b for symmetric positive definite a."""
    return torch.cholesky_solve(b, cholesky(a))


def stored_lowrank(arch: ArchSpec, u: torch.Tensor, v: torch.Tensor) -> LowRank:
    """ΔW = u @ v in the (d_out, d_in) layout, as a LowRank delta in the parameter's stored layout."""
    u, v = u.to(torch.float32), v.to(torch.float32)
    if arch.transposed:
        return LowRank(v.T.contiguous(), u.T.contiguous())
    return LowRank(u.contiguous(), v.contiguous())


def memit_delta(residual: torch.Tensor, keys: torch.Tensor, c0: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT: ΔW = R Kᵀ (λ C0 + K Kᵀ)⁻¹, as factors (R, Aᵀ) with A = (λ C0 + K Kᵀ)⁻¹ K."""
    a = spd_solve(lam * c0 + keys @ keys.T, keys)
    return residual, a.T


def emmet_delta(residual: torch.Tensor, keys: torch.Tensor, c0: torch.Tensor, lam: float,
                emmet_lambda: float, update_norm_lambda: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """EMMET: ΔW = R D⁻¹ Kᵀ C⁻¹ with C = λ C0 + μ I and D = Kᵀ C⁻¹ K + ε I (equality-constrained)."""
    c = lam * c0 + update_norm_lambda * torch.eye(c0.shape[0], dtype=c0.dtype)
    ck = spd_solve(c, keys)  # C⁻¹ K, (d_k, n)
    d = keys.T @ ck + emmet_lambda * torch.eye(keys.shape[1], dtype=keys.dtype)
    return torch.linalg.solve(d, residual.T).T, ck.T  # R D⁻¹ (d_out, n), (C⁻¹K)ᵀ = Kᵀ C⁻¹ (n, d_k)


_BASIS_MEMO: OrderedDict[tuple, tuple[torch.Tensor, float]] = OrderedDict()
_BASIS_MEMO_BYTES = 2 << 30  # SmolLM2's five edited layers hold < 100 MB; a 7B model's may not fit: recomputed


def null_space_basis(c0: torch.Tensor, threshold: float, rule: str = "relative") -> tuple[torch.Tensor, float]:
    """Û, the eigenvectors of C0 spanning AlphaEdit's "null space", and the share of C0's variance
    (trace) they hold.

    ``relative``: eigenvalues below ``threshold`` × the largest; ``absolute``: below ``threshold``
    (the reference code's 2e-2 on the normalised moment, which keeps every direction or none
    depending on the statistics' scale); ``energy``: the smallest eigenvalues that together hold at
    most ``threshold`` of the trace, so the preserved keys' variance the update may touch is
    bounded by construction.

    Memoised on C0's bytes: every edit of a sequence asks again for the same C0, and the
    eigendecomposition (0.3–0.6 s per 1,536-wide layer on a CPU) was a quarter of a lifelong
    AlphaEdit step. The returned basis is shared: read it, do not modify it in place.
    """
    from kedit.hashing import tensor_sha256

    key = (tensor_sha256(c0), str(c0.dtype), tuple(c0.shape), str(c0.device), float(threshold), rule)
    if key in _BASIS_MEMO:
        _BASIS_MEMO.move_to_end(key)
        return _BASIS_MEMO[key]
    result = _null_space_basis(c0, threshold, rule)
    _BASIS_MEMO[key] = result
    while len(_BASIS_MEMO) > 1 and sum(b.nbytes for b, _ in _BASIS_MEMO.values()) > _BASIS_MEMO_BYTES:
        _BASIS_MEMO.popitem(last=False)
    return result


def _null_space_basis(c0: torch.Tensor, threshold: float, rule: str) -> tuple[torch.Tensor, float]:
    evals, evecs = torch.linalg.eigh((c0 + c0.T) / 2)  # ascending
    evals = evals.clamp_min(0)
    total = float(evals.sum()) or 1.0
    if rule == "relative":
        keep = evals < threshold * evals.max()
    elif rule == "absolute":
        keep = evals < threshold
    elif rule == "energy":
        keep = torch.cumsum(evals, 0) <= threshold * total
    else:
        raise ValueError(f"null-space rule {rule!r}: expected relative, absolute or energy")
    return evecs[:, keep], float(evals[keep].sum()) / total


def alphaedit_delta(residual: torch.Tensor, keys: torch.Tensor, basis: torch.Tensor, prior: torch.Tensor | None,
                    l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit: ΔW = R Kᵀ Û (Ûᵀ (K Kᵀ + Cp) Û + L2 I)⁻¹ Ûᵀ (an r×r SPD solve; ΔW k = 0 for k ⟂ Û)."""
    m = keys @ keys.T + (prior if prior is not None else 0)
    inner = basis.T @ m @ basis + l2 * torch.eye(basis.shape[1], dtype=basis.dtype)
    x = spd_solve(inner, basis.T @ keys)  # (r, n)
    return residual, (basis @ x).T  # ΔW = R (Û x)ᵀ
