"""Streaming hashing helpers: bounded memory for any file size."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

__all__ = ["CHUNK", "hash_file", "hash_stream", "is_sha1_hex"]

CHUNK = 1 << 20


def hash_file(path: Path, algorithm: str = "sha1") -> str:
    """Return the lowercase hex digest of a file, read in chunks."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def hash_stream(f: BinaryIO, algorithms: Iterable[str]) -> dict[str, hashlib._Hash]:
    """Hash a stream with several algorithms in one pass; returns the hash objects."""
    states = {name: hashlib.new(name) for name in algorithms}
    while chunk := f.read(CHUNK):
        for h in states.values():
            h.update(chunk)
    return states


def is_sha1_hex(value: str) -> bool:
    """True if ``value`` is exactly 40 lowercase hex digits."""
    return len(value) == 40 and all(c in "0123456789abcdef" for c in value)
