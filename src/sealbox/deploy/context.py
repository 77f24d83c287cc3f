"""What a signer family's ``dev_setup`` gets: :class:`DevContext` makes a dev deployment's keys
(in files or a SoftHSM token), certificates and public files. It imports no signer code, so the
formats can name it without an import cycle."""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..keys import FileKey, PrivateKey, SigningKey, encrypt_pem
from ..keys.softhsm import SoftToken, create_token, generate_key, store_certificate
from . import pki


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
        """A certificate under the level's code-signing root (see :func:`sealbox.deploy.pki.issue`)."""
        return pki.issue(self.code_signing_ca(), f"{cn} ({self.level})", **kw)

    def self_signed(self, key: SigningKey, cn: str) -> x509.Certificate:
        """A self-signed certificate for ``key``, wherever the key lives (see :func:`pki.self_signed`)."""
        return pki.self_signed(key, cn)

    def signing_key(
        self,
        name: str,
        bits: int = 2048,
        *,
        algorithm: Literal["rsa", "ec", "ed25519"] = "rsa",
        certificate: str | None = None,
        ekus: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.CODE_SIGNING,),
        token: SoftToken | None = None,
    ) -> SigningKey:
        """A new RSA key ``name`` (``algorithm="ec"``: an EC P-256 key, ``"ed25519"``: an Ed25519
        key, ``bits`` unused): in the deployment's token with ``--hsm``, else an encrypted key
        file. With ``certificate`` (a common name; RSA only) it gets a certificate under the
        level's code-signing root, and the chain [certificate, root]; else :meth:`add_chain` may
        give it one. With ``--hsm`` and ``token`` (from :meth:`extra_token`), the key is made
        there instead. Returns the key as the server will hold it."""
        key: SigningKey
        if self.token is None:
            private: PrivateKey = (
                ec.generate_private_key(ec.SECP256R1())
                if algorithm == "ec"
                else ed25519.Ed25519PrivateKey.generate()
                if algorithm == "ed25519"
                else pki.new_rsa(bits)
            )
            self.add_key(name, private)
            key = FileKey(name, private)
        else:
            from ..keys import load_key

            token = token or self.token
            key_id = bytes([len(self.keys) + 1])
            generate_key(token, self._pin, name, key_id, algorithm, bits)
            self.keys[name] = {
                "kind": "pkcs11",
                "module": str(token.module),
                "module_env": dict(token.env),
                "token": token.label,
                "label": name,
                "id": key_id.hex(),
            }
            self.passphrases[name] = self._pin.decode()
            key = load_key(token.spec(name, name, key_id), self._pin)
        if certificate is None:
            return key
        public = key.public_key
        assert isinstance(public, rsa.RSAPublicKey)
        ca = self.code_signing_ca()
        return self.add_chain(
            key, [pki.certify(ca, f"{certificate} ({self.level})", public, ekus=ekus), ca.cert]
        )

    def extra_token(self, suffix: str) -> SoftToken | None:
        """With ``--hsm``, another token beside the deployment's (same SoftHSM directory and PIN),
        labelled ``sealbox-LEVEL-SUFFIX``, for keys the signing tools must not see; else None."""
        if self.token is None:
            return None
        return create_token(self.dir / "hsm", f"{self.token.label}-{suffix}", self._pin)

    def add_chain(self, key: SigningKey, chain: Sequence[x509.Certificate]) -> SigningKey:
        """Give a key made by :meth:`signing_key` its certificate chain (leaf first): a chain
        file beside it and, for a key in the token, the leaf on the token too, under the key's
        label and id (where tools that speak PKCS#11 look for it). Returns the key as the
        server will hold it."""
        entry = self.keys[key.name]
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
        entry["chain"] = str(self.write_file(f"keys/{key.name}.chain.pem", pem).relative_to(self.dir))
        if isinstance(key, FileKey):
            return key.with_chain(chain)
        from ..keys import load_key

        assert self.token is not None
        key_id = bytes.fromhex(entry["id"])
        store_certificate(self.token, self._pin, entry["label"], key_id, chain[0])
        return load_key(
            self.token.spec(key.name, entry["label"], key_id, self.dir / entry["chain"]), self._pin
        )

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
