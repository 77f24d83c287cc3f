"""``sealbox init --dev DIR``: a complete, self-contained dev deployment for one cert level.

Layout::

    DIR/sealbox.toml      server config (level, listen address, keys, formats)
    DIR/tls/ca.pem        private CA clients pass as -c; tls/server.{pem,key}
    DIR/token-auth        user:password for POST /token (config keeps a salted hash)
    DIR/secrets/token-secret   HMAC secret (0600)
    DIR/keys/             passphrase-protected private keys (0600) and chains
    DIR/public/           what each independent verifier needs, named after the format;
                          signlog.pub: the signing log's checkpoint key (``sealbox log verify``)
    DIR/passphrases       key-name:passphrase (0600), for unattended dev start only

With ``--hsm`` (``init_dev(..., hsm=True)``) the keys of the formats that sign in-process are
generated inside a SoftHSM token instead, sensitive and non-extractable, and never written to a
file: ``DIR/hsm/softhsm2.conf`` and its token directory ``DIR/hsm/tokens``; the token's PIN is
each such key's line in ``DIR/passphrases``. The formats whose tools cannot use a PKCS#11 key
yet keep encrypted key files (the config says so beside each).
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
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from .. import pki
from ..errors import ConfigError
from ..keys.credentials import hash_password
from ..keys.signing import PrivateKey, SigningKey
from ..keys.softhsm import SoftToken, create_token, generate_key, store_certificate
from ..keys.store import FileKey, encrypt_pem
from ..signlog.log import public_key_text

LOG_KEY = "signlog"  # the signing log's Ed25519 checkpoint key (docs/signing-log.md)
LEVEL_PORTS = {"dep": 9110, "nightly": 9111, "release": 9112}


class DevContext:
    """What a signer family's ``dev_setup`` uses to make its keys and public files."""

    def __init__(self, root: Path, level: str, hsm: bool = False) -> None:
        self.dir = root
        self.level = level
        #: the deployment's SoftHSM token (``--hsm``) and its PIN
        self.token: SoftToken | None = None
        self._pin = b""
        if hsm:
            self._pin = secrets.token_urlsafe(24).encode()
            self.token = create_token(root / "hsm", f"sealbox-{level}", self._pin)
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

    def signing_key(
        self,
        name: str,
        bits: int = 2048,
        *,
        certificate: str | None = None,
        ekus: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.CODE_SIGNING,),
    ) -> SigningKey:
        """A new RSA key ``name`` for a format that signs through the key interface: in the
        deployment's token with ``--hsm``, else an encrypted key file. With ``certificate`` (a
        common name) it gets a certificate under the level's code-signing root, and the chain
        [certificate, root]. Returns the key as the server will hold it."""
        if self.token is None:
            key = pki.new_rsa(bits)
            issued = self.issue(certificate, key=key, ekus=ekus) if certificate else None
            chain = [issued.cert, self.code_signing_ca().cert] if issued else []
            self.add_key(name, key, chain)
            return FileKey(name, key, chain)
        from ..keys.pkcs11 import load_pkcs11_key

        key_id = bytes([len(self.keys) + 1])
        generate_key(self.token, self._pin, name, key_id, "rsa", bits)
        spec = self.token.spec(name, name, key_id)
        entry: dict[str, Any] = {
            "kind": "pkcs11",
            "module": str(spec.module),
            "module_env": dict(spec.env),
            "token": spec.token,
            "label": name,
            "id": key_id.hex(),
        }
        if certificate:
            public = load_pkcs11_key(spec, self._pin).public_key
            assert isinstance(public, rsa.RSAPublicKey)
            cert = pki.certify(self.code_signing_ca(), f"{certificate} ({self.level})", public, ekus=ekus)
            store_certificate(self.token, self._pin, name, key_id, cert)
            pem = b"".join(
                c.public_bytes(serialization.Encoding.PEM) for c in (cert, self.code_signing_ca().cert)
            )
            entry["chain"] = str(self.write_file(f"keys/{name}.chain.pem", pem).relative_to(self.dir))
            spec = self.token.spec(name, name, key_id, self.dir / entry["chain"])
        self.keys[name] = entry
        self.passphrases[name] = self._pin.decode()
        return load_pkcs11_key(spec, self._pin)

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
    root: Path,
    level: str = "dep",
    listen: str | None = None,
    formats: Sequence[str] | None = None,
    hsm: bool = False,
) -> Path:
    """Create a dev deployment in ``root``; refuses to touch an existing one. With ``hsm`` the
    in-process formats' keys are made in a SoftHSM token under ``root/hsm`` (one such
    deployment per process: SoftHSM reads its config once)."""
    from ..formats import signer_families

    if level not in LEVEL_PORTS:
        raise ConfigError(f"unknown cert level '{level}' (dep, nightly, release)")
    if (root / "sealbox.toml").exists() or (root.exists() and any(root.iterdir())):
        raise ConfigError(f"{root} already holds files; refusing to overwrite a deployment")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    ctx = DevContext(root, level, hsm)
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
        if family.available() is not None:
            continue
        for name, section in family.dev_setup(ctx).items():
            if formats is None or name in formats:
                format_sections[name] = section

    # The signing log's checkpoint key: a key file like the others, unlocked at start-up.
    log_key = Ed25519PrivateKey.generate()
    ctx.add_key(LOG_KEY, log_key)
    ctx.write_public(
        "signlog.pub",
        (public_key_text(log_key.public_key()) + "\n").encode(),
        "sealbox log verify data/log --public public/signlog.pub   (the signing log, offline)",
    )

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
        "log": {"enabled": True, "key": LOG_KEY},
    }
    ctx.write_file("sealbox.toml", _with_key_notes(tomli_w.dumps(config), ctx).encode())
    lines = "".join(f"{name}:{value}\n" for name, value in ctx.passphrases.items())
    ctx.write_file("passphrases", lines.encode(), 0o600)
    readme = (
        f"Public halves of the '{level}' signing keys and the verifier command for each.\n"
        "FILE is the signed output; FILE.asc / FILE.sig a detached signature.\n\n"
        + "\n".join(ctx.public_readme)
    )
    ctx.write_file("public/README", readme.encode())
    return root / "sealbox.toml"


def _with_key_notes(text: str, ctx: DevContext) -> str:
    """In an ``--hsm`` deployment, say where the keys are and why some are still files."""
    if ctx.token is None:
        return text
    head = (
        f"# Keys marked kind = \"pkcs11\" live in the SoftHSM token '{ctx.token.label}' "
        "(hsm/softhsm2.conf): generated there,\n"
        "# sensitive and non-extractable; its PIN is each such key's line in 'passphrases'.\n"
    )
    for name, entry in ctx.keys.items():
        if entry["kind"] != "pkcs11" and name != LOG_KEY:  # the log key signs in the server itself
            text = text.replace(
                f"[keys.{name}]\n",
                f"# a key FILE, not in the token: what uses '{name}' cannot use a PKCS#11 key yet\n"
                f"[keys.{name}]\n",
                1,
            )
    return head + text
