"""PE images signed in-process (:mod:`sealbox.formats._pe`): no tool runs, and the outputs pass
``osslsigncode verify`` with the digest osslsigncode computes itself; malformed headers are
refused naming what is wrong. A SoftHSM key and a server: tests/formats/test_inprocess_kinds.py."""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from asn1crypto import cms  # type: ignore[import-untyped]

from sealbox.errors import FormatRejected
from sealbox.formats import authenticode
from sealbox.formats.authenticode import AuthenticodeSigner
from sealbox.samples.pe import launcher_path, write_dll, write_pe
from tests.formats._authenticode_util import OSSL, extract_data, indirect_data, no_process, verify_signed
from tests.formats.test_authenticode import STUB, Deployment, Job, make_job

pytestmark = pytest.mark.skipif(OSSL is None, reason="osslsigncode is not installed")

OPT_MAGIC_PE32 = 0x10B
OPT_MAGIC_PE32_PLUS = 0x20B


@pytest.fixture
def dep(authenticode_dep: Deployment) -> Deployment:
    """A dev deployment's Authenticode signers, file keys (one for the run: see conftest.py)."""
    return authenticode_dep


def sign(signer: AuthenticodeSigner, job: Job) -> None:
    with no_process():
        signer.sign(job.request)


# -- samples -------------------------------------------------------------------------------------
def _launcher(name: str) -> bytes:
    path = launcher_path().parent / name  # pip's distlib ships t32.exe next to t64.exe
    if not path.is_file():
        pytest.skip(f"no {name} next to {launcher_path()}")
    return path.read_bytes()


def _pe32(d: Path) -> Path:
    p = d / "t32.exe"
    p.write_bytes(_launcher("t32.exe"))
    return p


def _pe32_unaligned_tail(d: Path) -> Path:
    p = d / "tail.exe"
    p.write_bytes(_launcher("t32.exe") + b"abc")  # the image does not end on 8 bytes: padded
    return p


def _pe32plus_overlay(d: Path) -> Path:
    p = write_pe(d, "overlay.exe")
    with p.open("ab") as f:
        f.write(bytes(range(256)) * 4096 + b"12345")  # an installer's payload, 1 MiB + 5
    return p


SAMPLES: dict[str, Callable[[Path], Path]] = {
    "pe32plus": lambda d: write_pe(d, "setup.exe"),
    "pe32plus-dll": lambda d: write_dll(d, "xul.dll"),
    "pe32": _pe32,
    "pe32-unaligned-tail": _pe32_unaligned_tail,
    "pe32plus-overlay": _pe32plus_overlay,
}


def _magic(path: Path) -> int:
    data = path.read_bytes()[:4096]
    (lfanew,) = struct.unpack_from("<I", data, 0x3C)
    return int(struct.unpack_from("<H", data, lfanew + 24)[0])


def _verify_output(dep: Deployment, fmt: str, src: Path, out: Path) -> str:
    text = verify_signed(dep.public_dir, out, fmt, src)
    # the checksum written is the one osslsigncode computes (else: Current/Calculated + a warning)
    assert "PE checksum   :" in text and "invalid PE checksum" not in text, text
    return text


# -- signing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["sha2signcode", "sha2signcodestub"])
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_in_process_signature_verifies(dep: Deployment, tmp_path: Path, sample: str, fmt: str) -> None:
    src = SAMPLES[sample](tmp_path)
    assert _magic(src) == (OPT_MAGIC_PE32_PLUS if sample.startswith("pe32plus") else OPT_MAGIC_PE32)
    job = make_job(tmp_path, src)
    sign(dep.signer(fmt), job)
    assert list(job.work_dir.iterdir()) == []
    text = _verify_output(dep, fmt, src, job.output)
    assert (
        "Text description: sealbox dep" in text and "URL description: https://example.invalid/sealbox" in text
    )
    # the image digest is osslsigncode's own, and the SpcIndirectDataContent is the same bytes
    signature = authenticode.signature_pkcs7(job.output)
    assert indirect_data(signature) == extract_data(src, tmp_path)
    info = cms.ContentInfo.load(signature)["content"]
    subjects = {c.chosen.subject.native["common_name"] for c in info["certificates"]}
    assert any(s.startswith("sealbox stub dummy") for s in subjects) == (fmt in STUB)
    # the image itself is untouched but for CheckSum and the certificate table entry
    data, signed = src.read_bytes(), job.output.read_bytes()
    (lfanew,) = struct.unpack_from("<I", data, 0x3C)
    changed = [i for i in range(len(data)) if data[i] != signed[i]]
    dirs = lfanew + 24 + (96 if _magic(src) == OPT_MAGIC_PE32 else 112)
    allowed = {*range(lfanew + 88, lfanew + 92), *range(dirs + 32, dirs + 40)}
    assert set(changed) <= allowed
    assert len(signed) % 8 == 0


def test_resigning_replaces_the_certificate_table(dep: Deployment, tmp_path: Path) -> None:
    first = make_job(tmp_path, _pe32(tmp_path))
    sign(dep.signer("sha2signcodestub"), first)
    again = tmp_path / "again"
    again.mkdir()
    job = make_job(again, first.output)
    sign(dep.signer("sha2signcode"), job)
    text = _verify_output(dep, "sha2signcode", first.output, job.output)
    assert "Number of verified signatures: 1" in text
    signature = authenticode.signature_pkcs7(job.output)
    subjects = {
        c.chosen.subject.native["common_name"]
        for c in cms.ContentInfo.load(signature)["content"]["certificates"]
    }
    assert not any(s.startswith("sealbox stub dummy") for s in subjects)  # the old signature is gone
    # the same image as before (the old table dropped), so the same digest
    assert indirect_data(signature) == indirect_data(authenticode.signature_pkcs7(first.output))
    assert indirect_data(signature) == extract_data(first.output, again)


# -- refusals --------------------------------------------------------------------------------------
def _edit(at: int, fmt: str, *values: Callable[[int], int]) -> Callable[[Path], Path]:
    """A maker: pip's t64.exe (PE32+) with ``struct.pack(fmt, *(v(size) ...))`` written at
    e_lfanew + ``at``."""

    def make(d: Path) -> Path:
        data = bytearray(launcher_path().read_bytes())
        (lfanew,) = struct.unpack_from("<I", data, 0x3C)
        struct.pack_into(fmt, data, lfanew + at, *(v(len(data)) for v in values))
        p = d / "bad.exe"
        p.write_bytes(bytes(data))
        return p

    return make


_CERT_DIR = 24 + 112 + 32  # from e_lfanew to the PE32+ certificate table entry


def _truncated_headers(d: Path) -> Path:
    data = launcher_path().read_bytes()
    (lfanew,) = struct.unpack_from("<I", data, 0x3C)
    p = d / "cut.exe"
    p.write_bytes(data[: lfanew + 24 + 40])  # cut inside the optional header
    return p


def _trailing_after_signature(dep: Deployment) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        job = make_job(d, write_pe(d, "signed.exe"))
        dep.signer("sha2signcode").sign(job.request)
        p = d / "trailing.exe"
        p.write_bytes(job.output.read_bytes() + b"appended after the signature")
        return p

    return make


BAD: dict[str, tuple[Callable[[Path], Path], str]] = {
    "truncated-headers": (_truncated_headers, "truncated PE"),
    "huge-number-of-sections": (_edit(6, "<H", lambda _: 0xFFFF), "malformed PE: 65535 sections"),
    "cert-table-past-the-end": (
        _edit(_CERT_DIR, "<II", lambda size: size - 8, lambda _: 0x10000),
        "certificate table lies outside the file",
    ),
    "no-cert-table-entry": (
        _edit(24 + 108, "<I", lambda _: 4),  # NumberOfRvaAndSizes
        "the data directory has no certificate table entry",
    ),
    "cert-entry-without-size": (
        _edit(_CERT_DIR, "<II", lambda size: size - 8, lambda _: 0),
        "the certificate table entry has offset",
    ),
}


@pytest.mark.parametrize("case", [*BAD, "data-after-signature"])
def test_malformed_pe_is_refused_with_a_reason(dep: Deployment, tmp_path: Path, case: str) -> None:
    if case == "data-after-signature":
        make, reason = _trailing_after_signature(dep), "the certificate table is not at the end of the file"
    else:
        make, reason = BAD[case]
    src = make(tmp_path)
    job = make_job(tmp_path, src)
    signer = dep.signer("sha2signcode-v2")
    with pytest.raises(FormatRejected, match=reason) as e:
        sign(signer, job)
    assert str(e.value).startswith("sha2signcode-v2: ")
    assert not job.output.exists() and list(job.work_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("description", "url"), [(None, None), ("sealbox", None), (None, "https://x.invalid")]
)
def test_opus_info_only_when_there_is_something_to_say(description: str | None, url: str | None) -> None:
    """As osslsigncode: SpcSpOpusInfo (program name, URL) is an attribute only when one is given."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from sealbox.formats._pe import SPC_INDIRECT_DATA, indirect_data, signed_data

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "opus test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    der = signed_data(
        indirect_data(bytes(32)), SPC_INDIRECT_DATA, [cert],
        lambda data: key.sign(data, ec.ECDSA(hashes.SHA256())), ecdsa=True, description=description, url=url,
    )  # fmt: skip
    signer = cms.ContentInfo.load(der)["content"]["signer_infos"][0]
    kinds = [a["type"].dotted for a in signer["signed_attrs"]]
    assert ("1.3.6.1.4.1.311.2.1.12" in kinds) == bool(description or url)
