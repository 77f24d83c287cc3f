"""APPX/MSIX packages signed in-process (:mod:`sealbox.formats._appx`): no tool runs; the output
is osslsigncode's own, byte for byte outside the signature member, with the same digest, and
passes ``osslsigncode verify``; an old signature is replaced; malformed packages are refused
naming the fault; an ECDSA key, a SoftHSM key and a local TSA sign the same way."""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
import subprocess
import tomllib
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomli_w
from asn1crypto import cms  # type: ignore[import-untyped]
from cryptography.hazmat.primitives.asymmetric import ec

from sealbox.deploy import pki
from sealbox.errors import FormatRejected
from sealbox.formats import FormatSettings, SignRequest, authenticode
from sealbox.formats._appx import SPC_SIPINFO
from sealbox.formats.authenticode import AuthenticodeSigner
from sealbox.keys import FileKey
from sealbox.samples.windows import write_appx
from tests.formats import test_authenticode, test_pe_inprocess
from tests.formats.test_authenticode import STUB, Deployment, Job, LocalTSA, make_job, raw_verify
from tests.formats.test_cab_inprocess import _signed_by_osslsigncode
from tests.formats.test_pe_inprocess import no_process
from tests.servers import Deployment as ServerDeployment
from tests.servers import ServerProcess, start_server

OSSL = shutil.which("osslsigncode")
pytestmark = pytest.mark.skipif(OSSL is None, reason="needs osslsigncode")
CAP = 120.0
SIG = "AppxSignature.p7x"
CT = "[Content_Types].xml"

dep = test_pe_inprocess.dep  # module-scoped: a dev deployment's Authenticode signers, file keys
tsa = test_authenticode.tsa  # module-scoped local RFC 3161 TSA


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


def _indirect_data(der: bytes) -> bytes:
    return bytes(cms.ContentInfo.load(der)["content"]["encap_content_info"]["content"].dump())


def _extract_data(src: Path, tmp_path: Path) -> bytes:
    """What ``osslsigncode extract-data`` makes of ``src``: its own digest of the package."""
    assert OSSL is not None
    out = tmp_path / "data.p7"
    out.unlink(missing_ok=True)
    subprocess.run(
        [OSSL, "extract-data", "-h", "sha256", "-in", str(src), "-out", str(out)],
        capture_output=True,
        check=True,
    )
    return _indirect_data(out.read_bytes())


def _subjects(der: bytes) -> set[str]:
    return {
        c.chosen.subject.native["common_name"] for c in cms.ContentInfo.load(der)["content"]["certificates"]
    }


def _verify(dep: Deployment, fmt: str, src: Path, out: Path) -> str:
    AuthenticodeSigner.verify(fmt, out, src, dep.public_dir)
    res = raw_verify(out, dep.public_dir / authenticode.CA_FILE)
    assert res.returncode == 0 and "Signature verification: ok" in res.stdout, res.stdout + res.stderr
    assert "Number of verified signatures: 1" in res.stdout, res.stdout
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None  # every member reads back with its CRC
        assert b'<Override PartName="/AppxSignature.p7x"' in z.read(CT)
    return res.stdout


def _sign(dep: Deployment, fmt: str, src: Path, tmp_path: Path, **options: str) -> Job:
    """Sign with ``fmt``'s signer; no process may start (with a timestamp the local TSA runs
    ``openssl ts``: there the signer's osslsigncode is ``false`` instead)."""
    job = make_job(tmp_path, src)
    if "timestamp_url" in options:
        dep.signer(fmt, osslsigncode=shutil.which("false"), **options).sign(job.request)
    else:
        signer = dep.signer(fmt, **options)  # reads osslsigncode's version: before no_process
        with no_process():
            signer.sign(job.request)
    assert list(job.work_dir.iterdir()) == []
    return job


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
    job = _sign(dep, fmt, src, tmp_path)
    text = _verify(dep, fmt, src, job.output)
    assert (
        "Text description: sealbox dep" in text and "URL description: https://example.invalid/sealbox" in text
    )
    der = _signature(job.output.read_bytes(), tmp_path)
    # osslsigncode's own digest of the input, in the same SpcIndirectDataContent bytes
    assert _indirect_data(der) == _extract_data(src, tmp_path)
    assert SPC_SIPINFO in _indirect_data(der)
    assert any(s.startswith("sealbox stub dummy") for s in _subjects(der)) == (fmt in STUB)


@pytest.mark.parametrize("sample", [*SAMPLES, "signed-by-osslsigncode"])
def test_same_bytes_as_osslsigncode_outside_the_signature(
    dep: Deployment, tmp_path: Path, sample: str
) -> None:
    """osslsigncode signs the same input with the same key and options: every byte up to the
    signature member, and the central directory but for that member's entry, are the same; so
    is the digest (the SpcIndirectDataContent)."""
    if sample == "signed-by-osslsigncode":  # an old signature (with the stub's certificate) replaced
        first = tmp_path / "first"
        first.mkdir()
        src = _signed_by_osslsigncode(dep, write_appx(first), first / "signed.msix", "-ac",
                                      str(dep.sections["sha2signcodestub"].path("extra_cert")))  # fmt: skip
    else:
        src = SAMPLES[sample](tmp_path)
    ours = _sign(dep, "sha2signcode", src, tmp_path).output.read_bytes()
    (tmp_path / "ref").mkdir()
    theirs = _signed_by_osslsigncode(dep, src, tmp_path / "ref" / "signed.msix").read_bytes()
    sig_at, cd_at, cd_size = _layout(ours)
    assert _layout(theirs)[0] == sig_at
    assert ours[:sig_at] == theirs[:sig_at]
    assert ours[sig_at : sig_at + 10] == theirs[sig_at : sig_at + 10]  # version, flags, deflated
    their_cd_at, their_cd_size = _layout(theirs)[1:]
    assert ours[cd_at : cd_at + cd_size - 63] == theirs[their_cd_at : their_cd_at + their_cd_size - 63]
    assert _indirect_data(_signature(ours, tmp_path)) == _indirect_data(_signature(theirs, tmp_path))
    assert ours[sig_at:] != theirs[sig_at:] or ours == theirs  # the times may differ


def test_resigning_replaces_the_signature(dep: Deployment, tmp_path: Path) -> None:
    src = write_appx(tmp_path)
    first = _sign(dep, "sha2signcodestub", src, tmp_path)
    again = tmp_path / "again"
    again.mkdir()
    job = _sign(dep, "sha2signcode", first.output, again)
    _verify(dep, "sha2signcode", first.output, job.output)
    once, twice = first.output.read_bytes(), job.output.read_bytes()
    der = _signature(twice, tmp_path)
    assert not any(s.startswith("sealbox stub dummy") for s in _subjects(der))  # the old one is gone
    # the members stay (the content type is there already), so the digest is the same
    sig_at = _layout(once)[0]
    assert _layout(twice)[0] == sig_at and twice[:sig_at] == once[:sig_at]
    assert _indirect_data(der) == _indirect_data(_signature(once, tmp_path)) == _extract_data(src, tmp_path)


def test_stored_content_types_stays_readable(dep: Deployment, tmp_path: Path) -> None:
    """A stored [Content_Types].xml: osslsigncode writes it back deflated under the "stored"
    method (no unzip reads it); in-process it stays stored, and verifies."""
    src = _python_zip(tmp_path, "stored.msix", _members(tmp_path), set())
    job = _sign(dep, "sha2signcode", src, tmp_path)
    _verify(dep, "sha2signcode", src, job.output)
    (tmp_path / "ref").mkdir()
    theirs = _signed_by_osslsigncode(dep, src, tmp_path / "ref" / "signed.msix")
    with zipfile.ZipFile(theirs) as z:
        assert z.testzip() == CT


def test_v2_timestamp(dep: Deployment, tsa: LocalTSA, tmp_path: Path) -> None:
    before = tsa.requests
    src = write_appx(tmp_path)
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


def test_ecdsa_key_signs_a_package(tmp_path: Path) -> None:
    ca = pki.make_ca("sealbox test EC code-signing root")
    private = ec.generate_private_key(ec.SECP256R1())
    chain = [pki.certify(ca, "sealbox EC signer", private.public_key()), ca.cert]
    key = FileKey("ec", private).with_chain(chain)
    signer = AuthenticodeSigner(FormatSettings("sha2signcode", "ec", {}, tmp_path), lambda name: key)
    src = write_appx(tmp_path)
    (tmp_path / "work").mkdir()
    out = tmp_path / "signed.msix"
    with no_process():
        signer.sign(SignRequest(input=src, output=out, filename=src.name, work_dir=tmp_path / "work"))
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem())
    res = raw_verify(out, tmp_path / "ca.pem")
    assert res.returncode == 0 and "Signature verification: ok" in res.stdout, res.stdout + res.stderr
    (si,) = cms.ContentInfo.load(_signature(out.read_bytes(), tmp_path))["content"]["signer_infos"]
    assert si["signature_algorithm"]["algorithm"].dotted == "1.2.840.10045.4.3.2"  # ecdsa-with-SHA256


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


# -- through a real server -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def no_tool_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server whose osslsigncode for signing always fails: packages must not need it."""
    root = tmp_path_factory.mktemp("appx-server")
    stub = root / "osslsigncode-fails"
    stub.write_text('#!/bin/sh\necho "osslsigncode must not run for an MSIX" >&2\nexit 1\n')
    stub.chmod(0o755)
    d = ServerDeployment.create(root / "dep", "dep", ["sha2signcode"])
    cfg = tomllib.loads(d.config.read_text())
    cfg["formats"]["sha2signcode"]["osslsigncode"] = str(stub)
    d.config.write_text(tomli_w.dumps(cfg))
    sp = start_server(d)
    yield sp
    sp.stop()


@pytest.mark.parametrize("sample", ["sample", "makeappx-layout"])
def test_server_signs_msix_without_osslsigncode(
    no_tool_server: ServerProcess, tmp_path: Path, sample: str
) -> None:
    src = SAMPLES[sample](tmp_path)
    out = tmp_path / "out" / "app.msix"
    with no_tool_server.client(timeout=CAP) as c:
        res = c.sign(src, ["sha2signcode"], out)
    assert res.ok, res.error
    AuthenticodeSigner.verify("sha2signcode", out, src, no_tool_server.deployment.public)


@pytest.mark.parametrize("case", ["no-closing-types", "extra-fields"])
def test_server_refuses_malformed_package(no_tool_server: ServerProcess, tmp_path: Path, case: str) -> None:
    make, reason = BAD[case]
    bad = make(tmp_path)
    with no_tool_server.client(timeout=CAP) as c:
        res = c.sign(bad, ["sha2signcode"], tmp_path / "out" / bad.name)
    assert not res.ok and reason in (res.error or ""), res.error
    assert not (tmp_path / "out" / bad.name).exists()
    sha1 = hashlib.sha1(bad.read_bytes(), usedforsecurity=False).hexdigest()

    def outcomes(lines: list[dict[str, object]]) -> list[object]:
        return [e["outcome"] for e in lines if e.get("event") == "job" and e.get("sha1") == sha1]

    assert set(outcomes(no_tool_server.wait_log(outcomes))) == {"rejected"}  # permanent: a 4xx at once


def test_softhsm_key_signs_msix_in_process_through_the_server(tmp_path: Path) -> None:
    """The token key signs through the key interface: osslsigncode (a recording wrapper) runs
    once, at start-up, to prove the MSI hand-off, and never for a package; the -v2 name is
    stamped by a local TSA in-process too."""
    fmts = ["sha2signcode", "sha2signcodestub", "sha2signcode-v2"]
    d = ServerDeployment.create(tmp_path / "dep", "dep", fmts, hsm=True)
    local_tsa = LocalTSA(tmp_path / "tsa")
    runs = tmp_path / "runs"
    runs.mkdir()
    wrapper = tmp_path / "osslsigncode"
    wrapper.write_text(f'#!/bin/sh\necho "$@" > {runs}/$$\nexec {OSSL} "$@"\n')
    wrapper.chmod(0o755)
    cfg = tomllib.loads(d.config.read_text())
    for fmt in fmts:
        cfg["formats"][fmt]["osslsigncode"] = str(wrapper)
    cfg["formats"]["sha2signcode-v2"]["timestamp_url"] = local_tsa.url
    d.config.write_text(tomli_w.dumps(cfg))
    (d.public / authenticode.TSA_CA_FILE).write_bytes(local_tsa.ca.cert_pem())
    try:
        sp = start_server(d)
        try:
            at_start = sorted(runs.iterdir())
            assert at_start, "start-up proves the token hand-off with one osslsigncode run"
            with sp.client(timeout=CAP) as c:
                for fmt in fmts:
                    (tmp_path / fmt).mkdir()
                    src = write_appx(tmp_path / fmt)
                    out = tmp_path / fmt / "out" / src.name
                    res = c.sign(src, [fmt], out)
                    assert res.ok, res.error
                    AuthenticodeSigner.verify(fmt, out, src, d.public)
                    der = _signature(out.read_bytes(), tmp_path)
                    assert any(s.startswith("sealbox stub dummy") for s in _subjects(der)) == (fmt in STUB)
            assert sorted(runs.iterdir()) == at_start  # no tool ran for a package
            assert local_tsa.requests == 1
        finally:
            sp.stop()
    finally:
        local_tsa.close()
