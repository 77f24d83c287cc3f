"""sealbox.hashing: several digests of one stream in one pass, the later ones in other threads."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

from sealbox.hashing import CHUNK, hash_stream


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
