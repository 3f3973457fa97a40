"""A hostile-input probe: bad specs and options, crafted and corrupted diffs, kills, concurrent
writers, damaged caches and odd models, each tried against the ``kedit`` command in a new process.

    python bench/hostile.py [--only CLASS[,CLASS]] [--json bench/results/hostile.json] [--real]

A case is *handled* when kedit does what the robustness contract asks: bad input is one line on
stderr and exit code 2, failed work one line and exit code 1, never a traceback or a hang
(60 s), nothing lost (inputs and earlier outputs unchanged) and nothing silently wrong (a damaged
cache is rebuilt, a damaged diff or chain refused). Cases run on tiny random models made here;
``--real`` adds the ones that need the embedded SmolLM2 (a damaged dequantized-model cache, a
garbage GGUF next to it), which take a few minutes. Results are written as they come, so a cut
run keeps what it found; the table at the end counts handled / tried per class.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60
CASES: list[tuple[str, str, Callable[["Ctx"], "Outcome"]]] = []


def case(cls: str, name: str):
    def register(fn):
        CASES.append((cls, name, fn))
        return fn
    return register


@dataclass
class Outcome:
    handled: bool
    detail: str


@dataclass
class Ctx:
    work: Path
    env: dict[str, str]
    llama: Path
    gpt2: Path
    corpus: Path
    spec: Path
    good: Path  # a valid diff of the tiny llama

    def kedit(self, *argv: Any, env: dict[str, str] | None = None, timeout: int = TIMEOUT,
              **popen: Any) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "kedit.cli", *map(str, argv)]
        try:
            return subprocess.run(cmd, env={**self.env, **(env or {})}, capture_output=True, text=True,
                                  timeout=timeout, cwd=self.work, **popen)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(cmd, -999, "", f"HANG: no answer within {timeout} s")

    def edit(self, spec: Path | str, *extra: Any, model: Path | None = None, **kw: Any) -> subprocess.CompletedProcess:
        return self.kedit("apply", spec, "--plugin", "ft", "--model", model or self.llama, "-o", "layer", "1",
                          "-o", "steps", "3", "-q", *extra, **kw)

    def file(self, name: str, content: bytes | str) -> Path:
        p = self.work / "cases" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
        return p


def refused(proc: subprocess.CompletedProcess, code: int = 2, needle: str | None = None) -> Outcome:
    """One clear line and the expected exit code."""
    err = proc.stderr.strip()
    lines = [line for line in err.splitlines() if line.strip()]
    if proc.returncode == -999:
        return Outcome(False, err)
    if "Traceback" in err:
        return Outcome(False, f"traceback (exit {proc.returncode}): {lines[-1][:200] if lines else ''}")
    if proc.returncode != code:
        return Outcome(False, f"exit {proc.returncode}, expected {code}: {(lines or [''])[-1][:200]}")
    if len(lines) != 1:
        return Outcome(False, f"{len(lines)} lines on stderr: {err[:200]}")
    if needle and needle.lower() not in err.lower():
        return Outcome(False, f"message lacks {needle!r}: {err[:200]}")
    return Outcome(True, lines[0][:200])


def ok(proc: subprocess.CompletedProcess, needle: str | None = None) -> Outcome:
    err = proc.stderr.strip()
    if proc.returncode != 0 or "Traceback" in err:
        return Outcome(False, f"exit {proc.returncode}: {err[-200:]}")
    if needle and needle.lower() not in (proc.stdout + err).lower():
        return Outcome(False, f"output lacks {needle!r}")
    return Outcome(True, (err.splitlines() or ["ok"])[-1][:200])


def spec_line(**over: Any) -> dict[str, Any]:
    rec = {"id": "x", "subject": "France", "prompt": "The capital of {} is", "target_new": "Rome", "target_true": "Paris"}
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not None}


def jsonl(*records: Any) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# --- specs ----------------------------------------------------------------------------------------

def _spec_case(name: str, content: bytes | str | Callable[[], str], code: int = 2, needle: str | None = None,
               cmd: str = "check"):
    @case("spec files", name)
    def run(ctx: Ctx) -> Outcome:
        p = ctx.file(f"{name.replace(' ', '_')}.jsonl", content() if callable(content) else content)
        proc = ctx.kedit("check", p) if cmd == "check" else ctx.edit(p)
        return ok(proc) if code == 0 else refused(proc, code, needle)


GOOD = jsonl(spec_line())
_spec_case("latin-1 bytes", GOOD.replace("France", "Fr\u00e4nce").encode("latin-1"))
_spec_case("utf-16 with BOM", GOOD.encode("utf-16"))
_spec_case("binary garbage", bytes(random.Random(0).randrange(256) for _ in range(4000)))
_spec_case("100k-deep nested JSON", '{"id": "x", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
_spec_case("empty id", jsonl(spec_line(id="")))
_spec_case("whitespace id", jsonl(spec_line(id="  ")))
_spec_case("line is an array", "[1, 2, 3]\n")
_spec_case("line is a number", "42\n")
_spec_case("duplicate ids", jsonl(spec_line(), spec_line()))
_spec_case("missing prompt", jsonl(spec_line(prompt=None)))
_spec_case("prompt without {}", jsonl(spec_line(prompt="The capital is")))
_spec_case("empty target_new", jsonl(spec_line(target_new="")))
_spec_case("target field of wrong type", jsonl(spec_line(target_new=5)))
_spec_case("paraphrases not a list", jsonl(spec_line(paraphrases="France's capital is")))
_spec_case("neighborhood entry without target", jsonl(spec_line(neighborhood=[{"prompt": "The capital of Spain is"}])))
_spec_case("empty file", "")
_spec_case("only blank lines", "\n\n\n")
_spec_case("truncated last line", GOOD + GOOD[: len(GOOD) // 2])
_spec_case("UTF-8 BOM (accepted)", "\ufeff" + GOOD, code=0)
_spec_case("CRLF line endings (accepted)", GOOD.replace("\n", "\r\n"), code=0)
_spec_case("1 MB prompt", jsonl(spec_line(prompt="word " * 200_000 + "{} is")))
_spec_case("prompt longer than the context", jsonl(spec_line(prompt="The the the " * 60 + "capital of {} is")),
           cmd="apply")
_spec_case("a 110 MB meta field", lambda: jsonl(spec_line(meta={"blob": "x" * 110_000_000})))


@case("spec files", "no such file")
def _(ctx: Ctx) -> Outcome:
    return refused(ctx.kedit("check", ctx.work / "nope.jsonl"))


@case("spec files", "a folder given as the spec")
def _(ctx: Ctx) -> Outcome:
    return refused(ctx.kedit("check", ctx.work))


# --- options and flags ----------------------------------------------------------------------------

def _opt_case(name: str, *argv: str, code: int = 2):
    @case("options", name)
    def run(ctx: Ctx) -> Outcome:
        return refused(ctx.kedit("apply", ctx.spec, "--model", ctx.llama, "-q", *argv), code)


_opt_case("-o steps true (bool for an int)", "--plugin", "ft", "-o", "steps", "true")
_opt_case("-o lr Infinity", "--plugin", "ft", "-o", "lr", "Infinity")
_opt_case("-o lr NaN", "--plugin", "ft", "-o", "lr", "NaN")
_opt_case("-o lr -Infinity", "--plugin", "ft", "-o", "lr", "-Infinity")
_opt_case("-o unknown key", "--plugin", "ft", "-o", "bogus", "1")
_opt_case("-o layer 99 (no such layer)", "--plugin", "ft", "-o", "layer", "99")
_opt_case("-o layers [] (memit)", "--plugin", "memit", "-o", "layers", "[]")
_opt_case("--batch-size 0", "--plugin", "ft", "--mode", "sequential", "--batch-size", "0")
_opt_case("--batch-size -3", "--plugin", "ft", "--mode", "sequential", "--batch-size", "-3")
_opt_case("--reg rect:1.5", "--plugin", "ft", "--reg", "rect:1.5")
_opt_case("--reg rect:abc", "--plugin", "ft", "--reg", "rect:abc")
_opt_case("--reg rect:k=Infinity", "--plugin", "ft", "--reg", "rect:k=Infinity")
_opt_case("--reg unknown", "--plugin", "ft", "--reg", "nosuch")
_opt_case("--plugin unknown", "--plugin", "nosuch")
_opt_case("--eval-at every:0", "--plugin", "ft", "--mode", "sequential", "--eval-at", "every:0")
_opt_case("--stats-tokens 0", "--plugin", "memit", "--stats-tokens", "0")
_opt_case("--stats-tokens -5", "--plugin", "memit", "--stats-tokens", "-5")
_opt_case("--eval unknown evaluator", "--plugin", "ft", "--eval", "nosuch")
_opt_case("--after a missing diff", "--plugin", "ft", "--after", "missing.kedit.safetensors")


@case("options", "stats compute --batch-size 0")
def _(ctx: Ctx) -> Outcome:
    return refused(ctx.kedit("stats", "compute", "--model", ctx.llama, "--layers", "1", "--batch-size", "0", "-q"))


@case("options", "stats compute --layers 1,x")
def _(ctx: Ctx) -> Outcome:
    return refused(ctx.kedit("stats", "compute", "--model", ctx.llama, "--layers", "1,x", "-q"))


@case("options", "import --limit 0")
def _(ctx: Ctx) -> Outcome:
    cf = ctx.file("cf-limit.json", json.dumps([_cf_record()]))
    return refused(ctx.kedit("import", "counterfact", cf, "-o", ctx.work / "cases" / "lim.jsonl", "--limit", "0"))


# --- diffs ----------------------------------------------------------------------------------------

def _reseal(src: Path, dst: Path, edit_tensors: Callable[[dict], None] | None = None,
            edit_manifest: Callable[[dict], None] | None = None, reseal: bool = True) -> Path:
    from kedit.testing import tamper_diff

    return tamper_diff(src, dst, edit_tensors, edit_manifest, reseal)


def _first(tensors: dict, suffix: str) -> str:
    return sorted(k for k in tensors if k.endswith(suffix))[0]


def _diff_case(name: str, make: Callable[[Ctx, Path], Path], action: str = "verify", code: int = 2):
    @case("diff files", name)
    def run(ctx: Ctx) -> Outcome:
        bad = make(ctx, ctx.work / "cases" / f"{name.replace(' ', '_').replace('/', '_')}.kedit.safetensors")
        if action == "verify":
            return refused(ctx.kedit("diff", "verify", bad, "--model", ctx.llama, "-q"), code)
        if action == "show":
            return refused(ctx.kedit("diff", "show", bad), code)
        out = ctx.work / "cases" / f"out-{name.replace(' ', '_')}"
        proc = ctx.kedit("diff", action, bad, "--model", ctx.llama, "--out", out, "-q")
        result = refused(proc, code)
        if result.handled and out.exists():
            return Outcome(False, f"refused but wrote {out}")
        return result


def _trunc(ctx: Ctx, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(ctx.good.read_bytes()[: ctx.good.stat().st_size // 2])
    return dst


def _write(content: bytes) -> Callable[[Ctx, Path], Path]:
    def make(ctx: Ctx, dst: Path) -> Path:
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(content)
        return dst
    return make


def _flip(ctx: Ctx, dst: Path) -> Path:
    data = bytearray(ctx.good.read_bytes())
    data[-5] ^= 0xFF
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(bytes(data))
    return dst


def _tensor_edit(fn: Callable[[dict], None]) -> Callable[[Ctx, Path], Path]:
    return lambda ctx, dst: _reseal(ctx.good, dst, edit_tensors=fn)


def _manifest_edit(fn: Callable[[dict], None], reseal: bool = True) -> Callable[[Ctx, Path], Path]:
    return lambda ctx, dst: _reseal(ctx.good, dst, edit_manifest=fn, reseal=reseal)


def _set_delta(value: float) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        k = [k for k in t if not k.endswith(("::fix_idx", "::fix_val", "::idx"))][0]
        t[k] = t[k].clone()
        t[k].view(-1)[0] = value
    return edit


def _fix_out_of_bounds(t: dict) -> None:
    import torch

    k = _first(t, "::fix_idx")
    t[k] = torch.tensor([10 ** 9], dtype=t[k].dtype)
    t[k.replace("fix_idx", "fix_val")] = torch.zeros(1, dtype=t[k.replace("fix_idx", "fix_val")].dtype)


def _fix_wrong_value(t: dict) -> None:
    import torch

    k = _first(t, "::fix_idx")
    v = k.replace("fix_idx", "fix_val")
    t[k] = torch.tensor([0], dtype=t[k].dtype)
    t[v] = torch.tensor([123.0], dtype=t[v].dtype)


_diff_case("truncated file", _trunc)
_diff_case("empty file", _write(b""))
_diff_case("random bytes", _write(bytes(random.Random(1).randrange(256) for _ in range(5000))))
_diff_case("a flipped byte in a tensor", _flip)
_diff_case("NaN in a delta, id recomputed", _tensor_edit(_set_delta(float("nan"))))
_diff_case("Inf in a delta, id recomputed", _tensor_edit(_set_delta(float("inf"))))
_diff_case("fix index out of bounds, id recomputed", _tensor_edit(_fix_out_of_bounds), action="revert")


@case("diff files", "wrong fix value, id recomputed (revert)")
def _(ctx: Ctx) -> Outcome:
    edited = ctx.work / "cases" / "edited-model"
    if not edited.exists():
        proc = ctx.kedit("diff", "apply", ctx.good, "--model", ctx.llama, "--out", edited, "-q")
        if proc.returncode != 0:
            return Outcome(False, f"setup: {proc.stderr[-200:]}")
    bad = _reseal(ctx.good, ctx.work / "cases" / "wrongfix.kedit.safetensors", edit_tensors=_fix_wrong_value)
    out = ctx.work / "cases" / "reverted-wrongfix"
    res = refused(ctx.kedit("diff", "revert", bad, "--model", edited, "--out", out, "-q"))
    return res if not out.exists() else Outcome(False, f"refused but wrote {out}")
_diff_case("entries is a list", _manifest_edit(lambda m: m.update(entries=[1, 2])))
_diff_case("entry without encoding", _manifest_edit(lambda m: [e.pop("encoding") for e in m["entries"].values()]))
_diff_case("unknown encoding", _manifest_edit(lambda m: [e.update(encoding="zip") for e in m["entries"].values()]))
_diff_case("entry not in base tensors", _manifest_edit(lambda m: m["base"]["tensors"].clear()))
_diff_case("shape not a list", _manifest_edit(lambda m: [t.update(shape="big") for t in m["base"]["tensors"].values()]))
_diff_case("base missing", _manifest_edit(lambda m: m.pop("base")))
_diff_case("manifest schema 99", _manifest_edit(lambda m: m.update(schema=99)))
_diff_case("malformed entries, shown", _manifest_edit(lambda m: m.update(entries="x")), action="show")
_diff_case("id not recomputed after a change", _manifest_edit(lambda m: m.update(editor={"name": "x"}), reseal=False))


@case("diff files", "diff of another architecture")
def _(ctx: Ctx) -> Outcome:
    proc = ctx.kedit("diff", "verify", ctx.good, "--model", ctx.gpt2, "-q")  # verify reports; exit 1 = refused
    good = proc.returncode == 1 and "refused" in proc.stdout and "Traceback" not in proc.stderr
    return Outcome(good, proc.stdout.strip()[:200] if good else f"exit {proc.returncode}: {proc.stderr[-200:]}")


@case("diff files", "header over the safetensors limit")
def _(ctx: Ctx) -> Outcome:
    import struct

    p = ctx.file("huge.kedit.safetensors", struct.pack("<Q", 150 * 2 ** 20) + b"{" + b" " * 1000)
    return refused(ctx.kedit("diff", "show", p))


@case("diff files", "diff apply --out onto an existing file")
def _(ctx: Ctx) -> Outcome:
    out = ctx.file("existing.bin", b"keep")
    proc = ctx.kedit("diff", "apply", ctx.good, "--model", ctx.llama, "--out", out, "-q")
    res = refused(proc)
    return res if out.read_bytes() == b"keep" else Outcome(False, "the file was replaced")


@case("diff files", "diff apply --out onto a non-empty folder")
def _(ctx: Ctx) -> Outcome:
    out = ctx.work / "cases" / "nonempty"
    out.mkdir(parents=True, exist_ok=True)
    (out / "mine.txt").write_text("keep")
    res = refused(ctx.kedit("diff", "apply", ctx.good, "--model", ctx.llama, "--out", out, "-q"))
    return res if (out / "mine.txt").exists() else Outcome(False, "folder replaced")


@case("diff files", "chain listed out of order")
def _(ctx: Ctx) -> Outcome:
    second = ctx.work / "cases" / "second.kedit.safetensors"
    proc = ctx.edit(ctx.spec, "--after", ctx.good, "--out", second)
    if proc.returncode != 0:
        return Outcome(False, f"setup failed: {proc.stderr[-200:]}")
    return refused(ctx.kedit("diff", "verify", second, ctx.good, "--model", ctx.llama, "-q"))


@case("diff files", "squash -o onto one of its inputs")
def _(ctx: Ctx) -> Outcome:
    before = ctx.good.read_bytes()
    res = refused(ctx.kedit("diff", "squash", ctx.good, "-o", ctx.good, "--model", ctx.llama, "--overwrite", "-q"))
    return res if ctx.good.read_bytes() == before else Outcome(False, "input overwritten")


# --- signatures -----------------------------------------------------------------------------------

def _signed(ctx: Ctx, name: str) -> tuple[Path, Path]:
    """A copy of the good diff signed with ``name``'s key (made once); a failure is a probe error."""
    key = ctx.work / "cases" / f"{name}.pem"
    key.parent.mkdir(parents=True, exist_ok=True)
    if not key.exists():
        proc = ctx.kedit("diff", "keygen", key, "--name", name)
        if proc.returncode != 0:
            raise RuntimeError(f"keygen failed: {proc.stderr[-200:]}")
    d = ctx.work / "cases" / f"signed-{name}.kedit.safetensors"
    shutil.copy(ctx.good, d)
    proc = ctx.kedit("diff", "sign", d, "--key", key)
    if proc.returncode != 0:
        raise RuntimeError(f"sign failed: {proc.stderr[-200:]}")
    return d, key


@case("signatures", "verify reports the signer")
def _(ctx: Ctx) -> Outcome:
    d, key = _signed(ctx, "alice")
    proc = ctx.kedit("diff", "verify", d, "--model", ctx.llama, "-q")
    res = ok(proc, "alice")
    if res.handled and key.read_text()[40:80] in d.read_bytes().decode("latin-1"):
        return Outcome(False, "private key bytes found in the diff")
    return res


@case("signatures", "tampered signature")
def _(ctx: Ctx) -> Outcome:
    d, _ = _signed(ctx, "bob")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(d), "pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    key = next(k for k in meta if "signature" in k)
    sigs = json.loads(meta[key])
    s = sigs[0]["signature"]
    sigs[0]["signature"] = ("A" if s[0] != "A" else "B") + s[1:]
    meta[key] = json.dumps(sigs)
    save_file(tensors, str(d), metadata=meta)
    return refused(ctx.kedit("diff", "verify", d, "--model", ctx.llama, "-q"))


@case("signatures", "unsigned diff with --require-signature")
def _(ctx: Ctx) -> Outcome:
    _, key = _signed(ctx, "carol")  # carol's key is trusted; the diff below is not signed by anyone
    pub = key.with_name(key.name + ".pub")
    proc = ctx.kedit("diff", "verify", ctx.good, "--model", ctx.llama, "--require-signature", "--trusted-keys", pub,
                     "-q")
    return refused(proc, proc.returncode if proc.returncode in (1, 2) else 2)


@case("signatures", "signed by an untrusted key with --trusted-keys")
def _(ctx: Ctx) -> Outcome:
    signed, _ = _signed(ctx, "mallory")
    other = ctx.work / "cases" / "trusted.pem"
    proc = ctx.kedit("diff", "keygen", other, "--name", "trusted")
    if proc.returncode != 0:
        return Outcome(False, f"keygen failed: {proc.stderr[-200:]}")
    pubs = sorted((ctx.work / "cases").glob("trusted*.pub*"))
    trusted = pubs[0] if pubs else other
    proc = ctx.kedit("diff", "verify", signed, "--model", ctx.llama, "--require-signature", "--trusted-keys", trusted, "-q")
    return refused(proc, proc.returncode if proc.returncode in (1, 2) else 2)


# --- chains, kills and writers --------------------------------------------------------------------

EXACT_D4S = ("-o", "keys", "base", "-o", "residual", "once")  # the d4s mode whose single edits can be removed


def _chain(ctx: Ctx, name: str, n: int = 3, **kw: Any) -> tuple[Path, Path]:
    folder = ctx.work / "chains" / name
    spec = ctx.file(f"chain-{name}.jsonl", jsonl(*[spec_line(id=f"c{i}", subject=s, target_new=t)
                                                   for i, (s, t) in enumerate(zip(["France", "Spain", "Italy", "Chile"],
                                                                                  ["Rome", "Oslo", "Lima", "Quito"][:n]))]))
    return folder, spec


def _start_chain(ctx: Ctx, folder: Path, spec: Path, **kw: Any) -> subprocess.CompletedProcess:
    return ctx.kedit("apply", spec, "--plugin", "d4s", "--model", ctx.llama, "--mode", "sequential", "--batch-size",
                     "1", "--out", folder, "-o", "layers", "[1,2]", "-o", "v_steps", "3", *EXACT_D4S,
                     "--corpus", ctx.corpus, "--stats-tokens", "800", "-q", **kw)


def _weights(ctx: Ctx, folder: Path) -> str:
    from kedit import diff as diffmod
    from kedit.models import load
    from kedit.sequence import Chain

    model, _, _ = load(str(ctx.llama), quiet=True)
    chain = Chain.open(folder)
    for d in chain.diffs():
        diffmod.apply(model, d)
    h = hashlib.sha256()
    for _name, p in sorted(model.named_parameters(), key=lambda x: x[0]):
        h.update(p.detach().numpy().tobytes())
    for k, v in sorted(chain.state().items()):
        h.update(k.encode() + v.numpy().tobytes())
    return h.hexdigest()


_REFERENCE: dict[str, Any] = {}


def _reference(ctx: Ctx) -> str:
    if "w" not in _REFERENCE:
        folder, spec = _chain(ctx, "reference")
        t0 = time.perf_counter()
        proc = _start_chain(ctx, folder, spec)
        _REFERENCE["seconds"] = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr)
        _REFERENCE["w"] = _weights(ctx, folder)
    return _REFERENCE["w"]


def _kill_case(share: float):
    @case("kills and writers", f"SIGKILL at {share:.0%} of a chain's run, then --continue")
    def run(ctx: Ctx) -> Outcome:
        ref = _reference(ctx)
        delay = share * _REFERENCE["seconds"]
        folder, spec = _chain(ctx, f"kill{delay}")
        cmd = [sys.executable, "-m", "kedit.cli", "apply", str(spec), "--plugin", "d4s", "--model", str(ctx.llama),
               "--mode", "sequential", "--batch-size", "1", "--out", str(folder), "-o", "layers", "[1,2]", "-o",
               "v_steps", "3", *EXACT_D4S, "--corpus", str(ctx.corpus), "--stats-tokens", "800", "-q"]
        p = subprocess.Popen(cmd, env=ctx.env, cwd=ctx.work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if (folder / "chain.json").exists():
            proc = ctx.kedit("apply", spec, "--continue", folder, "-q")
        else:
            proc = _start_chain(ctx, folder, spec)
        if proc.returncode != 0:
            return Outcome(False, f"resume failed: {proc.stderr.strip()[-200:]}")
        same = _weights(ctx, folder) == ref
        how = f"killed after {delay:.1f} s, {'resumed' if (folder / 'chain.json').exists() else 'restarted'}"
        return Outcome(same, f"{how}: bit-identical" if same else f"{how}: weights/state differ")


for _share in (0.4, 0.55, 0.7, 0.85, 0.95):
    _kill_case(_share)


@case("kills and writers", "fault at every chain write point (KEDIT_FAULT_AT)")
def _(ctx: Ctx) -> Outcome:
    ref = _reference(ctx)
    bad = []
    for at in range(1, 32):
        folder, spec = _chain(ctx, f"fault{at}")
        _start_chain(ctx, folder, spec, env={"KEDIT_FAULT_AT": f"chain:{at}"})
        proc = ctx.kedit("apply", spec, "--continue", folder, "-q") if (folder / "chain.json").exists() \
            else _start_chain(ctx, folder, spec)
        if proc.returncode != 0 or _weights(ctx, folder) != ref:
            bad.append(at)
    return Outcome(not bad, f"31 points, not resumed exactly at: {bad}" if bad else "31 points, all bit-identical")


@case("kills and writers", "two --continue of one chain at once")
def _(ctx: Ctx) -> Outcome:
    folder, spec = _chain(ctx, "race", n=3)
    one = ctx.file("race1.jsonl", jsonl(spec_line(id="c0")))
    if _start_chain(ctx, folder, one).returncode != 0:
        return Outcome(False, "setup failed")
    cmd = [sys.executable, "-m", "kedit.cli", "apply", str(spec), "--continue", str(folder), "-q"]
    procs = [subprocess.Popen(cmd, env=ctx.env, cwd=ctx.work, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = sorted(p.wait(timeout=300) for p in procs)
    from kedit.sequence import Chain

    ids = Chain.open(folder).spec_ids()
    good = codes in ([0, 0], [0, 2]) and sorted(ids) == sorted(set(ids)) and len(ids) == 3
    return Outcome(good, f"exit codes {codes}, edits in effect {ids}")


@case("kills and writers", "two apply --out X at once")
def _(ctx: Ctx) -> Outcome:
    out = ctx.work / "cases" / "race.kedit.safetensors"
    cmd = [sys.executable, "-m", "kedit.cli", "apply", str(ctx.spec), "--plugin", "ft", "--model", str(ctx.llama),
           "-o", "layer", "1", "--out", str(out), "-q"]
    procs = [subprocess.Popen(cmd, env=ctx.env, cwd=ctx.work, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    res = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    codes = [c for c, _ in res]
    return Outcome(codes == [0, 2], f"exit codes {codes}: {res[-1][1].strip()[:150]}")


@case("kills and writers", "apply --out onto an existing diff")
def _(ctx: Ctx) -> Outcome:
    out = ctx.file("exists.kedit.safetensors", b"precious")
    res = refused(ctx.edit(ctx.spec, "--out", out))
    return res if out.read_bytes() == b"precious" else Outcome(False, "overwritten")


@case("kills and writers", "import -o onto its own input")
def _(ctx: Ctx) -> Outcome:
    cf = ctx.file("cf-self.json", json.dumps([_cf_record()]))
    before = cf.read_bytes()
    res = refused(ctx.kedit("import", "counterfact", cf, "-o", cf, "--overwrite"))
    return res if cf.read_bytes() == before else Outcome(False, "input overwritten")


@case("kills and writers", "import -o onto an existing file")
def _(ctx: Ctx) -> Outcome:
    cf = ctx.file("cf-exist.json", json.dumps([_cf_record()]))
    out = ctx.file("exist.jsonl", "keep\n")
    res = refused(ctx.kedit("import", "counterfact", cf, "-o", out))
    return res if out.read_text() == "keep\n" else Outcome(False, "overwritten")


@case("kills and writers", "SIGINT during an edit")
def _(ctx: Ctx) -> Outcome:
    out = ctx.work / "cases" / "sigint.kedit.safetensors"
    cmd = [sys.executable, "-m", "kedit.cli", "apply", str(ctx.spec), "--plugin", "memit", "--model", str(ctx.llama),
           "--corpus", str(ctx.corpus), "--stats-tokens", "800", "--out", str(out), "-q"]
    for _ in range(2):  # the first run fills the statistics cache; the second is timed
        t0 = time.perf_counter()
        subprocess.run([*cmd[:-2], str(out.with_name("sigint-timing.kedit.safetensors")), "--overwrite", "-q"],
                       env=ctx.env, cwd=ctx.work, capture_output=True)
        whole = time.perf_counter() - t0
    p = subprocess.Popen(cmd, env=ctx.env, cwd=ctx.work, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    time.sleep(0.7 * whole)
    p.send_signal(signal.SIGINT)
    code = p.wait(timeout=60)
    err = p.stderr.read()
    left = [x.name for x in out.parent.iterdir() if x.name.startswith(".sigint")]
    good = code == 130 and "Traceback" not in err and not left and not out.exists()
    return Outcome(good, f"interrupted at 70% of {whole:.1f} s: exit {code}, {err.strip()[:80]}; leftovers {left}")


def _chain_damage(name: str, damage: Callable[[Path], None]):
    @case("chain folders", name)
    def run(ctx: Ctx) -> Outcome:
        _reference(ctx)
        folder = ctx.work / "chains" / f"dmg-{name.replace(' ', '_')}"
        shutil.copytree(ctx.work / "chains" / "reference", folder)
        damage(folder)
        spec = ctx.file("chain-more.jsonl", jsonl(spec_line(id="c9", subject="Peru")))
        return refused(ctx.kedit("apply", spec, "--continue", folder, "-q"))


def _state(folder: Path) -> Path:
    return folder / json.loads((folder / "chain.json").read_text())["state"]["file"]


def _scale_state(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(str(_state(folder)))
    save_file({k: v * 1.01 for k, v in t.items()}, str(_state(folder)))


_chain_damage("state changed but valid", _scale_state)
_chain_damage("state truncated", lambda f: _state(f).write_bytes(_state(f).read_bytes()[:100]))
_chain_damage("state empty", lambda f: _state(f).write_bytes(b""))
_chain_damage("chain.json truncated", lambda f: (f / "chain.json").write_text((f / "chain.json").read_text()[:50]))
_chain_damage("chain.json 100k-deep", lambda f: (f / "chain.json").write_text("[" * 100_000 + "]" * 100_000))
_chain_damage("a step's diff deleted", lambda f: (f / "step-0002.kedit.safetensors").unlink())
_chain_damage("a step's data replaced", lambda f: (f / "step-0001.data.safetensors").write_bytes(b"\0" * 64))


@case("chain folders", "--continue with another editor")
def _(ctx: Ctx) -> Outcome:
    _reference(ctx)
    return refused(ctx.kedit("apply", ctx.spec, "--plugin", "memit", "--continue", ctx.work / "chains" / "reference", "-q"))


@case("chain folders", "--continue of a folder that is not a chain")
def _(ctx: Ctx) -> Outcome:
    return refused(ctx.kedit("apply", ctx.spec, "--continue", ctx.work / "cases", "-q"))


@case("chain folders", "diff revert --edit of an unknown edit")
def _(ctx: Ctx) -> Outcome:
    _reference(ctx)
    folder = ctx.work / "chains" / "revert-unknown"
    shutil.copytree(ctx.work / "chains" / "reference", folder)
    return refused(ctx.kedit("diff", "revert", "--edit", "nosuch", folder, "-q"))


# --- caches ---------------------------------------------------------------------------------------

def _stats_files(ctx: Ctx) -> list[Path]:
    return sorted((Path(ctx.env["KEDIT_CACHE_DIR"]) / "stats").rglob("*.safetensors"))


def _stats_case(name: str, damage: Callable[[Path], None]):
    @case("caches", f"statistics file {name}")
    def run(ctx: Ctx) -> Outcome:
        out = ctx.work / "cases" / f"stats-{name.replace(' ', '_')}.kedit.safetensors"
        args = ["apply", ctx.spec, "--plugin", "memit", "--model", ctx.llama, "-o", "layers", "[1]", "-o", "v_steps",
                "3", "--corpus", ctx.corpus, "--stats-tokens", "800", "-q"]
        ref = ctx.kedit(*args, "--out", out.with_suffix(".ref.kedit.safetensors"), "--overwrite")
        if ref.returncode != 0:
            return Outcome(False, f"setup: {ref.stderr[-200:]}")
        files = _stats_files(ctx)
        if not files:
            return Outcome(False, "no statistics file found")
        for f in files:
            damage(f)
        proc = ctx.kedit(*args, "--out", out, "--overwrite")
        if proc.returncode != 0 or "Traceback" in proc.stderr:
            return Outcome(False, f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}")
        from kedit import diff as diffmod

        a = diffmod.read(out).manifest["entries"]
        b = diffmod.read(out.with_suffix(".ref.kedit.safetensors")).manifest["entries"]
        same = all(a[n]["post_sha256"] == b[n]["post_sha256"] for n in a)
        return Outcome(same, "recomputed; same edit as with intact statistics" if same else "edit differs: damaged stats used")


def _rewrite_stats(change: Callable[[Any], Any]) -> Callable[[Path], None]:
    """Rewrite a statistics file's tensors, keeping its metadata (so only its checksum can tell)."""
    def damage(f: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(f), "pt") as fh:
            meta = fh.metadata()
            t = {k: fh.get_tensor(k) for k in fh.keys()}
        save_file({k: change(v) if v.is_floating_point() else v for k, v in t.items()}, str(f), metadata=meta)
    return damage


def _eye7(v: Any) -> Any:
    import torch

    return torch.eye(7, dtype=v.dtype) if v.dim() == 2 else v


_stats_case("scaled x50", _rewrite_stats(lambda v: v * 50))
_stats_case("with NaN", _rewrite_stats(lambda v: v * float("nan")))
_stats_case("replaced by a 7x7 matrix", _rewrite_stats(_eye7))
_stats_case("truncated", lambda f: f.write_bytes(f.read_bytes()[:200]))
_stats_case("empty", lambda f: f.write_bytes(b""))


@case("caches", "orphaned export temporary folder")
def _(ctx: Ctx) -> Outcome:
    out = ctx.work / "cases" / "export"
    orphan = out.parent / f".export.zz{'.kedit-tmp'}"
    orphan.mkdir(parents=True, exist_ok=True)
    (orphan / "model.safetensors").write_bytes(b"x" * 100_000)
    proc = ctx.kedit("diff", "export", ctx.good, "--model", ctx.llama, "--out", out, "-q")
    res = ok(proc)
    return res if not orphan.exists() else Outcome(False, "orphan left")


@case("caches", "evaluation cache truncated")
def _(ctx: Ctx) -> Outcome:
    args = ["eval", "--model", ctx.llama, "--specs", ctx.spec, "--evaluator", "counterfact", "-q", "--json"]
    first = ctx.kedit(*args)
    if first.returncode != 0:
        return Outcome(False, f"setup: {first.stderr[-200:]}")
    files = sorted(f for f in (Path(ctx.env["KEDIT_CACHE_DIR"]) / "eval").rglob("*") if f.is_file())
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    proc = ctx.kedit(*args)
    if proc.returncode != 0 or "Traceback" in proc.stderr:
        return Outcome(False, f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}")
    same = json.loads(proc.stdout)["metrics"] == json.loads(first.stdout)["metrics"]
    return Outcome(same and bool(files), f"{len(files)} cache files damaged; recomputed, same metrics" if same
                   else "metrics differ")


# --- models ---------------------------------------------------------------------------------------

def _model_case(name: str, damage: Callable[[Path], None], kind: str = "llama"):
    @case("models", name)
    def run(ctx: Ctx) -> Outcome:
        folder = ctx.work / "models" / name.replace(" ", "_")
        shutil.copytree(ctx.llama if kind == "llama" else ctx.gpt2, folder)
        damage(folder)
        return refused(ctx.edit(ctx.spec, model=folder, timeout=TIMEOUT))


def _config_edit(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        fn(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    return damage


def _drop_layer_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    t = load_file(str(f))
    save_file({k: v for k, v in t.items() if ".layers.3." not in k}, str(f), metadata={"format": "pt"})


def _extra_weight(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.0.mlp.surprise.weight"] = torch.zeros(3, 3)
    save_file(t, str(f), metadata={"format": "pt"})


_model_case("config claims more layers than the weights", _config_edit(lambda c: c.update(num_hidden_layers=6)))
_model_case("a layer's weights missing", _drop_layer_weights)
_model_case("unexpected extra weights", _extra_weight)
_model_case("unknown model_type", _config_edit(lambda c: c.update(model_type="martian")))
_model_case("config.json not JSON", lambda f: (f / "config.json").write_text("{not json"))
_model_case("config.json empty", lambda f: (f / "config.json").write_text(""))
_model_case("wrong intermediate_size", _config_edit(lambda c: c.update(intermediate_size=96)))
_model_case("no tokenizer", lambda f: [p.unlink() for p in f.iterdir() if "token" in p.name or p.name.startswith("vocab")
                                       or p.name.startswith("merges")])
_model_case("weights file truncated", lambda f: (f / "model.safetensors").write_bytes(
    (f / "model.safetensors").read_bytes()[:5000]))
_model_case("weights file missing", lambda f: (f / "model.safetensors").unlink())


@case("models", "--model path that does not exist")
def _(ctx: Ctx) -> Outcome:
    return refused(ctx.edit(ctx.spec, model=ctx.work / "no-such-model"))


@case("models", "garbage .gguf")
def _(ctx: Ctx) -> Outcome:
    g = ctx.file("garbage.gguf", bytes(random.Random(2).randrange(256) for _ in range(100_000)))
    return refused(ctx.edit(ctx.spec, model=g))


@case("models", "empty .gguf")
def _(ctx: Ctx) -> Outcome:
    return refused(ctx.edit(ctx.spec, model=ctx.file("empty.gguf", b"")))


@case("models", "GGUF magic then garbage")
def _(ctx: Ctx) -> Outcome:
    g = ctx.file("magic.gguf", b"GGUF" + bytes(random.Random(3).randrange(256) for _ in range(50_000)))
    return refused(ctx.edit(ctx.spec, model=g))


# --- the embedded model's cache (--real) ----------------------------------------------------------

def _real_cache_case(name: str, damage: Callable[[Path], None]):
    @case("real model cache", name)
    def run(ctx: Ctx) -> Outcome:
        from kedit.cache import cache_root

        env = dict(ctx.env)
        src = Path(os.environ.get("KEDIT_CACHE_DIR") or cache_root()) / "models"
        folders = [p for p in src.iterdir() if (p / "kedit-record.json").is_file()] if src.exists() else []
        if not folders:
            return Outcome(False, f"no dequantized model cache in {src} to copy (run kedit once)")
        cache = ctx.work / f"realcache-{name.replace(' ', '_')}"
        shutil.copytree(folders[0], cache / "models" / folders[0].name)
        env["KEDIT_CACHE_DIR"] = str(cache)
        damage(cache / "models" / folders[0].name)
        spec = ctx.file("france.jsonl", jsonl(spec_line()))
        proc = ctx.kedit("apply", spec, "--plugin", "rome", "--out", ctx.work / "cases" / f"{name}.kedit.safetensors",
                         "--overwrite", env=env, timeout=600)
        if proc.returncode != 0 or "Traceback" in proc.stderr:
            return Outcome(False, f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}")
        d = ctx.kedit("diff", "verify", ctx.work / "cases" / f"{name}.kedit.safetensors", "-q", timeout=300)
        return Outcome(d.returncode == 0, "rebuilt; the diff verifies against the intact model"
                       if d.returncode == 0 else f"diff refused by the intact model: {d.stdout[-200:]}")


def _zero_3mib(folder: Path) -> None:
    f = max(folder.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size // 2)
        fh.write(b"\0" * (3 << 20))


def _truncate_weights(folder: Path) -> None:
    f = max(folder.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 3)


_real_cache_case("3 MiB of the cached weights zeroed", _zero_3mib)
_real_cache_case("cached weights truncated", _truncate_weights)
_real_cache_case("cached tokenizer emptied", lambda f: (f / "tokenizer.json").write_text(""))


def _cf_record() -> dict[str, Any]:
    return {"case_id": 1, "requested_rewrite": {"prompt": "{} is in", "subject": "Paris", "target_new": {"str": "Rome"},
                                                "target_true": {"str": "France"}}}


# --- running --------------------------------------------------------------------------------------

def setup(work: Path) -> Ctx:
    from kedit.testing import save_tiny

    env = {**os.environ, "KEDIT_CACHE_DIR": str(work / "cache"), "PYTHONPATH": str(ROOT)}
    env.pop("KEDIT_FAULT_AT", None)
    llama = save_tiny(work / "tiny-llama", "llama")
    gpt2 = save_tiny(work / "tiny-gpt2", "gpt2")
    corpus = work / "corpus.txt"
    corpus.write_text("\n\n".join(["The cat sat on the mat.", "Paris is the capital of France."] * 40))
    spec = work / "spec.jsonl"
    spec.write_text(jsonl(spec_line(id="fr"), spec_line(id="es", subject="Spain", target_new="Oslo")))
    ctx = Ctx(work, env, llama, gpt2, corpus, spec, work / "good.kedit.safetensors")
    proc = ctx.edit(spec, "--out", ctx.good)
    if proc.returncode != 0:
        raise SystemExit(f"setup: could not make a diff: {proc.stderr}")
    return ctx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated classes to run")
    ap.add_argument("--real", action="store_true", help="also the cases on the embedded SmolLM2's cache")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "hostile.json"))
    ap.add_argument("--case", help="run only the cases whose name contains this text")
    ap.add_argument("--fresh", action="store_true", help="start a new results file instead of updating the "
                    "cases run in the existing one (the table counts the whole file)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    work = Path(tempfile.mkdtemp(prefix="kedit-hostile-"))
    ctx = setup(work)
    out = Path(args.json)
    old = [] if args.fresh or not out.exists() else json.loads(out.read_text())
    order = [(c, n) for c, n, _ in CASES]
    kept = {(r["class"], r["case"]): r for r in old if (r["class"], r["case"]) in order}
    for cls, name, fn in CASES:
        if (only and cls not in only) or (args.case and args.case not in name) \
                or (cls == "real model cache" and not args.real):
            continue
        t0 = time.perf_counter()
        try:
            res = fn(ctx)
        except Exception as exc:  # a broken case is reported, not fatal
            res = Outcome(False, f"probe error: {type(exc).__name__}: {exc}"[:200])
        row = {"class": cls, "case": name, "handled": res.handled, "detail": res.detail,
               "seconds": round(time.perf_counter() - t0, 1)}
        kept[(cls, name)] = row
        print(f"{'ok ' if res.handled else 'BAD'} {cls:<18} {name:<48} {res.detail[:110]}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        results = sorted(kept.values(), key=lambda r: order.index((r["class"], r["case"])))
        out.write_text(json.dumps(results, indent=1) + "\n")
    results = sorted(kept.values(), key=lambda r: order.index((r["class"], r["case"])))
    print(f"\n{'class':<20} {'handled':>8} {'tried':>6}")
    classes = sorted({r["class"] for r in results}, key=[c for c, _, _ in CASES].index)
    for c in classes:
        rows = [r for r in results if r["class"] == c]
        print(f"{c:<20} {sum(r['handled'] for r in rows):>8} {len(rows):>6}")
    print(f"{'all':<20} {sum(r['handled'] for r in results):>8} {len(results):>6}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
