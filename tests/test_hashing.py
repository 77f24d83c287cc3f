"""sealbox.hashing: several digests of one stream in one pass, the later ones in other threads."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

from sealbox.errors import SigningFailed
from sealbox.hashing import CHUNK, copy_hashed, hash_stream


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 3 * CHUNK + 17])
def test_every_algorithm_sees_every_chunk_in_order(size: int) -> None:
    data = os.urandom(size)
    states = hash_stream(io.BytesIO(data), ("sha1", "sha256", "sha384"))
    assert list(states) == ["sha1", "sha256", "sha384"]
    for name, state in states.items():
        assert state.hexdigest() == hashlib.new(name, data).hexdigest(), name


def test_a_failing_read_is_raised() -> None:
    class Broken(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        hash_stream(Broken(), ("sha1", "sha256"))


def test_copy_hashed_copies_the_range_and_hashes_it() -> None:
    data = os.urandom(2 * CHUNK + 5)
    src, dst = io.BytesIO(data), io.BytesIO()
    src.seek(3)
    sha1, sha256 = hashlib.sha1(usedforsecurity=False), hashlib.sha256()
    copy_hashed(src, dst, len(data) - 10, sha1, sha256)
    kept = data[3 : len(data) - 7]
    assert dst.getvalue() == kept
    assert sha1.digest() == hashlib.sha1(kept, usedforsecurity=False).digest()
    assert sha256.digest() == hashlib.sha256(kept).digest()


def test_copy_hashed_refuses_an_input_that_ends_early() -> None:
    with pytest.raises(SigningFailed, match="shrank"):
        copy_hashed(io.BytesIO(b"short"), io.BytesIO(), 6)


def test_copy_hashed_without_a_destination_only_hashes() -> None:
    data = os.urandom(CHUNK + 3)
    state = hashlib.sha256()
    copy_hashed(io.BytesIO(data), None, len(data), state)
    assert state.digest() == hashlib.sha256(data).digest()
