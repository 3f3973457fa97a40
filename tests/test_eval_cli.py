"""`kedit apply --eval`, `kedit eval` and `kedit report` on tiny model folders."""
from __future__ import annotations

import json

import pytest

from kedit import diff as diffmod

FAST = ["-o", "layer", "1", "-o", "steps", "5", "-o", "lr", "0.05"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KEDIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def test_apply_eval_then_eval_then_report(run_cli, tiny_dirs, spec_file, workdir):
    text = workdir / "text.txt"
    text.write_text("The capital of France is Paris. The capital of Italy is Rome. " * 8)
    code, out, err = run_cli("apply", spec_file, "--plugin", "ft", "--model", tiny_dirs["gpt2"], "--out",
                             workdir / f"a{diffmod.SUFFIX}", "--json", *FAST,
                             "--eval", "counterfact,token-acc,neighborhood-kl", "--eval", "perplexity", "--data", text)
    assert code == 0, err
    applied = json.loads(out)
    m = applied["metrics"]
    assert set(m) == {"counterfact", "token-acc", "neighborhood-kl", "perplexity"}
    assert all(0 <= m["counterfact"][k] <= 1 for k in ("ES", "PS", "NS"))
    assert applied["base"]["neighborhood-kl"]["kl"] == 0 and m["neighborhood-kl"]["kl"] > 0
    assert m["counterfact"]["ES"] >= applied["base"]["counterfact"]["ES"]
    assert applied["protocols"]["counterfact"].startswith("counterfact-prob-v1")
    manifest = diffmod.read(applied["diff"]).manifest
    assert manifest["eval"]["metrics"]["counterfact"] == m["counterfact"]

    # `kedit eval` with the diff: the specs come from the diff; the base comes from the cache.
    code, out, err = run_cli("eval", "--model", tiny_dirs["gpt2"], "--diff", applied["diff"], "--evaluator",
                             "counterfact", "--evaluator", "token-acc", "--json", "--out", workdir / "eval.json")
    assert code == 0, err
    ev = json.loads(out)
    assert ev["metrics"]["counterfact"] == m["counterfact"] and ev["specs"] == 2
    assert ev["base"]["counterfact"] == applied["base"]["counterfact"]
    assert ev["seconds"]["counterfact"]["base_cached"] is True
    assert ev["label"] == "ft"
    from kedit.manifest import method_label

    assert method_label({"editor": {"name": "memit"}, "regularizers": [{"name": "rect", "options": {"k": 0.4, "eps": 1e-8}}]}) \
        == "memit + rect:0.4"
    assert method_label({"editor": {"name": "memit"}, "regularizers": [{"name": "rect", "options": {"k": 0.2, "eps": 1e-8}}]}) \
        == "memit + rect:0.2"
    assert method_label({"editor": {"name": "memit"}, "regularizers": [{"name": "rect", "options": {"k": 0.4, "eps": 1e-5}}]}) \
        == "memit + rect:eps=1e-05"
    assert method_label({"editor": {"name": "x"}, "regularizers": [{"name": "not-installed", "options": {"a": 1, "b": 2}}]}) \
        == "x + not-installed:a=1,b=2"

    # Without diffs: the model as it is, with an interval around each value.
    code, out, err = run_cli("eval", "--model", tiny_dirs["gpt2"], "--specs", spec_file, "--json",
                             "--label", "unedited", "--out", workdir / "base.json")
    assert code == 0, err
    base = json.loads(out)
    assert "delta" not in base and base["metrics"]["counterfact"] == applied["base"]["counterfact"]

    code, out, err = run_cli("report", workdir / "eval.json", workdir / "base.json", "-o", workdir / "report")
    assert code == 0, err
    md = (workdir / "report" / "index.md").read_text()
    assert "## counterfact" in md and "| ft |" in md and "| unedited |" in md
    png = workdir / "report" / "edit_metrics.png"
    assert png.read_bytes()[:8] == PNG
    assert "<img src='edit_metrics.png'" in (workdir / "report" / "index.html").read_text()


def test_report_draws_curves_and_drift(run_cli, workdir):
    run = {"label": "memit sequential", "metrics": {"glue": {"sst2.acc": 0.6, "mean.acc": 0.6}},
           "base": {"glue": {"sst2.acc": 0.7, "mean.acc": 0.7}}, "delta": {"glue": {"sst2.acc": -0.1, "mean.acc": -0.1}},
           "ci": {"glue": {"sst2.acc": [-0.2, 0.0]}}, "info": {"glue": {"sst2": {"n": 100, "chance": 0.5, "majority": 0.5}}},
           "curve": [{"edits": n, "metrics": {"counterfact": {"ES": es}, "glue": {"mean.acc": acc}}}
                     for n, es, acc in [(1, 1.0, 0.7), (10, 0.9, 0.65), (100, 0.5, 0.6)]]}
    path = workdir / "runs.json"
    path.write_text(json.dumps({"runs": [run]}))
    code, out, err = run_cli("report", path, "-o", workdir / "r")
    assert code == 0, err
    for name in ("drift.png", "curves.png"):
        assert (workdir / "r" / name).read_bytes()[:8] == PNG
    assert "| sst2 | 100 | 0.500 | 0.500 |" in (workdir / "r" / "index.md").read_text()


def test_eval_bad_input(run_cli, tiny_dirs, spec_file, workdir):
    code, _, err = run_cli("eval", "--model", tiny_dirs["gpt2"], "--evaluator", "counterfact")
    assert code == 2 and "read edit specs" in err
    code, _, err = run_cli("eval", "--model", tiny_dirs["gpt2"], "--specs", spec_file, "--evaluator", "nope")
    assert code == 2 and "counterfact" in err  # the list of known names
    code, _, err = run_cli("eval", "--model", tiny_dirs["gpt2"], "--evaluator", "glue", "--data", workdir / "missing")
    assert code == 2 and "missing" in err
    code, _, err = run_cli("eval", "--model", tiny_dirs["gpt2"], "--specs", spec_file, "--evaluator", "fluency:bogus=1")
    assert code == 2 and "unknown option 'bogus'" in err
    bad = workdir / "bad.json"
    bad.write_text("{\"no\": 1}")
    code, _, err = run_cli("report", bad, "-o", workdir / "r")
    assert code == 2 and "metrics" in err


def test_bars_label_values_show_zero_and_missing():
    """Report bars carry their numbers; a 0 is drawn (a line at 0 in the bar's colour), a missing
    value says n/a, and intervals become error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kedit.report import bars

    fig, ax = plt.subplots()
    bars(ax, [0.0, 1.0, 2.0], [0.0, 0.42, None], 0.3, "unedited", err=[[0, 0.05, 0], [0, 0.04, 0]])
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["0.00", "0.42", "n/a"]
    zero_lines = [c for c in ax.collections if c.__class__.__name__ == "LineCollection" and len(c.get_segments()) == 1
                  and c.get_segments()[0][0][1] == 0 and c.get_segments()[0][1][1] == 0]
    assert zero_lines and zero_lines[0].get_segments()[0][0][0] == -0.15
    assert any(c.__class__.__name__ == "LineCollection" and len(c.get_segments()) == 3 for c in ax.collections)  # errors
    plt.close(fig)
