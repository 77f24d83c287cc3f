"""``apt-inrelease`` and ``apt-release-gpg`` through a real server: a Release file clear-signed
into InRelease and signed into a detached Release.gpg, both checked by ``gpgv`` (and
Release.gpg by ``sqv``); tampered files, foreign keys and inputs that are not Release files
fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sealbox.errors import VerificationFailed
from sealbox.formats import _openpgp
from sealbox.formats.apt import AptSigner
from sealbox.keys import FileKey
from sealbox.samples.linuxpkg import write_release
from tests.formats.test_formats_e2e import _no_temp_left, _refused_at_once
from tests.formats.test_rpm import foreign_public
from tests.servers import Deployment, ServerProcess, start_server

FORMATS = ["apt-inrelease", "apt-release-gpg"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    sp = start_server(Deployment.create(tmp_path_factory.mktemp("apt") / "dep", "dep", FORMATS))
    yield sp
    sp.stop()


def sign_both(sp: ServerProcess, release: Path) -> tuple[Path, Path]:
    """InRelease and Release.gpg beside ``release``, one request each."""
    inrelease = release.with_name("InRelease")
    with sp.client(timeout=120) as c:
        res = c.sign(release, ["apt-inrelease"], inrelease)
        assert res.ok, res.error
        res = c.sign(release, ["apt-release-gpg"], release)  # the detached .gpg goes beside it
        assert res.ok, res.error
    return inrelease, release.with_name("Release.gpg")


def gpgv(args: list[str], public: Path, home: Path) -> subprocess.CompletedProcess[str]:
    home.mkdir()
    keyring = home / "apt.gpg"
    keyring.write_bytes(_openpgp.dearmor(public.read_bytes()))
    argv = ["gpgv", "--homedir", str(home), "--keyring", str(keyring), *args]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def test_release_signed_both_ways(server: ServerProcess, tmp_path: Path) -> None:
    release = write_release(tmp_path / "dists" / "stable")
    original = release.read_bytes()
    inrelease, release_gpg = sign_both(server, release)
    assert release.read_bytes() == original
    public = server.deployment.public
    assert AptSigner.verify("apt-inrelease", inrelease, release, public) == "gpgv"
    expected = "gpgv + sqv" if shutil.which("sqv") else "gpgv"
    assert AptSigner.verify("apt-release-gpg", release_gpg, release, public) == expected
    text = inrelease.read_text()
    assert text.startswith("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nOrigin: sealbox\n")
    assert release_gpg.read_text().startswith("-----BEGIN PGP SIGNATURE-----")
    res = gpgv([str(inrelease)], public / "apt.asc", tmp_path / "h1")
    assert res.returncode == 0 and "Good signature" in res.stderr, res.stderr
    res = gpgv([str(release_gpg), str(release)], public / "apt.asc", tmp_path / "h2")
    assert res.returncode == 0 and "Good signature" in res.stderr, res.stderr


def test_tampered_or_foreign_fails(server: ServerProcess, tmp_path: Path) -> None:
    release = write_release(tmp_path)
    inrelease, release_gpg = sign_both(server, release)
    public = server.deployment.public
    bad_in = tmp_path / "bad-InRelease"
    bad_in.write_text(inrelease.read_text().replace("Suite: stable", "Suite: stablf"))
    with pytest.raises(VerificationFailed, match="gpgv"):
        AptSigner.verify("apt-inrelease", bad_in, None, public)
    bad_release = tmp_path / "bad-Release"
    bad_release.write_text(release.read_text().replace("Suite: stable", "Suite: stablf"))
    with pytest.raises(VerificationFailed, match="gpgv"):
        AptSigner.verify("apt-release-gpg", release_gpg, bad_release, public)
    if shutil.which("sqv"):
        sqv = ["sqv", "--keyring", str(public / "apt.asc"), str(release_gpg)]
        assert subprocess.run([*sqv, str(release)], capture_output=True, check=False).returncode == 0
        assert subprocess.run([*sqv, str(bad_release)], capture_output=True, check=False).returncode != 0
    other = foreign_public(tmp_path / "other", "apt")
    for fmt, signed in (("apt-inrelease", inrelease), ("apt-release-gpg", release_gpg)):
        with pytest.raises(VerificationFailed, match="gpgv"):
            AptSigner.verify(fmt, signed, release, other)


def test_cleartext_framework_dash_escapes_and_strips_trailing_whitespace(tmp_path: Path) -> None:
    """The RFC 4880 section 7 details a Release never shows: dash-escaped lines, trailing
    whitespace outside the signature, a text without a final newline."""
    key = FileKey("k", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    (tmp_path / "k.asc").write_bytes(_openpgp.public_key_block(key, "k <k@example.invalid>", 1_700_000_000))
    pub = _openpgp.PublicKey.from_armored((tmp_path / "k.asc").read_bytes())
    text = "-----BEGIN PGP SIGNATURE-----\n- dash\ntrailing \t \nlast"
    signed = tmp_path / "msg.asc"
    signed.write_bytes(_openpgp.clearsigned(key, pub, text, "sha256", int(time.time())))
    assert "\n- -----BEGIN PGP SIGNATURE-----\n- - dash\n" in signed.read_text()
    res = gpgv(["--output", str(tmp_path / "out"), str(signed)], tmp_path / "k.asc", tmp_path / "h")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out").read_text().splitlines() == [
        "-----BEGIN PGP SIGNATURE-----",
        "- dash",
        "trailing",
        "last",
    ]


def _bad(kind: str, d: Path) -> Path:
    p = d / "Release"
    good = write_release(d / "good").read_bytes()
    data = {
        "random": os.urandom(2048),
        "latin-1": good.replace(b"sample", "\xe9chantillon".encode("latin-1")),
        "nul": good.replace(b"Suite", b"Su\0ite"),
        "not-deb822": b"hello world\nthis is not a Release file\n",
        "two-paragraphs": good + b"\nOrigin: again\n",
        "blank": b"\n" * 16,
    }[kind]
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["random", "latin-1", "nul", "not-deb822", "two-paragraphs", "blank"])
def test_bad_input_is_refused_at_once(server: ServerProcess, tmp_path: Path, fmt: str, kind: str) -> None:
    bad = _bad(kind, tmp_path)
    started = time.monotonic()
    with server.client(timeout=120) as c:
        res = c.sign(bad, [fmt], tmp_path / "out" / "Release")
    assert (
        not res.ok and "signing failed" in (res.error or "") and "not a Release file" in (res.error or "")
    ), res.error
    assert _refused_at_once(server, fmt, bad.read_bytes())
    assert time.monotonic() - started < 60  # a generous cap: refused, not retried
    assert _no_temp_left(server)


def test_a_clear_signed_file_is_refused(server: ServerProcess, tmp_path: Path) -> None:
    key = FileKey("k", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    pub = _openpgp.PublicKey.from_rsa(key.public_key, 0)  # type: ignore[arg-type]
    inrelease = tmp_path / "InRelease"
    text = write_release(tmp_path).read_text()
    inrelease.write_bytes(_openpgp.clearsigned(key, pub, text, "sha256", int(time.time())))
    with server.client(timeout=120) as c:
        res = c.sign(inrelease, ["apt-inrelease"], tmp_path / "twice")
    assert not res.ok and "does not start with a field" in (res.error or ""), res.error


def test_hsm_key(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "hsm", "dep", FORMATS, hsm=True)
    assert 'kind = "pkcs11"' in d.config.read_text()
    sp = start_server(d)
    try:
        release = write_release(tmp_path / "repo")
        inrelease, release_gpg = sign_both(sp, release)
    finally:
        sp.stop()
    AptSigner.verify("apt-inrelease", inrelease, release, d.public)
    AptSigner.verify("apt-release-gpg", release_gpg, release, d.public)
    assert not (d.root / "keys" / "apt.pem").exists()  # the key lives in the token only
