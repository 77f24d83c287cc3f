"""Checking that a server recorded a signature in its signing log (``sealbox sign --log-proof``).

The answer that delivers a result names its entry (``X-Sealbox-Log-Index``); the client then
asks ``GET /log/proof/<index>`` and checks, itself: the entry is about this file (format,
input SHA-1, and the SHA-256 of the very bytes received), the entry's leaf hash leads to the
checkpoint's root through the inclusion proof (RFC 9162), and, given the log's public key, the
checkpoint is signed by it. Without the key the proof shows the server committed to a tree
holding the entry, but not which server's key vouches for it.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fsutil import read_small_text
from ..hashing import hash_file

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


class ProofFailed(Exception):
    """The server's proof does not show the signature in its log."""


@dataclass(frozen=True)
class LogProof:
    """A checked inclusion of one signature in a server's signing log."""

    source: Path  # the file that was signed
    fmt: str
    server: str
    index: int
    tree_size: int
    root: str  # hex root hash of the checkpoint
    origin: str
    checkpoint_time: int  # ms since the epoch
    key_checked: bool  # the checkpoint's signature verified with the pinned log key

    def to_json(self) -> dict[str, Any]:
        """The proof as ``sealbox sign --json`` reports it."""
        return {
            "file": self.source.name,
            "format": self.fmt,
            "server": self.server,
            "index": self.index,
            "treeSize": self.tree_size,
            "rootHash": self.root,
            "origin": self.origin,
            "checkpointTime": self.checkpoint_time,
            "keyChecked": self.key_checked,
        }


def check(
    answer: Any,
    index: int,
    wire: str,
    digest: str,
    dest: Path,
    source: Path,
    server: str,
    log_key: Ed25519PublicKey | None,
) -> LogProof:
    """Check a ``/log/proof/<index>`` answer for the result ``dest`` of (wire, digest)."""
    from ..signlog.log import Checkpoint
    from ..signlog.merkle import ProofError, leaf_hash, verify_inclusion

    try:
        entry_bytes = base64.b64decode(answer["entry"], validate=True)
        hashes = [bytes.fromhex(h) for h in answer["hashes"]]
        tree_size = int(answer["tree_size"])
        cp = Checkpoint.from_json(answer["checkpoint"])
        entry = json.loads(entry_bytes)
        got_index, fmt = entry["index"], entry["format"]
        src, out = entry["input"], entry["output"]
        if not isinstance(src, dict) or not isinstance(out, dict):
            raise TypeError("the entry's input and output must be objects")
    except (KeyError, TypeError, AttributeError, ValueError, RecursionError, binascii.Error) as e:
        raise ProofFailed(f"malformed proof answer: {type(e).__name__}: {e}"[:300]) from None
    if got_index != index or fmt != wire:
        raise ProofFailed(f"entry {index} is entry {got_index} of format {fmt}, not of this {wire} result")
    if digest not in (src.get("sha1"), out.get("sha1")):
        raise ProofFailed(f"entry {index} is not about this file (sha1 {digest})")
    sha256 = hash_file(dest, "sha256")
    if out.get("sha256") != sha256:
        raise ProofFailed(f"entry {index} records output sha256 {out.get('sha256')}, the result is {sha256}")
    if cp.size != tree_size:
        raise ProofFailed(f"the proof is for a tree of {tree_size} entries, its checkpoint has {cp.size}")
    try:
        verify_inclusion(leaf_hash(entry_bytes), index, tree_size, hashes, cp.root)
    except ProofError as e:
        raise ProofFailed(f"entry {index} is not in the checkpoint's tree: {e}") from None
    if log_key is not None and not cp.verify(log_key):
        raise ProofFailed("the checkpoint is not signed by the given log key")
    checked = log_key is not None
    return LogProof(source, wire, server, index, tree_size, cp.root.hex(), cp.origin, cp.time, checked)


def load_log_key(path: Path) -> Ed25519PublicKey:
    """A signing log public key file (``DIR/public/signlog.pub``)."""
    from ..signlog.log import parse_public_key

    return parse_public_key(read_small_text(path))
