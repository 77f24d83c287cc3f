"""Cabinets (CAB) signed in-process (:mod:`sealbox.formats._cab`): no tool runs; the output is
osslsigncode's own, byte for byte outside the signature blob, and passes ``osslsigncode
verify``; an old signature is replaced; malformed cabinets are refused naming the fault; a
local TSA stamps. A SoftHSM key and a server: tests/formats/test_inprocess_kinds.py."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from sealbox.errors import FormatRejected
from sealbox.formats._cab import SPC_CAB_DATA
from sealbox.samples.windows import write_cab
from tests.formats import test_pe_inprocess
from tests.formats._authenticode_util import (
    DESCRIPTION,
    OSSL,
    URL,
    check_v2_timestamp,
    extract_data,
    indirect_data,
    no_process,
    sign_in_process,
    signed_both_ways,
    signed_by_osslsigncode_first,
    signed_twice,
    stub_signed,
    verify_signed,
)
from tests.formats.test_authenticode import STUB, Deployment, LocalTSA, make_job

pytestmark = pytest.mark.skipif(
    OSSL is None or shutil.which("gcab") is None, reason="needs osslsigncode and gcab"
)

dep = test_pe_inprocess.dep  # a dev deployment's Authenticode signers, file keys


# -- samples -------------------------------------------------------------------------------------
def _checksum(data: bytes, seed: int = 0) -> int:
    """The CFDATA checksum of MS-CAB: little-endian words XORed, the tail big-endian."""
    whole = len(data) // 4 * 4
    for (word,) in struct.iter_unpack("<I", data[:whole]):
        seed ^= word
    return seed ^ int.from_bytes(data[whole:], "big")


def _stored_cab(d: Path, folders: list[dict[str, bytes]]) -> Path:
    """An uncompressed cabinet with one folder per mapping (name -> bytes), built by hand:
    gcab writes one folder only. One CFDATA block per folder."""
    cffiles, blocks = b"", []
    for index, files in enumerate(folders):
        offset = 0
        for name, data in files.items():
            cffiles += (
                struct.pack("<IIHHHH", len(data), offset, index, 0x5821, 0, 0x20) + name.encode() + b"\0"
            )
            offset += len(data)
        payload = b"".join(files.values())
        sizes = struct.pack("<HH", len(payload), len(payload))
        blocks.append(struct.pack("<I", _checksum(sizes, _checksum(payload))) + sizes + payload)
    nfiles = sum(len(f) for f in folders)
    files_at = 36 + 8 * len(folders)
    data_at = files_at + len(cffiles)
    cffolders = b""
    for block in blocks:
        cffolders += struct.pack("<IHH", data_at, 1, 0)  # one CFDATA, no compression
        data_at += len(block)
    header = struct.pack("<4sIIIIIBBHHHHH", b"MSCF", 0, data_at, 0, files_at, 0, 3, 1,
                         len(folders), nfiles, 0, 0x1234, 0)  # fmt: skip
    p = d / "folders.cab"
    p.write_bytes(header + cffolders + cffiles + b"".join(blocks))
    return p


SAMPLES: dict[str, Callable[[Path], Path]] = {
    "one-file": lambda d: write_cab(d, "one.cab", {"readme.txt": b"sealbox\n"}),
    "several-files": lambda d: write_cab(d, "several.cab"),
    "big": lambda d: write_cab(d, "big.cab", {"a.bin": bytes(range(256)) * 9000, "b.txt": b"x" * 5000}),
    "two-folders": lambda d: _stored_cab(
        d, [{"a.txt": b"first\n", "b.txt": b"second\n"}, {"c.txt": b"third\n"}]
    ),
}


# -- what the output holds -----------------------------------------------------------------------
def _sig_area(data: bytes) -> tuple[int, int]:
    """(offset, size) of the signature a signed cabinet's reserve area names."""
    flags, cb_header, magic, sigpos, siglen = struct.unpack_from("<H4xIIII", data, 30)
    assert flags & 0x0004 and cb_header == 20 and magic == 0x00100000
    return sigpos, siglen


def _signature(data: bytes) -> bytes:
    sigpos, siglen = _sig_area(data)
    assert sigpos + siglen == len(data) and siglen % 8 == 0
    return data[sigpos:]


def _indirect_data(data: bytes) -> bytes:
    """The SpcIndirectDataContent (with its [0] wrapper) of a signed cabinet's signature."""
    return indirect_data(_signature(data))


# -- signing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["sha2signcode", "sha2signcodestub"])
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_in_process_signature_verifies(dep: Deployment, tmp_path: Path, sample: str, fmt: str) -> None:
    src = SAMPLES[sample](tmp_path)
    job = sign_in_process(dep, fmt, src, tmp_path)
    text = verify_signed(dep.public_dir, job.output, fmt, src)
    assert f"Text description: {DESCRIPTION}" in text and f"URL description: {URL}" in text
    data = job.output.read_bytes()
    # osslsigncode's own digest of the input, in the same SpcIndirectDataContent bytes
    assert _indirect_data(data) == extract_data(src, tmp_path)
    assert SPC_CAB_DATA in _indirect_data(data)
    assert stub_signed(_signature(data)) == (fmt in STUB)
    # still a cabinet: gcab (its CFDATA checksums checked) extracts the same files
    assert _extract(job.output, tmp_path / "signed") == _extract(src, tmp_path / "unsigned")


def _extract(cab: Path, d: Path) -> dict[str, bytes]:
    d.mkdir()
    subprocess.run(["gcab", "-x", "-C", str(d), str(cab.absolute())], capture_output=True, check=True)
    return {p.name: p.read_bytes() for p in d.iterdir()}


@pytest.mark.parametrize("sample", [*SAMPLES, "signed-by-osslsigncode"])
def test_same_bytes_as_osslsigncode_outside_the_signature(
    dep: Deployment, tmp_path: Path, sample: str
) -> None:
    """osslsigncode signs the same input with the same key and options: the cabinet (CFHEADER
    with its reserve area, CFFOLDERs, CFFILEs, CFDATA) is identical up to the signature, which
    is the same size; the digest and the SpcIndirectDataContent are identical too."""
    if sample == "signed-by-osslsigncode":  # an old signature (with the stub's certificate) replaced
        src = signed_by_osslsigncode_first(dep, write_cab, tmp_path)
    else:
        src = SAMPLES[sample](tmp_path)
    ours, theirs = signed_both_ways(dep, src, tmp_path)
    sigpos, siglen = _sig_area(theirs)
    assert _sig_area(ours) == (sigpos, siglen) and len(ours) == len(theirs)
    assert ours[:sigpos] == theirs[:sigpos]
    assert _indirect_data(ours) == _indirect_data(theirs)
    assert ours[sigpos:] != theirs[sigpos:] or ours == theirs  # the signing time may differ


def test_resigning_replaces_the_signature(dep: Deployment, tmp_path: Path) -> None:
    src = write_cab(tmp_path)
    first, job = signed_twice(dep, src, tmp_path)
    verify_signed(dep.public_dir, job.output, "sha2signcode", first.output)
    once, twice = first.output.read_bytes(), job.output.read_bytes()
    assert not stub_signed(_signature(twice))  # the old one is gone
    # the header stays (the signature goes where the old one was), so the digest is the same
    sigpos, _ = _sig_area(once)
    assert _sig_area(twice)[0] == sigpos
    assert twice[:48] == once[:48] and twice[52:sigpos] == once[52:sigpos]
    assert _indirect_data(twice) == _indirect_data(once) == extract_data(src, tmp_path)


def test_v2_timestamp(dep: Deployment, inprocess_tsa: LocalTSA, tmp_path: Path) -> None:
    check_v2_timestamp(dep, inprocess_tsa, write_cab(tmp_path), tmp_path)


# -- refusals --------------------------------------------------------------------------------------
def _edit(fmt: str, at: int, *values: int, signed: bool = False) -> Callable[[Deployment, Path], Path]:
    """A maker: gcab's cabinet (``signed``: signed in-process first) with ``struct.pack(fmt,
    *values)`` written at ``at``."""

    def make(dep: Deployment, d: Path) -> Path:
        src = write_cab(d, "good.cab")
        if signed:
            src = sign_in_process(dep, "sha2signcode", src, d).output
        data = bytearray(src.read_bytes())
        struct.pack_into(fmt, data, at, *values)
        p = d / "bad.cab"
        p.write_bytes(bytes(data))
        return p

    return make


def _with(change: Callable[[bytes], bytes], signed: bool = False) -> Callable[[Deployment, Path], Path]:
    def make(dep: Deployment, d: Path) -> Path:
        src = write_cab(d, "good.cab")
        if signed:
            src = sign_in_process(dep, "sha2signcode", src, d).output
        p = d / "bad.cab"
        p.write_bytes(change(src.read_bytes()))
        return p

    return make


def _file_table_moved(data: bytes) -> bytes:
    out = bytearray(data)
    (files_at,) = struct.unpack_from("<I", out, 16)
    struct.pack_into("<I", out, 16, files_at + 8)  # a gap after the folder entries
    return bytes(out)


def _reserve_of(size: int) -> Callable[[bytes], bytes]:
    """Flag a reserve area of ``size`` bytes in the header (what makecab -reserve writes)."""

    def change(data: bytes) -> bytes:
        out = bytearray(data)
        out[30] |= 0x04
        struct.pack_into("<HBB", out, 36, size, 0, 0)
        return bytes(out)

    return change


BAD: dict[str, tuple[Callable[[Deployment, Path], Path], str]] = {
    "reserved1": (_edit("<I", 4, 7), "malformed CAB: reserved1 is 0x00000007, not 0"),
    "previous-cabinet": (_edit("<H", 30, 0x0001), "CAB in a multi-cabinet set (flags 0x0001"),
    "next-cabinet": (_edit("<H", 30, 0x0002), "CAB in a multi-cabinet set (flags 0x0002"),
    "other-reserve": (_with(_reserve_of(6144)), "reserve area that is not a signature's (cbCFHeader 6144"),
    "reserve-without-signature": (_edit("<II", 44, 0, 0, signed=True), "the signature area (at 0, 0 bytes)"),
    "reserve-magic": (_edit("<I", 40, 0x11, signed=True), "the reserve area does not start 0x00100000"),
    "data-after-signature": (_with(lambda b: b + b"tail", signed=True), "does not end the file"),
    "signature-cut": (_with(lambda b: b[:-100], signed=True), "does not end the file"),
    "bytes-after-cabinet": (_with(lambda b: b + b"tail"), "the header says"),
    "file-table-moved": (_with(_file_table_moved), "the file table is at"),
    "folder-data-past-the-end": (_edit("<I", 36, 0x7FFFFFF0), "folder 0's data starts at 2147483632"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_cab_is_refused_with_a_reason(dep: Deployment, tmp_path: Path, case: str) -> None:
    make, reason = BAD[case]
    src = make(dep, tmp_path)
    job = make_job(tmp_path, src)
    signer = dep.signer("sha2signcode-v2")
    with pytest.raises(FormatRejected, match=re.escape(reason)), no_process():
        signer.sign(job.request)
    assert not job.output.exists() and list(job.work_dir.iterdir()) == []
