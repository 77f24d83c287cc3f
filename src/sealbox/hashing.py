"""Streaming hashing helpers: bounded memory for any file size."""

from __future__ import annotations

import concurrent.futures
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from .errors import SigningFailed

__all__ = ["CHUNK", "copy_hashed", "hash_file", "hash_stream", "is_sha1_hex"]

CHUNK = 1 << 20


def hash_file(path: Path, algorithm: str = "sha1") -> str:
    """Return the lowercase hex digest of a file, read in chunks."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


#: threads that take the second and later algorithms of :func:`hash_stream`: hashlib lets go of
#: the GIL, so SHA-1 and SHA-256 of one file take two cores instead of one after the other
_LANES = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="sealbox-hash")


def hash_stream(f: BinaryIO, algorithms: Iterable[str]) -> dict[str, hashlib._Hash]:
    """Hash a stream with several algorithms in one pass (each chunk hashed by all of them at
    once, the first in this thread, the others in :data:`_LANES`); returns the hash objects."""
    states = {name: hashlib.new(name) for name in algorithms}
    first, *others = states.values()
    while chunk := f.read(CHUNK):
        lanes = [_LANES.submit(h.update, chunk) for h in others]
        first.update(chunk)
        for lane in lanes:
            lane.result()  # before the next chunk: each state takes its chunks in order
    return states


def copy_hashed(src: BinaryIO, dst: BinaryIO | None, length: int, *states: hashlib._Hash) -> None:
    """Copy ``length`` bytes from ``src`` (from where it stands) to ``dst`` (None: only hash
    them), each chunk fed to ``states`` on the way: a signer's one pass over the bytes it keeps. Raises
    :class:`~sealbox.errors.SigningFailed` if ``src`` ends first (it changed under the job)."""
    while length:
        chunk = src.read(min(CHUNK, length))
        if not chunk:
            raise SigningFailed("the input shrank while it was being signed")
        for state in states:
            state.update(chunk)
        if dst is not None:
            dst.write(chunk)
        length -= len(chunk)


def is_sha1_hex(value: str) -> bool:
    """True if ``value`` is exactly 40 lowercase hex digits."""
    return len(value) == 40 and all(c in "0123456789abcdef" for c in value)
