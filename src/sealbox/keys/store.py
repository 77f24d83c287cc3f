"""Loading encrypted private keys (PKCS#8 PEM or PKCS#12) and their certificate chains."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from ..errors import ConfigError, KeyUnlockError

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class KeySpec:
    """Where a key lives. ``path`` is encrypted PKCS#8 PEM (kind ``pem``) or PKCS#12."""

    name: str
    path: Path
    kind: Literal["pem", "pkcs12"] = "pem"
    chain: Path | None = None  # PEM certificates, leaf first (for kind ``pem``)


@dataclass(frozen=True)
class UnlockedKey:
    """A private key in memory with its certificate chain (leaf first, may be empty)."""

    name: str
    private_key: PrivateKey
    chain: tuple[x509.Certificate, ...] = field(default=())

    @property
    def rsa(self) -> rsa.RSAPrivateKey:
        if not isinstance(self.private_key, rsa.RSAPrivateKey):
            raise ConfigError(f"key '{self.name}' must be an RSA key")
        return self.private_key

    @property
    def certificate(self) -> x509.Certificate:
        if not self.chain:
            raise ConfigError(f"key '{self.name}' has no certificate configured")
        return self.chain[0]


def load_certificates(path: Path) -> tuple[x509.Certificate, ...]:
    try:
        return tuple(x509.load_pem_x509_certificates(path.read_bytes()))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read certificates from {path}: {e}") from None


def load_key(spec: KeySpec, passphrase: bytes) -> UnlockedKey:
    """Decrypt a key; a wrong passphrase raises :class:`KeyUnlockError` naming the key."""
    try:
        data = spec.path.read_bytes()
    except OSError as e:
        raise ConfigError(f"key '{spec.name}': cannot read {spec.path}: {e.strerror}") from None
    try:
        if spec.kind == "pkcs12":
            key, cert, extra = pkcs12.load_key_and_certificates(data, passphrase)
            if key is None:
                raise KeyUnlockError(f"key '{spec.name}': {spec.path} holds no private key")
            chain = tuple(c for c in (cert, *extra) if c is not None)
        else:
            key = serialization.load_pem_private_key(data, passphrase or None)
            chain = load_certificates(spec.chain) if spec.chain else ()
    except (ValueError, TypeError):
        raise KeyUnlockError(
            f"key '{spec.name}': wrong passphrase (or unreadable key) for {spec.path}"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise KeyUnlockError(f"key '{spec.name}': unsupported key type {type(key).__name__}")
    return UnlockedKey(name=spec.name, private_key=key, chain=chain)


def encrypt_pem(key: PrivateKey, passphrase: bytes) -> bytes:
    """Serialize a private key as encrypted PKCS#8 PEM (AES-256)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )
