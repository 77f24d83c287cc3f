"""`sealbox init --dev`: a complete deployment, private files private, never overwritten."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

from cryptography import x509

from tests.servers import BIN


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_init_dev_layout_and_refusal(tmp_path: Path) -> None:
    d = tmp_path / "rel"
    res = subprocess.run(
        [str(BIN / "sealbox"), "init", "--dev", str(d), "--level", "release"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    cfg = (d / "sealbox.toml").read_text()
    assert 'level = "release"' in cfg and "127.0.0.1:9112" in cfg
    _user, _, password = (d / "token-auth").read_text().partition(":")
    assert password and password not in cfg and "scrypt$" in cfg
    for private in ("token-auth", "secrets/token-secret", "passphrases", "tls/server.key"):
        assert _mode(d / private) == 0o600, private
    for key in (d / "keys").iterdir():
        data = key.read_bytes()
        if key.suffix == ".p12" or b"PRIVATE KEY" in data:
            assert _mode(key) == 0o600, key
            assert key.suffix == ".p12" or b"ENCRYPTED PRIVATE KEY" in data, key
    cert = x509.load_pem_x509_certificate((d / "tls" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    public = {p.name for p in (d / "public").iterdir()}
    for name in (
        "gpg.asc",
        "mar.pem",
        "mar_sha384.pem",
        "sha2signcode-ca.pem",
        "jar-truststore.p12",
        "emevoucher-ca.pem",
        "widevine.pem",
        "README",
    ):
        assert name in public, name
    again = subprocess.run(
        [str(BIN / "sealbox"), "init", "--dev", str(d)], capture_output=True, text=True, check=False
    )
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
