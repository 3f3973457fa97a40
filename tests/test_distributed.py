"""Key statistics over 2 gloo ranks on the CPU equal one process's, to float64 rounding, and land in
the same cache entry."""
from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kedit.arch import arch_for
from kedit.distributed import leave
from kedit.stats import accumulate
from kedit.testing import tiny_model

ROWS = [[(7 * i + j) % 397 + 1 for j in range(24)] for i in range(9)] + [[5, 6, 7]]  # 10 rows, a short last one


def _rank(rank: int, size: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        torch.set_num_threads(1)
        model = tiny_model("llama")
        moments, count = accumulate(model, arch_for(model), ROWS, [1, 3], 3, 0, lambda **_: _Bar())
        if rank == 0:
            torch.save({"moments": moments, "count": count}, out)
    finally:
        leave()


class _Bar:
    def update(self, n):
        pass

    def close(self):
        pass


def test_two_gloo_ranks_give_the_one_process_moments(tmp_path):
    model = tiny_model("llama")
    one, n_one = accumulate(model, arch_for(model), ROWS, [1, 3], 3, 0, lambda **_: _Bar())
    out = str(tmp_path / "two.pt")
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, join=True)
    two = torch.load(out)
    assert two["count"] == n_one == sum(len(r) for r in ROWS)
    for layer in (1, 3):
        assert torch.allclose(two["moments"][layer], one[layer], rtol=1e-12, atol=1e-15), layer
        assert not torch.equal(two["moments"][layer], torch.zeros_like(one[layer]))


def test_stats_compute_nproc_2_fills_the_one_process_cache_entry(tmp_path, tiny_dirs):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The capital of France is Paris. " * 60)
    env = {**os.environ, "KEDIT_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "kedit", "stats", "compute", "--model", str(tiny_dirs["llama"]), "--layers", "1,2",
            "--corpus", str(corpus), "--tokens", "400", "--max-len", "32", "--batch-size", "2", "--json", "-q"]
    two = subprocess.run(base + ["--nproc", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    import json

    first = json.loads(two.stdout)
    assert {v["source"] for v in first["layers"].values()} == {"computed"}
    files = {v["file"] for v in first["layers"].values()}
    assert all(os.path.isfile(f) for f in files)
    again = subprocess.run(base, env=env, capture_output=True, text=True, timeout=300)
    second = json.loads(again.stdout)
    assert {v["source"] for v in second["layers"].values()} == {"disk"}  # the same cache entry
    assert {v["file"] for v in second["layers"].values()} == files
    # and a one-process computation in a fresh cache gives the same moments to float64 rounding
    from safetensors.torch import load_file

    env1 = {**env, "KEDIT_CACHE_DIR": str(tmp_path / "cache1")}
    single = json.loads(subprocess.run(base, env=env1, capture_output=True, text=True, timeout=300).stdout)
    for layer, info in single["layers"].items():
        a = next(iter(load_file(info["file"]).values()))
        b = next(iter(load_file(first["layers"][layer]["file"]).values()))
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)
