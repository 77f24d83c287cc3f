"""Widevine-style detached RSA-PSS `.sig` files: in-process verify, and `openssl pkeyutl` with a digest
rebuilt by the shell commands documented in docs/formats/widevine.md."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from sealbox.deploy import pki
from sealbox.deploy.dev import init_dev
from sealbox.errors import ConfigError, FormatRejected, VerificationFailed
from sealbox.formats import FormatSettings, Signer, SignRequest, signer_class
from sealbox.formats.widevine import WidevineSigner, verify_sig
from sealbox.keys import PassphraseSource, SigningKey, load_key
from sealbox.keys._store import UnlockedKey
from sealbox.server.config import load_config

FORMATS = ("widevine", "widevine_blessed")

# The documented shell recipe (docs/formats/widevine.md), run verbatim with FILE, SIG and PUB set.
SHELL_VERIFY = r"""
set -eu
tail -c +43 "$SIG" > "$TMP/RAWSIG"
{ printf 'sealbox widevine signature v1\n'; head -c 7 "$SIG" | tail -c 3;
  openssl dgst -sha256 -binary "$FILE"; } | openssl dgst -sha256 -binary > "$TMP/DIGEST"
openssl pkeyutl -verify -pubin -inkey "$PUB" -in "$TMP/DIGEST" -sigfile "$TMP/RAWSIG" \
    -pkeyopt rsa_padding_mode:pss -pkeyopt rsa_pss_saltlen:32 \
    -pkeyopt digest:sha256 -pkeyopt rsa_mgf1_md:sha256
"""


@dataclass
class Deployment:
    root: Path
    public: Path
    signers: dict[str, Signer]


def make_deployment(root: Path, level: str) -> Deployment:
    config_path = init_dev(root, level, formats=list(FORMATS))
    cfg = load_config(config_path)
    passphrases = PassphraseSource.from_file(root / "passphrases")

    def resolve(name: str) -> SigningKey:
        return load_key(cfg.key_spec(name), passphrases.get(name))

    signers = {fmt: signer_class(fmt)(cfg.format_settings(fmt), resolve) for fmt in FORMATS}
    return Deployment(root, root / "public", signers)


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return make_deployment(tmp_path_factory.mktemp("dep") / "d", "dep")


@pytest.fixture(scope="module")
def nightly(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return make_deployment(tmp_path_factory.mktemp("nightly") / "d", "nightly")


def sign(signer: Signer, src: Path, work: Path, precompute: bool = True) -> Path:
    """Sign like the server: with a SHA-256 state precomputed during the upload."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    digests = {"sha256": hashlib.sha256(src.read_bytes())} if precompute else {}
    signer.sign(SignRequest(input=src, output=out, filename=src.name, work_dir=work, digests=digests))
    return out


def elf(tmp_path: Path, size: int = 200_000, name: str = "libwidevinecdm.so") -> Path:
    """A real ELF binary followed by random bytes (unique content, still well-formed)."""
    path = tmp_path / name
    real = Path("/bin/true").read_bytes()
    path.write_bytes(real + os.urandom(max(0, size - len(real))))
    return path


def shell_verify(sig: Path, data: Path, pub: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "SIG": str(sig), "FILE": str(data), "PUB": str(pub), "TMP": str(tmp)}
    return subprocess.run(["bash", "-c", SHELL_VERIFY], capture_output=True, text=True, env=env, check=False)


def flags_byte(sig: Path) -> str:
    return subprocess.run(
        ["od", "-An", "-tx1", "-j5", "-N1", str(sig)], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.parametrize("fmt", FORMATS)
def test_sign_verifies_in_process_and_with_openssl(dep: Deployment, tmp_path: Path, fmt: str) -> None:
    src = Path(sys.executable).resolve()  # a real ELF executable
    out = sign(dep.signers[fmt], src, tmp_path / "work")
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["out"]
    assert WidevineSigner.verify(fmt, out, src, dep.public).startswith("openssl pkeyutl -verify")

    res = shell_verify(out, src, dep.public / "widevine.pem", tmp_path)
    assert res.returncode == 0 and "Signature Verified Successfully" in res.stdout, res
    assert flags_byte(out) == ("01" if fmt == "widevine_blessed" else "00")

    data = out.read_bytes()
    assert data[:4] == b"SBWV" and len(data) == 42 + 384  # RSA-3072
    key_id = subprocess.run(
        [
            "bash",
            "-c",
            'openssl pkey -pubin -in "$1" -outform DER | openssl dgst -sha256 -binary',
            "-",
            str(dep.public / "widevine.pem"),
        ],
        capture_output=True,
        check=True,
    ).stdout
    assert data[8:40] == key_id
    verify_sig(data, src, (dep.public / "widevine.pem").read_bytes(), fmt == "widevine_blessed")


def test_blessed_flag_is_bound(dep: Deployment, tmp_path: Path) -> None:
    src = elf(tmp_path)
    blessed = sign(dep.signers["widevine_blessed"], src, tmp_path / "w1")
    plain = sign(dep.signers["widevine"], src, tmp_path / "w2")
    with pytest.raises(VerificationFailed, match="expected a non-blessed signature"):
        WidevineSigner.verify("widevine", blessed, src, dep.public)
    with pytest.raises(VerificationFailed, match="expected a blessed signature"):
        WidevineSigner.verify("widevine_blessed", plain, src, dep.public)
    # flipping the blessed bit in the header breaks the signature, in-process and for openssl
    forged = tmp_path / "forged.sig"
    data = bytearray(plain.read_bytes())
    data[5] |= 0x01
    forged.write_bytes(bytes(data))
    with pytest.raises(VerificationFailed, match="does not match"):
        WidevineSigner.verify("widevine_blessed", forged, src, dep.public)
    res = shell_verify(forged, src, dep.public / "widevine.pem", tmp_path)
    assert res.returncode != 0 and "Signature Verification Failure" in res.stdout + res.stderr


@pytest.mark.parametrize("fmt", FORMATS)
def test_tampered_data_or_signature_fails(dep: Deployment, tmp_path: Path, fmt: str) -> None:
    src = elf(tmp_path)
    out = sign(dep.signers[fmt], src, tmp_path / "work")
    original = src.read_bytes()
    changed = tmp_path / "changed.so"
    changed.write_bytes(original[:1000] + bytes([original[1000] ^ 1]) + original[1001:])
    with pytest.raises(VerificationFailed, match="does not match"):
        WidevineSigner.verify(fmt, out, changed, dep.public)
    assert shell_verify(out, changed, dep.public / "widevine.pem", tmp_path).returncode != 0

    bad_sig = tmp_path / "bad.sig"
    data = bytearray(out.read_bytes())
    data[-1] ^= 0x01
    bad_sig.write_bytes(bytes(data))
    with pytest.raises(VerificationFailed, match="does not match"):
        WidevineSigner.verify(fmt, bad_sig, src, dep.public)
    assert shell_verify(bad_sig, src, dep.public / "widevine.pem", tmp_path).returncode != 0

    for broken, match in (
        (data[:41], "too short"),
        (b"XXXX" + bytes(data[4:]), "magic"),
        (bytes(data) + b"\0", "length field"),
    ):
        bad_sig.write_bytes(bytes(broken))
        with pytest.raises(VerificationFailed, match=match):
            WidevineSigner.verify(fmt, bad_sig, src, dep.public)


def test_other_level_key_fails(dep: Deployment, nightly: Deployment, tmp_path: Path) -> None:
    src = elf(tmp_path)
    out = sign(dep.signers["widevine"], src, tmp_path / "work")
    with pytest.raises(VerificationFailed, match="different key"):
        WidevineSigner.verify("widevine", out, src, nightly.public)
    assert shell_verify(out, src, nightly.public / "widevine.pem", tmp_path).returncode != 0


def test_uses_the_precomputed_hash(dep: Deployment, tmp_path: Path) -> None:
    """The signer signs the SHA-256 state the server computed during upload, not a re-read."""
    src = elf(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    wrong = {"sha256": hashlib.sha256(b"something else")}
    dep.signers["widevine"].sign(
        SignRequest(input=src, output=work / "out", filename=src.name, work_dir=work, digests=wrong)
    )
    with pytest.raises(VerificationFailed):
        WidevineSigner.verify("widevine", work / "out", src, dep.public)
    # and without a precomputed state it hashes the file itself
    out = sign(dep.signers["widevine"], src, tmp_path / "w2", precompute=False)
    WidevineSigner.verify("widevine", out, src, dep.public)


def test_bad_inputs_are_rejected(dep: Deployment, tmp_path: Path) -> None:
    cases = {
        "random.bin": (os.urandom(5000), "not an executable"),
        "empty.so": (b"", "empty"),
        "text.txt": (b"#!/bin/sh\necho hello\n", "not an executable"),
    }
    for name, (blob, match) in cases.items():
        src = tmp_path / name
        src.write_bytes(blob)
        work = tmp_path / f"work-{name}"
        work.mkdir()
        for fmt in FORMATS:
            with pytest.raises(FormatRejected, match=match):
                sign(dep.signers[fmt], src, work)
        assert list(work.iterdir()) == []


def test_options_and_config_errors(tmp_path: Path) -> None:
    issued = pki.issue(pki.make_ca("t root"), "t widevine")
    lenient = WidevineSigner(
        FormatSettings("widevine", "k", {"require_executable": False}, tmp_path),
        lambda n: UnlockedKey(n, issued.key, (issued.cert,)),
    )
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(3000))
    out = sign(lenient, src, tmp_path / "work")
    pem = issued.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    verify_sig(out.read_bytes(), src, pem, expect_blessed=False)

    with pytest.raises(ConfigError, match="require_executable"):
        WidevineSigner(
            FormatSettings("widevine", "k", {"require_executable": "yes"}, tmp_path),
            lambda n: UnlockedKey(n, issued.key),
        )
    with pytest.raises(ConfigError, match="shorter than 2048"):
        WidevineSigner(
            FormatSettings("widevine", "k", {}, tmp_path), lambda n: UnlockedKey(n, pki.new_rsa(1024))
        )
    other = pki.new_rsa(2048)
    with pytest.raises(ConfigError, match="does not match"):
        WidevineSigner(
            FormatSettings("widevine", "k", {}, tmp_path), lambda n: UnlockedKey(n, other, (issued.cert,))
        )


def test_dev_setup_public_files(dep: Deployment) -> None:
    readme = (dep.public / "README").read_text()
    assert "openssl pkeyutl -verify -pubin -inkey public/widevine.pem" in readme
    res = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(dep.root / "keys" / "widevine.chain.pem"),
            str(dep.public / "widevine-cert.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res
    cert_key = subprocess.run(
        ["openssl", "x509", "-in", str(dep.public / "widevine-cert.pem"), "-pubkey", "-noout"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert cert_key.strip() == (dep.public / "widevine.pem").read_text().strip()


def test_truncated_binaries_are_refused(tmp_path: Path) -> None:
    from sealbox.errors import FormatRejected
    from sealbox.formats.widevine import _check_whole
    from sealbox.samples.pe import write_pe

    elf = Path("/bin/ls").read_bytes()
    for name, data in (("ls", elf), ("setup.exe", write_pe(tmp_path).read_bytes())):
        whole = tmp_path / f"whole-{name}"
        whole.write_bytes(data)
        _check_whole(whole, data[:4])  # a whole binary passes
        cut = tmp_path / f"cut-{name}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(FormatRejected, match="truncated"):
            _check_whole(cut, data[:4])
