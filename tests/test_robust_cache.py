"""Nothing silently wrong in model loading and caches: a damaged cache is rebuilt with a warning,
never used; a broken model folder or GGUF file is one clear InputError naming the file, never a
traceback and never a model with randomly initialised parts."""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kedit import cache as C
from kedit import models as M
from kedit import stats as S
from kedit.atomic import atomic_dir
from kedit.errors import InputError
from kedit.progress import Progress
from kedit.testing import CORPUS, tiny_model

pytestmark = pytest.mark.usefixtures("cache_dir")  # every test gets its own cache


def reporter() -> tuple[Progress, io.StringIO]:
    """A quiet reporter whose warnings land in a buffer (warnings show even when quiet)."""
    buf = io.StringIO()
    return Progress(quiet=True, stream=buf), buf


def error_line(err: str) -> str:
    """The CLI's one error line: the last line of stderr, and no traceback before it."""
    assert "Traceback" not in err and err.count("kedit: error:") == 1
    return err.splitlines()[-1]


def zero_bytes(path: Path, offset: int, n: int, keep_mtime: bool = False) -> None:
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0" * n)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


# --- the content record of a cache folder --------------------------------------------------------

def _folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "weights.bin").write_bytes(random.Random(0).randbytes(1 << 16))
    (root / "sub" / "tok.json").write_text('{"a": 1}', encoding="utf-8")
    C.write_record(root)
    return root


def test_folder_record_trusts_an_unchanged_folder_and_finds_every_damage(tmp_path):
    folder = _folder(tmp_path / "f")
    assert C.verify_folder(folder) is None and C.verify_folder(folder, full=True) is None

    weights = folder / "weights.bin"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # touched only
    assert C.verify_folder(folder) is None
    record = json.loads((folder / C.RECORD).read_text())
    assert record["files"]["weights.bin"]["mtime_ns"] == weights.stat().st_mtime_ns  # refreshed: fast again

    zero_bytes(weights, 1000, 4096)
    assert "weights.bin changed" in C.verify_folder(folder)

    for damage, expected in [(lambda f: truncate(f / "weights.bin"), "weights.bin has 32,768 bytes instead of 65,536"),
                             (lambda f: (f / "sub" / "tok.json").write_bytes(b""), "sub/tok.json has 0 bytes"),
                             (lambda f: (f / "sub" / "tok.json").unlink(), "sub/tok.json is missing"),
                             (lambda f: (f / "extra.safetensors").write_bytes(b"x"), "extra.safetensors was not part"),
                             (lambda f: (f / C.RECORD).write_text("{", encoding="utf-8"), "record .* is damaged"),
                             (lambda f: (f / C.RECORD).unlink(), "no content record")]:
        shutil.rmtree(folder)
        _folder(folder)
        damage(folder)
        problem = C.verify_folder(folder)
        assert problem is not None and __import__("re").search(expected, problem), (expected, problem)


def test_fast_path_trusts_size_and_mtime_and_the_full_check_does_not(tmp_path):
    """The contract of the fast path, as make and rsync have it: bytes changed with the mtime put
    back are only found by a full check."""
    folder = _folder(tmp_path / "f")
    zero_bytes(folder / "weights.bin", 1000, 4096, keep_mtime=True)
    assert C.verify_folder(folder) is None
    assert "weights.bin changed" in C.verify_folder(folder, full=True)


def test_checked_files_and_file_records(tmp_path):
    path = tmp_path / "x.pt"
    C.write_checked(path, b"payload" * 100)
    assert C.read_checked(path) == (b"payload" * 100, "")
    raw = path.read_bytes()
    for damaged, expected in [(raw[:-10], "bytes instead of"), (raw[:-1] + b"X", "does not match its checksum"),
                              (b"", "empty"), (b"payload", "no checksum header")]:
        path.write_bytes(damaged)
        assert C.read_checked(path)[0] is None and expected in C.read_checked(path)[1]

    text = tmp_path / "c.jsonl"
    text.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert C.check_file_record(text) == "it has no checksum"
    C.write_file_record(text)
    assert C.check_file_record(text) is None
    text.write_text('{"text": "a"}\n', encoding="utf-8")  # cut at a line boundary: still valid JSONL
    assert "bytes instead of" in C.check_file_record(text)


# --- the dequantized GGUF cache --------------------------------------------------------------------

@pytest.fixture
def fake_gguf(tmp_path, tiny_dirs, monkeypatch):
    """A GGUF file whose "dequantization" copies the tiny Llama (and counts how often it ran)."""
    gguf = tmp_path / "src" / "tiny.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 16)
    calls = []

    def dequantize(path, folder, progress):
        calls.append(path)
        with atomic_dir(folder) as tmp:
            shutil.copytree(tiny_dirs["llama"], tmp, dirs_exist_ok=True)
            C.write_record(tmp)

    monkeypatch.setattr(M, "_dequantize", dequantize)
    return types.SimpleNamespace(path=gguf, calls=calls)


@pytest.mark.parametrize("damage, warned", [
    (lambda f: zero_bytes(f / "model.safetensors", 2000, 3000), "model.safetensors changed"),
    (lambda f: truncate(f / "model.safetensors"), "model.safetensors has"),
    (lambda f: (f / "model.safetensors").write_bytes(b""), "model.safetensors has 0 bytes"),
    (lambda f: truncate(f / "tokenizer.json"), "tokenizer.json has"),
    (lambda f: (f / "config.json").unlink(), "config.json is missing"),
    (lambda f: (f / C.RECORD).write_text("not json", encoding="utf-8"), "is damaged"),
], ids=["zeroed", "truncated", "empty", "tokenizer-truncated", "config-missing", "record-damaged"])
def test_a_damaged_gguf_cache_is_rebuilt_with_a_warning_never_used(fake_gguf, damage, warned):
    progress, buf = reporter()
    folder, _ = M._cached_gguf_folder(fake_gguf.path, progress)
    assert len(fake_gguf.calls) == 1 and C.verify_folder(folder) is None
    assert M._cached_gguf_folder(fake_gguf.path, progress)[0] == folder and len(fake_gguf.calls) == 1  # cached

    damage(folder)
    assert M._cached_gguf_folder(fake_gguf.path, progress)[0] == folder
    assert len(fake_gguf.calls) == 2 and C.verify_folder(folder) is None  # rebuilt, and intact
    (line,) = [ln for ln in buf.getvalue().splitlines() if "warning" in ln]
    assert f"cached fp32 copy of tiny.gguf in {folder} is damaged" in line and warned in line and "rebuilding" in line
    model, _, source = M.load(str(fake_gguf.path))
    assert source.kind == "gguf" and model.config.model_type == "llama"


def test_processes_that_start_together_convert_the_gguf_once(fake_gguf, monkeypatch, tmp_path):
    """torchrun's ranks on a fresh cache: the first converts, the others wait and use its folder
    (before, the second replaced the first's folder while the first was reading it)."""
    import multiprocessing
    import time

    slow, log = M._dequantize, tmp_path / "conversions"

    def dequantize(path, folder, progress):
        with open(log, "a") as fh:
            fh.write("converted\n")
        time.sleep(0.5)
        slow(path, folder, progress)

    monkeypatch.setattr(M, "_dequantize", dequantize)
    ctx = multiprocessing.get_context("fork")  # the children keep this test's patches
    procs = [ctx.Process(target=_convert_and_check, args=(str(fake_gguf.path),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert log.read_text().count("converted") == 1


def _convert_and_check(path: str) -> None:
    folder, _ = M._cached_gguf_folder(Path(path), reporter()[0])
    if C.verify_folder(folder) is not None or not (folder / "config.json").is_file():
        raise SystemExit(1)


def test_a_cache_from_before_content_records_is_rebuilt_once(fake_gguf):
    folder, _ = M._cached_gguf_folder(fake_gguf.path, reporter()[0])
    (folder / C.RECORD).unlink()  # as an older kedit left it
    progress = Progress(quiet=False, stream=io.StringIO(), tty=False)
    M._cached_gguf_folder(fake_gguf.path, progress)
    assert len(fake_gguf.calls) == 2 and "predates content records" in progress.stream.getvalue()
    M._cached_gguf_folder(fake_gguf.path, progress)
    assert len(fake_gguf.calls) == 2  # once


def _embedded_prefix(tmp_path: Path, n: int) -> Path:
    try:
        real = M.embedded_gguf()
    except InputError:
        pytest.skip("the embedded model's package is not installed")
    path = tmp_path / "cut.gguf"
    with open(real, "rb") as fh:
        path.write_bytes(fh.read(n))
    return path


@pytest.mark.parametrize("make, expected", [
    (lambda d: (d / "random.gguf").write_bytes(random.Random(1).randbytes(5000)) and d / "random.gguf",
     "not a GGUF file"),
    (lambda d: (d / "empty.gguf").write_bytes(b"") or d / "empty.gguf", "the file is empty"),
    (lambda d: _embedded_prefix(d, 1_000_000), "cannot read it as a GGUF model; is it truncated"),
], ids=["random", "empty", "truncated"])
def test_a_garbage_gguf_file_is_an_input_error_that_leaves_no_cache(tmp_path, cache_dir, make, expected):
    path = make(tmp_path)
    with pytest.raises(InputError, match=expected) as err:
        M.load(str(path))
    assert str(err.value).startswith(str(path.resolve())) and "\n" not in str(err.value)
    models = cache_dir / "models"
    assert not models.exists() or not any(models.iterdir())  # no half-written folder, no temporary one


def test_a_garbage_gguf_file_on_the_command_line(run_cli, tmp_path, corpus):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"\x00" * 100)
    code, out, err = run_cli("stats", "compute", "--model", bad, "--corpus", corpus, "--layers", "0")
    assert code == 2 and error_line(err).startswith(f"kedit: error: {bad.resolve()}: not a GGUF file")


REAL_CACHE_ZERO = 3 << 20  # 3 MiB, as in the report


def test_the_real_embedded_cache_with_zeroed_bytes_is_detected(tmp_path, monkeypatch):
    """The issue's case on the real dequantized SmolLM2 cache (a copy; ~0.5 GB): 3 MiB zeroed in
    model.safetensors is found and sent to a rebuild (the 30 s rebuild itself is stubbed)."""
    monkeypatch.delenv("KEDIT_CACHE_DIR")
    try:
        gguf = M.embedded_gguf()
    except InputError:
        pytest.skip("the embedded model's package is not installed")
    digest = C.file_sha256(gguf)
    real = M.gguf_cache_folder(gguf, digest)
    if not (real / "model.safetensors").is_file():
        pytest.skip(f"no dequantized cache of the embedded model at {real}")
    monkeypatch.setenv("KEDIT_CACHE_DIR", str(tmp_path / "cache"))
    copy = M.gguf_cache_folder(gguf, digest)
    try:
        shutil.copytree(real, copy, ignore=shutil.ignore_patterns(C.RECORD))
        C.write_record(copy)
        assert M._cached_gguf_folder(gguf, reporter()[0])[0] == copy  # intact: used as it is
        zero_bytes(copy / "model.safetensors", 100 << 20, REAL_CACHE_ZERO)
        rebuilt = []
        monkeypatch.setattr(M, "_dequantize", lambda g, f, p: rebuilt.append(f))
        progress, buf = reporter()
        M._cached_gguf_folder(gguf, progress)
        assert rebuilt == [copy] and "model.safetensors changed" in buf.getvalue()
    finally:
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)


# --- model folders that would load wrong -----------------------------------------------------------

def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_weights(folder: Path, fn) -> None:
    weights = load_file(folder / "model.safetensors")
    fn(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _no_tokenizer(folder: Path) -> None:
    for f in folder.glob("tokenizer*"):
        f.unlink()


BROKEN_FOLDERS = {
    "missing-tensor": (lambda f: _edit_weights(f, lambda w: w.pop("model.layers.1.mlp.down_proj.weight")),
                       r"1 missing from the checkpoint \(model\.layers\.1\.mlp\.down_proj\.weight\)"),
    "more-layers-in-config": (lambda f: _edit_config(f, num_hidden_layers=40),
                              r"324 missing .*model\.layers\.4\.input_layernorm\.weight, .* and 319 more"),
    "unexpected-tensor": (lambda f: _edit_weights(f, lambda w: w.update({"model.extra.weight": torch.zeros(2)})),
                          r"1 in the checkpoint but not in the model \(model\.extra\.weight\)"),
    "wrong-intermediate-size": (lambda f: _edit_config(f, intermediate_size=48),
                                r"model\.layers\.0\.mlp\.down_proj\.weight is \[32, 64\] in the checkpoint but "
                                r"\[32, 48\] by config\.json \(and 11 more\)"),
    "unknown-model-type": (lambda f: _edit_config(f, model_type="zorblax"),
                           r"config\.json: model_type 'zorblax' is unknown to transformers .*gpt2.*llama.*"
                           r"`kedit architectures`"),
    "truncated-config": (lambda f: truncate(f / "config.json"), r"config\.json: not valid JSON, perhaps truncated"),
    "empty-config": (lambda f: (f / "config.json").write_bytes(b""), r"config\.json: not valid JSON"),
    "no-tokenizer": (_no_tokenizer, r"no tokenizer in the model folder"),
    "truncated-tokenizer": (lambda f: truncate(f / "tokenizer.json"), r"cannot load its tokenizer; is a tokenizer file"),
    "truncated-weights": (lambda f: truncate(f / "model.safetensors"), r"a weights file is truncated or damaged"),
    "empty-weights": (lambda f: (f / "model.safetensors").write_bytes(b""), r"a weights file is truncated"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FOLDERS))
def test_a_broken_model_folder_is_one_clear_input_error(tiny_dirs, tmp_path, case):
    damage, expected = BROKEN_FOLDERS[case]
    folder = tmp_path / case
    shutil.copytree(tiny_dirs["llama"], folder)
    damage(folder)
    with pytest.raises(InputError, match=expected) as err:
        M.load(str(folder))
    assert str(err.value).startswith(str(folder)) and "\n" not in str(err.value)


def test_missing_weights_on_the_command_line(run_cli, tiny_dirs, tmp_path, corpus):
    folder = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama"], folder)
    _edit_config(folder, num_hidden_layers=6)
    code, _, err = run_cli("stats", "compute", "--model", folder, "--corpus", corpus, "--layers", "0")
    assert code == 2 and error_line(err).startswith(f"kedit: error: {folder}: the weights do not match config.json: "
                                                    "18 missing")


def test_tied_weights_are_not_missing(tmp_path, tiny_dirs):
    """An LM head tied to the embeddings is left out of the checkpoint, and that is fine."""
    gpt2 = M.load(str(tiny_dirs["gpt2"])).model
    assert gpt2.lm_head.weight.data_ptr() == gpt2.transformer.wte.weight.data_ptr()
    folder = tmp_path / "tied"
    shutil.copytree(tiny_dirs["llama"], folder)
    _edit_config(folder, tie_word_embeddings=True)
    _edit_weights(folder, lambda w: w.pop("lm_head.weight"))
    model = M.load(str(folder)).model
    assert torch.equal(model.lm_head.weight, load_file(folder / "model.safetensors")["model.embed_tokens.weight"])


def test_model_paths_that_do_not_exist(tmp_path):
    for path in [tmp_path / "nope", "./nope", tmp_path / "a" / "b" / "c"]:
        with pytest.raises(InputError, match="no such model folder"):
            M.load(str(path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a model folder \\(no config.json\\)"):
        M.load(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="no such GGUF file"):
        M.load(str(tmp_path / "x.gguf"))


def test_unregistered_architecture_names_the_config_and_the_known_ones(tmp_path):
    from kedit.arch import arch_for

    config = types.SimpleNamespace(model_type="opt", name_or_path=str(tmp_path))
    with pytest.raises(InputError, match=rf"^{tmp_path}/config\.json: no architecture registered for model_type "
                                         r"'opt'; available: .*llama.*`kedit architectures`"):
        arch_for(config)


# --- key statistics ------------------------------------------------------------------------------

def _stats(corpus, progress=None) -> S.KeyStats:
    return S.KeyStats(str(corpus), n_tokens=200, max_len=32, batch_size=4, progress=progress)


def _rewrite(path: Path, tensor: torch.Tensor | None = None, honest: bool = False, **meta_changes) -> None:
    """Replace a statistics file's tensor and/or metadata; ``honest`` recomputes its checksum (so
    only the other checks can catch it)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta, old = dict(fh.metadata()), fh.get_tensor("mom2")
    tensor = old if tensor is None else tensor
    meta.update(meta_changes)
    if honest:
        meta.update(sha256=S.tensor_sha256(tensor), shape=",".join(map(str, tensor.shape)))
    meta = {k: v for k, v in meta.items() if v is not None}
    save_file({"mom2": tensor.contiguous()}, str(path), metadata=meta)


STATS_DAMAGE = {
    "scaled-x50": (lambda p, t: _rewrite(p, t * 50), "does not match its checksum"),
    "nan": (lambda p, t: _rewrite(p, torch.full_like(t, float("nan"))), "does not match its checksum"),
    "nan-with-its-checksum": (lambda p, t: _rewrite(p, torch.full_like(t, float("nan")), honest=True),
                              "non-finite values"),
    "7x7": (lambda p, t: _rewrite(p, torch.eye(7, dtype=torch.float64), honest=True),
            "float64 7×7 matrix, not float64 128×128"),
    "float32": (lambda p, t: _rewrite(p, t.float(), honest=True), "float32 128×128 matrix"),
    "zero-count": (lambda p, t: _rewrite(p, count="0"), "records 0 tokens"),
    "no-checksum": (lambda p, t: _rewrite(p, sha256=None), "without a checksum"),
    "truncated": (lambda p, t: truncate(p), "cannot be read"),
    "empty": (lambda p, t: p.write_bytes(b""), "cannot be read"),
}


@pytest.mark.parametrize("case", sorted(STATS_DAMAGE))
def test_damaged_statistics_are_recomputed_with_a_warning(tok, corpus, cache_dir, monkeypatch, case):
    damage, warned = STATS_DAMAGE[case]
    model = tiny_model("gpt2")  # d_k = 128: the MLP output's input is 4 × n_embd
    calls = [0]
    real = S.accumulate

    def counting(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(S, "accumulate", counting)
    first = _stats(corpus).second_moment(model, tok, [1])[1]
    (path,) = (cache_dir / "stats").glob("*.safetensors")
    damage(path, first)
    progress, buf = reporter()
    stats = _stats(corpus, progress)
    again = stats.second_moment(model, tok, [1])[1]
    assert calls[0] == 2 and stats.last[1]["source"] == "computed" and torch.equal(again, first)
    (line,) = buf.getvalue().splitlines()
    assert line.startswith(f"kedit: warning: key statistics file {path} ") and warned in line
    assert line.endswith("; recomputing it")
    reread = _stats(corpus)
    assert torch.equal(reread.second_moment(model, tok, [1])[1], first) and reread.last[1]["source"] == "disk"


def test_a_damaged_sampled_corpus_is_sampled_again(tok, cache_dir, monkeypatch):
    samples = []

    def sample(model, tokenizer, n_tokens, max_len, seed, bar):
        samples.append(seed)
        return [f"{doc} {seed}" for doc in CORPUS * 4]

    monkeypatch.setattr(S, "sample_documents", sample)
    model = tiny_model("gpt2")
    first = S.KeyStats("sampled", n_tokens=100, max_len=32).second_moment(model, tok, [0])[0]
    (path,) = (cache_dir / "corpora").glob("sampled-*.jsonl")
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-3]), encoding="utf-8")  # valid, shorter
    progress, buf = reporter()
    again = S.KeyStats("sampled", n_tokens=100, max_len=32, progress=progress).second_moment(model, tok, [0])[0]
    assert len(samples) == 2 and torch.equal(first, again)
    assert "sampled statistics corpus" in buf.getvalue() and "sampling it again" in buf.getvalue()


# --- evaluation and corpus caches ------------------------------------------------------------------

@pytest.mark.parametrize("damage, warned", [
    (lambda p: truncate(p), "bytes instead of"),
    (lambda p: p.write_bytes(b""), "it is empty"),
    (lambda p: p.write_bytes(p.read_bytes()[:-1] + b"\x01"), "does not match its checksum"),
], ids=["truncated", "empty", "flipped"])
def test_a_damaged_evaluation_cache_is_recomputed_with_a_warning(tok, cache_dir, damage, warned):
    from kedit.evaluate import Evaluation, resolve_evaluators
    from kedit.spec import EditSpec

    specs = [EditSpec(subject="France", prompt="The capital of {} is", target_new="Rome", target_true="Paris")]
    model = tiny_model("gpt2")
    first = Evaluation(resolve_evaluators(["counterfact"]), specs)
    first.base(model, tok)
    (path,) = (cache_dir / "eval").glob("*.pt")
    damage(path)
    progress, buf = reporter()
    again = Evaluation(resolve_evaluators(["counterfact"]), specs, progress=progress)
    again.base(model, tok)
    run = again.base_runs["counterfact"]
    assert not run.cached and run.result.metrics == first.base_runs["counterfact"].result.metrics
    (line,) = buf.getvalue().splitlines()
    assert f"evaluation cache file {path} is damaged" in line and warned in line
    assert C.read_checked(path)[0] is not None  # rewritten intact


def test_a_truncated_builtin_corpus_cache_is_rebuilt_with_a_warning(cache_dir):
    from kedit import corpus as K

    K._BUILTIN_CACHE.clear()
    docs, sha = K.builtin_documents()
    (path,) = (cache_dir / "corpora").glob("builtin-*.json")
    truncate(path)
    K._BUILTIN_CACHE.clear()
    progress, buf = reporter()
    assert K.builtin_documents(progress) == (docs, sha)
    assert f"built-in corpus cache {path} is damaged" in buf.getvalue() and "rebuilding it" in buf.getvalue()
    K._BUILTIN_CACHE.clear()
    assert K.builtin_documents(progress) == (docs, sha) and buf.getvalue().count("warning") == 1
