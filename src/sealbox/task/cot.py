"""Chain-of-trust records: Ed25519 keys, the record itself, signing and verification.

The record follows scriptworker's "Chain of Trust v1" (``public/chain-of-trust.json``,
``json.dumps(indent=2, sort_keys=True)``) and its Ed25519 scheme: ``public/chain-of-trust.json.sig``
holds the raw 64-byte signature over the exact bytes of the JSON file; a private key file is
the base64 of the 32-byte seed, a public key the base64 of the raw 32-byte key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import SealboxError

__all__ = [
    "RECORD",
    "SIGNATURE",
    "CotError",
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "build_record",
    "check_files",
    "generate_key",
    "list_artifacts",
    "load_private_key",
    "parse_public_key",
    "parse_record",
    "public_key_text",
    "verify_signature",
    "write_private_key",
    "write_record",
]

RECORD = "public/chain-of-trust.json"
SIGNATURE = RECORD + ".sig"
VERSION = 1
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: the largest record read (a record lists paths and hashes: far smaller in practice)
MAX_RECORD = 64 << 20


class CotError(SealboxError):
    """A chain-of-trust record is missing, malformed, unsigned, or does not verify."""


# -- keys ------------------------------------------------------------------------------------


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_text(key: Ed25519PrivateKey) -> str:
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(raw).decode()


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(
        pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ).decode()


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write the base64 seed to a new file with mode 0600 (never overwrites)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(private_key_text(key) + "\n")


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a base64-seed key file; refuses one that group or others can read or write."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise CotError(f"private key {path} is not a regular file")
        if st.st_mode & 0o077:
            raise CotError(
                f"private key {path} is readable by others (mode {st.st_mode & 0o777:o}; use 0600)"
            )
        text = path.read_text(encoding="ascii").strip()
    except OSError as e:
        raise CotError(f"cannot read private key {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CotError(f"private key {path} is not base64 text") from None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CotError(f"private key {path} is not base64 text") from None
    if len(raw) != 32:
        raise CotError(f"private key {path} must hold a 32-byte Ed25519 seed (got {len(raw)} bytes)")
    return Ed25519PrivateKey.from_private_bytes(raw)


def parse_public_key(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise CotError(f"public key {text[:16]!r}... is not base64") from None
    if len(raw) != 32:
        raise CotError(f"public key {text[:16]!r}... is not a raw 32-byte Ed25519 key")
    return Ed25519PublicKey.from_public_bytes(raw)


# -- hashing and the record ------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def list_artifacts(artifact_dir: Path) -> dict[str, Path]:
    """Every regular file under ``artifact_dir`` except the record and its signature."""
    out: dict[str, Path] = {}
    for root, dirs, files in os.walk(artifact_dir):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            rel = p.relative_to(artifact_dir).as_posix()
            if rel in (RECORD, SIGNATURE):
                continue
            if p.is_symlink() or not p.is_file():
                raise CotError(f"artifact {rel} is not a regular file")
            out[rel] = p
        for d in dirs:
            if (Path(root) / d).is_symlink():
                raise CotError(f"artifact folder {(Path(root) / d).relative_to(artifact_dir)} is a link")
    return out


def build_record(
    artifact_dir: Path,
    task: Mapping[str, Any],
    task_id: str,
    worker_type: str,
    worker_id: str,
    worker_group: str,
    run_id: int = 0,
    environment: Mapping[str, Any] | None = None,
) -> bytes:
    """The record's exact bytes (JSON, indent 2, sorted keys) over ``artifact_dir``."""
    artifacts = {rel: {"sha256": sha256_file(p)} for rel, p in list_artifacts(artifact_dir).items()}
    record = {
        "chainOfTrustVersion": VERSION,
        "artifacts": artifacts,
        "task": dict(task),
        "taskId": task_id,
        "runId": run_id,
        "workerGroup": worker_group,
        "workerId": worker_id,
        "workerType": worker_type,
        "environment": dict(environment or {}),
    }
    return json.dumps(record, indent=2, sort_keys=True).encode()


def write_record(
    artifact_dir: Path,
    task: Mapping[str, Any],
    task_id: str,
    worker_type: str,
    worker_id: str,
    worker_group: str,
    key: Ed25519PrivateKey | None,
    environment: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``public/chain-of-trust.json`` (and ``.sig`` when ``key`` is given); return them."""
    data = build_record(artifact_dir, task, task_id, worker_type, worker_id, worker_group, 0, environment)
    record = artifact_dir / RECORD
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_bytes(data)
    out = [record]
    sig = artifact_dir / SIGNATURE
    if key is not None:
        sig.write_bytes(key.sign(data))
        out.append(sig)
    else:
        sig.unlink(missing_ok=True)
    return out


def verify_signature(
    data: bytes, signature: bytes, trusted: Mapping[str, Sequence[Ed25519PublicKey]]
) -> str | None:
    """The name of the first trusted class one of whose keys made ``signature``, else None."""
    if len(signature) != 64:
        return None
    for name, keys in trusted.items():
        for key in keys:
            try:
                key.verify(signature, data)
            except InvalidSignature:
                continue
            return name
    return None


def parse_record(data: bytes) -> dict[str, Any]:
    """Decode and shape-check a record; raises CotError naming what is wrong."""
    if len(data) > MAX_RECORD:
        raise CotError("record is larger than 64 MiB")
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CotError(f"record is not JSON: {e}") from None
    except RecursionError:
        raise CotError("record is not JSON this runner reads: it nests too deeply") from None
    if not isinstance(record, dict):
        raise CotError("record is not a JSON object")
    version = record.get("chainOfTrustVersion")
    if type(version) is not int or version != VERSION:  # (true and 1.0 equal 1 in Python)
        raise CotError(f"record has chainOfTrustVersion {version!r}, not {VERSION}")
    if not isinstance(record.get("taskId"), str):
        raise CotError("record has no taskId")
    artifacts = record.get("artifacts")
    if not isinstance(artifacts, dict):
        raise CotError("record has no artifacts object")
    for rel, entry in artifacts.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise CotError(f"record entry {rel!r} has no sha256")
        if not _HEX64.match(entry["sha256"]):
            raise CotError(f"record entry {rel!r}: sha256 is not 64 lowercase hex digits")
    return record


def check_files(record: Mapping[str, Any], files: Mapping[str, Path]) -> None:
    """Each ``path -> file`` must be listed in the record with the file's sha256."""
    artifacts = record["artifacts"]
    for rel, path in files.items():
        entry = artifacts.get(rel)
        if entry is None:
            raise CotError(f"{rel} is not listed in the chain-of-trust record of task {record['taskId']}")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise CotError(
                f"{rel}: sha256 {actual} does not match {entry['sha256']} in the record of task "
                f"{record['taskId']}"
            )
