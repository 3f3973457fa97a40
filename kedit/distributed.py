"""torch.distributed for the work that splits cleanly over processes (key statistics today).

kedit starts nothing itself: ``--nproc N`` re-runs the same command under ``torchrun`` (the
``torch.distributed.run`` module), and a command that finds torchrun's environment joins the
process group: gloo on the CPU, nccl on CUDA. Each rank takes a disjoint share of the work and the
float64 results are all-reduced, so every rank ends with the single-process result (to float64
rounding) and rank 0 alone writes caches and prints.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence


def in_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_and_size() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join(device: str = "cpu") -> None:
    """Join torchrun's process group (once), and give each rank its share of the CPU cores."""
    import torch
    import torch.distributed as dist

    if not in_torchrun() or dist.is_initialized():
        return
    size = int(os.environ["WORLD_SIZE"])
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))


def all_reduce_sum(tensors: Sequence["torch.Tensor"]) -> None:  # noqa: F821
    """Sum in place over the ranks (a no-op outside a process group)."""
    import torch.distributed as dist

    if rank_and_size()[1] > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def barrier() -> None:
    import torch.distributed as dist

    if rank_and_size()[1] > 1:
        dist.barrier()


def leave() -> None:
    """Leave the process group cleanly: wait for every rank, then tear gloo down.

    A rank that exits while another still holds gloo's pair connections can abort in C++
    ("terminate called without an active exception"), so every rank meets here first.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def relaunch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``kedit ARGV`` as ``nproc`` processes under torchrun; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "kedit.cli", *argv]
    return subprocess.call(cmd)
