"""EME voucher signing: attached CMS SignedData checked with `openssl cms -verify`."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from sealbox.deploy import pki
from sealbox.deploy.dev import init_dev
from sealbox.errors import ConfigError, FormatRejected, VerificationFailed
from sealbox.formats import FormatSettings, Signer, SignRequest, signer_class
from sealbox.formats.emevoucher import EmeVoucherSigner
from sealbox.keys import PassphraseSource, SigningKey, load_key
from sealbox.keys._store import UnlockedKey
from sealbox.server.config import load_config


@dataclass
class Deployment:
    root: Path
    public: Path
    signer: Signer


def make_deployment(root: Path, level: str) -> Deployment:
    config_path = init_dev(root, level, formats=["emevoucher"])
    cfg = load_config(config_path)
    passphrases = PassphraseSource.from_file(root / "passphrases")

    def resolve(name: str) -> SigningKey:
        return load_key(cfg.key_spec(name), passphrases.get(name))

    return Deployment(
        root, root / "public", signer_class("emevoucher")(cfg.format_settings("emevoucher"), resolve)
    )


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return make_deployment(tmp_path_factory.mktemp("dep") / "d", "dep")


@pytest.fixture(scope="module")
def nightly(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return make_deployment(tmp_path_factory.mktemp("nightly") / "d", "nightly")


def sign(signer: Signer, src: Path, work: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    signer.sign(SignRequest(input=src, output=out, filename=src.name, work_dir=work))
    return out


def openssl_cms_verify(signed: Path, ca: Path, extracted: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "openssl",
            "cms",
            "-verify",
            "-binary",
            "-inform",
            "DER",
            "-in",
            str(signed),
            "-CAfile",
            str(ca),
            "-out",
            str(extracted),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def voucher(tmp_path: Path, size: int = 4096) -> Path:
    src = tmp_path / "voucher.bin"
    src.write_bytes(os.urandom(size))
    return src


def test_sign_verifies_with_openssl(dep: Deployment, tmp_path: Path) -> None:
    src = voucher(tmp_path)
    out = sign(dep.signer, src, tmp_path / "work")
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["out"]
    assert EmeVoucherSigner.verify("emevoucher", out, src, dep.public).startswith("openssl cms -verify")

    res = openssl_cms_verify(out, dep.public / "emevoucher-ca.pem", tmp_path / "extracted")
    assert res.returncode == 0 and "Verification successful" in res.stderr, res
    assert (tmp_path / "extracted").read_bytes() == src.read_bytes()  # content attached
    # also the legacy smime verifier, as used by the classic server
    res = subprocess.run(
        [
            "openssl",
            "smime",
            "-verify",
            "-binary",
            "-inform",
            "DER",
            "-in",
            str(out),
            "-CAfile",
            str(dep.public / "emevoucher-ca.pem"),
            "-out",
            str(tmp_path / "x2"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res

    printed = subprocess.run(
        ["openssl", "cms", "-cmsout", "-print", "-inform", "DER", "-in", str(out)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "sha256" in printed and "eContent: <ABSENT>" not in printed
    certs = subprocess.run(
        ["openssl", "pkcs7", "-inform", "DER", "-in", str(out), "-print_certs", "-noout"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "EME voucher signer (dep)" in certs and "code-signing root" in certs  # chain included


def test_tampered_content_fails(dep: Deployment, tmp_path: Path) -> None:
    src = voucher(tmp_path)
    out = sign(dep.signer, src, tmp_path / "work")
    data = bytearray(out.read_bytes())
    at = bytes(data).index(src.read_bytes()[:64])  # the voucher bytes inside the DER
    data[at + 100] ^= 0x01
    bad = tmp_path / "bad.p7m"
    bad.write_bytes(bytes(data))
    with pytest.raises(VerificationFailed, match=r"rc 4.*content verify error"):
        EmeVoucherSigner.verify("emevoucher", bad, None, dep.public)
    res = openssl_cms_verify(bad, dep.public / "emevoucher-ca.pem", tmp_path / "x")
    assert res.returncode == 4 and "content verify error" in res.stderr


def test_original_mismatch_fails(dep: Deployment, tmp_path: Path) -> None:
    src = voucher(tmp_path)
    out = sign(dep.signer, src, tmp_path / "work")
    other = tmp_path / "other.bin"
    other.write_bytes(b"another voucher")
    with pytest.raises(VerificationFailed, match="differs from the original"):
        EmeVoucherSigner.verify("emevoucher", out, other, dep.public)


def test_other_level_ca_fails(dep: Deployment, nightly: Deployment, tmp_path: Path) -> None:
    src = voucher(tmp_path)
    out = sign(dep.signer, src, tmp_path / "work")
    with pytest.raises(VerificationFailed, match=r"certificate verify error|unable to get"):
        EmeVoucherSigner.verify("emevoucher", out, src, nightly.public)
    assert openssl_cms_verify(out, nightly.public / "emevoucher-ca.pem", tmp_path / "x").returncode != 0


def test_bad_inputs_are_rejected(dep: Deployment, tmp_path: Path) -> None:
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    work = tmp_path / "w1"
    work.mkdir()
    with pytest.raises(FormatRejected, match="empty"):
        dep.signer.sign(SignRequest(input=empty, output=work / "out", filename="v", work_dir=work))
    assert list(work.iterdir()) == []

    leaf = pki.issue(
        pki.make_ca("t root"),
        "t leaf",
        ekus=(ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.CODE_SIGNING),
    )
    small = EmeVoucherSigner(
        FormatSettings("emevoucher", "k", {"max_size": 1000}, tmp_path),
        lambda n: UnlockedKey(n, leaf.key, (leaf.cert,)),
    )
    work = tmp_path / "w2"
    work.mkdir()
    with pytest.raises(FormatRejected, match="at most 1000 bytes"):
        small.sign(
            SignRequest(input=voucher(tmp_path, 1001), output=work / "out", filename="v", work_dir=work)
        )
    assert list(work.iterdir()) == []
    assert sign(small, voucher(tmp_path, 1000), tmp_path / "w3").is_file()


def test_config_errors(tmp_path: Path) -> None:
    ca = pki.make_ca("t root")
    code_only = pki.issue(ca, "code only")  # EKU codeSigning only: openssl would refuse its signatures
    settings = FormatSettings("emevoucher", "k", {}, tmp_path)
    with pytest.raises(ConfigError, match="emailProtection"):
        EmeVoucherSigner(settings, lambda n: UnlockedKey(n, code_only.key, (code_only.cert, ca.cert)))
    with pytest.raises(ConfigError, match="no certificate"):
        EmeVoucherSigner(settings, lambda n: UnlockedKey(n, code_only.key))
    other = pki.issue(ca, "other", ekus=(ExtendedKeyUsageOID.EMAIL_PROTECTION,))
    with pytest.raises(ConfigError, match="does not match"):
        EmeVoucherSigner(settings, lambda n: UnlockedKey(n, code_only.key, (other.cert,)))
    with pytest.raises(ConfigError, match="max_size"):
        EmeVoucherSigner(
            FormatSettings("emevoucher", "k", {"max_size": "big"}, tmp_path),
            lambda n: UnlockedKey(n, other.key, (other.cert,)),
        )


def test_dev_setup_public_files(dep: Deployment) -> None:
    assert "public/emevoucher-ca.pem" in (dep.public / "README").read_text()
    pem = (dep.public / "emevoucher-ca.pem").read_bytes()
    assert pem.startswith(b"-----BEGIN CERTIFICATE-----")
    from cryptography import x509

    ca = x509.load_pem_x509_certificate(pem)
    assert ca.subject == ca.issuer
    assert ca.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
