"""``sealbox init --dev DIR``: a complete, self-contained dev deployment for one cert level.

Layout::

    DIR/sealbox.toml      server config (level, listen address, keys, formats)
    DIR/tls/ca.pem        private CA clients pass as -c; tls/server.{pem,key}
    DIR/token-auth        user:password for POST /token (config keeps a salted hash)
    DIR/secrets/token-secret   HMAC secret (0600)
    DIR/keys/             passphrase-protected private keys (0600) and chains
    DIR/public/           what each independent verifier needs, named after the format
    DIR/passphrases       key-name:passphrase (0600), for unattended dev start only
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from .. import pki
from ..errors import ConfigError
from ..keys.credentials import hash_password
from ..keys.store import PrivateKey, encrypt_pem

LEVEL_PORTS = {"dep": 9110, "nightly": 9111, "release": 9112}


class DevContext:
    """What a signer family's ``dev_setup`` uses to make its keys and public files."""

    def __init__(self, root: Path, level: str) -> None:
        self.dir = root
        self.level = level
        self.public_dir = root / "public"
        self.keys: dict[str, dict[str, Any]] = {}
        self.passphrases: dict[str, str] = {}
        self._ca: pki.Issued | None = None
        self.public_readme: list[str] = []

    # -- keys ---------------------------------------------------------------------------
    def rsa(self, bits: int = 2048) -> Any:
        return pki.new_rsa(bits)

    def code_signing_ca(self) -> pki.Issued:
        """This level's code-signing root CA (made once; its key is not kept)."""
        if self._ca is None:
            self._ca = pki.make_ca(f"sealbox {self.level} code-signing root")
        return self._ca

    def issue(self, cn: str, **kw: Any) -> pki.Issued:
        """A certificate under the level's code-signing root (see :func:`sealbox.pki.issue`)."""
        return pki.issue(self.code_signing_ca(), f"{cn} ({self.level})", **kw)

    def _passphrase(self, name: str) -> bytes:
        value = secrets.token_urlsafe(24)
        self.passphrases[name] = value
        return value.encode()

    def add_key(self, name: str, key: PrivateKey, chain: Sequence[x509.Certificate] = ()) -> str:
        """Store ``key`` encrypted as PKCS#8 PEM (plus its chain); returns the key name."""
        path = self.write_file(f"keys/{name}.pem", encrypt_pem(key, self._passphrase(name)), 0o600)
        entry: dict[str, Any] = {"path": str(path.relative_to(self.dir)), "kind": "pem"}
        if chain:
            pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
            entry["chain"] = str(self.write_file(f"keys/{name}.chain.pem", pem).relative_to(self.dir))
        self.keys[name] = entry
        return name

    def add_pkcs12_key(
        self, name: str, key: PrivateKey, cert: x509.Certificate, extra: Sequence[x509.Certificate] = ()
    ) -> str:
        """Store ``key`` + cert in a passphrase-protected PKCS#12 keystore."""
        blob = pkcs12.serialize_key_and_certificates(
            name.encode(),
            key,
            cert,
            list(extra) or None,
            serialization.BestAvailableEncryption(self._passphrase(name)),
        )
        path = self.write_file(f"keys/{name}.p12", blob, 0o600)
        self.keys[name] = {"path": str(path.relative_to(self.dir)), "kind": "pkcs12"}
        return name

    # -- files --------------------------------------------------------------------------
    def write_file(self, rel: str, data: bytes, mode: int = 0o644) -> Path:
        path = self.dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path

    def write_public(self, filename: str, data: bytes, readme: str = "") -> Path:
        """A public half under ``public/``; ``readme`` is the verifier command that uses it."""
        if readme:
            self.public_readme.append(f"{filename}\n    {readme}\n")
        return self.write_file(f"public/{filename}", data)


def init_dev(
    root: Path, level: str = "dep", listen: str | None = None, formats: Sequence[str] | None = None
) -> Path:
    """Create a dev deployment in ``root``; refuses to touch an existing one."""
    from ..formats import signer_families

    if level not in LEVEL_PORTS:
        raise ConfigError(f"unknown cert level '{level}' (dep, nightly, release)")
    if (root / "sealbox.toml").exists() or (root.exists() and any(root.iterdir())):
        raise ConfigError(f"{root} already holds files; refusing to overwrite a deployment")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    ctx = DevContext(root, level)
    listen = listen or f"127.0.0.1:{LEVEL_PORTS[level]}"

    tls_ca = pki.make_ca(f"sealbox {level} dev TLS CA")
    server = pki.tls_server(tls_ca)
    ctx.write_file("tls/ca.pem", tls_ca.cert_pem())
    ctx.write_file("tls/server.pem", server.cert_pem() + tls_ca.cert_pem())
    ctx.write_file(
        "tls/server.key",
        server.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        0o600,
    )

    password = secrets.token_urlsafe(18)
    ctx.write_file("token-auth", f"issuer:{password}".encode(), 0o600)
    ctx.write_file("secrets/token-secret", base64.b64encode(os.urandom(32)), 0o600)

    format_sections: dict[str, Any] = {}
    for family in signer_families(list(formats) if formats is not None else None):
        if formats is not None and not set(family.formats) & set(formats):
            continue
        if family.available() is not None and not getattr(family, "dev_without_tool", False):
            continue
        for name, section in family.dev_setup(ctx).items():
            if formats is None or name in formats:
                format_sections[name] = section

    config: dict[str, Any] = {
        "server": {
            "level": level,
            "listen": listen,
            "data_dir": "data",
            "get_hold": 20.0,
            "max_file_age": 86400,
            "concurrency": 4,
            "min_filesize": 10,
        },
        "tls": {"cert": "tls/server.pem", "key": "tls/server.key"},
        "security": {
            "allowed_ips": ["127.0.0.0/8", "::1/128"],
            "token_issuer_ips": ["127.0.0.1/32", "::1/128"],
            "token_issuers": [f"issuer:{hash_password(password)}"],
            "token_secret_files": ["secrets/token-secret"],
            "max_token_age": 3600,
            "allowed_filenames": [r"^[\w][\w.+@-]*$"],
        },
        "keys": ctx.keys,
        "formats": format_sections,
    }
    ctx.write_file("sealbox.toml", tomli_w.dumps(config).encode())
    lines = "".join(f"{name}:{value}\n" for name, value in ctx.passphrases.items())
    ctx.write_file("passphrases", lines.encode(), 0o600)
    readme = (
        f"Public halves of the '{level}' signing keys and the verifier command for each.\n"
        "FILE is the signed output; FILE.asc / FILE.sig a detached signature.\n\n"
        + "\n".join(ctx.public_readme)
    )
    ctx.write_file("public/README", readme.encode())
    return root / "sealbox.toml"
