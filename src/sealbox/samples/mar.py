"""Unsigned MAR update archives shaped like Firefox's, built in code with mardor."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 20


def _manifest(files: list[str]) -> bytes:
    lines = ['type "complete"\n']
    lines += [f'add "{name}"\n' for name in files]
    return "".join(lines).encode()


def _stream(data: bytes) -> Iterator[bytes]:
    buf = io.BytesIO(data)
    while chunk := buf.read(CHUNK):
        yield chunk


def _random_stream(size: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    left = size
    while left > 0:
        n = min(CHUNK, left)
        yield rng.randbytes(n)
        left -= n


def write_mar(
    directory: Path,
    name: str = "update.mar",
    channel: str = "release",
    version: str = "100.0",
    size: int = 1 << 20,
    seed: int = 0,
) -> Path:
    """Write an UNSIGNED complete-update MAR into ``directory`` and return its path.

    It holds an xz-compressed ``updatev3.manifest`` and ``precomplete`` (as Firefox's do), a
    small ``application.ini`` and a ``size``-byte pseudo-random ``libxul.so`` (seeded, so the
    same arguments give the same file). ``channel``/``version`` go in the product-info block.
    """
    from mardor.writer import MarWriter

    directory.mkdir(parents=True, exist_ok=True)
    files = ["application.ini", "libxul.so", "precomplete"]
    ini = f"[App]\nVendor=Mozilla\nName=Firefox\nVersion={version}\nBuildID=20260101000000\n".encode()
    precomplete = "".join(f'remove "{n}"\n' for n in files).encode()
    path = directory / name
    with path.open("w+b") as f, MarWriter(f, productversion=version, channel=channel) as m:
        m.add_stream(_stream(_manifest(files)), "updatev3.manifest", "xz", 0o644)
        m.add_stream(_stream(ini), "application.ini", "xz", 0o644)
        m.add_stream(_random_stream(size, seed), "libxul.so", None, 0o755)
        m.add_stream(_stream(precomplete), "precomplete", "xz", 0o644)
    return path
