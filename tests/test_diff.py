"""Diff files on tiny GPT-2 (Conv1D) and Llama (Linear) models: round trip, verify, apply, revert, squash."""
from __future__ import annotations

import copy

import pytest
import torch

from kedit import delta as D
from kedit import diff as diffmod
from kedit.errors import InputError
from kedit.hashing import tensor_sha256
from kedit.testing import tiny_model

KINDS = ["gpt2", "llama"]
PARAM = {"gpt2": "transformer.h.1.mlp.c_proj.weight", "llama": "model.layers.1.mlp.down_proj.weight"}


def _diff(model, kind, seed=0, parents=(), encoding="dense"):
    g = torch.Generator().manual_seed(seed)
    name = PARAM[kind]
    w = model.get_parameter(name).detach()
    if encoding == "lowrank":
        delta = D.LowRank(torch.randn(w.shape[0], 1, generator=g) * 0.1, torch.randn(1, w.shape[1], generator=g))
    elif encoding == "sparse":
        delta = torch.zeros_like(w)
        delta.view(-1)[:: 7] = torch.randn(delta.numel() // 7 + 1, generator=g)[: delta.view(-1)[:: 7].numel()]
    else:
        delta = torch.randn(w.shape, generator=g) * 0.05
    record = {"base": {"name_or_path": "tiny", "revision": None, "kind": "folder", "model_type": kind},
              "parents": list(parents), "editor": {"name": "test", "options": {}}}
    return diffmod.build({name: w}, {name: delta}, record)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("encoding", ["dense", "lowrank", "sparse"])
def test_round_trip_apply_revert_exact(tmp_path, kind, encoding):
    model = tiny_model(kind)
    name = PARAM[kind]
    w0 = model.get_parameter(name).detach().clone()
    d = _diff(model, kind, encoding=encoding)
    assert d.manifest["entries"][name]["encoding"] == encoding
    path = diffmod.write(d, tmp_path / f"a{diffmod.SUFFIX}")
    back = diffmod.read(path)
    assert back.id == d.id and back.manifest == d.manifest
    assert diffmod.state(model, back) == "base"
    assert diffmod.apply(model, back) == "applied"
    expected = (w0.double() + D.to_dense(d.deltas[name], torch.float64)).float()
    assert torch.equal(model.get_parameter(name).detach(), expected)
    assert diffmod.apply(model, back) == "already applied"
    assert diffmod.revert(model, back) == "reverted"
    assert torch.equal(model.get_parameter(name).detach(), w0)  # bit for bit, thanks to the fix list
    assert diffmod.revert(model, back) == "not applied"


def test_exact_revert_needs_fixes_for_some_elements():
    # A delta far larger than the weights makes (w + d) - d != w in float32 for many elements.
    w = torch.full((4, 4), 1e-3)
    d = torch.full((4, 4), 1e3)
    out = diffmod.build({"w": w}, {"w": d}, {"base": {}})
    assert out.manifest["entries"]["w"]["exact_revert_fixes"] > 0


@pytest.mark.parametrize("kind", KINDS)
def test_refuses_another_model(kind):
    d = _diff(tiny_model(kind, seed=0), kind)
    other = tiny_model(kind, seed=1)
    with pytest.raises(InputError, match="made for another model"):
        diffmod.apply(other, d)
    wrong_arch = tiny_model("llama" if kind == "gpt2" else "gpt2")
    with pytest.raises(InputError, match="no parameter"):
        diffmod.state(wrong_arch, d)


def test_refuses_a_dtype_cast():
    model = tiny_model("llama")
    d = _diff(model, "llama")
    model.to(torch.bfloat16)
    with pytest.raises(InputError, match="dtype cast"):
        diffmod.apply(model, d)


@pytest.mark.parametrize("kind", KINDS)
def test_chain_order_and_squash(tmp_path, kind):
    model = tiny_model(kind)
    name = PARAM[kind]
    w0 = model.get_parameter(name).detach().clone()
    first = _diff(model, kind, seed=1, encoding="lowrank")
    diffmod.apply(model, first)
    second = _diff(model, kind, seed=2, parents=[first.id], encoding="lowrank")
    diffmod.apply(model, second)
    chained = model.get_parameter(name).detach().clone()

    fresh = tiny_model(kind)
    with pytest.raises(InputError, match="apply its parents first"):
        diffmod.apply(fresh, second)  # out of order
    with pytest.raises(InputError, match="does not continue"):
        diffmod.check_chain([second, first])

    squashed = diffmod.squash(fresh, [first, second])
    assert squashed.manifest["parents"] == []
    assert squashed.manifest["entries"][name]["encoding"] == "lowrank"
    assert squashed.manifest["entries"][name]["rank"] == 2
    assert torch.equal(fresh.get_parameter(name).detach(), w0)  # squash leaves the model alone
    diffmod.apply(fresh, squashed)
    torch.testing.assert_close(fresh.get_parameter(name).detach(), chained, rtol=0, atol=1e-6)
    assert squashed.manifest["squash_max_abs_vs_chain"] <= 1e-6
    diffmod.revert(fresh, squashed)
    assert torch.equal(fresh.get_parameter(name).detach(), w0)


def test_partly_applied_is_reported():
    model = tiny_model("gpt2")
    names = ["transformer.h.0.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.weight"]
    deltas = {n: torch.ones_like(model.get_parameter(n)) * 0.01 for n in names}
    d = diffmod.build({n: model.get_parameter(n).detach() for n in names}, deltas, {"base": {}})
    with torch.no_grad():
        model.get_parameter(names[0]).add_(deltas[names[0]])
    with pytest.raises(InputError, match="partly applied"):
        diffmod.state(model, d)


def test_truncated_and_corrupted_files_are_refused(tmp_path):
    model = tiny_model("gpt2")
    path = diffmod.write(_diff(model, "gpt2"), tmp_path / f"a{diffmod.SUFFIX}")
    raw = path.read_bytes()
    (tmp_path / "cut.kedit.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="truncated or corrupted"):
        diffmod.read(tmp_path / "cut.kedit.safetensors")
    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF  # a byte inside the tensor data
    (tmp_path / "flip.kedit.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(InputError, match="content hash does not match"):
        diffmod.read(tmp_path / "flip.kedit.safetensors")
    (tmp_path / "junk.kedit.safetensors").write_bytes(b"not a diff at all")
    with pytest.raises(InputError, match="truncated or corrupted"):
        diffmod.read(tmp_path / "junk.kedit.safetensors")


def test_write_is_atomic(tmp_path, monkeypatch):
    model = tiny_model("gpt2")
    d = _diff(model, "gpt2")
    target = tmp_path / f"a{diffmod.SUFFIX}"
    import safetensors.torch

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(RuntimeError):
        diffmod.write(d, target)
    assert list(tmp_path.iterdir()) == []  # no partial file, no temp file left


def test_manifest_records_hashes():
    model = tiny_model("gpt2")
    d = _diff(model, "gpt2")
    name = PARAM["gpt2"]
    rec = d.manifest["base"]["tensors"][name]
    assert rec["sha256"] == tensor_sha256(model.get_parameter(name))
    assert rec["dtype"] == "float32" and rec["shape"] == list(model.get_parameter(name).shape)
    m2 = copy.deepcopy(model)
    diffmod.apply(m2, d)
    assert d.manifest["entries"][name]["post_sha256"] == tensor_sha256(m2.get_parameter(name))
    assert d.id.startswith("sha256:") and d.manifest["kedit"]["torch"] == torch.__version__
