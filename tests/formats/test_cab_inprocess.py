"""Cabinets (CAB) signed in-process (:mod:`sealbox.formats._cab`): no tool runs; the output is
osslsigncode's own, byte for byte outside the signature blob, and passes ``osslsigncode
verify``; an old signature is replaced; malformed cabinets are refused naming the fault; a
SoftHSM key and a local TSA sign the same way through a real server."""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomli_w
from asn1crypto import cms  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization

from sealbox.errors import FormatRejected
from sealbox.formats import authenticode
from sealbox.formats._cab import SPC_CAB_DATA
from sealbox.formats.authenticode import AuthenticodeSigner
from sealbox.keys import FileKey
from sealbox.samples.windows import write_cab
from tests.formats import test_authenticode, test_pe_inprocess
from tests.formats.test_authenticode import STUB, Deployment, Job, LocalTSA, make_job, raw_verify
from tests.formats.test_pe_inprocess import no_process
from tests.servers import Deployment as ServerDeployment
from tests.servers import ServerProcess, start_server

OSSL = shutil.which("osslsigncode")
pytestmark = pytest.mark.skipif(
    OSSL is None or shutil.which("gcab") is None, reason="needs osslsigncode and gcab"
)
CAP = 120.0
DESCRIPTION, URL = "sealbox dep", "https://example.invalid/sealbox"  # what dev_setup configures

dep = test_pe_inprocess.dep  # module-scoped: a dev deployment's Authenticode signers, file keys
tsa = test_authenticode.tsa  # module-scoped local RFC 3161 TSA


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


def _signed_by_osslsigncode(dep: Deployment, src: Path, out: Path, *extra: str) -> Path:
    """``osslsigncode sign`` of ``src`` with the deployment's own Authenticode key and options
    (as the bench's direct row runs it): the reference the in-process output is compared with."""
    assert OSSL is not None
    key = dep.resolver(dep.sections["sha2signcode"].require_key())
    assert isinstance(key, FileKey)
    pem = out.parent / "key.pem"
    pem.touch(mode=0o600)
    pem.write_bytes(
        key._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    certs = out.parent / "certs.pem"
    certs.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in key.chain))
    out.unlink(missing_ok=True)
    try:
        subprocess.run(
            [OSSL, "sign", "-certs", str(certs), "-key", str(pem), "-h", "sha256", "-n", DESCRIPTION,
             "-i", URL, *extra, "-in", str(src), "-out", str(out)],
            capture_output=True, check=True,
        )  # fmt: skip
    finally:
        pem.unlink()
    return out


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
    return bytes(cms.ContentInfo.load(_signature(data))["content"]["encap_content_info"]["content"].dump())


def _extract_data(src: Path, tmp_path: Path) -> bytes:
    """What ``osslsigncode extract-data`` makes of ``src``: its own digest of the cabinet."""
    assert OSSL is not None
    out = tmp_path / "data.p7"
    out.unlink(missing_ok=True)
    subprocess.run(
        [OSSL, "extract-data", "-h", "sha256", "-in", str(src), "-out", str(out)],
        capture_output=True,
        check=True,
    )
    return bytes(cms.ContentInfo.load(out.read_bytes())["content"]["encap_content_info"]["content"].dump())


def _subjects(data: bytes) -> set[str]:
    info = cms.ContentInfo.load(_signature(data))["content"]
    return {c.chosen.subject.native["common_name"] for c in info["certificates"]}


def _verify(dep: Deployment, fmt: str, src: Path, out: Path) -> str:
    AuthenticodeSigner.verify(fmt, out, src, dep.public_dir)
    res = raw_verify(out, dep.public_dir / authenticode.CA_FILE)
    assert res.returncode == 0 and "Signature verification: ok" in res.stdout, res.stdout + res.stderr
    assert "Number of verified signatures: 1" in res.stdout, res.stdout
    return res.stdout


def _sign(dep: Deployment, fmt: str, src: Path, tmp_path: Path, **options: str) -> Job:
    """Sign with ``fmt``'s signer; no process may start (with a timestamp the local TSA runs
    ``openssl ts``: there the signer's osslsigncode is ``false`` instead)."""
    job = make_job(tmp_path, src)
    if "timestamp_url" in options:
        signer = dep.signer(fmt, osslsigncode=shutil.which("false"), **options)
        signer.sign(job.request)
    else:
        signer = dep.signer(fmt, **options)
        with no_process():
            signer.sign(job.request)
    assert list(job.work_dir.iterdir()) == []
    return job


# -- signing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["sha2signcode", "sha2signcodestub"])
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_in_process_signature_verifies(dep: Deployment, tmp_path: Path, sample: str, fmt: str) -> None:
    src = SAMPLES[sample](tmp_path)
    job = _sign(dep, fmt, src, tmp_path)
    text = _verify(dep, fmt, src, job.output)
    assert f"Text description: {DESCRIPTION}" in text and f"URL description: {URL}" in text
    data = job.output.read_bytes()
    # osslsigncode's own digest of the input, in the same SpcIndirectDataContent bytes
    assert _indirect_data(data) == _extract_data(src, tmp_path)
    assert SPC_CAB_DATA in _indirect_data(data)
    assert any(s.startswith("sealbox stub dummy") for s in _subjects(data)) == (fmt in STUB)
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
        first = tmp_path / "first"
        first.mkdir()
        src = _signed_by_osslsigncode(dep, write_cab(first), first / "signed.cab", "-ac",
                                      str(dep.sections["sha2signcodestub"].path("extra_cert")))  # fmt: skip
    else:
        src = SAMPLES[sample](tmp_path)
    ours = _sign(dep, "sha2signcode", src, tmp_path).output.read_bytes()
    (tmp_path / "ref").mkdir()
    theirs = _signed_by_osslsigncode(dep, src, tmp_path / "ref" / "signed.cab").read_bytes()
    sigpos, siglen = _sig_area(theirs)
    assert _sig_area(ours) == (sigpos, siglen) and len(ours) == len(theirs)
    assert ours[:sigpos] == theirs[:sigpos]
    assert _indirect_data(ours) == _indirect_data(theirs)
    assert ours[sigpos:] != theirs[sigpos:] or ours == theirs  # the signing time may differ


def test_resigning_replaces_the_signature(dep: Deployment, tmp_path: Path) -> None:
    src = write_cab(tmp_path)
    first = _sign(dep, "sha2signcodestub", src, tmp_path)
    again = tmp_path / "again"
    again.mkdir()
    job = _sign(dep, "sha2signcode", first.output, again)
    _verify(dep, "sha2signcode", first.output, job.output)
    signed_once, signed_twice = first.output.read_bytes(), job.output.read_bytes()
    assert not any(s.startswith("sealbox stub dummy") for s in _subjects(signed_twice))  # the old one is gone
    # the header stays (the signature goes where the old one was), so the digest is the same
    sigpos, _ = _sig_area(signed_once)
    assert _sig_area(signed_twice)[0] == sigpos
    assert signed_twice[:48] == signed_once[:48] and signed_twice[52:sigpos] == signed_once[52:sigpos]
    assert _indirect_data(signed_twice) == _indirect_data(signed_once) == _extract_data(src, tmp_path)


def test_v2_timestamp(dep: Deployment, tsa: LocalTSA, tmp_path: Path) -> None:
    before = tsa.requests
    src = write_cab(tmp_path)
    job = _sign(dep, "sha2signcodestub-v2", src, tmp_path, timestamp_url=tsa.url)
    assert tsa.requests == before + 1
    pub = tmp_path / "public"
    shutil.copytree(dep.public_dir, pub)
    (pub / authenticode.TSA_CA_FILE).write_bytes(tsa.ca.cert_pem())
    AuthenticodeSigner.verify("sha2signcodestub-v2", job.output, src, pub)
    res = raw_verify(
        job.output, pub / authenticode.CA_FILE, "-TSA-CAfile", str(pub / authenticode.TSA_CA_FILE)
    )
    assert res.returncode == 0 and "Timestamp Server Signature verification: ok" in res.stdout, res.stdout


# -- refusals --------------------------------------------------------------------------------------
def _edit(fmt: str, at: int, *values: int, signed: bool = False) -> Callable[[Deployment, Path], Path]:
    """A maker: gcab's cabinet (``signed``: signed in-process first) with ``struct.pack(fmt,
    *values)`` written at ``at``."""

    def make(dep: Deployment, d: Path) -> Path:
        src = write_cab(d, "good.cab")
        if signed:
            src = _sign(dep, "sha2signcode", src, d).output
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
            src = _sign(dep, "sha2signcode", src, d).output
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


# -- through a real server -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def no_tool_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server whose osslsigncode for signing always fails: CABs must not need it."""
    root = tmp_path_factory.mktemp("cab-server")
    stub = root / "osslsigncode-fails"
    stub.write_text('#!/bin/sh\necho "osslsigncode must not run for a CAB" >&2\nexit 1\n')
    stub.chmod(0o755)
    d = ServerDeployment.create(root / "dep", "dep", ["sha2signcode"])
    cfg = tomllib.loads(d.config.read_text())
    cfg["formats"]["sha2signcode"]["osslsigncode"] = str(stub)
    d.config.write_text(tomli_w.dumps(cfg))
    sp = start_server(d)
    yield sp
    sp.stop()


@pytest.mark.parametrize("sample", ["several-files", "two-folders"])
def test_server_signs_cab_without_osslsigncode(
    no_tool_server: ServerProcess, tmp_path: Path, sample: str
) -> None:
    src = SAMPLES[sample](tmp_path)
    out = tmp_path / "out" / src.name
    with no_tool_server.client(timeout=CAP) as c:
        res = c.sign(src, ["sha2signcode"], out)
    assert res.ok, res.error
    AuthenticodeSigner.verify("sha2signcode", out, src, no_tool_server.deployment.public)


@pytest.mark.parametrize("case", ["next-cabinet", "signature-cut", "file-table-moved"])
def test_server_refuses_malformed_cab(
    dep: Deployment, no_tool_server: ServerProcess, tmp_path: Path, case: str
) -> None:
    make, reason = BAD[case]
    bad = make(dep, tmp_path)
    with no_tool_server.client(timeout=CAP) as c:
        res = c.sign(bad, ["sha2signcode"], tmp_path / "out" / bad.name)
    assert not res.ok and reason in (res.error or ""), res.error
    assert not (tmp_path / "out" / bad.name).exists()
    sha1 = hashlib.sha1(bad.read_bytes(), usedforsecurity=False).hexdigest()

    def outcomes(lines: list[dict[str, object]]) -> list[object]:
        return [e["outcome"] for e in lines if e.get("event") == "job" and e.get("sha1") == sha1]

    assert set(outcomes(no_tool_server.wait_log(outcomes))) == {"rejected"}  # permanent: a 4xx at once


def test_softhsm_key_signs_cab_in_process_through_the_server(tmp_path: Path) -> None:
    """The token key signs through the key interface: osslsigncode (a recording wrapper) runs
    once, at start-up, to prove the MSI hand-off, and never for a CAB; the -v2 name is stamped
    by a local TSA in-process too."""
    fmts = ["sha2signcode", "sha2signcodestub", "sha2signcode-v2"]
    d = ServerDeployment.create(tmp_path / "dep", "dep", fmts, hsm=True)
    tsa = LocalTSA(tmp_path / "tsa")
    runs = tmp_path / "runs"
    runs.mkdir()
    wrapper = tmp_path / "osslsigncode"
    wrapper.write_text(f'#!/bin/sh\necho "$@" > {runs}/$$\nexec {OSSL} "$@"\n')
    wrapper.chmod(0o755)
    cfg = tomllib.loads(d.config.read_text())
    for fmt in fmts:
        cfg["formats"][fmt]["osslsigncode"] = str(wrapper)
    cfg["formats"]["sha2signcode-v2"]["timestamp_url"] = tsa.url
    d.config.write_text(tomli_w.dumps(cfg))
    (d.public / authenticode.TSA_CA_FILE).write_bytes(tsa.ca.cert_pem())
    try:
        sp = start_server(d)
        try:
            at_start = sorted(runs.iterdir())
            assert at_start, "start-up proves the token hand-off with one osslsigncode run"
            with sp.client(timeout=CAP) as c:
                for fmt in fmts:
                    (tmp_path / fmt).mkdir()
                    src = write_cab(tmp_path / fmt)
                    out = tmp_path / fmt / "out" / src.name
                    res = c.sign(src, [fmt], out)
                    assert res.ok, res.error
                    AuthenticodeSigner.verify(fmt, out, src, d.public)
                    stub = any(s.startswith("sealbox stub dummy") for s in _subjects(out.read_bytes()))
                    assert stub == (fmt == "sha2signcodestub")
            assert sorted(runs.iterdir()) == at_start  # no tool ran for a CAB
            assert tsa.requests == 1
        finally:
            sp.stop()
    finally:
        tsa.close()
