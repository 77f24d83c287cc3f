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
from sealbox.samples.linuxpkg import write_deb, write_release, write_rpm
from sealbox.samples.macos import write_app_tarball, write_macho
from sealbox.samples.mar import write_mar
from sealbox.samples.pe import launcher_path
from sealbox.samples.sigstore import write_payload
from sealbox.samples.windows import write_appx, write_cab, write_cat, write_ps1

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


def sigstore_payload(directory: Path, i: int) -> Path:
    """The simple-signing payload of a container image (~250 bytes), a distinct digest per ``i``."""
    return write_payload(directory, f"payload{i}.json", seed=i)


def rpm(directory: Path, i: int) -> Path:
    """A small noarch RPM built by rpmbuild, a distinct package per ``i``."""
    return write_rpm(directory, f"bench{i}", payload=f"bench package {i}")


def deb(directory: Path, i: int) -> Path:
    """A small .deb built by dpkg-deb, a distinct package per ``i``."""
    return write_deb(directory, f"bench{i}", payload=f"bench package {i}")


def release(directory: Path, i: int) -> Path:
    """An APT Release file over 100 indexes (~25 KiB), a distinct suite per ``i``."""
    return write_release(directory, f"Release{i}", suite=f"suite{i}", indexes=100)


def _payload(i: int) -> dict[str, bytes]:
    return {"readme.txt": f"bench {i}\n".encode(), "data.bin": os.urandom(256 * 1024)}


def cab(directory: Path, i: int) -> Path:
    """A gcab cabinet of a note and 256 KiB of random data (compressed, ~256 KiB)."""
    return write_cab(directory, f"files{i}.cab", _payload(i))


def cat(directory: Path, i: int) -> Path:
    """A security catalog of 200 members (~40 KiB)."""
    return write_cat(directory, f"files{i}.cat", {f"f{n}.dll": f"{i}/{n}".encode() for n in range(200)})


def appx(directory: Path, i: int) -> Path:
    """A minimal MSIX package (manifest, block map, 16 KiB stored payload), distinct per ``i``."""
    return write_appx(directory, f"app{i}.msix", publisher=f"CN=sealbox bench {i}")


def ps1(directory: Path, i: int) -> Path:
    """A small PowerShell script (~100 bytes), distinct per ``i``."""
    path = write_ps1(directory, f"tool{i}.ps1")
    path.write_bytes(path.read_bytes() + f"# variant {i}\n".encode())
    return path
