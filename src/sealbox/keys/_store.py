"""The file backend: encrypted private keys (PKCS#8 PEM or PKCS#12) and their certificate chains,
decrypted into memory at start-up."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import pkcs12

from ..errors import ConfigError, KeyUnlockError
from ..fsutil import read_small
from ._signing import HASHES, FileHandoff, HashName, Padding, PrivateKey, SigningKey, pss


@dataclass(frozen=True)
class KeySpec:
    """Where a key lives. ``path`` is encrypted PKCS#8 PEM (kind ``pem``) or PKCS#12."""

    name: str
    path: Path
    kind: Literal["pem", "pkcs12"] = "pem"
    chain: Path | None = None  # PEM certificates, leaf first (for kind ``pem``)


class FileKey(SigningKey):
    """A key decrypted from its file into memory, with its certificate chain (leaf first)."""

    backend = "file"

    def __init__(self, name: str, private_key: PrivateKey, chain: Sequence[x509.Certificate] = ()) -> None:
        super().__init__(name, private_key.public_key(), tuple(chain))
        self._key = private_key

    def _sign_digest(self, digest: bytes, hash_name: HashName, pad: Padding) -> bytes:
        prehashed = utils.Prehashed(HASHES[hash_name]())
        key = self._key
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(digest, pss(hash_name) if pad == "pss" else padding.PKCS1v15(), prehashed)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key.sign(digest, ec.ECDSA(prehashed))

    def _sign_message(self, data: bytes) -> bytes:
        assert isinstance(self._key, ed25519.Ed25519PrivateKey)
        return self._key.sign(data)

    def _self_checked(self, pad: Padding) -> bool:
        # OpenSSL checks every RSA private-key result (crypto/rsa/rsa_ossl.c, rsa_ossl_mod_exp:
        # a miscalculated CRT result is recomputed, never returned). It checks no ECDSA or
        # Ed25519 signature (a faulty deterministic Ed25519 one can give the key away).
        return self.algorithm == "rsa"

    def tool_handoff(self) -> FileHandoff:
        """The in-memory key and its chain, for tools that are given key material."""
        return FileHandoff(self.name, self.chain, self._key)

    def with_chain(self, chain: Sequence[x509.Certificate]) -> FileKey:
        """The same key with the certificate chain ``chain`` (leaf first)."""
        return FileKey(self.name, self._key, chain)


#: the most a key or certificate file may hold (a chain of a few certificates is far less)
KEY_FILE_LIMIT = 1024 * 1024
#: the name this backend had before there were others
UnlockedKey = FileKey


def load_certificates(path: Path) -> tuple[x509.Certificate, ...]:
    """The PEM certificates in ``path``, in file order; ConfigError if unreadable."""
    try:
        return tuple(x509.load_pem_x509_certificates(read_small(path, KEY_FILE_LIMIT)))
    except (OSError, ValueError, ConfigError) as e:
        raise ConfigError(f"cannot read certificates from {path}: {e}") from None


def load_key(spec: KeySpec, passphrase: bytes) -> FileKey:
    """Decrypt a key; a wrong passphrase raises :class:`KeyUnlockError` naming the key."""
    try:
        data = read_small(spec.path, KEY_FILE_LIMIT)
    except OSError as e:
        raise ConfigError(f"key '{spec.name}': cannot read {spec.path}: {e.strerror}") from None
    except ConfigError as e:
        raise ConfigError(f"key '{spec.name}': {e}") from None
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
    return FileKey(spec.name, key, chain)


def encrypt_pem(key: PrivateKey, passphrase: bytes) -> bytes:
    """Serialize a private key as encrypted PKCS#8 PEM (AES-256)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )
