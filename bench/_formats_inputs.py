"""Typical inputs for each format, in as many distinct variants as a benchmark needs.

The server keeps results by (format, SHA-1 of the input), so every timed signing must send new
bytes. Each maker writes variant ``i`` of its typical input into a folder and returns its path;
different ``i`` give different bytes, the same ``i`` the same shape and size.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from functools import cache
from pathlib import Path

from sealbox.samples.android import write_apk, write_jar
from sealbox.samples.macos import write_app_tarball, write_macho
from sealbox.samples.mar import write_mar
from sealbox.samples.pe import launcher_path

Maker = Callable[[Path, int], Path]

MIB = 1024 * 1024


@cache
def _launcher() -> bytes:
    return launcher_path().read_bytes()


def pe(directory: Path, i: int) -> Path:
    """pip's ``t64.exe`` launcher (~100 KB PE32+) with COFF TimeDateStamp = ``i``."""
    data = bytearray(_launcher())
    (lfanew,) = struct.unpack_from("<I", data, 0x3C)
    struct.pack_into("<I", data, lfanew + 8, 0x60000000 + i)
    path = directory / f"setup{i}.exe"
    path.write_bytes(bytes(data))
    return path


def blob(size: int, suffix: str) -> Maker:
    """``size`` random bytes (a release artefact, a voucher...)."""

    def make(directory: Path, i: int) -> Path:
        path = directory / f"blob{i}{suffix}"
        path.write_bytes(os.urandom(size))
        return path

    return make


def mar(size: int = MIB) -> Maker:
    """A Firefox-shaped complete-update MAR with a ``size``-byte payload seeded by ``i``."""

    def make(directory: Path, i: int) -> Path:
        return write_mar(directory, f"update{i}.mar", size=size, seed=i)

    return make


def apk(blob_size: int = MIB) -> Maker:
    """An unsigned, unaligned APK with a ``blob_size`` STORED resource (random, so unique)."""

    def make(directory: Path, i: int) -> Path:
        return write_apk(directory, f"app{i}.apk", package=f"org.sealbox.bench.v{i}", blob_size=blob_size)

    return make


def jar(extra_size: int = MIB) -> Maker:
    """A small unsigned JAR plus an ``extra_size`` random member."""

    def make(directory: Path, i: int) -> Path:
        return write_jar(directory, f"lib{i}.jar", extra_size=extra_size + i)

    return make


def app_tarball(directory: Path, i: int) -> Path:
    """The sample ``.app`` bundle as a tar.gz, named (and so hashed) differently per ``i``."""
    return write_app_tarball(directory, f"App{i}.tar.gz", app_name=f"Hello{i}")


def macho(directory: Path, i: int) -> Path:
    """ninja's universal executable, different bytes per ``i`` (in padding no signature covers)."""
    return write_macho(directory, f"ninja{i}", variant=i + 1)
