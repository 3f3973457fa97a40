"""Work split over 2 gloo ranks on the CPU gives one process's result: key statistics (to float64
rounding, in the same cache entry), the target values of a batch edit and the scorer's and
perplexity's numbers (bit for bit), and through the command line the same diff id and the same
evaluation."""
from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kedit.arch import arch_for
from kedit.distributed import exit_rank, leave
from kedit.stats import accumulate
from kedit.testing import tiny_model, tiny_tokenizer

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
    exit_rank(0)  # a clean rank can still abort in C++ teardown at exit (about 1 run in 50)


SPECS = [{"id": f"s{i}", "subject": subj, "prompt": "{} is located in", "target_new": new, "target_true": "Europe"}
         for i, (subj, new) in enumerate([("Paris", "Asia"), ("Rome", "Africa"), ("Oslo", "Oceania"),
                                          ("Lima", "Antarctica"), ("Kyiv", "America")])]
PAIRS = [(f"The word {w} is", t) for w in ("one", "two", "three", "four", "five", "six", "seven")
         for t in (" red", " a big house")]
TEXT = " ".join(f"word{i % 37} and more text number {i}." for i in range(300))


def _work(model, tok):
    """v* on 5 requests in chunks of 2 (3 chunks), scores of 14 pairs in small batches, windowed NLL."""
    from kedit.scoring import TeacherForced, window_nll
    from kedit.spec import EditSpec
    from kedit_plugins.lte import values

    arch = arch_for(model)
    opts = values.ValueOptions(v_steps=3, v_chunk=2)
    chunks, forwards = [], []
    inner = values._optimize
    values._optimize = lambda *a, **k: chunks.append(len(a[3])) or inner(*a, **k)  # requests per chunk run here
    try:
        vals = values.optimize(model, tok, arch, [EditSpec(**s) for s in SPECS], ["{}", "Hello. {}"], "block", 2,
                               opts)
    finally:
        values._optimize = inner
    hook = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    scores = TeacherForced(model, tok, token_budget=24).score(PAIRS)
    nll = window_nll(model, tok, TEXT, window=16, batch_size=2)
    hook.remove()
    return {"z": vals.z, "steps": vals.steps, "scores": [s.logprobs for s in scores], "nll": nll,
            "chunks": chunks, "forwards": len(forwards)}


def _work_rank(rank: int, size: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        torch.set_num_threads(1)
        result = _work(tiny_model("llama"), tiny_tokenizer())
        torch.save(result, f"{out}.{rank}")  # every rank ends with the whole result
    finally:
        leave()
    exit_rank(0)


def test_two_gloo_ranks_give_the_one_process_values_scores_and_perplexity(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' arithmetic: bit-equality holds at equal threads
    try:
        one = _work(tiny_model("llama"), tiny_tokenizer())
    finally:
        torch.set_num_threads(threads)  # later tests in this process run as before
    out = str(tmp_path / "two.pt")
    mp.spawn(_work_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in (0, 1)]
    # the work was shared: chunks 0 and 2 of v* on rank 0, chunk 1 on rank 1; the forwards split
    assert one["chunks"] == [2, 2, 1] and [r["chunks"] for r in ranks] == [[2, 1], [2]]
    assert sum(r["forwards"] for r in ranks) == one["forwards"] and all(r["forwards"] < one["forwards"] for r in ranks)
    for two in ranks:
        assert torch.equal(two["z"], one["z"]) and two["z"].shape == (5, 32)
        assert two["steps"] == one["steps"]
        assert len(two["scores"]) == len(PAIRS)
        assert all(torch.equal(a, b) for a, b in zip(two["scores"], one["scores"]))
        assert two["nll"] == one["nll"] and len(one["nll"]) > 4


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


def test_apply_and_eval_nproc_2_give_the_one_process_diff_and_numbers(tmp_path, tiny_dirs):
    """``kedit apply --nproc 2``: statistics computed inside the edit, the batch's targets in chunks
    over both ranks, one diff with the one-process id; ``kedit eval --nproc 2``: the same numbers."""
    import json

    from conftest import write_jsonl

    spec = write_jsonl(tmp_path / "specs.jsonl", SPECS)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The capital of France is Paris. Rome is in Italy. " * 40)

    def kedit(*argv, cache, code=0):
        env = {**os.environ, "KEDIT_CACHE_DIR": str(tmp_path / cache), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "kedit", *map(str, argv), "--json", "-q"], env=env,
                              capture_output=True, text=True, timeout=300)
        assert (proc.returncode == 0) == (code == 0), proc.stderr
        return json.loads(proc.stdout) if code == 0 else proc.stderr

    edit = ["apply", spec, "--plugin", "memit", "--model", tiny_dirs["llama"], "-o", "layers", "[1,2]",
            "-o", "v_steps", "3", "-o", "v_chunk", "2", "--corpus", corpus, "--stats-tokens", "600"]
    two = kedit(*edit, "--nproc", "2", "--out", tmp_path / "two.kedit.safetensors", cache="c2")
    one = kedit(*edit, "--out", tmp_path / "one.kedit.safetensors", cache="c1")
    assert two["id"] == one["id"] and two["results"] == one["results"]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "two.kedit.safetensors"), load_file(tmp_path / "one.kedit.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "c2" / "stats").rglob("*.safetensors"))) == 2  # rank 0 cached layers 1 and 2
    look = ["eval", "--model", tiny_dirs["llama"], "--diff", tmp_path / "one.kedit.safetensors",
            "--evaluator", "counterfact,token-acc,perplexity", "--data", text, "--no-cache"]
    e2, e1 = kedit(*look, "--nproc", "2", cache="c2"), kedit(*look, cache="c1")
    assert e2["metrics"] == e1["metrics"] and e2["base"] == e1["base"]
    assert set(e1["metrics"]) == {"counterfact", "token-acc", "perplexity"}
    refused = kedit(*edit, "--nproc", "2", "--mode", "sequential", cache="c2", code=1)
    assert "sequential editing (--mode sequential, --continue) runs in one process" in refused
