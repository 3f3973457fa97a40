"""Chains survive kills and refuse a second writer; outputs are never overwritten silently.

The fault-injection test kills a real process (SIGKILL, through ``KEDIT_FAULT_AT``) at each write
point of a chain step and checks that ``--continue`` then ends bit-identical to a run that was
never interrupted: the same weights, the same editor state, and no stray files.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from kedit import diff as diffmod

NAMES = ["France", "Spain", "Italy"]
TARGETS = ["Rome", "Berlin", "Oslo"]
MAIN = "import sys; from kedit.cli import main; sys.exit(main(sys.argv[1:]))"


def _specs(n=3):
    return [{"id": f"s{i}", "subject": NAMES[i], "prompt": "The capital of {} is", "target_new": TARGETS[i],
             "target_true": "Paris"} for i in range(n)]


@pytest.fixture(scope="module")
def cenv(tmp_path_factory, tiny_dirs):
    tmp = tmp_path_factory.mktemp("chain")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(["The cat sat on the mat.", "Paris is the capital of France."] * 40))
    spec = write_jsonl(tmp / "s.jsonl", _specs())
    return {"tmp": tmp, "model": str(tiny_dirs["llama"]), "corpus": str(corpus), "spec": spec,
            "cache": str(tmp / "cache")}


def _cli(cenv, *argv, fault=None, log=None, wait=True):
    env = {**os.environ, "KEDIT_CACHE_DIR": cenv["cache"]}
    env.pop("KEDIT_FAULT_AT", None)
    if fault:
        env["KEDIT_FAULT_AT"] = fault
    if log:
        env["KEDIT_FAULT_LOG"] = str(log)
    cmd = [sys.executable, "-c", MAIN, *map(str, argv)]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _start_args(cenv, out):
    return ["apply", cenv["spec"], "--plugin", "d4s", "--model", cenv["model"], "--mode", "sequential",
            "--batch-size", "1", "--out", out, "-o", "layers", "[1,2]", "-o", "v_steps", "3",
            "-o", "keys", "base", "-o", "residual", "once",  # the mode whose single edits can be reverted
            "--corpus", cenv["corpus"], "--stats-tokens", "800", "-q"]


def _start(cenv, out, **kw):
    return _cli(cenv, *_start_args(cenv, out), **kw)


def _continue(cenv, out, **kw):
    return _cli(cenv, "apply", cenv["spec"], "--continue", out, "-q", **kw)


def _outcome(cenv, folder: Path):
    from kedit.models import load
    from kedit.sequence import Chain

    chain = Chain.open(folder)
    model, _, _ = load(cenv["model"], quiet=True)
    for d in chain.diffs():
        diffmod.apply(model, d)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    files = sorted(p.name for p in folder.iterdir())
    return weights, chain.state(), [s["specs"] for s in chain.steps], files, [d for _, d in chain.step_data()]


@pytest.fixture(scope="module")
def reference(cenv):
    log = cenv["tmp"] / "points.log"
    proc = _start(cenv, cenv["tmp"] / "ref", log=log)
    assert proc.returncode == 0, proc.stderr
    points = [line.split()[0] for line in log.read_text().splitlines() if line.startswith("chain:")]
    return _outcome(cenv, cenv["tmp"] / "ref"), points


def _same(a, b):
    wa, sa, steps_a, files_a, data_a = a
    wb, sb, steps_b, files_b, data_b = b
    assert steps_a == steps_b and files_a == files_b
    for n in wa:
        assert torch.equal(wa[n], wb[n]), n
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert len(data_a) == len(data_b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                              for x, y in zip(data_a, data_b))


def test_write_points_of_a_chain_are_counted(reference):
    _, points = reference
    # create (2) + 3 steps x (diff 2, data 2, state 2, chain.json 2, old state dropped 1) + final save (2)
    assert len(points) == 2 + 3 * 9 + 2, points


def _kill_points(n_points):
    """Every write point of the second step (the first to replace a state), the chain's creation,
    the first step's commit and the final record."""
    second = list(range(2 + 9 + 1, 2 + 18 + 1))
    return [1, 2, 8, *second, n_points - 1, n_points]


@pytest.mark.parametrize("k", range(13))
def test_a_kill_at_any_write_point_resumes_bit_identical(cenv, reference, k, run_cli, monkeypatch):
    outcome, points = reference
    at = _kill_points(len(points))[k]
    folder = cenv["tmp"] / f"kill{at}"
    proc = _start(cenv, folder, fault=f"chain:{at}")
    assert proc.returncode == -signal.SIGKILL, (at, proc.stderr)
    monkeypatch.setenv("KEDIT_CACHE_DIR", cenv["cache"])
    if not (folder / "chain.json").exists():  # killed before the chain's creation was committed
        code, _, err = run_cli(*_start_args(cenv, folder))
    else:  # the resumed run goes in process: only the killed one needs its own
        code, _, err = run_cli("apply", cenv["spec"], "--continue", folder, "-q")
    assert code == 0, (at, points[at - 1], err)
    _same(_outcome(cenv, folder), outcome)


def test_second_writer_is_refused_naming_the_holder(cenv, reference):
    import shutil

    folder = cenv["tmp"] / "busy"
    shutil.copytree(cenv["tmp"] / "ref", folder)
    more = write_jsonl(cenv["tmp"] / "more.jsonl", [{**_specs(1)[0], "id": "s9", "subject": "Peru"}])
    # hold the chain's lock from a live process, as a long --continue would
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from kedit.locking import exclusive\n"
                               f"with exclusive({str(folder)!r}, 'the chain', folder=True):\n"
                               "    print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = _cli(cenv, "apply", more, "--continue", folder, "-q")
        assert proc.returncode == 2
        assert f"pid {holder.pid}" in proc.stderr and "in use" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    finally:
        holder.kill()
        holder.wait()
    proc = _cli(cenv, "apply", more, "--continue", folder, "-q")  # the kernel dropped the dead holder's lock
    assert proc.returncode == 0, proc.stderr


def test_two_real_continues_at_once_one_wins_and_nothing_is_lost(cenv):
    folder = cenv["tmp"] / "race"
    spec2 = write_jsonl(cenv["tmp"] / "s2.jsonl", _specs(3))
    proc = _cli(cenv, "apply", write_jsonl(cenv["tmp"] / "s1.jsonl", _specs(1)), "--plugin", "d4s", "--model",
                cenv["model"], "--mode", "sequential", "--batch-size", "1", "--out", folder, "-o", "layers", "[1,2]",
                "-o", "v_steps", "3", "--corpus", cenv["corpus"], "--stats-tokens", "800", "-q")
    assert proc.returncode == 0, proc.stderr
    procs = [_cli(cenv, "apply", spec2, "--continue", folder, "-q", wait=False) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    if codes == [0, 2]:
        assert "in use by pid" in [e for c, e in results if c == 2][0]
    from kedit.sequence import Chain

    chain = Chain.open(folder)
    assert chain.spec_ids() == ["s0", "s1", "s2"]  # every edit kept once, whoever ran first
    chain.diffs()


def test_altered_state_or_data_is_refused_on_continue(cenv, reference, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "c"
    shutil.copytree(cenv["tmp"] / "ref", folder)
    rec = json.loads((folder / "chain.json").read_text())
    state = folder / rec["state"]["file"]
    tensors = load_file(str(state))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * 1.0001  # still a valid file, other numbers
    save_file(tensors, str(state))
    proc = _continue(cenv, folder)
    assert proc.returncode == 2 and "does not match the hash" in proc.stderr and state.name in proc.stderr
    shutil.rmtree(folder)
    shutil.copytree(cenv["tmp"] / "ref", folder)
    (folder / rec["steps"][0]["data"]).write_bytes(b"\0" * 64)
    code, out = _revert_edit(cenv, folder)
    assert code == 2 and "does not match the hash" in out
    proc = _continue(cenv, folder)  # continuing checks every committed file, not only those it reads
    assert proc.returncode == 2 and "does not match the hash" in proc.stderr


def _revert_edit(cenv, folder):
    proc = _cli(cenv, "diff", "revert", "--edit", "s0", folder, "-q")
    return proc.returncode, proc.stderr


def test_legacy_schema_1_chain_continues_and_is_upgraded(cenv, reference, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "old"
    shutil.copytree(cenv["tmp"] / "ref", folder)
    rec = json.loads((folder / "chain.json").read_text())
    state = rec.pop("state")
    save_file(load_file(str(folder / state["file"])), str(folder / "state.safetensors"),
              metadata={"steps": str(len(rec["steps"]))})
    (folder / state["file"]).unlink()
    rec["schema"] = 1
    (folder / "chain.json").write_text(json.dumps(rec))
    from kedit.sequence import Chain

    assert Chain.open(folder).state().keys() == load_file(str(cenv["tmp"] / "ref" / state["file"])).keys()
    more = write_jsonl(tmp_path / "more.jsonl", [{**_specs(1)[0], "id": "s9", "subject": "Peru"}])
    proc = _cli(cenv, "apply", more, "--continue", folder, "-q")
    assert proc.returncode == 0, proc.stderr
    upgraded = Chain.open(folder)
    assert upgraded.record["schema"] == 2 and upgraded.record["state"]["file"] == "state-0004.safetensors"
    assert not (folder / "state.safetensors").exists() and upgraded.spec_ids() == ["s0", "s1", "s2", "s9"]


def test_outputs_are_not_overwritten_without_overwrite(cenv, run_cli, tmp_path):
    spec = cenv["spec"]
    out = tmp_path / f"x{diffmod.SUFFIX}"
    out.write_bytes(b"precious")
    args = ["apply", spec, "--plugin", "ft", "--model", cenv["model"], "--out", out, "-o", "layer", "1", "-q"]
    code, _, err = run_cli(*args)
    assert code == 2 and "already exists; pass --overwrite" in err and out.read_bytes() == b"precious"
    code, _, err = run_cli(*args, "--overwrite")
    assert code == 0, err
    assert diffmod.read(out).manifest["editor"]["name"] == "ft"
    code, _, err = run_cli(*args, "--after", out, "--overwrite")  # never over an input, even with --overwrite
    assert code == 2 and "also an input" in err
    # the importer never writes over its own input, with or without --overwrite
    cf = tmp_path / "cf.json"
    cf.write_text(json.dumps([{"case_id": 1, "requested_rewrite": {"prompt": "{} is in", "subject": "Paris",
                                                                   "target_new": {"str": "Rome"},
                                                                   "target_true": {"str": "France"}}}]))
    before = cf.read_bytes()
    for extra in ([], ["--overwrite"]):
        code, _, err = run_cli("import", "counterfact", cf, "-o", cf, *extra)
        assert code == 2 and "also an input" in err and cf.read_bytes() == before
    target = tmp_path / "cf.jsonl"
    target.write_text("keep\n")
    code, _, err = run_cli("import", "counterfact", cf, "-o", target)
    assert code == 2 and "--overwrite" in err and target.read_text() == "keep\n"
    assert run_cli("import", "counterfact", cf, "-o", target, "--overwrite")[0] == 0


def test_two_real_writers_of_one_output_second_refused(cenv, tmp_path):
    out = tmp_path / f"y{diffmod.SUFFIX}"
    holder = subprocess.Popen([sys.executable, "-c", "import time; from kedit.outputs import claimed\n"
                               f"with claimed({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = _cli(cenv, "apply", cenv["spec"], "--plugin", "ft", "--model", cenv["model"], "--out", out,
                    "-o", "layer", "1", "-q")
        assert proc.returncode == 2 and f"pid {holder.pid}" in proc.stderr, proc.stderr
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()


def test_orphaned_temporaries_are_removed_by_the_next_writer(tmp_path):
    from kedit.atomic import TMP_SUFFIX, atomic_dir, atomic_write_text

    orphan_dir = tmp_path / f".export.abc{TMP_SUFFIX}"
    orphan_dir.mkdir()
    (orphan_dir / "model.safetensors").write_bytes(b"x" * 1000)
    orphan_file = tmp_path / f".d.kedit.safetensors.abc{TMP_SUFFIX}"
    orphan_file.write_bytes(b"y")
    unrelated = tmp_path / ".notes.tmp"
    unrelated.write_text("mine")
    # a live writer's temporary is left alone
    live = subprocess.Popen([sys.executable, "-c", "import time; from kedit.atomic import atomic_path\n"
                             f"with atomic_path({str(tmp_path / 'live.txt')!r}) as t:\n"
                             "    print(t, flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        live_tmp = Path(live.stdout.readline().strip())
        assert live_tmp.exists()
        atomic_write_text(tmp_path / "other.txt", "new")
        assert not orphan_dir.exists() and not orphan_file.exists()
        assert unrelated.exists() and live_tmp.exists()
    finally:
        live.kill()
        live.wait()
    with atomic_dir(tmp_path / "export") as d:
        (d / "a").write_text("1")
    assert not live_tmp.exists() and (tmp_path / "export" / "a").read_text() == "1"


def test_full_disk_is_one_clear_failure_and_keeps_the_old_file(tmp_path, monkeypatch):
    import errno

    from kedit.atomic import atomic_path
    from kedit.errors import KeditError

    target = tmp_path / "t.json"
    target.write_text("old")

    with pytest.raises(KeditError, match="disk is full"):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_lock_is_released_when_the_holder_dies(tmp_path):
    from kedit.locking import exclusive

    holder = subprocess.Popen([sys.executable, "-c", "import time; from kedit.locking import exclusive\n"
                               f"with exclusive({str(tmp_path / 'c')!r}, 'the chain', folder=True):\n"
                               "    print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    t0 = time.monotonic()
    with exclusive(tmp_path / "c", "the chain", folder=True):
        pass
    assert time.monotonic() - t0 < 5


def test_a_killed_model_conversion_is_swept_by_the_next_load(tmp_path, monkeypatch):
    from kedit.atomic import TMP_SUFFIX
    from kedit.errors import InputError
    from kedit.models import load

    monkeypatch.setenv("KEDIT_CACHE_DIR", str(tmp_path / "cache"))
    orphan = tmp_path / "cache" / "models" / f".SmolLM2-abc-v1.x1{TMP_SUFFIX}"
    orphan.mkdir(parents=True)
    (orphan / "model.safetensors").write_bytes(b"\0" * 4096)
    garbage = tmp_path / "m.gguf"
    garbage.write_bytes(b"GGUF" + b"\1" * 100)
    with pytest.raises(InputError):  # any load of a GGUF model sweeps the cache folder first
        load(str(garbage))
    assert not orphan.exists()
