"""``rpm`` through a real server: rpmsign's external signer hook gets its signature from the
server's key (a file or a SoftHSM token), and ``rpmkeys --checksig`` with the public key in a
private rpmdb says OK; tampered packages, foreign keys and malformed inputs fail."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sealbox.errors import VerificationFailed
from sealbox.formats import FormatSettings, SignRequest, _openpgp
from sealbox.formats.rpm import RpmSigner, _Hook, main_header
from sealbox.keys import FileKey
from sealbox.samples.linuxpkg import write_deb, write_rpm
from tests.formats.test_formats_e2e import _no_temp_left, _refused_at_once
from tests.servers import Deployment, ServerProcess, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    sp = start_server(Deployment.create(tmp_path_factory.mktemp("rpm") / "dep", "dep", ["rpm"]))
    yield sp
    sp.stop()


def foreign(d: Path, name: str) -> tuple[FileKey, Path]:
    """Some other key, and a public dir whose ``<name>.asc`` is its public key."""
    key = FileKey(name, rsa.generate_private_key(public_exponent=65537, key_size=2048))
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.asc").write_bytes(
        _openpgp.public_key_block(key, "other <o@example.invalid>", int(time.time()))
    )
    return key, d


def foreign_public(d: Path, name: str) -> Path:
    """A public dir whose ``<name>.asc`` is some other key."""
    return foreign(d, name)[1]


def sign(sp: ServerProcess, src: Path, out: Path) -> Path:
    with sp.client(timeout=120) as c:
        res = c.sign(src, ["rpm"], out)
    assert res.ok, res.error
    return out


def checksig(rpm: Path, public: Path | None, db: Path) -> str:
    env = {"PATH": os.environ["PATH"], "HOME": str(db)}
    if public is not None:
        subprocess.run(["rpmkeys", "--dbpath", str(db), "--import", str(public)], env=env, check=True)
    res = subprocess.run(
        ["rpmkeys", "--dbpath", str(db), "--checksig", "-v", str(rpm)],
        capture_output=True,
        text=True,
        env=env,
    )
    return res.stdout + res.stderr


def test_signed_rpm_passes_rpmkeys(server: ServerProcess, tmp_path: Path) -> None:
    src = write_rpm(tmp_path / "in")
    out = sign(server, src, tmp_path / "out" / src.name)
    assert RpmSigner.verify("rpm", out, None, server.deployment.public) == "rpmkeys --checksig"
    text = checksig(out, server.deployment.public / "rpm.asc", tmp_path / "db")
    assert "Header V4 RSA/SHA256 Signature, key ID" in text and ": OK" in text and "NOT OK" not in text, text
    # without the key rpm sees the signature but cannot check it; the unsigned input has none
    assert "NOKEY" in checksig(out, None, tmp_path / "db2")
    assert "Signature" not in checksig(src, server.deployment.public / "rpm.asc", tmp_path / "db3")
    assert main_header(out) == main_header(src)  # the package itself is untouched


def test_a_signature_by_another_key_is_replaced(server: ServerProcess, tmp_path: Path) -> None:
    key, other = foreign(tmp_path / "other", "rpm")
    signer = RpmSigner(
        FormatSettings("rpm", "rpm", {"public_key": str(other / "rpm.asc")}, tmp_path), lambda _: key
    )
    src = write_rpm(tmp_path / "in")
    (tmp_path / "work").mkdir()
    signer.sign(SignRequest(src, tmp_path / "theirs.rpm", "x.rpm", tmp_path / "work"))
    RpmSigner.verify("rpm", tmp_path / "theirs.rpm", None, other)
    out = sign(server, tmp_path / "theirs.rpm", tmp_path / "out" / src.name)
    assert RpmSigner.verify("rpm", out, None, server.deployment.public)
    with pytest.raises(VerificationFailed):
        RpmSigner.verify("rpm", out, None, other)


def test_tampered_or_foreign_fails(server: ServerProcess, tmp_path: Path) -> None:
    src = write_rpm(tmp_path / "in", payload="x" * 4000)
    out = sign(server, src, tmp_path / "out" / src.name)
    data = bytearray(out.read_bytes())
    header = main_header(out)
    in_header = bytes(data).index(header) + len(header) // 2
    for at in (len(data) - 40, in_header):  # the payload, the main header
        bad = tmp_path / f"bad{at}.rpm"
        flipped = bytearray(data)
        flipped[at] ^= 0x01
        bad.write_bytes(bytes(flipped))
        with pytest.raises(VerificationFailed):
            RpmSigner.verify("rpm", bad, None, server.deployment.public)
    with pytest.raises(VerificationFailed, match=r"NOKEY|NOT OK"):
        RpmSigner.verify("rpm", out, None, foreign_public(tmp_path / "other", "rpm"))


def _big_index(d: Path) -> Path:
    """An RPM lead and a signature header that claims 1,000,000 entries."""
    p = d / "big.rpm"
    lead = b"\xed\xab\xee\xdb\x03\x00" + bytes(90)
    p.write_bytes(lead + b"\x8e\xad\xe8\x01\x00\x00\x00\x00" + struct.pack(">II", 1_000_000, 16) + bytes(64))
    return p


@pytest.mark.parametrize("kind", ["random", "truncated", "deb", "big-index"])
def test_bad_input_is_refused_at_once(server: ServerProcess, tmp_path: Path, kind: str) -> None:
    if kind == "random":
        bad = tmp_path / "x.rpm"
        bad.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        good = write_rpm(tmp_path / "good", payload="y" * 3000).read_bytes()
        bad = tmp_path / "x.rpm"
        bad.write_bytes(good[: len(good) - 200])
    elif kind == "deb":
        bad = write_deb(tmp_path)
    else:
        bad = _big_index(tmp_path)
    started = time.monotonic()
    with server.client(timeout=120) as c:
        res = c.sign(bad, ["rpm"], tmp_path / "out" / bad.name)
    assert not res.ok and "signing failed" in (res.error or "")
    assert any(w in (res.error or "") for w in ("RPM", "rpm")), res.error
    assert _refused_at_once(server, "rpm", bad.read_bytes())
    assert time.monotonic() - started < 60  # a generous cap: refused, not retried
    assert not (tmp_path / "out" / bad.name).exists() and _no_temp_left(server)


def test_hook_signs_only_the_package_header() -> None:
    key = FileKey("rpm", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    pub = _openpgp.PublicKey.from_rsa(key.public_key, 0)  # type: ignore[arg-type]

    def ask(data: bytes) -> tuple[bytes, str | None]:
        """One request as rpmsign's hook (socat) makes it: the data, then the end of it."""
        with _Hook(key, pub, b"the header") as hook:
            peer = hook.theirs
            peer.sendall(data)
            peer.shutdown(socket.SHUT_WR)
            answer = bytearray()
            while chunk := peer.recv(1 << 16):
                answer += chunk
        return bytes(answer), hook.error

    body, error = ask(b"something else")
    assert body == b"" and error is not None and "other than the package's header" in error
    body, error = ask(b"the header, and more")
    assert body == b"" and error is not None
    body, error = ask(b"the header")
    assert error is None and body[0] == 0xC2  # a signature packet


def test_hsm_key(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "hsm", "dep", ["rpm"], hsm=True)
    assert 'kind = "pkcs11"' in d.config.read_text()
    sp = start_server(d)
    try:
        src = write_rpm(tmp_path / "in")
        out = sign(sp, src, tmp_path / "out" / src.name)
    finally:
        sp.stop()
    RpmSigner.verify("rpm", out, None, d.public)
    assert not (d.root / "keys" / "rpm.pem").exists()  # the key lives in the token only
