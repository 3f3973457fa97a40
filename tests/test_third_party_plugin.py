"""A real third-party plugin package (tests/plugin_pkg, ``kedit-bias-nudge``) installed with pip
into a private folder and found by the ``kedit`` CLI only through its entry point.

Everything is offline: pip builds from the local source with the environment's setuptools, and the
models are kedit.testing's tiny random GPT-2 and Llama.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kedit import diff as diffmod
from kedit.testing import save_tiny

SPEC = {"subject": "France", "prompt": "The capital of {} is", "target_new": "Rome", "target_true": "Paris"}


@pytest.fixture(scope="module")
def site() -> Path:
    """The plugin package, pip-installed (no deps, no index, no build isolation) by conftest."""
    import conftest

    assert conftest.PLUGIN_SITE is not None and (conftest.PLUGIN_SITE / "kedit_bias_nudge" / "__init__.py").is_file()
    return conftest.PLUGIN_SITE


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {kind: save_tiny(root / kind, kind) for kind in ("gpt2", "llama")}


def run_kedit(site: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run the kedit CLI in a fresh interpreter that sees the plugin only through PYTHONPATH."""
    full = {k: v for k, v in os.environ.items() if k not in ("KEDIT_LOAD_PLUGINS", "PYTHONPATH")}
    full.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                KEDIT_CACHE_DIR=str(cwd / "cache"), **env)
    return subprocess.run([sys.executable, "-m", "kedit.cli", *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=120)


def test_plugins_lists_the_package(site, tmp_path):
    # Naming the package in KEDIT_LOAD_PLUGINS (any spelling of its normalised name) lets it in.
    proc = run_kedit(site, tmp_path, "plugins", KEDIT_LOAD_PLUGINS="kedit_bias_nudge")
    assert proc.returncode == 0, proc.stderr
    mine = [p for p in json.loads(proc.stdout) if p["package"] == "kedit-bias-nudge"]
    assert len(mine) == 1, proc.stdout
    assert mine[0]["version"] == "0.1.0"
    assert mine[0]["hooks"] == ["register_editors"]
    assert mine[0]["registers"] == {"editors": ["nudge"]}


def test_editors_options_show_layer_and_scale(site, tmp_path):
    proc = run_kedit(site, tmp_path, "editors", "--options", "--json")
    assert proc.returncode == 0, proc.stderr
    nudge = json.loads(proc.stdout)["nudge"]
    assert nudge["package"] == "kedit-bias-nudge"
    assert set(nudge["options"]) == {"layer", "scale"}
    assert nudge["options"]["layer"]["default"] == -1
    assert nudge["options"]["scale"]["default"] == 5.0
    assert all(o["description"] for o in nudge["options"].values())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_apply_with_the_third_party_editor(site, models, tmp_path, kind):
    spec = tmp_path / "capital.jsonl"
    spec.write_text(json.dumps(SPEC) + "\n", encoding="utf-8")
    out = tmp_path / "x.kedit.safetensors"
    proc = run_kedit(site, tmp_path, "apply", str(spec), "--plugin", "nudge", "--model", str(models[kind]),
                 "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["diff"] == str(out) and out.is_file()
    assert result["editor"] == "nudge" and result["count"] == 1
    row = result["results"][0]
    assert row["p_new_after"] > row["p_new_before"], row

    d = diffmod.read(out)
    editor = d.manifest["editor"]
    assert editor["name"] == "nudge"
    assert editor["package"] == "kedit-bias-nudge"
    assert editor["version"] == "0.1.0"
    assert editor["options"] == {"layer": 3, "scale": 5.0}  # resolved for the model: the last of its 4 layers
    (param, entry), = d.manifest["entries"].items()  # one matrix: the last layer's MLP output
    assert param == {"gpt2": "transformer.h.3.mlp.c_proj.weight", "llama": "model.layers.3.mlp.down_proj.weight"}[kind]
    assert entry["encoding"] == "lowrank" and entry["rank"] == 1


def test_options_are_validated(site, models, tmp_path):
    spec = tmp_path / "capital.jsonl"
    spec.write_text(json.dumps(SPEC) + "\n", encoding="utf-8")
    proc = run_kedit(site, tmp_path, "apply", str(spec), "--plugin", "nudge", "-o", "sclae", "2",
                 "--model", str(models["gpt2"]), "--out", str(tmp_path / "x.kedit.safetensors"))
    assert proc.returncode == 2
    assert "unknown option 'sclae'" in proc.stderr and "layer, scale" in proc.stderr


def test_kedit_load_plugins_excludes_the_package(site, models, tmp_path):
    spec = tmp_path / "capital.jsonl"
    spec.write_text(json.dumps(SPEC) + "\n", encoding="utf-8")
    out = tmp_path / "x.kedit.safetensors"
    proc = run_kedit(site, tmp_path, "apply", str(spec), "--plugin", "nudge", "--model", str(models["gpt2"]),
                 "--out", str(out), KEDIT_LOAD_PLUGINS="none-such")
    assert proc.returncode == 2, proc.stderr
    assert "unknown editor 'nudge'" in proc.stderr
    assert "available:" in proc.stderr and "ft" in proc.stderr.split("available:")[1]
    assert not out.exists()
