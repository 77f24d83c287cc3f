"""``deb`` through a real server: a debsigs origin signature (``_gpgorigin``) that
``debsig-verify`` accepts with a policy and keyring made here; tampered packages, foreign keys
and malformed archives fail."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealbox.errors import FormatRejected, VerificationFailed
from sealbox.formats.deb import DebSigner, ar_header, members
from sealbox.samples.linuxpkg import write_deb, write_rpm
from tests.formats.test_formats_e2e import _no_temp_left, _refused_at_once
from tests.formats.test_rpm import foreign_public
from tests.servers import Deployment, ServerProcess, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    sp = start_server(Deployment.create(tmp_path_factory.mktemp("deb") / "dep", "dep", ["deb"]))
    yield sp
    sp.stop()


def sign(sp: ServerProcess, src: Path, out: Path) -> Path:
    with sp.client(timeout=120) as c:
        res = c.sign(src, ["deb"], out)
    assert res.ok, res.error
    return out


def ar_names(deb: Path) -> list[str]:
    return subprocess.run(["ar", "t", str(deb)], capture_output=True, text=True, check=True).stdout.split()


def test_signed_deb_passes_debsig_verify(server: ServerProcess, tmp_path: Path) -> None:
    src = write_deb(tmp_path / "in")
    out = sign(server, src, tmp_path / "out" / src.name)
    assert DebSigner.verify("deb", out, None, server.deployment.public) == "debsig-verify"
    assert ar_names(out) == ["debian-binary", "control.tar.xz", "data.tar.xz", "_gpgorigin"]
    assert out.read_bytes().startswith(src.read_bytes())  # appended, the package untouched
    # dpkg still reads it; debsigs lists the signature
    subprocess.run(["dpkg-deb", "--info", str(out)], capture_output=True, check=True)
    listed = subprocess.run(["debsigs", "--list", str(out)], capture_output=True, text=True, check=True)
    assert "origin" in listed.stdout
    # an existing origin signature (here junk) is replaced, other members kept
    forged = tmp_path / "forged.deb"
    forged.write_bytes(
        src.read_bytes() + ar_header("_gpgorigin", 3, 0) + b"xyz\n" + ar_header("_gpgmaint", 2, 0) + b"ab"
    )
    again = sign(server, forged, tmp_path / "again" / src.name)
    assert ar_names(again) == ["debian-binary", "control.tar.xz", "data.tar.xz", "_gpgmaint", "_gpgorigin"]
    DebSigner.verify("deb", again, None, server.deployment.public)
    with pytest.raises(VerificationFailed):  # the unsigned input
        DebSigner.verify("deb", src, None, server.deployment.public)


def test_tampered_or_foreign_fails(server: ServerProcess, tmp_path: Path) -> None:
    src = write_deb(tmp_path / "in", payload="z" * 5000)
    out = sign(server, src, tmp_path / "out" / src.name)
    data = members(out)[2]  # data.tar.xz
    raw = bytearray(out.read_bytes())
    raw[data.data + data.size // 2] ^= 0x01
    bad = tmp_path / "bad.deb"
    bad.write_bytes(bytes(raw))
    with pytest.raises(VerificationFailed, match="debsig-verify"):
        DebSigner.verify("deb", bad, None, server.deployment.public)
    with pytest.raises(VerificationFailed, match="debsig-verify"):
        DebSigner.verify("deb", out, None, foreign_public(tmp_path / "other", "deb"))


def _ar(d: Path, name: str, parts: list[tuple[str, bytes]], magic: bytes = b"!<arch>\n") -> Path:
    body = b"".join(ar_header(n, len(c), 0) + c + b"\n" * (len(c) % 2) for n, c in parts)
    p = d / name
    p.write_bytes(magic + body)
    return p


def _bad(kind: str, d: Path) -> Path:
    three = [("debian-binary", b"2.0\n"), ("control.tar", b""), ("data.tar", b"")]
    if kind == "rpm":
        return write_rpm(d)
    if kind == "many-members":
        return _ar(d, "x.deb", three + [(f"_m{i}", b"x") for i in range(40)])
    if kind == "wrong-order":
        return _ar(d, "x.deb", three[::-1])
    p = d / "x.deb"
    if kind == "random":
        p.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        p.write_bytes(write_deb(d / "good").read_bytes()[:-100])
    else:  # a size field that is not a number
        p.write_bytes(_ar(d, "y.deb", three).read_bytes().replace(b"4         `", b"9x        `"))
    return p


BAD = ["random", "rpm", "truncated", "many-members", "wrong-order", "bad-size"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_refused_at_once(server: ServerProcess, tmp_path: Path, kind: str) -> None:
    bad = _bad(kind, tmp_path)
    started = time.monotonic()
    with server.client(timeout=120) as c:
        res = c.sign(bad, ["deb"], tmp_path / "out" / bad.name)
    assert not res.ok and "signing failed" in (res.error or "") and ".deb" in (res.error or ""), res.error
    assert _refused_at_once(server, "deb", bad.read_bytes())
    assert time.monotonic() - started < 60  # a generous cap: refused, not retried
    assert not (tmp_path / "out" / bad.name).exists() and _no_temp_left(server)


def test_hsm_key(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "hsm", "dep", ["deb"], hsm=True)
    assert 'kind = "pkcs11"' in d.config.read_text()
    sp = start_server(d)
    try:
        src = write_deb(tmp_path / "in")
        out = sign(sp, src, tmp_path / "out" / src.name)
    finally:
        sp.stop()
    DebSigner.verify("deb", out, None, d.public)
    assert not (d.root / "keys" / "deb.pem").exists()  # the key lives in the token only


def test_a_mode_field_with_non_octal_digits_is_a_refusal() -> None:
    """An ar member's mode of "100689" (found by fuzzing): a refusal, not a ValueError."""
    from sealbox.formats.deb import _field

    with pytest.raises(FormatRejected, match="bad mode field"):
        _field(b"100689  ", "mode", 8, 8)
    assert _field(b"100644  ", "mode", 8, 8) == 0o100644
