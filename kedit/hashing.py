"""Content hashes of tensors: what a diff records about the exact base it applies to."""
from __future__ import annotations

import hashlib

import torch


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of the raw bytes of a CPU, contiguous, native-dtype copy of ``t``."""
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
