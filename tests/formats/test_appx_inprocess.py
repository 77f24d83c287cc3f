"""APPX/MSIX packages signed in-process (:mod:`sealbox.formats._appx`): no tool runs; the output
is osslsigncode's own, byte for byte outside the signature member, with the same digest, and
passes ``osslsigncode verify``; an old signature is replaced; malformed packages are refused
naming the fault; an ECDSA key and a local TSA sign the same way. A SoftHSM key and a server:
tests/formats/test_inprocess_kinds.py."""

from __future__ import annotations

import re
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from sealbox.errors import FormatRejected
from sealbox.formats._pe import SPC_SIPINFO
from sealbox.samples.windows import write_appx
from tests.formats import test_pe_inprocess
from tests.formats._authenticode_util import (
    OSSL,
    check_ecdsa_key,
    check_v2_timestamp,
    extract_data,
    indirect_data,
    no_process,
    sign_in_process,
    signed_both_ways,
    signed_by_osslsigncode,
    signed_by_osslsigncode_first,
    signed_twice,
    stub_signed,
    verify_signed,
)
from tests.formats.test_authenticode import STUB, Deployment, LocalTSA, make_job

pytestmark = pytest.mark.skipif(OSSL is None, reason="needs osslsigncode")
SIG = "AppxSignature.p7x"
CT = "[Content_Types].xml"

dep = test_pe_inprocess.dep  # a dev deployment's Authenticode signers, file keys


# -- samples -------------------------------------------------------------------------------------
def _members(d: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(write_appx(d, "base.msix")) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def _python_zip(d: Path, name: str, members: list[tuple[str, bytes]], deflated: set[str]) -> Path:
    """A zip as Python's zipfile writes it (local sizes, no ZIP64), fixed member times."""
    p = d / name
    with zipfile.ZipFile(p, "w") as z:
        for member, data in members:
            info = zipfile.ZipInfo(member, (2023, 11, 14, 22, 13, 20))
            info.compress_type = zipfile.ZIP_DEFLATED if member in deflated else zipfile.ZIP_STORED
            z.writestr(info, data)
    return p


def _makeappx_zip(d: Path, name: str, members: list[tuple[str, bytes]]) -> Path:
    """A zip laid out as MakeAppx writes one: data descriptors with 64-bit sizes, every central
    directory entry's sizes and offset in its ZIP64 extra field, ZIP64 end records."""
    body, central = b"", b""
    for member, data in members:
        packed = zlib.compress(data, 6, -15) if member != "data.bin" else data
        method, crc, raw = (8 if member != "data.bin" else 0), zlib.crc32(data), member.encode()
        offset = len(body)
        body += (
            struct.pack("<4sHHHHHIIIHH", b"PK\3\4", 45, 8, method, 0x6A9A, 0x576E, 0, 0, 0, len(raw), 0) + raw
        )
        body += packed + struct.pack("<4sIQQ", b"PK\7\x08", crc, len(packed), len(data))
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\1\2", 45, 45, 8, method, 0x6A9A, 0x576E, crc,
                               0xFFFFFFFF, 0xFFFFFFFF, len(raw), 28, 0, 0, 0, 0, 0xFFFFFFFF)  # fmt: skip
        central += raw + struct.pack("<HHQQQ", 1, 24, len(data), len(packed), offset)
    n, at, size = len(members), len(body), len(central)
    end64 = struct.pack("<4sQHHIIQQQQ", b"PK\6\6", 44, 45, 45, 0, 0, n, n, size, at)
    locator = struct.pack("<4sIQI", b"PK\6\7", 0, at + size, 1)
    end = struct.pack("<4sHHHHIIH", b"PK\5\6", 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    p = d / name
    p.write_bytes(body + central + end64 + locator + end)
    return p


def _with_parts(*parts: tuple[str, bytes]) -> Callable[[Path], Path]:
    """The sample package with ``parts`` added (deflated) before the block map."""

    def make(d: Path) -> Path:
        members = _members(d)
        at = [m for m, _ in members].index("AppxBlockMap.xml")
        members[at:at] = list(parts)
        return _python_zip(d, "parts.msix", members, {CT, *(m for m, _ in parts)})

    return make


def _sha512_block_map(d: Path) -> Path:
    members = [
        (m, data.replace(b"xmlenc#sha256", b"xmlenc#sha512") if m == "AppxBlockMap.xml" else data)
        for m, data in _members(d)
    ]
    return _python_zip(d, "sha512.msix", members, {CT})


SAMPLES: dict[str, Callable[[Path], Path]] = {
    "sample": lambda d: write_appx(d, "app.msix"),
    "second-payload": _with_parts(("bin/tool.dll", bytes(range(256)) * 300 + b"second payload\n")),
    "code-integrity": _with_parts(("AppxMetadata/CodeIntegrity.cat", b"0\x82catalog bytes" * 40)),
    "bundle": _with_parts(("AppxMetadata/AppxBundleManifest.xml", b"<Bundle/>\n" * 20)),
    "sha512-block-map": _sha512_block_map,
    "makeappx-layout": lambda d: _makeappx_zip(d, "makeappx.msix", _members(d)),
}


# -- what the output holds -----------------------------------------------------------------------
def _signature(data: bytes, tmp: Path) -> bytes:
    p = tmp / "probe.zip"
    p.write_bytes(data)
    with zipfile.ZipFile(p) as z:
        names = [i.filename for i in z.infolist()]
        assert names.count(SIG) == 1 and names[-1] == SIG, names
        blob = z.read(SIG)
    assert blob[:4] == b"PKCX"
    return blob[4:]


def _verify(dep: Deployment, fmt: str, src: Path, out: Path) -> str:
    text = verify_signed(dep.public_dir, out, fmt, src)
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None  # every member reads back with its CRC
        assert b'<Override PartName="/AppxSignature.p7x"' in z.read(CT)
    return text


def _layout(data: bytes) -> tuple[int, int, int]:
    """(signature member's offset, central directory's offset, its size) of a signed package."""
    end = data.rindex(b"PK\5\6")
    _, cd_size, cd_offset = struct.unpack_from("<HII", data, end + 10)
    if cd_offset == 0xFFFFFFFF:
        end64 = data.rindex(b"PK\6\6")
        cd_size, cd_offset = struct.unpack_from("<QQ", data, end64 + 40)
    last = data.rindex(b"PK\1\2", cd_offset, cd_offset + cd_size)
    (sig_at,) = struct.unpack_from("<I", data, last + 42)
    assert data[last + 46 : last + 63] == SIG.encode()
    return sig_at, cd_offset, cd_size


# -- signing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["sha2signcode", "sha2signcodestub"])
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_in_process_signature_verifies(dep: Deployment, tmp_path: Path, sample: str, fmt: str) -> None:
    src = SAMPLES[sample](tmp_path)
    job = sign_in_process(dep, fmt, src, tmp_path)
    text = _verify(dep, fmt, src, job.output)
    assert (
        "Text description: sealbox dep" in text and "URL description: https://example.invalid/sealbox" in text
    )
    der = _signature(job.output.read_bytes(), tmp_path)
    # osslsigncode's own digest of the input, in the same SpcIndirectDataContent bytes
    assert indirect_data(der) == extract_data(src, tmp_path)
    assert SPC_SIPINFO in indirect_data(der)
    assert stub_signed(der) == (fmt in STUB)


@pytest.mark.parametrize("sample", [*SAMPLES, "signed-by-osslsigncode"])
def test_same_bytes_as_osslsigncode_outside_the_signature(
    dep: Deployment, tmp_path: Path, sample: str
) -> None:
    """osslsigncode signs the same input with the same key and options: every byte up to the
    signature member, and the central directory but for that member's entry, are the same; so
    is the digest (the SpcIndirectDataContent)."""
    if sample == "signed-by-osslsigncode":  # an old signature (with the stub's certificate) replaced
        src = signed_by_osslsigncode_first(dep, write_appx, tmp_path)
    else:
        src = SAMPLES[sample](tmp_path)
    ours, theirs = signed_both_ways(dep, src, tmp_path)
    sig_at, cd_at, cd_size = _layout(ours)
    assert _layout(theirs)[0] == sig_at
    assert ours[:sig_at] == theirs[:sig_at]
    assert ours[sig_at : sig_at + 10] == theirs[sig_at : sig_at + 10]  # version, flags, deflated
    their_cd_at, their_cd_size = _layout(theirs)[1:]
    assert ours[cd_at : cd_at + cd_size - 63] == theirs[their_cd_at : their_cd_at + their_cd_size - 63]
    assert indirect_data(_signature(ours, tmp_path)) == indirect_data(_signature(theirs, tmp_path))
    assert ours[sig_at:] != theirs[sig_at:] or ours == theirs  # the times may differ


def test_resigning_replaces_the_signature(dep: Deployment, tmp_path: Path) -> None:
    src = write_appx(tmp_path)
    first, job = signed_twice(dep, src, tmp_path)
    _verify(dep, "sha2signcode", first.output, job.output)
    once, twice = first.output.read_bytes(), job.output.read_bytes()
    der = _signature(twice, tmp_path)
    assert not stub_signed(der)  # the old one is gone
    # the members stay (the content type is there already), so the digest is the same
    sig_at = _layout(once)[0]
    assert _layout(twice)[0] == sig_at and twice[:sig_at] == once[:sig_at]
    assert indirect_data(der) == indirect_data(_signature(once, tmp_path)) == extract_data(src, tmp_path)


def test_stored_content_types_stays_readable(dep: Deployment, tmp_path: Path) -> None:
    """A stored [Content_Types].xml: osslsigncode writes it back deflated under the "stored"
    method (no unzip reads it); in-process it stays stored, and verifies."""
    src = _python_zip(tmp_path, "stored.msix", _members(tmp_path), set())
    job = sign_in_process(dep, "sha2signcode", src, tmp_path)
    _verify(dep, "sha2signcode", src, job.output)
    (tmp_path / "ref").mkdir()
    theirs = signed_by_osslsigncode(dep.root, src, tmp_path / "ref" / "signed.msix")
    with zipfile.ZipFile(theirs) as z:
        assert z.testzip() == CT


def test_v2_timestamp(dep: Deployment, inprocess_tsa: LocalTSA, tmp_path: Path) -> None:
    check_v2_timestamp(dep, inprocess_tsa, write_appx(tmp_path), tmp_path)


def test_ecdsa_key_signs_a_package(tmp_path: Path) -> None:
    check_ecdsa_key(tmp_path, write_appx(tmp_path), {})


# -- refusals --------------------------------------------------------------------------------------
def _changed(
    change: Callable[[bytes], bytes], base: Callable[[Path], Path] = SAMPLES["sample"]
) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        p = d / "bad.msix"
        p.write_bytes(change(base(d).read_bytes()))
        return p

    return make


def _replace(old: bytes, new: bytes, count: int = 1) -> Callable[[bytes], bytes]:
    return lambda data: data.replace(old, new, count)


def _member_data(
    members: Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]],
) -> Callable[[Path], Path]:
    return lambda d: _python_zip(d, "bad.msix", members(_members(d)), {CT})


def _edit(name: str, old: bytes, new: bytes) -> Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]]:
    return lambda ms: [(m, data.replace(old, new) if m == name else data) for m, data in ms]


def _with_timestamps(d: Path) -> Path:
    """Info-ZIP's extended timestamp extra field on every central directory entry."""
    p = d / "bad.msix"
    with zipfile.ZipFile(p, "w") as z:
        for member, data in _members(d):
            info = zipfile.ZipInfo(member, (2023, 11, 14, 22, 13, 20))
            info.extra = struct.pack("<HHBI", 0x5455, 5, 1, 1_700_000_000)
            z.writestr(info, data)
    return p


BAD: dict[str, tuple[Callable[[Path], Path], str]] = {
    "zip-comment": (_changed(lambda b: b[:-2] + b"\4\0note"), "(a zip comment?)"),
    "local-header-disagrees": (
        _changed(_replace(b"PK\3\4\x14\0\0\0\0\0", b"PK\3\4\x14\0\0\0\x08\0")),
        "the local header of central directory entry 0 disagrees with the central directory",
    ),
    "no-closing-types": (
        _member_data(_edit(CT, b"</Types>", b"</Typos>")),
        "[Content_Types].xml has no </Types>",
    ),
    "unknown-hash-method": (
        _member_data(_edit("AppxBlockMap.xml", b"xmlenc#sha256", b"xmldsig#sha1")),
        "block map HashMethod is not SHA-256, SHA-384 or SHA-512",
    ),
    "no-hash-method": (
        _member_data(_edit("AppxBlockMap.xml", b"HashMethod", b"HashMode")),
        "has no HashMethod",
    ),
    "extra-fields": (_with_timestamps, "has extra fields besides its ZIP64 values"),
    "descriptor-without-signature": (
        _changed(_replace(b"PK\7\x08", b"XX\7\x08"), SAMPLES["makeappx-layout"]),
        "the data descriptor of central directory entry 0 has no signature",
    ),
    "bytes-cut-before-the-central-directory": (
        _changed(lambda b: b[: b.index(b"PK\1\2") - 300] + b[b.index(b"PK\1\2") :]),
        "truncated APPX/MSIX package: central directory entry 0 is cut off",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_package_is_refused_with_a_reason(dep: Deployment, tmp_path: Path, case: str) -> None:
    make, reason = BAD[case]
    src = make(tmp_path)
    job = make_job(tmp_path, src)
    signer = dep.signer("sha2signcode-v2")
    with pytest.raises(FormatRejected, match=re.escape(reason)), no_process():
        signer.sign(job.request)
    assert not job.output.exists() and list(job.work_dir.iterdir()) == []
