"""torch.distributed for the work that splits cleanly over processes.

Three kinds of work split today, each in units that one process computes in exactly the same
way, so the gathered result equals one process's (bit for bit where the units' arithmetic is
the same; key statistics to float64 summation order): key statistics (batches of the corpus),
teacher-forced scoring and perplexity in ``kedit eval`` and in an edit's evaluation (the
scorer's batches), and the target-value optimisation of a batch edit (chunks of ``v_chunk``
requests, whose losses are separable). Everything else (keys, solves, generation) runs
identically on every rank.

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
from typing import Any, NoReturn, Sequence


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


def is_writer() -> bool:
    """Whether this process writes outputs and caches and prints (rank 0, or no process group)."""
    return rank_and_size()[0] == 0


def my_share(n: int) -> list[int]:
    """The indices of ``n`` work units this rank computes: every size-th, starting at its rank."""
    rank, size = rank_and_size()
    return list(range(n))[rank::size]


def gather(local: dict[int, Any], n: int) -> list[Any]:
    """Every rank's ``{unit index: result}`` merged into the list of all ``n`` results, on every
    rank (results travel pickled, tensors included; fine for per-row scores and per-chunk values)."""
    import torch.distributed as dist

    if rank_and_size()[1] == 1:
        return [local[i] for i in range(n)]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict[int, Any] = {}
    for part in parts:
        merged.update(part)
    missing = [i for i in range(n) if i not in merged]
    if missing:
        raise RuntimeError(f"distributed gather: units {missing[:5]} computed by no rank")
    return [merged[i] for i in range(n)]


def barrier() -> None:
    import torch.distributed as dist

    if rank_and_size()[1] > 1:
        dist.barrier()


def leave(wait: bool = True) -> None:
    """Leave the process group: wait for every rank (``wait``), then tear it down.

    A rank that exits while another still holds gloo's pair connections can abort in C++
    ("terminate called without an active exception"), so ranks that finished meet here first;
    a rank that failed passes ``wait=False`` and leaves at once (its peers may never arrive).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End a rank that has left its process group, skipping the interpreter's C++ teardown.

    After a clean ``leave()`` a rank can still abort at exit in a static destructor
    ("terminate called without an active exception", no Python frame on the stack: about one
    run in 50 with 2 gloo ranks), and torchrun then reports the whole command failed although
    every output was written. Outputs are written atomically before this point, so the rank
    flushes its streams and ends with ``_exit``.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def relaunch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``kedit ARGV`` as ``nproc`` processes under torchrun; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "kedit.cli", *argv]
    return subprocess.call(cmd)
