"""The one key interface formats sign through, whatever holds the key (a file, a PKCS#11 token).

A format gets a :class:`SigningKey` from its key resolver and only ever asks it to sign (a
digest or data, with a named hash and padding), for its public key and certificate chain, or,
for a format whose external tool must reach the key itself, for a :meth:`~SigningKey.tool_handoff`
in the tool's own terms. No format sees a private key object or serialises a key.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import pkcs12

from ..errors import ConfigError, SigningFailed

HashName = Literal["sha1", "sha256", "sha384", "sha512"]
#: ``pss`` is RSA-PSS with MGF1 over the same hash and a salt as long as the digest
Padding = Literal["pkcs1v15", "pss", "ecdsa", "ed25519"]
Algorithm = Literal["rsa", "ec", "ed25519"]
Backend = Literal["file", "pkcs11"]
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

HASHES: dict[str, type[hashes.SHA1 | hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
#: DER DigestInfo prefixes (RFC 8017 9.2 note 1): what PKCS#1 v1.5 signs ahead of the digest
DIGEST_INFO: dict[str, bytes] = {
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
#: the padding a test signature (and a format that does not care) uses for each algorithm
DEFAULT_PADDING: dict[str, Padding] = {"rsa": "pkcs1v15", "ec": "ecdsa", "ed25519": "ed25519"}
_PADDINGS: dict[str, frozenset[str]] = {
    "rsa": frozenset({"pkcs1v15", "pss"}),
    "ec": frozenset({"ecdsa"}),
    "ed25519": frozenset({"ed25519"}),
}


def algorithm_of(public_key: PublicKey) -> Algorithm:
    """The key's algorithm family: ``rsa``, ``ec`` or ``ed25519``."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "ec"
    return "ed25519"


def _spki(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def pss(hash_name: str) -> padding.PSS:
    """RSA-PSS as :data:`Padding` ``pss`` means it: MGF1 over the hash, salt = digest length."""
    algorithm = HASHES[hash_name]()
    return padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)


def verify_digest(
    public_key: PublicKey, signature: bytes, digest: bytes, hash_name: HashName, pad: Padding
) -> bool:
    """Whether ``signature`` over ``digest`` (or, for ``ed25519``, over the message) checks out."""
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, digest)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, digest, ec.ECDSA(utils.Prehashed(HASHES[hash_name]())))
        else:
            scheme = pss(hash_name) if pad == "pss" else padding.PKCS1v15()
            public_key.verify(signature, digest, scheme, utils.Prehashed(HASHES[hash_name]()))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class FileHandoff:
    """How an external tool reaches a file key: serialised here, for a pipe only
    (:class:`~sealbox.keys.ToolSecrets`), never for a file, argv or the environment."""

    name: str
    chain: tuple[x509.Certificate, ...]
    _key: PrivateKey = field(repr=False)

    def pkcs12(self, friendly_name: bytes, encryption: serialization.KeySerializationEncryption) -> bytes:
        """A PKCS#12 keystore: the key, its certificate and the rest of the chain."""
        if not self.chain:
            raise ConfigError(f"key '{self.name}' has no certificate configured")
        return pkcs12.serialize_key_and_certificates(
            friendly_name, self._key, self.chain[0], list(self.chain[1:]) or None, encryption
        )

    def pkcs8_pem(self) -> bytes:
        """The key as unencrypted PKCS#8 PEM: only ever written into a pipe."""
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


@dataclass(frozen=True)
class Pkcs11Handoff:
    """How an external tool reaches a PKCS#11 key: the module, a PKCS#11 URI without the PIN
    (OpenSSL's engine), the key's label and its token's slot (Java's SunPKCS11 names keys so),
    the environment the module needs (e.g. ``SOFTHSM2_CONF``) and the PIN, for a pipe only."""

    name: str
    chain: tuple[x509.Certificate, ...]
    module: str
    uri: str
    label: str | None
    slot: int
    env: Mapping[str, str]
    pin: bytes = field(repr=False)


ToolHandoff = FileHandoff | Pkcs11Handoff


class SigningKey(ABC):
    """A private key that signs where it lives, with its public key and certificate chain.

    Signing raises :class:`~sealbox.errors.SigningFailed` when the key cannot be reached now
    (a token gone): retryable for a job, a failed check for the heartbeat."""

    #: where the key lives: ``file`` (decrypted in memory) or ``pkcs11`` (a token)
    backend: Backend

    def __init__(self, name: str, public_key: PublicKey, chain: tuple[x509.Certificate, ...]) -> None:
        self.name = name
        self.public_key = public_key
        self.chain = chain
        self.algorithm = algorithm_of(public_key)
        #: bits of an RSA modulus or EC curve; 256 for Ed25519
        self.key_size = 256 if isinstance(public_key, ed25519.Ed25519PublicKey) else public_key.key_size

    @property
    def certificate(self) -> x509.Certificate:
        """The leaf certificate; ConfigError if the key has no chain."""
        if not self.chain:
            raise ConfigError(f"key '{self.name}' has no certificate configured")
        return self.chain[0]

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the DER SubjectPublicKeyInfo, hex."""
        return hashlib.sha256(_spki(self.public_key)).hexdigest()

    def public_der(self) -> bytes:
        """The DER SubjectPublicKeyInfo."""
        return _spki(self.public_key)

    def require(self, fmt: str, algorithm: Algorithm, min_bits: int = 0) -> None:
        """Refuse (naming the format and key) a key of another algorithm than ``fmt`` signs
        with, or a shorter one than it accepts: a rule of the format, whatever the backend."""
        if self.algorithm != algorithm:
            raise ConfigError(f"format '{fmt}': key '{self.name}' must be an {algorithm.upper()} key")
        if self.key_size < min_bits:
            raise ConfigError(f"format '{fmt}': key '{self.name}' is shorter than {min_bits} bits")

    def sign_digest(self, digest: bytes, hash_name: HashName, pad: Padding) -> bytes:
        """Sign a digest made with ``hash_name`` (RSA: PKCS#1 v1.5 or PSS; EC: DER ECDSA).

        The signature is checked with the public half before it is returned (unless the
        backend's library checked it already): a faulty one (a hardware or library fault)
        never leaves the server. Raises :class:`~sealbox.errors.SigningFailed` for one (another
        attempt may do)."""
        self._check(hash_name, pad)
        if pad == "ed25519":
            raise ConfigError(f"key '{self.name}': Ed25519 signs messages, not digests")
        if len(digest) != HASHES[hash_name].digest_size:
            raise ValueError(
                f"a {hash_name} digest is {HASHES[hash_name].digest_size} bytes, not {len(digest)}"
            )
        return self._checked(self._sign_digest(digest, hash_name, pad), digest, hash_name, pad)

    def sign(self, data: bytes, hash_name: HashName, pad: Padding) -> bytes:
        """Sign a message (hashed here with ``hash_name``, except for Ed25519); checked as
        :meth:`sign_digest` checks."""
        self._check(hash_name, pad)
        if pad == "ed25519":
            return self._checked(self._sign_message(data), data, hash_name, pad)
        digest = hashlib.new(hash_name, data).digest()
        return self._checked(self._sign_digest(digest, hash_name, pad), digest, hash_name, pad)

    def _checked(self, signature: bytes, signed: bytes, hash_name: HashName, pad: Padding) -> bytes:
        if not self._self_checked(pad) and not self.verifies(signature, signed, hash_name, pad):
            raise SigningFailed(f"key '{self.name}' made a {pad} signature that does not verify")
        return signature

    def _self_checked(self, pad: Padding) -> bool:
        """Whether the backend's own library checks its ``pad`` signatures before returning
        them (a second check here would only cost time). None does, unless it says so."""
        return False

    def verifies(self, signature: bytes, digest: bytes, hash_name: HashName, pad: Padding) -> bool:
        """Whether ``signature`` over ``digest`` checks out with this key's public half (a
        guard against faulty signatures before they leave the server)."""
        return verify_digest(self.public_key, signature, digest, hash_name, pad)

    def _check(self, hash_name: str, pad: str) -> None:
        if hash_name not in HASHES:
            raise ValueError(f"unknown hash '{hash_name}'")
        if pad not in _PADDINGS[self.algorithm]:
            raise ConfigError(
                f"key '{self.name}' is an {self.algorithm.upper()} key: it cannot sign with {pad}"
            )

    @abstractmethod
    def _sign_digest(self, digest: bytes, hash_name: HashName, pad: Padding) -> bytes: ...

    def _sign_message(self, data: bytes) -> bytes:
        raise ConfigError(f"key '{self.name}': Ed25519 is not supported by the {self.backend} backend")

    @abstractmethod
    def tool_handoff(self) -> ToolHandoff:
        """What an external tool needs to reach this key, in the tool's own terms."""
