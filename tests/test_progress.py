"""Progress a log can read (one line per stage, a heartbeat, a finishing line with the time), bars
on a terminal, silence when asked; and commands that answer without loading torch."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from conftest import write_jsonl

from kedit.progress import LineBar, Progress


def _log(**kw) -> tuple[Progress, io.StringIO]:
    stream = io.StringIO()
    return Progress(stream=stream, tty=False, **kw), stream


def test_log_lines_say_what_how_much_and_how_long():
    progress, stream = _log(heartbeat=0.0)  # a heartbeat line on every update
    for _ in progress(range(4), desc="key statistics", unit="batch"):
        pass
    with progress.stage("writing the diff"):
        pass
    lines = stream.getvalue().splitlines()
    assert lines[0] == "kedit: key statistics: 4 batches"
    assert lines[1].startswith("kedit: key statistics: 1/4 batches after ") and "left" in lines[1]
    assert lines[4].startswith("kedit: key statistics: 4/4 batches after ")
    assert lines[5].startswith("kedit: key statistics: done, 4 batches in ") and lines[5].endswith(" s")
    assert lines[6:] == ["kedit: writing the diff …", lines[7]] and lines[7].startswith("kedit: writing the diff: done in")


def test_a_heartbeat_at_most_once_a_minute_by_default():
    progress, stream = _log()
    bar = progress(total=1000, desc="sampling", unit="tok")
    for _ in range(1000):
        bar.update(1)
    bar.close()
    bar.close()  # closing twice prints once
    assert stream.getvalue().splitlines() == ["kedit: sampling: 1,000 tokens",
                                             stream.getvalue().splitlines()[1]]
    assert stream.getvalue().splitlines()[1].startswith("kedit: sampling: done, 1,000 tokens in")


def test_quiet_prints_nothing_and_a_terminal_gets_a_bar():
    progress, stream = _log(quiet=True)
    assert list(progress([1, 2], desc="x")) == [1, 2]
    progress.note("hello")
    with progress.stage("y"):
        pass
    assert stream.getvalue() == ""
    from tqdm import tqdm

    screen = io.StringIO()
    bar = Progress(stream=screen, tty=True)(total=3, desc="edits", unit="edit")
    assert isinstance(bar, tqdm) and not isinstance(bar, LineBar)
    bar.update(3)
    bar.close()
    assert "edits" in screen.getvalue() and "\r" in screen.getvalue()  # redrawn in place


def test_sampling_advances_with_every_decoding_step(monkeypatch, tmp_path):
    from kedit.stats import sample_documents
    from kedit.testing import tiny_model, tiny_tokenizer

    updates: list[float] = []

    class Recorder:
        n = 0.0

        def update(self, k=1):
            updates.append(k)

        def close(self):
            pass

    docs = sample_documents(tiny_model("llama"), tiny_tokenizer(), 40, 8, 0, lambda **_: Recorder())
    assert docs and len(updates) >= 8  # one generate call of 8 steps: at least one update per step
    assert sum(updates) == pytest.approx(48)  # the bar ends at the requested total (tokens + one row's margin)


def test_apply_with_stderr_in_a_log(run_cli, tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_jsonl(tmp_path / "s.jsonl", [{"subject": "France", "prompt": "The capital of {} is",
                                               "target_new": "Rome", "target_true": "Paris"}])
    code, out, err = run_cli("apply", spec, "--plugin", "ft", "--model", tiny_dirs["gpt2"], "-o", "steps", "2",
                             "-o", "layer", "1", "--out", tmp_path / "a.kedit.safetensors")
    assert code == 0, err
    lines = err.splitlines()
    for stage in ("loading", "scoring 1 specs before the edit", "editing 1 specs with ft", "scoring 1 specs after"):
        assert any(stage in line and "done in" in line for line in lines), (stage, err)
    assert all(line.startswith("kedit: ") for line in lines) and "\r" not in err
    code, out, err = run_cli("apply", spec, "--plugin", "ft", "--model", tiny_dirs["gpt2"], "-o", "steps", "2",
                             "--out", tmp_path / "b.kedit.safetensors", "--quiet")
    assert code == 0 and err == ""


LIGHT = """
import sys
from kedit.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
"""


@pytest.mark.parametrize("args", [["--help"], ["plugins"], ["editors"], ["editors", "--options"], ["evaluators"],
                                  ["diff", "show", "DIFF"]])
def test_listing_and_showing_never_load_torch(args, tiny_dirs, tmp_path):
    """What keeps `kedit --help`, `kedit plugins`, `kedit editors` and `kedit diff show` fast: they
    import no torch and no transformers (together seconds of start-up on a busy machine)."""
    from kedit import diff as diffmod
    from kedit.editing import EditPlan, compute_diff
    from kedit.models import load
    from kedit.spec import EditSpec

    if "DIFF" in args:
        loaded = load(str(tiny_dirs["gpt2"]))
        plan = EditPlan.make(loaded.model, "ft", {"layer": 1, "steps": 1})
        d = compute_diff(loaded, [EditSpec(subject="France", prompt="The capital of {} is", target_new="Rome")], plan)
        args = [str(diffmod.write(d, tmp_path / f"d{diffmod.SUFFIX}")) if a == "DIFF" else a for a in args]
    proc = subprocess.run([sys.executable, "-c", "import json\n" + LIGHT, *args], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "torch": False, "transformers": False}, proc.stderr
