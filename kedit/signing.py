"""Ed25519 signatures on diffs: who vouches for a diff passed between people.

The content id says a diff is intact, but anyone who changes a delta can recompute it. A signature
record binds a signer's public key to the id: it is stored in the file's safetensors metadata
under ``kedit.signatures``, outside the manifest, so signing changes no tensor byte and no id.
The signed message is domain-separated and covers the id, the key id, the signer's name and the
time, so none of these can be changed without breaking the signature. Private keys are read only
to sign and never written into diffs, logs or error messages. No torch here.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import InputError

ALGORITHM = "ed25519"
DOMAIN = b"kedit-diff-signature-v1\0"
PASSPHRASE_ENV = "KEDIT_KEY_PASSPHRASE"
FIELDS = ("algorithm", "public_key", "key_id", "name", "signed", "signature")
_KEY_ID = re.compile(r"ed25519:[0-9a-f]{32}")
_PEM = re.compile(rb"-----BEGIN ([A-Z ]+)-----.*?-----END \1-----", re.S)


def key_id(public_raw: bytes) -> str:
    """``ed25519:`` and 128 bits of the sha256 of the raw public key: short enough to read, long
    enough that no one can make another key with the same id."""
    return f"{ALGORITHM}:{hashlib.sha256(public_raw).hexdigest()[:32]}"


def message(record: Mapping[str, Any], diff_id: str) -> bytes:
    """What a signature signs: the domain tag, then the diff id and the record's other fields."""
    body = {"id": diff_id, **{k: record[k] for k in ("algorithm", "key_id", "name", "signed")}}
    return DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Signer:
    """A signing key, loaded from a private key file."""

    private: Any  # cryptography's Ed25519PrivateKey
    public_raw: bytes
    name: str

    @property
    def key_id(self) -> str:
        return key_id(self.public_raw)

    def sign(self, diff_id: str, now: datetime | None = None) -> dict[str, Any]:
        """A signature record over ``diff_id``."""
        signed = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
        rec: dict[str, Any] = {"algorithm": ALGORITHM, "public_key": base64.b64encode(self.public_raw).decode(),
                               "key_id": self.key_id, "name": self.name, "signed": signed}
        rec["signature"] = base64.b64encode(self.private.sign(message(rec, diff_id))).decode()
        return rec


def _raw_public(key: Any) -> bytes:
    """The 32 raw bytes of an ed25519 public key, or of a private key's public half."""
    from cryptography.hazmat.primitives import serialization

    public = key.public_key() if hasattr(key, "public_key") else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def public_file(key_path: str | os.PathLike) -> Path:
    """Where ``kedit diff keygen`` writes the public half of ``key_path``."""
    return Path(f"{key_path}.pub")


def load_signer(path: str | os.PathLike, name: str | None = None) -> Signer:
    """The ed25519 private key in PEM file ``path`` (encrypted ones with ``KEDIT_KEY_PASSPHRASE``).
    Without ``name``, the signer name recorded beside it by ``keygen`` is used, if any."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"--key {path}: cannot read the key ({exc.strerror or exc})") from None
    try:
        key = serialization.load_pem_private_key(data, password=_passphrase())
    except TypeError:  # encrypted without a passphrase, or a passphrase for an unencrypted key
        if _passphrase() is None:
            raise InputError(f"--key {path}: the key is encrypted; set {PASSPHRASE_ENV} to its passphrase") from None
        raise InputError(f"--key {path}: the key is not encrypted; unset {PASSPHRASE_ENV}") from None
    except Exception as exc:  # cryptography raises several types for damaged or unsupported keys
        hint = f" (or a wrong {PASSPHRASE_ENV})" if _passphrase() is not None else ""
        raise InputError(f"--key {path}: not a PEM private key{hint} ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"--key {path}: a {type(key).__name__.removeprefix('_')} key; kedit signs with ed25519 keys "
                         "(make one with `kedit diff keygen --key PATH`)")
    raw = _raw_public(key)
    if name is None:
        name = _recorded_name(public_file(path), key_id(raw))
    return Signer(key, raw, name or "")


def _recorded_name(pub: Path, kid: str) -> str | None:
    try:
        keys = read_public_keys(pub)
    except InputError:
        return None
    return keys.get(kid)


def generate(path: str | os.PathLike, name: str = "") -> tuple[str, Path]:
    """Make an ed25519 key pair: the private key as PEM at ``path`` (mode 0600, encrypted with
    ``KEDIT_KEY_PASSPHRASE`` when it is set), the public key and ``name`` at ``path.pub``. Refuses
    to replace an existing file. Returns the key id and the public file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    pub = public_file(path)
    if "\n" in name or "\r" in name:
        raise InputError("--name: one line, please")
    for p in (path, pub):
        if os.path.lexists(p):
            raise InputError(f"{p} exists; kedit never overwrites a key (choose another path)")
    if not path.parent.is_dir():
        raise InputError(f"{path}: the folder {path.parent} does not exist")
    key = Ed25519PrivateKey.generate()
    secret = _passphrase()
    encryption = serialization.BestAvailableEncryption(secret) if secret else serialization.NoEncryption()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    raw = _raw_public(key)
    kid = key_id(raw)
    _write_new(path, pem, 0o600)
    _write_new(pub, public_text(raw, name).encode(), 0o644)
    return kid, pub


def public_text(public_raw: bytes, name: str = "") -> str:
    """A public key file: a key-id line (with the signer name) and the key as PEM; accepted by
    ``--trusted-keys``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    pem = Ed25519PublicKey.from_public_bytes(public_raw).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return f"{key_id(public_raw)} {name}".rstrip() + "\n" + pem


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file atomically with ``mode`` from the start: a temporary file is
    linked into place, which fails if ``path`` appeared meanwhile."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # created 0600
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise InputError(f"{path} exists; kedit never overwrites a key") from None
    finally:
        tmp.unlink(missing_ok=True)


# --- reading signature records ---------------------------------------------------------------

def _b64(value: Any, size: int) -> bytes:
    if not isinstance(value, str):
        raise ValueError("not a string")
    raw = base64.b64decode(value, validate=True)
    if len(raw) != size:
        raise ValueError(f"{len(raw)} bytes, not {size}")
    return raw


def verify_records(path: Path, diff_id: str, text: Any) -> list[dict[str, Any]]:
    """Check every signature record of a diff against its id; returns the signers (algorithm, key
    id, name, time, public key). Any malformed or bad signature is an InputError naming the file."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        records = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        records = None
    if not isinstance(records, list):
        raise InputError(f"{path}: malformed signatures (kedit.signatures is not a JSON list)")
    out: list[dict[str, Any]] = []
    for i, rec in enumerate(records, start=1):
        where = f"{path}: signature {i}"
        if not isinstance(rec, dict) or sorted(rec) != sorted(FIELDS):
            raise InputError(f"{where} is malformed (a record has exactly the fields {', '.join(FIELDS)})")
        if rec["algorithm"] != ALGORITHM or not all(isinstance(rec[k], str) for k in ("name", "signed", "key_id")):
            raise InputError(f"{where} is malformed (algorithm {rec['algorithm']!r}; this kedit verifies {ALGORITHM})")
        try:
            public_raw, sig = _b64(rec["public_key"], 32), _b64(rec["signature"], 64)
        except ValueError as exc:
            raise InputError(f"{where} is malformed (public key or signature: {exc})") from None
        if rec["key_id"] != key_id(public_raw):
            raise InputError(f"{where} is malformed (its key id does not belong to its public key)")
        if any(o["key_id"] == rec["key_id"] for o in out):
            raise InputError(f"{where} repeats the key {rec['key_id']}")
        try:
            Ed25519PublicKey.from_public_bytes(public_raw).verify(sig, message(rec, diff_id))
        except (InvalidSignature, ValueError):
            raise InputError(f"{where} ({_who(rec)}) is bad: the diff or the signature was changed after "
                             "signing") from None
        out.append({k: rec[k] for k in ("algorithm", "key_id", "name", "signed", "public_key")})
    return out


def _who(rec: Mapping[str, Any]) -> str:
    return f"{rec['name']}, {rec['key_id']}" if rec.get("name") else str(rec["key_id"])


def describe(signer: Mapping[str, Any]) -> str:
    """``signed by NAME (key id) at TIME``, with the trust verdict if :meth:`Trust.report` gave one."""
    who = f"{signer['name']} ({signer['key_id']})" if signer.get("name") else signer["key_id"]
    text = f"signed by {who} at {signer['signed']}"
    if "trusted" in signer:
        text += ", a trusted key" if signer["trusted"] else ", not a trusted key"
    return text


# --- trusted keys ----------------------------------------------------------------------------

def read_public_keys(path: str | os.PathLike) -> dict[str, str]:
    """Trusted keys from a file or a folder of files: PEM public keys, and lines ``ed25519:ID
    [NAME]`` (as ``keygen`` writes them beside a key); ``#`` starts a comment. Returns key id ->
    name (maybe empty). A private key here is refused: trust lists are shared, private keys not."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    elif path.is_file():
        files = [path]
    else:
        raise InputError(f"--trusted-keys {path}: no such file or folder")
    keys: dict[str, str] = {}
    for f in files:
        for kid, name in _keys_in(f):
            keys[kid] = keys.get(kid) or name
    if not keys:
        raise InputError(f"--trusted-keys {path}: no public keys in it")
    return keys


def _keys_in(path: Path) -> Iterable[tuple[str, str]]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"--trusted-keys {path}: cannot read it ({exc.strerror or exc})") from None
    rest = data
    for block in _PEM.finditer(data):
        kind = block.group(1).decode()
        if "PRIVATE" in kind:
            raise InputError(f"--trusted-keys {path}: holds a private key; give public keys only (the .pub file)")
        try:
            key = serialization.load_pem_public_key(block.group(0))
        except ValueError:
            raise InputError(f"--trusted-keys {path}: a {kind} block that is not a readable public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise InputError(f"--trusted-keys {path}: a {type(key).__name__.removeprefix('_')}; kedit trusts ed25519 keys")
        yield key_id(_raw_public(key)), ""
        rest = rest.replace(block.group(0), b"")
    try:
        text = rest.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"--trusted-keys {path}: not a text file of public keys") from None
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        kid, _, name = line.partition(" ")
        if not _KEY_ID.fullmatch(kid):
            raise InputError(f"--trusted-keys {path}: line {n} is neither a PEM public key nor an "
                             "'ed25519:<32 hex digits> [name]' key id line")
        yield kid, name.strip()


@dataclass(frozen=True)
class Trust:
    """Which signers a reader trusts (``--trusted-keys``) and whether a diff must carry a trusted
    signature (``--require-signature``). Every signature present is verified whenever a diff is
    read; this only decides which valid ones count."""

    keys: Mapping[str, str] | None = None  # key id -> name; None: no trusted keys given
    require: bool = False

    @classmethod
    def load(cls, trusted_keys: str | os.PathLike | None, require: bool = False) -> "Trust":
        if require and trusted_keys is None:
            raise InputError("--require-signature needs --trusted-keys FILE_OR_DIR (anyone can make a key and sign)")
        return cls(read_public_keys(trusted_keys) if trusted_keys is not None else None, require)

    def report(self, signers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The signers, each marked trusted or not when keys were given."""
        if self.keys is None:
            return [dict(s) for s in signers]
        return [{**s, "trusted": s["key_id"] in self.keys} for s in signers]

    def check(self, label: str, signers: Sequence[Mapping[str, Any]]) -> None:
        """With ``require``, refuse a diff that no trusted key signed."""
        if not self.require:
            return
        if not signers:
            raise InputError(f"{label}: not signed, and --require-signature is set")
        if not any(s["key_id"] in (self.keys or {}) for s in signers):
            raise InputError(f"{label}: signed only by keys that are not trusted "
                             f"({', '.join(s['key_id'] for s in signers)}); see --trusted-keys")


# --- signing a file --------------------------------------------------------------------------

def sign_file(path: str | os.PathLike, signer: Signer) -> dict[str, Any]:
    """Add ``signer``'s signature to the diff at ``path`` (replacing an earlier one by the same
    key), rewriting only the file's metadata, atomically. The diff is fully checked first, its
    other signatures included. Returns the record written."""
    from . import manifest as M
    from .atomic import atomic_path

    path, data = M.read_bytes(path)
    parsed = M.parse_file(path, data)
    meta = dict(parsed.header.get("__metadata__") or {})
    others = [r for r in json.loads(meta.get(M.SIGNATURES) or "[]") if r.get("key_id") != signer.key_id]
    record = signer.sign(parsed.manifest["id"])
    meta[M.SIGNATURES] = json.dumps([*others, record], ensure_ascii=False)
    header = {"__metadata__": meta, **{k: v for k, v in parsed.header.items() if k != "__metadata__"}}
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the tensor data to 8 bytes
    if len(text) > M.HEADER_LIMIT:
        raise InputError(f"{path}: too many signatures for a safetensors header")
    signed = len(text).to_bytes(8, "little") + text + data[parsed.body:]
    M.parse_file(path, signed)  # what will be written reads back, every signature verified
    mode = stat.S_IMODE(os.stat(path).st_mode)
    with atomic_path(path, mode=mode) as tmp:  # the file keeps its mode
        tmp.write_bytes(signed)
    return record
