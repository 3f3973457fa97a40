from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kedit.testing import save_tiny

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA_DOC = "docs/evaluation.md, section 'Data', says what it is and where to get it"


def needs_shared(sub: str, what: str):
    """Skip a test whose real data (``../shared/data/SUB``) is absent, saying what it is and where
    the docs say to get it, instead of a bare "not present"."""
    return pytest.mark.skipif(not (SHARED / sub).exists(),
                              reason=f"needs {what} at {SHARED / sub}, which is not here ({DATA_DOC})")
PLUGIN_PKG = Path(__file__).parent / "plugin_pkg"
PLUGIN_SITE: Path | None = None  # where pytest_configure installed the third-party test plugin


def pytest_configure(config):
    """Install the third-party test plugin (``kedit-bias-nudge``) once per session, offline, into a
    private folder on sys.path: every in-process test, the editor contract matrix above all, then
    sees it through its entry point exactly as a user's installed plugin."""
    global PLUGIN_SITE
    root = Path(tempfile.mkdtemp(prefix="kedit-plugin-"))
    src = root / "src"
    shutil.copytree(PLUGIN_PKG, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--disable-pip-version-check", "--quiet", "--target", str(root / "site"), str(src)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise pytest.UsageError(f"could not install tests/plugin_pkg: {proc.stdout}{proc.stderr}")
    PLUGIN_SITE = root / "site"
    sys.path.insert(0, str(PLUGIN_SITE))
    importlib.invalidate_caches()
    config._kedit_plugin_root = root


def pytest_unconfigure(config):
    root = getattr(config, "_kedit_plugin_root", None)
    if root is not None:
        if str(root / "site") in sys.path:
            sys.path.remove(str(root / "site"))
        shutil.rmtree(root, ignore_errors=True)

TINY_SPECS = [
    {"id": "fr", "subject": "France", "prompt": "The capital of {} is", "target_new": "Rome", "target_true": "Paris",
     "paraphrases": ["France's capital is"], "neighborhood": [{"prompt": "The capital of Spain is", "target": "Madrid"}]},
    {"id": "lebron", "subject": "LeBron James", "prompt": "{} plays the sport of", "target_new": "football",
     "target_true": "basketball"},
]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """from_pretrained folders: tiny GPT-2 and Llama, plus a GPT-2 with other weights."""
    root = tmp_path_factory.mktemp("models")
    return {"gpt2": save_tiny(root / "gpt2", "gpt2", seed=0), "llama": save_tiny(root / "llama", "llama", seed=0),
            "gpt2-other": save_tiny(root / "gpt2-other", "gpt2", seed=1)}


@pytest.fixture
def spec_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "specs.jsonl", TINY_SPECS)


def files_under(root: Path) -> set[str]:
    """Every file below ``root``, relative: what a refused command must not have changed."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KEDIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def tok():
    from kedit.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def corpus(tmp_path) -> Path:
    from kedit.testing import CORPUS

    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(CORPUS * 4), encoding="utf-8")
    return path


@pytest.fixture
def run_cli(capsys):
    """Run the kedit CLI in process; returns (exit code, stdout, stderr)."""
    from kedit.cli import main

    def run(*argv: str):
        code = main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
