"""Every cache key hashes content, never state that changes while kedit runs: the tokenizer's
vocabulary and rules (not its padding/truncation settings), the model's weights, data bytes and
options. A key that changed between two runs would recompute minutes of work; one that did not
change when the content did would serve a stale result."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_SPECS

from kedit.hashing import tokenizer_sha256
from kedit.testing import CORPUS, tiny_tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KEDIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(CORPUS * 6), encoding="utf-8")
    return path


def _use_padding_and_truncation(tok) -> None:
    tok(["The capital of France is", "a"], padding=True, truncation=True, max_length=4)
    tok("The capital", padding="max_length", max_length=12)


def test_tokenizer_hash_ignores_padding_and_truncation_settings():
    tok = tiny_tokenizer()
    state, key = tok.backend_tokenizer.to_str(), tokenizer_sha256(tok)
    _use_padding_and_truncation(tok)
    assert tok.backend_tokenizer.to_str() != state  # the calls did change the serialized state...
    assert tokenizer_sha256(tok) == key  # ...but not what decides the tokenization
    tok(["x"], padding=False, truncation=False)
    assert tokenizer_sha256(tok) == key


def test_tokenizer_hash_differs_for_one_extra_token_or_another_eos():
    tok = tiny_tokenizer()
    key = tokenizer_sha256(tok)
    more = tiny_tokenizer()
    more.add_tokens(["<extra-token>"])
    assert tokenizer_sha256(more) != key
    other = tiny_tokenizer()
    other.eos_token = "the"
    assert tokenizer_sha256(other) != key


def test_tokenizer_hash_is_the_same_in_another_process(tmp_path):
    from transformers import AutoTokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    here = AutoTokenizer.from_pretrained(tmp_path / "tok")
    _use_padding_and_truncation(here)
    code = ("import sys; from transformers import AutoTokenizer; from kedit.hashing import tokenizer_sha256; "
            "print(tokenizer_sha256(AutoTokenizer.from_pretrained(sys.argv[1])))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tok")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == tokenizer_sha256(here)


def _stats_keys(model_dir: str, corpus: str) -> dict:
    from kedit.models import load
    from kedit.stats import KeyStats

    model, tok, _ = load(model_dir)
    return KeyStats(corpus, n_tokens=500, max_len=32).cache_keys(model, tok, [1, 2])


def test_statistics_keys_survive_other_editors_in_any_order_and_other_processes(tiny_dirs, corpus, cache):
    """The design card's case: an ft run pads and truncates with the tokenizer, then memit and
    rome ask for statistics; neither the order nor a new process may change the key."""
    from kedit.editing import EditPlan, compute_diff
    from kedit.models import load
    from kedit.spec import EditSpec
    from kedit.stats import KeyStats

    loaded = load(str(tiny_dirs["llama"]))
    model, tok, _ = loaded
    specs = [EditSpec(**s) for s in TINY_SPECS]
    stats = KeyStats(str(corpus), n_tokens=500, max_len=32)
    keys = stats.cache_keys(model, tok, [1, 2])
    plans = [EditPlan.make(model, "ft", {"layer": 1, "steps": 2}),
             EditPlan.make(model, "memit", {"layers": [1, 2], "v_steps": 2}, stats=stats),
             EditPlan.make(model, "rome", {"layer": 1, "v_steps": 2}, stats=stats)]
    for order in (plans, plans[::-1]):
        for plan in order:
            compute_diff(loaded, specs, plan)
            assert KeyStats(str(corpus), n_tokens=500, max_len=32).cache_keys(model, tok, [1, 2]) == keys
    again = KeyStats(str(corpus), n_tokens=500, max_len=32)
    again.second_moment(model, tok, [1, 2])
    assert {info["source"] for info in again.last.values()} == {"disk"}  # computed once, served from disk

    code = ("import json, sys; sys.path.insert(0, sys.argv[3]); from test_cache_keys import _stats_keys; "
            "print(json.dumps(_stats_keys(sys.argv[1], sys.argv[2])))")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_dirs["llama"]), str(corpus), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()} == keys


def test_statistics_keys_change_with_the_content(tiny_dirs, corpus, tmp_path, cache):
    from kedit.models import load
    from kedit.stats import KeyStats

    model, tok, _ = load(str(tiny_dirs["llama"]))
    keys = KeyStats(str(corpus), n_tokens=500, max_len=32).cache_keys(model, tok, [1, 2])
    moved = tmp_path / "elsewhere" / "renamed.txt"
    moved.parent.mkdir()
    shutil.copy(corpus, moved)
    assert KeyStats(str(moved), n_tokens=500, max_len=32).cache_keys(model, tok, [1, 2]) == keys  # content, not path
    moved.write_text(corpus.read_text() + "\n\nOne more sentence.", encoding="utf-8")
    assert KeyStats(str(moved), n_tokens=500, max_len=32).cache_keys(model, tok, [1, 2]) != keys
    more = tiny_tokenizer()
    more.add_tokens(["<extra-token>"])
    assert KeyStats(str(corpus), n_tokens=500, max_len=32).cache_keys(model, more, [1, 2]) != keys
    with __import__("torch").no_grad():
        model.get_parameter("model.layers.2.mlp.down_proj.weight").add_(1e-3)
    changed = KeyStats(str(corpus), n_tokens=500, max_len=32).cache_keys(model, tok, [1, 2])
    assert changed[1] == keys[1] and changed[2] != keys[2]  # an edit at layer 2 cannot move layer 1's keys
    with __import__("torch").no_grad():
        model.get_parameter("model.layers.1.mlp.down_proj.weight").add_(1e-3)
    assert KeyStats(str(corpus), n_tokens=500, max_len=32).cache_keys(model, tok, [1, 2])[1] != keys[1]


def test_sampled_corpus_is_found_again_after_the_tokenizer_was_used(cache):
    from kedit.stats import KeyStats
    from kedit.testing import tiny_model

    model, tok = tiny_model("llama"), tiny_tokenizer()
    first = KeyStats("sampled", n_tokens=60, max_len=4)
    first.second_moment(model, tok, [1])
    path = first.record()["corpus"]["path"]
    _use_padding_and_truncation(tok)
    again = KeyStats("sampled", n_tokens=60, max_len=4)
    again.second_moment(model, tok, [1])
    assert again.record()["corpus"]["path"] == path and len(list((cache / "corpora").glob("sampled-*.jsonl"))) == 1
    assert {info["source"] for info in again.last.values()} == {"disk"}


def test_evaluation_cache_key_is_content_not_state_or_paths(tiny_dirs, tmp_path, cache):
    from kedit.evaluate import Evaluation, resolve_evaluators
    from kedit.models import load
    from kedit.spec import EditSpec

    model, tok, _ = load(str(tiny_dirs["gpt2"]))
    text = tmp_path / "a" / "text.txt"
    text.parent.mkdir()
    text.write_text(" ".join(CORPUS), encoding="utf-8")
    specs = [EditSpec(**s) for s in TINY_SPECS]

    def key(data: Path, tokenizer=tok) -> str:
        ev = Evaluation(resolve_evaluators(["counterfact", f"perplexity:data={data},window=32"]), specs)
        ev.base(model, tokenizer)
        return ev._key(ev.chosen[1])

    first = key(text)
    _use_padding_and_truncation(tok)
    assert key(text) == first
    moved = tmp_path / "b" / "moved.txt"
    moved.parent.mkdir()
    shutil.copy(text, moved)
    assert key(moved) == first  # the data's bytes, not where they are
    moved.write_text(text.read_text() + " More.", encoding="utf-8")
    assert key(moved) != first
    more = tiny_tokenizer()
    more.add_tokens(["<extra-token>"])
    more.pad_token = more.eos_token
    assert key(text, more) != first


def test_dequantized_model_cache_is_named_by_the_files_content(tmp_path, cache):
    from kedit.cache import file_sha256
    from kedit.models import gguf_cache_folder

    a = tmp_path / "x" / "model.gguf"
    a.parent.mkdir()
    a.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    b = tmp_path / "y" / "model.gguf"
    b.parent.mkdir()
    shutil.copy(a, b)
    assert gguf_cache_folder(a, file_sha256(a)) == gguf_cache_folder(b, file_sha256(b))
    raw = bytearray(b.read_bytes())
    raw[100] ^= 1
    b.write_bytes(bytes(raw))
    assert gguf_cache_folder(a, file_sha256(a)) != gguf_cache_folder(b, file_sha256(b))


def test_builtin_corpus_is_keyed_by_its_data_and_rebuilds_a_damaged_cache(cache):
    from kedit import corpus as C

    C._BUILTIN_CACHE.clear()
    docs, sha = C.builtin_documents()
    assert len(docs) > 1000 and sha == C.docs_sha256(docs)
    (cached,) = (cache / "corpora").glob("builtin-*.json")
    cached.write_text(json.dumps({"sha256": sha, "documents": docs[:10]}), encoding="utf-8")  # damaged
    C._BUILTIN_CACHE.clear()
    docs2, sha2 = C.builtin_documents()
    assert (docs2, sha2) == (docs, sha)
    record = C.open_corpus(None).describe
    assert record["kind"] == "builtin" and "public domain" in record["licence"] and record["documents"] == len(docs)
