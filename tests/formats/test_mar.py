"""MAR signing (mar / mar_sha384): the real signer, `mar -v`, and a hand-written parser feeding
`openssl dgst -verify`."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from mardor.writer import MarWriter

from sealbox.deploy.dev import init_dev
from sealbox.deploy.pki import new_rsa
from sealbox.errors import ConfigError, FormatRejected, VerificationFailed
from sealbox.formats import FormatSettings, Signer, SignRequest, signer_class
from sealbox.formats.mar import MarSigner
from sealbox.keys import PassphraseSource, SigningKey, load_key
from sealbox.keys._store import UnlockedKey
from sealbox.samples.mar import write_mar
from sealbox.server.config import load_config

MAR_CLI = Path(sys.executable).parent / "mar"
FORMATS = ("mar", "mar_sha384")


# -- shared helpers ----------------------------------------------------------------------
@dataclass
class Deployment:
    root: Path
    public: Path
    signers: dict[str, Signer]


def make_deployment(root: Path, level: str, formats: tuple[str, ...]) -> Deployment:
    """A dev deployment with only ``formats``, and their signers unlocked as the server does."""
    config_path = init_dev(root, level, formats=list(formats))
    cfg = load_config(config_path)
    passphrases = PassphraseSource.from_file(root / "passphrases")

    def resolve(name: str) -> SigningKey:
        return load_key(cfg.key_spec(name), passphrases.get(name))

    signers = {fmt: signer_class(fmt)(cfg.format_settings(fmt), resolve) for fmt in formats}
    return Deployment(root, root / "public", signers)


def sign(signer: Signer, src: Path, work: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    signer.sign(SignRequest(input=src, output=out, filename=src.name, work_dir=work))
    return out


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return make_deployment(tmp_path_factory.mktemp("dep") / "d", "dep", FORMATS)


@pytest.fixture(scope="module")
def nightly(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return make_deployment(tmp_path_factory.mktemp("nightly") / "d", "nightly", FORMATS)


# -- independent verifier: hand-written MAR parser + openssl (formats-and-tools.md §3) ----
def split_signed_mar(data: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Return (the bytes MAR signatures cover, [(algorithm id, signature)])."""
    assert data[:4] == b"MAR1"
    filesize, count = struct.unpack(">QI", data[8:20])
    assert filesize == len(data), "file size field must equal the real length"
    covered = bytearray(data[:20])
    pos = 20
    sigs = []
    for _ in range(count):
        algo, size = struct.unpack(">II", data[pos : pos + 8])
        covered += data[pos : pos + 8]
        sigs.append((algo, data[pos + 8 : pos + 8 + size]))
        pos += 8 + size
    covered += data[pos:]
    return bytes(covered), sigs


def openssl_verify(signed: Path, public_pem: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    covered, sigs = split_signed_mar(signed.read_bytes())
    assert len(sigs) == 1
    algo, sig = sigs[0]
    (tmp / "covered.bin").write_bytes(covered)
    (tmp / "sig.bin").write_bytes(sig)
    md = {1: "-sha1", 2: "-sha384"}[algo]
    return subprocess.run(
        [
            "openssl",
            "dgst",
            md,
            "-verify",
            str(public_pem),
            "-signature",
            str(tmp / "sig.bin"),
            str(tmp / "covered.bin"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def mar_cli_verify(signed: Path, public_pem: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MAR_CLI), "-v", str(signed), "-k", str(public_pem)], capture_output=True, text=True, check=False
    )


def entries(data: bytes) -> dict[str, bytes]:
    """File name -> stored bytes, read with a hand-written index parser."""
    (index_offset,) = struct.unpack(">I", data[4:8])
    (size,) = struct.unpack(">I", data[index_offset : index_offset + 4])
    index = data[index_offset + 4 : index_offset + 4 + size]
    out, pos = {}, 0
    while pos < len(index):
        offset, length, _flags = struct.unpack(">III", index[pos : pos + 12])
        end = index.index(b"\0", pos + 12)
        out[index[pos + 12 : end].decode()] = data[offset : offset + length]
        pos = end + 1
    return out


# -- signing and verifying ---------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_sign_verifies_with_mar_cli_and_openssl(dep: Deployment, tmp_path: Path, fmt: str) -> None:
    src = write_mar(tmp_path, channel="release", version="101.0", size=300_000)
    out = sign(dep.signers[fmt], src, tmp_path / "work")
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["out"]
    pub = dep.public / f"{fmt}.pem"

    assert MarSigner.verify(fmt, out, src, dep.public) == f"mar -v FILE -k public/{fmt}.pem"
    res = mar_cli_verify(out, pub)
    assert res.returncode == 0 and "Verification OK" in res.stdout, res
    res = openssl_verify(out, pub, tmp_path)
    assert res.returncode == 0 and "Verified OK" in res.stdout, res

    data = out.read_bytes()
    _, sigs = split_signed_mar(data)
    assert [(a, len(s)) for a, s in sigs] == [{"mar": (1, 256), "mar_sha384": (2, 512)}[fmt]]
    assert entries(data) == entries(src.read_bytes())  # payload unchanged
    listing = subprocess.run(
        [str(MAR_CLI), "-T", str(out)], capture_output=True, text=True, check=True
    ).stdout
    assert "MAR channel name: release" in listing and "Product version: 101.0" in listing


@pytest.mark.parametrize("fmt", FORMATS)
def test_tampered_mar_fails(dep: Deployment, tmp_path: Path, fmt: str) -> None:
    src = write_mar(tmp_path, size=50_000)
    out = sign(dep.signers[fmt], src, tmp_path / "work")
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside libxul.so
    bad = tmp_path / "tampered.mar"
    bad.write_bytes(bytes(data))
    pub = dep.public / f"{fmt}.pem"
    with pytest.raises(VerificationFailed, match="Verification failed"):
        MarSigner.verify(fmt, bad, src, dep.public)
    assert mar_cli_verify(bad, pub).returncode != 0
    res = openssl_verify(bad, pub, tmp_path)
    assert res.returncode != 0 and "Verification failure" in res.stdout + res.stderr


@pytest.mark.parametrize("fmt", FORMATS)
def test_other_level_key_fails(dep: Deployment, nightly: Deployment, tmp_path: Path, fmt: str) -> None:
    src = write_mar(tmp_path, size=10_000)
    out = sign(dep.signers[fmt], src, tmp_path / "work")
    MarSigner.verify(fmt, out, src, dep.public)
    with pytest.raises(VerificationFailed):
        MarSigner.verify(fmt, out, src, nightly.public)
    assert openssl_verify(out, nightly.public / f"{fmt}.pem", tmp_path).returncode != 0


def test_wrong_algorithm_is_not_accepted(dep: Deployment, tmp_path: Path) -> None:
    src = write_mar(tmp_path, size=10_000)
    out = sign(dep.signers["mar"], src, tmp_path / "work")
    with pytest.raises(VerificationFailed, match="algorithm id 2"):
        MarSigner.verify("mar_sha384", out, src, dep.public)


def test_resigning_replaces_existing_signatures(dep: Deployment, tmp_path: Path) -> None:
    src = write_mar(tmp_path, size=20_000)
    sha1_signed = sign(dep.signers["mar"], src, tmp_path / "w1")
    both = sign(dep.signers["mar_sha384"], sha1_signed, tmp_path / "w2")
    _, sigs = split_signed_mar(both.read_bytes())
    assert [a for a, _ in sigs] == [2]
    MarSigner.verify("mar_sha384", both, src, dep.public)
    # signing the same input twice gives a MAR that verifies each time (PKCS#1 v1.5 is deterministic)
    again = sign(dep.signers["mar_sha384"], both, tmp_path / "w3")
    assert again.read_bytes() == both.read_bytes()


# -- refused inputs ------------------------------------------------------------------------
def _assert_rejected(signer: Signer, src: Path, work: Path, match: str) -> None:
    work.mkdir()
    with pytest.raises(FormatRejected, match=match):
        signer.sign(SignRequest(input=src, output=work / "out", filename=src.name, work_dir=work))
    assert list(work.iterdir()) == [], "no output and no scratch file may be left behind"


def _old_style_mar(path: Path) -> Path:
    with path.open("w+b") as f, MarWriter(f) as m:
        m.add_stream(iter([b"hello"]), "a.txt", None, 0o644)
    return path


def _mar_with_name(path: Path, name: str) -> Path:
    with path.open("w+b") as f, MarWriter(f, productversion="1.0", channel="release") as m:
        m.add_stream(iter([b"evil"]), name, None, 0o644)
    return path


def test_bad_inputs_are_rejected(dep: Deployment, tmp_path: Path) -> None:
    signer = dep.signers["mar"]
    good = write_mar(tmp_path / "in", size=20_000).read_bytes()
    cases: dict[str, tuple[bytes, str]] = {
        "random": (os.urandom(5000), "no MAR1 magic"),
        "empty": (b"", "too short"),
        "text": (b"#!/bin/sh\necho not a mar\n", "no MAR1 magic"),
        "truncated-end": (good[:-100], "truncated"),
        "truncated-half": (good[: len(good) // 2], "truncated"),
        "truncated-header": (good[:30], "truncated"),
        "appended": (good + b"x" * 10, "truncated or padded|after the index"),
        "bad-magic": (b"MAR2" + good[4:], "no MAR1 magic"),
        "old-style": (_old_style_mar(tmp_path / "old.mar").read_bytes(), "old-style"),
        "traversal": (_mar_with_name(tmp_path / "t1.mar", "../../etc/evil").read_bytes(), "escapes"),
        "absolute": (_mar_with_name(tmp_path / "t2.mar", "/etc/evil").read_bytes(), "absolute"),
    }
    huge_count = bytearray(good)
    huge_count[16:20] = struct.pack(">I", 0xFFFFFFFF)
    cases["huge-sig-count"] = (bytes(huge_count), "signatures")
    (index_offset,) = struct.unpack(">I", good[4:8])
    bad_entry = bytearray(good)
    bad_entry[index_offset + 4 : index_offset + 8] = struct.pack(">I", 0x7FFFFFF0)  # first entry's offset
    cases["entry-offset"] = (bytes(bad_entry), "unsupported layout|runs past")
    for name, (blob, match) in cases.items():
        src = tmp_path / f"{name}.mar"
        src.write_bytes(blob)
        _assert_rejected(signer, src, tmp_path / f"work-{name}", match)


def test_channel_allow_list(dep: Deployment, tmp_path: Path) -> None:
    key = new_rsa(2048)

    def make(patterns: list[str]) -> MarSigner:
        settings = FormatSettings("mar", "k", {"allowed_channels": patterns}, tmp_path)
        return MarSigner(settings, lambda name: UnlockedKey(name, key))

    src = write_mar(tmp_path / "in", channel="nightly-try")
    _assert_rejected(make(["release", "beta*"]), src, tmp_path / "w1", "channel 'nightly-try' is not allowed")
    _assert_rejected(make(["NIGHTLY-*"]), src, tmp_path / "w2", "nightly-try")  # case-sensitive
    out = sign(make(["release", "nightly-*"]), src, tmp_path / "w3")
    assert out.is_file()


def test_config_errors(tmp_path: Path) -> None:
    k2048 = new_rsa(2048)

    def settings(fmt: str, **options: object) -> FormatSettings:
        return FormatSettings(fmt, "k", options, tmp_path)

    with pytest.raises(ConfigError, match="need RSA-4096"):
        MarSigner(settings("mar_sha384"), lambda n: UnlockedKey(n, k2048))
    with pytest.raises(ConfigError, match="allowed_channels"):
        MarSigner(settings("mar", allowed_channels="release"), lambda n: UnlockedKey(n, k2048))
    with pytest.raises(ConfigError, match="allowed_channels"):
        MarSigner(settings("mar", allowed_channels=[]), lambda n: UnlockedKey(n, k2048))
    with pytest.raises(ConfigError, match="'key' is required"):
        MarSigner(FormatSettings("mar", None, {}, tmp_path), lambda n: UnlockedKey(n, k2048))


def test_dev_setup_public_files(dep: Deployment) -> None:
    readme = (dep.public / "README").read_text()
    assert "mar -v FILE -k public/mar.pem" in readme
    assert "mar -v FILE -k public/mar_sha384.pem" in readme
    for fmt, bits in (("mar", 2048), ("mar_sha384", 4096)):
        res = subprocess.run(
            ["openssl", "rsa", "-pubin", "-in", str(dep.public / f"{fmt}.pem"), "-noout", "-text"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert f"Public-Key: ({bits} bit)" in res.stdout


def test_hash_of_covered_bytes_matches_module(dep: Deployment, tmp_path: Path) -> None:
    """The module's digest helper agrees with the independent parser (guards the patch offset)."""
    from sealbox.formats.mar import signed_data_digest

    out = sign(dep.signers["mar_sha384"], write_mar(tmp_path, size=1000), tmp_path / "work")
    covered, _ = split_signed_mar(out.read_bytes())
    assert signed_data_digest(out, 2) == hashlib.sha384(covered).digest()


@pytest.mark.parametrize(("fmt", "bits", "algo"), [("mar", 2048, "sha1"), ("mar_sha384", 4096, "sha384")])
def test_output_is_identical_to_the_mardor_recipe(
    dep: Deployment, tmp_path: Path, fmt: str, bits: int, algo: str
) -> None:
    """add_signature_block (dummy) -> calculate_hashes -> sign -> add_signature_block gives the same bytes."""
    from mardor.reader import MarReader
    from mardor.writer import add_signature_block

    key = dep.signers[fmt]._key  # type: ignore[attr-defined]  # the signer's SigningKey
    assert key.key_size == bits
    # an input that already carries a signature of the other kind, to exercise replacement too
    other = "mar_sha384" if fmt == "mar" else "mar"
    src = sign(dep.signers[other], write_mar(tmp_path, size=123_457), tmp_path / "pre")
    ours = sign(dep.signers[fmt], src, tmp_path / "work").read_bytes()

    dummy, expected = tmp_path / "dummy.mar", tmp_path / "expected.mar"
    with src.open("rb") as f, dummy.open("w+b") as d:
        add_signature_block(f, d, algo)
    with dummy.open("rb") as d:
        [(_, digest)] = MarReader(d).calculate_hashes()
    signature = key.sign_digest(digest, algo, "pkcs1v15")
    with src.open("rb") as f, expected.open("w+b") as e:
        add_signature_block(f, e, algo, signature)
    assert ours == expected.read_bytes()
