"""Hostile and damaged diff files, and signatures: each file is a real diff of a tiny model that the
test tampers with and re-seals with a recomputed content id, so only the check under test can
catch it. Refusals are one line (exit 2) and leave models and folders as they were."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from conftest import files_under
from safetensors import safe_open
from safetensors.torch import save_file

from kedit import diff as diffmod
from kedit import manifest as M
from kedit.errors import InputError
from kedit.testing import tamper_diff, tiny_model

P1, P2 = "transformer.h.0.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.weight"






def _build(names=(P2,), scale: float = 0.05, seed: int = 0, model=None) -> diffmod.Diff:
    """A dense diff of the tiny GPT-2 (the weights of ``tiny_dirs["gpt2"]``)."""
    model = model or tiny_model("gpt2")
    g = torch.Generator().manual_seed(seed)
    base = {n: model.get_parameter(n).detach() for n in names}
    deltas = {n: torch.randn(w.shape, generator=g) * scale for n, w in base.items()}
    return diffmod.build(base, deltas, {"base": {"name_or_path": "tiny", "model_type": "gpt2"}})


def _write(path: Path, **kw: Any) -> Path:
    return diffmod.write(_build(**kw), path)


def _one_line_error(err: str, path: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kedit: error: {path}"), err
    assert "Traceback" not in err


# --- 1. NaN and infinite values -------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("tensor", ["delta", "fix_val"])
def test_non_finite_values_are_refused(run_cli, tiny_dirs, workdir, value, tensor):
    good = _write(workdir / "good.kedit.safetensors", scale=100.0)  # big deltas: a non-empty fix list

    def poison(ts):
        ts[f"{P2}::{tensor}"].view(-1)[0] = value

    bad = tamper_diff(good, workdir / "bad.kedit.safetensors", tensors=poison)
    with pytest.raises(InputError, match=rf"bad.kedit.safetensors: tensor {P2}::{tensor} holds NaN or infinite"):
        diffmod.read(bad)
    before = files_under(workdir)
    code, _, err = run_cli("diff", "apply", "bad.kedit.safetensors", "--model", tiny_dirs["gpt2"], "--out", "o")
    assert code == 2
    _one_line_error(err, "bad.kedit.safetensors")
    assert files_under(workdir) == before


def test_non_finite_low_rank_factor_is_refused(workdir):
    model = tiny_model("gpt2")
    w = model.get_parameter(P2).detach()
    d = diffmod.build({P2: w}, {P2: diffmod.D.LowRank(torch.ones(w.shape[0], 1), torch.ones(1, w.shape[1]) * 1e-3)}, {})
    good = diffmod.write(d, workdir / "lr.kedit.safetensors")

    def poison(ts):
        ts[f"{P2}::u"][3, 0] = float("inf")

    with pytest.raises(InputError, match=rf"tensor {P2}::u holds NaN or infinite"):
        diffmod.read(tamper_diff(good, workdir / "bad.kedit.safetensors", tensors=poison))


# --- 2. a corrupt fix list: revert must give back the base or refuse ------------------------

def _applied_model(d: diffmod.Diff):
    model = tiny_model("gpt2")
    diffmod.apply(model, d)
    return model


def test_fix_indices_out_of_range_are_refused(workdir):
    good = _write(workdir / "good.kedit.safetensors", scale=100.0)

    def out_of_range(ts):
        ts[f"{P2}::fix_idx"][0] = 10**6

    with pytest.raises(InputError, match=rf"{P2}::fix_idx has indices outside the tensor's 4096 elements"):
        diffmod.read(tamper_diff(good, workdir / "bad.kedit.safetensors", tensors=out_of_range))

    def negative(ts):
        ts[f"{P2}::fix_idx"][0] = -1

    with pytest.raises(InputError, match="fix_idx has indices outside"):
        diffmod.read(tamper_diff(good, workdir / "neg.kedit.safetensors", tensors=negative))


def test_fix_list_of_unequal_lengths_is_refused(run_cli, workdir):
    good = _write(workdir / "good.kedit.safetensors", scale=100.0)

    def shorter(ts):
        ts[f"{P2}::fix_val"] = ts[f"{P2}::fix_val"][:-1].clone()

    tamper_diff(good, workdir / "bad.kedit.safetensors", tensors=shorter)
    code, _, err = run_cli("diff", "show", "bad.kedit.safetensors")
    assert code == 2 and "fix_idx/fix_val' have lengths" in err
    _one_line_error(err, "bad.kedit.safetensors")


def test_revert_with_wrong_fix_values_refuses_and_leaves_the_model(run_cli, tiny_dirs, workdir):
    d = _build(scale=100.0)
    assert d.manifest["entries"][P2]["exact_revert_fixes"] > 0
    good = diffmod.write(d, workdir / "good.kedit.safetensors")

    def wrong_value(ts):
        ts[f"{P2}::fix_val"][0] += 1.0  # in range, right length: only the base hash can tell

    bad = diffmod.read(tamper_diff(good, workdir / "bad.kedit.safetensors", tensors=wrong_value))
    model = _applied_model(d)
    post = model.get_parameter(P2).detach().clone()
    with pytest.raises(InputError, match="reverting it does not give back its recorded base tensor"):
        diffmod.revert(model, bad)
    assert torch.equal(model.get_parameter(P2).detach(), post)
    # the command: nothing written, one line
    code, _, err = run_cli("diff", "apply", "good.kedit.safetensors", "--model", tiny_dirs["gpt2"], "--out", "edited")
    assert code == 0, err
    before = files_under(workdir)
    code, out, err = run_cli("diff", "revert", "bad.kedit.safetensors", "--model", "edited", "--out", "restored")
    assert code == 2 and "reverted" not in out
    _one_line_error(err, "bad.kedit.safetensors")
    assert files_under(workdir) == before


# --- 3. all or nothing ----------------------------------------------------------------------

def test_apply_is_all_or_nothing(workdir):
    d = _build(names=(P1, P2))
    good = diffmod.write(d, workdir / "good.kedit.safetensors")

    def nudge_last(ts):  # the second tensor applied: the first would already be changed
        ts[f"{P2}::delta"][0, 0] += 0.5

    bad = diffmod.read(tamper_diff(good, workdir / "bad.kedit.safetensors", tensors=nudge_last))
    model = tiny_model("gpt2")
    w1, w2 = (model.get_parameter(n).detach().clone() for n in (P1, P2))
    with pytest.raises(InputError, match=f"{P2}: applying it gives another result than the one it records"):
        diffmod.apply(model, bad)
    assert torch.equal(model.get_parameter(P1).detach(), w1) and torch.equal(model.get_parameter(P2).detach(), w2)
    assert diffmod.state(model, diffmod.read(good)) == "base"


def test_revert_is_all_or_nothing(workdir):
    d = _build(names=(P1, P2), scale=100.0)
    good = diffmod.write(d, workdir / "good.kedit.safetensors")

    def wrong_last(ts):
        ts[f"{P2}::fix_val"][0] += 1.0

    bad = diffmod.read(tamper_diff(good, workdir / "bad.kedit.safetensors", tensors=wrong_last))
    model = _applied_model(d)
    posts = [model.get_parameter(n).detach().clone() for n in (P1, P2)]
    with pytest.raises(InputError, match="the model is unchanged"):
        diffmod.revert(model, bad)
    assert all(torch.equal(model.get_parameter(n).detach(), p) for n, p in zip((P1, P2), posts))
    assert diffmod.state(model, d) == "applied"


# --- 4. malformed manifests -----------------------------------------------------------------

def _set(path: list[str], value: Any) -> Callable[[dict], None]:
    def change(m: dict) -> None:
        target = m
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return change


def _rename_entry(m: dict) -> None:
    m["entries"]["no.such.weight"] = m["entries"].pop(P2)


MALFORMED = [
    (_set(["entries"], []), "entries is missing or not an object"),
    (_set(["entries"], KeyError), "entries is missing or not an object"),
    (_set(["entries", P2], "dense"), f"entries['{P2}'] is not an object"),
    (_set(["entries", P2, "encoding"], KeyError), f"entries['{P2}'].encoding is missing"),
    (_set(["entries", P2, "encoding"], "zip"), "'zip' is not one of ['dense', 'lowrank', 'masked-lowrank', 'sparse']"),
    (_set(["entries", P2, "encoding"], "lowrank"), f"needs tensor {P2}::u, which the file lacks"),
    (_set(["entries", P2, "post_sha256"], 7), "post_sha256 is not a sha256 hex digest"),
    (_set(["entries", P2, "bytes"], "many"), "bytes is not a non-negative integer"),
    (_rename_entry, "entries['no.such.weight'] names a parameter without a record in base.tensors"),
    (_set(["base"], KeyError), "base is missing or not an object"),
    (_set(["base"], "tiny"), "base is missing or not an object"),
    (_set(["base", "tensors"], [1]), "base.tensors is missing or not an object"),
    (_set(["base", "tensors", P2, "shape"], "32x32"), "shape is not a list of non-negative integers"),
    (_set(["base", "tensors", P2, "shape"], [32.5, 32]), "shape is not a list of non-negative integers"),
    (_set(["base", "tensors", P2, "shape"], [16, 64]), "does not have the base shape [16, 64]"),
    (_set(["base", "tensors", P2, "dtype"], "float128"), "'float128' is not a tensor dtype"),
    (_set(["parents"], "sha256:abc"), "parents is not a list of diff ids"),
    (_set(["regularizers"], [{"options": {}}]), "regularizers is not a list of objects with a name"),
    (_set(["editor"], "ft"), "editor is not an object"),
    (_set(["specs"], {"count": 1, "records": ["x"]}), "specs.records is not a list of objects"),
]


@pytest.mark.parametrize("change,message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_manifests_are_refused_in_one_line(run_cli, workdir, change, message):
    good = _write(workdir / "good.kedit.safetensors")
    bad = tamper_diff(good, workdir / "bad.kedit.safetensors", manifest=change)
    with pytest.raises(InputError, match="malformed diff manifest") as exc:
        M.read_manifest(bad)
    assert message in str(exc.value)
    with pytest.raises(InputError, match="malformed diff manifest"):
        diffmod.read(bad)
    code, _, err = run_cli("diff", "show", "bad.kedit.safetensors")
    assert code == 2 and message in err
    _one_line_error(err, "bad.kedit.safetensors")


def test_unexplained_tensor_is_refused(workdir):
    good = _write(workdir / "good.kedit.safetensors")

    def extra(ts):
        ts["smuggled"] = torch.zeros(3)

    with pytest.raises(InputError, match="tensor 'smuggled' is in the file but not described by entries"):
        diffmod.read(tamper_diff(good, workdir / "bad.kedit.safetensors", tensors=extra))


# --- 5. header size -------------------------------------------------------------------------

def test_write_refuses_a_manifest_over_the_header_limit(workdir):
    d = _build()
    d.manifest["specs"] = {"count": 1, "records": [{"meta": {"blob": "x" * 110_000_000}}]}
    with pytest.raises(InputError, match=r"manifest is 110 MB; diff headers are limited to 100 MB.*spec meta"):
        diffmod.write(d, workdir / "big.kedit.safetensors")
    assert list(workdir.iterdir()) == []


def test_read_refuses_a_header_over_the_limit_before_parsing(run_cli, workdir, monkeypatch):
    good = _write(workdir / "good.kedit.safetensors")
    monkeypatch.setattr(M, "HEADER_LIMIT", 1000)  # a real one would take a 100 MB file

    def no_parsing(*a, **k):
        raise AssertionError("the header was parsed")

    monkeypatch.setattr(M.json, "loads", no_parsing)
    with pytest.raises(InputError, match=r"its header is 0 MB; diff headers are limited to 0 MB"):
        diffmod.read(good)
    code, _, err = run_cli("diff", "show", "good.kedit.safetensors")
    assert code == 2
    _one_line_error(err, "good.kedit.safetensors")


# --- 6. --out that cannot be a folder -------------------------------------------------------

@pytest.mark.parametrize("action", ["apply", "revert", "export"])
def test_out_that_is_a_file_is_refused(run_cli, tiny_dirs, workdir, action):
    _write(workdir / "good.kedit.safetensors")
    (workdir / "taken").write_text("mine")
    for out, message in [("taken", "--out taken: exists and is a file"),
                         ("taken/sub", "--out taken/sub: taken is a file, not a folder")]:
        code, _, err = run_cli("diff", action, "good.kedit.safetensors", "--model", tiny_dirs["gpt2"], "--out", out)
        assert code == 2 and message in err and "Traceback" not in err, err
    assert (workdir / "taken").read_text() == "mine"


def test_squash_into_a_folder_is_refused(run_cli, tiny_dirs, workdir):
    _write(workdir / "good.kedit.safetensors")
    (workdir / "folder").mkdir()
    code, _, err = run_cli("diff", "squash", "good.kedit.safetensors", "--model", tiny_dirs["gpt2"], "-o", "folder")
    assert code == 2 and "-o folder: is a folder" in err


# --- 7. signatures --------------------------------------------------------------------------

@pytest.fixture
def keys(run_cli, workdir):
    """Two key pairs, alice's and mallory's, made with `kedit diff keygen`."""
    out = {}
    for who in ("alice", "mallory"):
        code, stdout, err = run_cli("diff", "keygen", f"{who}.pem", "--name", who)
        assert code == 0, err
        out[who] = stdout.split("key id ")[1].strip()
    return out


def test_keygen_writes_a_private_key_only_its_owner_reads(run_cli, workdir, keys):
    assert stat.S_IMODE(os.stat("alice.pem").st_mode) == 0o600
    assert b"PRIVATE KEY" in Path("alice.pem").read_bytes()
    pub = Path("alice.pem.pub").read_text()
    assert pub.startswith(f"{keys['alice']} alice\n") and "BEGIN PUBLIC KEY" in pub
    code, _, err = run_cli("diff", "keygen", "alice.pem")
    assert code == 2 and "never overwrites a key" in err
    code, _, err = run_cli("diff", "keygen", "--key", "bob.pem", "bob.pem")
    assert code == 2 and "kedit diff keygen KEY.pem [--name NAME]" in err
    assert not [p for p in workdir.iterdir() if p.name.endswith(".tmp")]


def test_sign_show_verify(run_cli, tiny_dirs, workdir, keys):
    path = _write(workdir / "d.kedit.safetensors")
    before = diffmod.read(path)
    code, out, err = run_cli("diff", "sign", "d.kedit.safetensors", "--key", "alice.pem")
    assert code == 0, err
    assert f"signed by alice ({keys['alice']})" in out
    after = diffmod.read(path)
    assert after.id == before.id and after.manifest == before.manifest
    assert all(torch.equal(a, b) for a, b in zip(after.tensors().values(), before.tensors().values()))
    assert [s["key_id"] for s in after.signatures] == [keys["alice"]]
    # the private key appears nowhere
    secret = Path("alice.pem").read_bytes()
    body = b"".join(secret.strip().splitlines()[1:-1])
    data = path.read_bytes()
    assert secret not in data and body not in data and body.decode() not in out + err
    code, out, _ = run_cli("diff", "show", "d.kedit.safetensors")
    assert code == 0 and f"signed by alice ({keys['alice']})" in out
    code, out, _ = run_cli("diff", "show", "d.kedit.safetensors", "--json")
    assert json.loads(out)["signatures"][0]["name"] == "alice"
    code, out, err = run_cli("diff", "verify", "d.kedit.safetensors", "--model", tiny_dirs["gpt2"],
                             "--trusted-keys", "alice.pem.pub", "--require-signature")
    assert code == 0 and ": applies" in out and f"signed by alice ({keys['alice']})" in out and "a trusted key" in out
    # signing again with the same key replaces its record; another key adds one
    assert run_cli("diff", "sign", "d.kedit.safetensors", "--key", "alice.pem")[0] == 0
    assert run_cli("diff", "sign", "d.kedit.safetensors", "--key", "mallory.pem")[0] == 0
    assert [s["name"] for s in diffmod.read(path).signatures] == ["alice", "mallory"]
    assert diffmod.read(path).id == before.id


def _records(path: Path) -> list[dict]:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()[M.SIGNATURES])


def _with_records(src: Path, dst: Path, change: Callable[[list], Any]) -> Path:
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}
    records = json.loads(meta[M.SIGNATURES])
    change(records)
    meta[M.SIGNATURES] = json.dumps(records) if not isinstance(records, str) else records
    save_file(ts, str(dst), metadata=meta)
    return dst


def _flip_signature(recs):
    sig = bytearray(__import__("base64").b64decode(recs[0]["signature"]))
    sig[0] ^= 1
    recs[0]["signature"] = __import__("base64").b64encode(bytes(sig)).decode()


BAD_SIGNATURES = [
    (lambda recs: recs[0].update(name="bob"), "is bad: the diff or the signature was changed after signing"),
    (lambda recs: recs[0].update(signed="2001-01-01T00:00:00Z"), "is bad"),
    (_flip_signature, "is bad"),
    (lambda recs: recs[0].pop("key_id"), "is malformed"),
    (lambda recs: recs[0].update(algorithm="rsa"), "is malformed"),
    (lambda recs: recs[0].update(public_key="AAAA"), "is malformed"),
    (lambda recs: recs[0].update(key_id="ed25519:" + "0" * 32), "its key id does not belong to its public key"),
    (lambda recs: recs.append(dict(recs[0])), "repeats the key"),
]


@pytest.mark.parametrize("change,message", BAD_SIGNATURES, ids=[m for _, m in BAD_SIGNATURES])
def test_bad_signatures_are_refused(run_cli, tiny_dirs, workdir, keys, change, message):
    path = _write(workdir / "d.kedit.safetensors")
    assert run_cli("diff", "sign", "d.kedit.safetensors", "--key", "alice.pem")[0] == 0
    _with_records(path, workdir / "bad.kedit.safetensors", change)
    with pytest.raises(InputError, match=r"bad.kedit.safetensors: signature \d"):
        diffmod.read(workdir / "bad.kedit.safetensors")
    for argv in (["show"], ["verify", "--model", tiny_dirs["gpt2"]], ["apply", "--model", tiny_dirs["gpt2"], "--out", "o"]):
        code, _, err = run_cli("diff", argv[0], "bad.kedit.safetensors", *argv[1:])
        assert code == 2 and message in err, err
        _one_line_error(err, "bad.kedit.safetensors")
    assert not (workdir / "o").exists()


def test_a_signature_does_not_carry_over_to_another_diff(workdir, keys, run_cli):
    a = _write(workdir / "a.kedit.safetensors")
    run_cli("diff", "sign", "a.kedit.safetensors", "--key", "alice.pem")
    other = _write(workdir / "b.kedit.safetensors", seed=1)
    with safe_open(str(other), "pt") as f:
        meta, ts = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta[M.SIGNATURES] = json.dumps(_records(a))
    save_file(ts, str(other), metadata=meta)
    with pytest.raises(InputError, match="signature 1 .* is bad"):
        diffmod.read(other)


def test_a_changed_delta_with_a_recomputed_id_breaks_the_signature(workdir, keys, run_cli):
    path = _write(workdir / "d.kedit.safetensors")
    run_cli("diff", "sign", "d.kedit.safetensors", "--key", "alice.pem")

    def nudge(ts):
        ts[f"{P2}::delta"][0, 0] += 1.0

    bad = tamper_diff(path, workdir / "bad.kedit.safetensors", tensors=nudge)
    assert M.SIGNATURES in safe_open(str(bad), "pt").metadata()
    with pytest.raises(InputError, match="signature 1 \\(alice, ed25519:[0-9a-f]{32}\\) is bad"):
        diffmod.read(bad)


def test_require_signature(run_cli, tiny_dirs, workdir, keys):
    _write(workdir / "d.kedit.safetensors")
    model = ["--model", tiny_dirs["gpt2"]]
    code, _, err = run_cli("diff", "verify", "d.kedit.safetensors", *model, "--require-signature")
    assert code == 2 and "--require-signature needs --trusted-keys" in err
    code, _, err = run_cli("diff", "verify", "d.kedit.safetensors", *model, "--trusted-keys", "alice.pem.pub",
                           "--require-signature")
    assert code == 2 and "d.kedit.safetensors: not signed" in err
    run_cli("diff", "sign", "d.kedit.safetensors", "--key", "mallory.pem")
    for action in (["verify"], ["apply", "--out", "o"]):
        code, _, err = run_cli("diff", *action[:1], "d.kedit.safetensors", *action[1:], *model,
                               "--trusted-keys", "alice.pem.pub", "--require-signature")
        assert code == 2 and "signed only by keys that are not trusted" in err, err
    assert not (workdir / "o").exists()
    # without --require-signature an untrusted signer is reported, not refused
    code, out, _ = run_cli("diff", "verify", "d.kedit.safetensors", *model, "--trusted-keys", "alice.pem.pub")
    assert code == 0 and "signed by mallory" in out and "not a trusted key" in out
    # a folder of trusted keys, and key-id lines
    (workdir / "trusted").mkdir()
    (workdir / "trusted" / "ids.txt").write_text(f"# our team\n{keys['mallory']} mallory\n")
    code, out, err = run_cli("diff", "apply", "d.kedit.safetensors", *model, "--out", "o", "--trusted-keys",
                             "trusted", "--require-signature")
    assert code == 0, err


def test_trusted_keys_must_be_public_keys(run_cli, tiny_dirs, workdir, keys):
    _write(workdir / "d.kedit.safetensors")
    model = ["--model", tiny_dirs["gpt2"]]
    code, _, err = run_cli("diff", "verify", "d.kedit.safetensors", *model, "--trusted-keys", "alice.pem")
    assert code == 2 and "holds a private key; give public keys only" in err
    assert "BEGIN" not in err
    Path("junk.txt").write_text("alice\n")
    code, _, err = run_cli("diff", "verify", "d.kedit.safetensors", *model, "--trusted-keys", "junk.txt")
    assert code == 2 and "junk.txt: line 1 is neither a PEM public key" in err


def test_encrypted_keys(run_cli, workdir, monkeypatch):
    _write(workdir / "d.kedit.safetensors")
    monkeypatch.setenv("KEDIT_KEY_PASSPHRASE", "correct horse")
    assert run_cli("diff", "keygen", "k.pem", "--name", "carol")[0] == 0
    assert b"ENCRYPTED PRIVATE KEY" in Path("k.pem").read_bytes()
    code, out, err = run_cli("diff", "sign", "d.kedit.safetensors", "--key", "k.pem")
    assert code == 0 and "signed by carol" in out, err
    monkeypatch.setenv("KEDIT_KEY_PASSPHRASE", "wrong")
    code, _, err = run_cli("diff", "sign", "d.kedit.safetensors", "--key", "k.pem")
    assert code == 2 and "wrong KEDIT_KEY_PASSPHRASE" in err and "correct horse" not in err
    monkeypatch.delenv("KEDIT_KEY_PASSPHRASE")
    code, _, err = run_cli("diff", "sign", "d.kedit.safetensors", "--key", "k.pem")
    assert code == 2 and "the key is encrypted; set KEDIT_KEY_PASSPHRASE" in err


def test_other_keys_are_refused(run_cli, workdir):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    _write(workdir / "d.kedit.safetensors")
    key = ec.generate_private_key(ec.SECP256R1())
    Path("ec.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    Path("text.pem").write_text("hello\n")
    for name, message in [("ec.pem", "kedit signs with ed25519 keys"), ("text.pem", "not a PEM private key"),
                          ("none.pem", "cannot read the key")]:
        code, _, err = run_cli("diff", "sign", "d.kedit.safetensors", "--key", name)
        assert code == 2 and message in err, err


SIGN_AND_SHOW = """
import json, sys
from kedit.cli import main
codes = [main(["diff", "keygen", "k.pem"]), main(["diff", "sign", sys.argv[1], "--key", "k.pem"]),
         main(["diff", "show", sys.argv[1]])]
print(json.dumps({"codes": codes, "torch": "torch" in sys.modules}))
"""


def test_sign_and_show_never_load_torch(workdir):
    path = _write(workdir / "d.kedit.safetensors")
    proc = subprocess.run([sys.executable, "-c", SIGN_AND_SHOW, str(path)], capture_output=True, text=True,
                          timeout=120, cwd=workdir)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"codes": [0, 0, 0], "torch": False}, proc.stderr


def test_written_files_follow_the_umask_and_keys_stay_private(run_cli, tiny_dirs, workdir, spec_file):
    """Diffs, exports and reports are shared on common machines: they get the user's umask, not
    the 0600/0700 of temporary files; a private key stays 0600 whatever the umask."""
    old = os.umask(0o022)
    try:
        code, _, err = run_cli("apply", spec_file, "--plugin", "ft", "--model", tiny_dirs["gpt2"], "--out", "a.kedit.safetensors",
                               "-o", "layer", "1", "-o", "steps", "2", "-q")
        assert code == 0, err
        code, _, err = run_cli("diff", "apply", "a.kedit.safetensors", "--model", tiny_dirs["gpt2"], "--out", "merged")
        assert code == 0, err
        code, _, err = run_cli("diff", "keygen", "k.pem")
        assert code == 0, err
        code, _, err = run_cli("diff", "sign", "a.kedit.safetensors", "--key", "k.pem")
        assert code == 0, err
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode("a.kedit.safetensors") == 0o644  # also after signing rewrote it
    assert mode("merged") == 0o755 and mode("merged/config.json") == 0o644
    assert {mode(p) for p in Path("merged").iterdir()} == {0o644}
    assert mode("k.pem") == 0o600 and mode("k.pem.pub") == 0o644
