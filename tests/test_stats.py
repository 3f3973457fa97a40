"""Key statistics: exact against a direct computation, one pass, content-keyed caching, offline default."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kedit import stats as S
from kedit.arch import arch_for
from kedit.errors import InputError
from kedit.testing import CORPUS, tiny_model

N_TOKENS, MAX_LEN = 300, 32  # 9 full rows and a partial one: packing, batching and masking are all exercised


pytestmark = pytest.mark.usefixtures("cache_dir")  # every test gets its own cache


def _stats(corpus, **kw) -> S.KeyStats:
    return S.KeyStats(str(corpus), **{"n_tokens": N_TOKENS, "max_len": MAX_LEN, "batch_size": 4, **kw})


def _direct(model, tok, docs: list[str], layers: list[int]) -> dict[int, torch.Tensor]:
    """Independent reference: pack by hand, run each row alone through the FULL model, stack every key."""
    stream: list[int] = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    stream = stream[:N_TOKENS]
    arch, keys = arch_for(model), {layer: [] for layer in layers}
    handles = [model.get_submodule(arch.mlp_out.format(layer)).register_forward_hook(
        lambda _m, args, _out, layer=layer: keys[layer].append(args[0][0].double())) for layer in layers]
    with torch.no_grad():
        for i in range(0, len(stream), MAX_LEN):
            model(input_ids=torch.tensor([stream[i:i + MAX_LEN]]))
    for h in handles:
        h.remove()
    out = {}
    for layer, xs in keys.items():
        x = torch.cat(xs)
        assert x.shape[0] == N_TOKENS
        out[layer] = x.T @ x / x.shape[0]
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _count_layer_calls(model) -> list[int]:
    arch, calls = arch_for(model), [0] * 4
    for i in range(4):
        model.get_submodule(f"{arch.layers}.{i}").register_forward_pre_hook(
            lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_matches_direct_computation(kind, tok, corpus):
    model = tiny_model(kind)
    got = _stats(corpus).second_moment(model, tok, [2, 0])
    want = _direct(model, tok, S.read_documents(corpus), [0, 2])
    assert sorted(got) == [0, 2]
    for layer in (0, 2):
        assert got[layer].dtype == torch.float64 and got[layer].shape == want[layer].shape
        assert _rel(got[layer], want[layer]) < 1e-6


def test_one_pass_that_stops_after_the_deepest_layer(tok, corpus, tmp_path, monkeypatch):
    model = tiny_model("gpt2")
    calls = _count_layer_calls(model)
    forwards = [0]
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    _stats(corpus).second_moment(model, tok, [2])
    assert forwards[0] == 3 and calls == [3, 3, 3, 0]  # 10 rows in batches of 4; layer 3 and the head never run
    monkeypatch.setenv("KEDIT_CACHE_DIR", str(tmp_path / "fresh"))
    _stats(corpus).second_moment(model, tok, [0, 2])  # two layers cost what one does
    assert forwards[0] == 6 and calls == [6, 6, 6, 0]
    _stats(corpus, seed=1).second_moment(model, tok, [0, 2])  # seed is irrelevant for a file corpus: cache hit
    assert forwards[0] == 6


def test_cache_is_keyed_by_content(tok, corpus, tmp_path, monkeypatch, cache_dir):
    model = tiny_model("gpt2")
    first = _stats(corpus).second_moment(model, tok, [0, 2])
    assert len(list((cache_dir / "stats").glob("*.safetensors"))) == 2

    def boom(*_a, **_k):
        raise AssertionError("recomputed although cached")

    real = S.accumulate
    monkeypatch.setattr(S, "accumulate", boom)
    stats = _stats(corpus)
    again = stats.second_moment(model, tok, [0, 2])  # a fresh provider: from disk
    assert all(torch.equal(first[k], again[k]) for k in first) and stats.last[0]["source"] == "disk"
    assert stats.used and not _stats(corpus).used
    assert stats.record()["n_tokens"] == N_TOKENS and set(stats.record()["layers"]) == {"0", "2"}

    with torch.no_grad():  # a change ABOVE layer 2 leaves layers 0 and 2 cached
        model.get_submodule("transformer.h.3.mlp.c_proj").weight.add_(1.0)
    _stats(corpus).second_moment(model, tok, [0, 2])
    with torch.no_grad():
        model.get_submodule("transformer.h.1.mlp.c_proj").weight.add_(1.0)
    _stats(corpus).second_moment(model, tok, [0])  # ... a change in layer 1 leaves layer 0 cached
    with pytest.raises(AssertionError, match="recomputed"):
        _stats(corpus).second_moment(model, tok, [2])

    monkeypatch.setattr(S, "accumulate", real)
    calls = [0]

    def counting(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(S, "accumulate", counting)
    _stats(corpus).second_moment(tiny_model("gpt2", seed=1), tok, [0])  # other weights
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text() + "\n\nOne more paragraph.", encoding="utf-8")
    _stats(other).second_moment(model, tok, [0])  # other corpus bytes
    _stats(corpus, n_tokens=N_TOKENS - 1).second_moment(model, tok, [0])  # other budget
    assert calls[0] == 3


def test_model_sampled_corpus_is_offline_and_seeded(tok, tmp_path, monkeypatch):
    model = tiny_model("llama")
    kw = {"corpus": "sampled", "n_tokens": 60, "max_len": 4}  # one generate call of 4 steps
    a = S.KeyStats(**kw)
    ma = a.second_moment(model, tok, [1])
    rec = a.record()
    assert rec["corpus"]["kind"] == "model-sampled" and rec["n_tokens"] == 60
    assert Path(rec["corpus"]["path"]).is_file()
    monkeypatch.setenv("KEDIT_CACHE_DIR", str(tmp_path / "cache2"))  # sample again from scratch
    b = S.KeyStats(**kw)
    mb = b.second_moment(model, tok, [1])
    assert b.record()["corpus_sha256"] == rec["corpus_sha256"] and torch.equal(ma[1], mb[1])
    c = S.KeyStats(seed=1, **kw)
    c.second_moment(model, tok, [1])
    assert c.record()["corpus_sha256"] != rec["corpus_sha256"]


def test_bad_corpora(tok, tmp_path, monkeypatch):
    model = tiny_model("gpt2")
    with pytest.raises(InputError, match="nope.txt"):
        S.KeyStats(str(tmp_path / "nope.txt"), max_len=32).second_moment(model, tok, [0])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.jsonl.*record 2"):
        S.KeyStats(str(bad), max_len=32).second_moment(model, tok, [0])
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"text": t} for t in CORPUS]), encoding="utf-8")
    assert S.read_documents(good) == CORPUS
    import datasets

    def offline(*_a, **_k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(InputError, match="hf:wikitext"):
        S.KeyStats("hf:wikitext:wikitext-2-raw-v1", max_len=32).second_moment(model, tok, [0])


def test_cli(run_cli, tiny_dirs, corpus):
    code, out, err = run_cli("stats", "compute", "--model", tiny_dirs["gpt2"], "--corpus", corpus,
                             "--layers", "0,1", "--tokens", "500", "--max-len", "32", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result["layers"]) == {"0", "1"} and result["layers"]["0"]["d_k"] == 128
    assert result["record"]["n_tokens"] == 500 and result["record"]["corpus"]["kind"] == "file"
    code, out, err = run_cli("stats", "compute", "--model", tiny_dirs["gpt2"], "--corpus", corpus, "--layers", "-1",
                             "--max-len", "32", "--tokens", "500")
    assert code == 0 and "cache file" in out and " 3 " in out and "disk" not in out
    code, _, err = run_cli("stats", "compute", "--model", tiny_dirs["gpt2"], "--corpus", corpus, "--layers", "0",
                           "--max-len", "256")
    assert code == 2 and "exceeds the model's context" in err
    code, _, err = run_cli("stats", "compute", "--model", tiny_dirs["gpt2"], "--corpus", corpus)
    assert code == 2 and "--layers" in err
    code, _, err = run_cli("stats", "compute", "--model", tiny_dirs["gpt2"], "--corpus", corpus, "--layers", "9")
    assert code == 2 and "out of range" in err
