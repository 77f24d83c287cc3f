"""Signing keys behind one interface (:class:`SigningKey`): encrypted key files unlocked into
memory at start-up, or keys inside a PKCS#11 token; passphrases and PINs; hand-off to tools."""

from __future__ import annotations

import sys

from ..errors import ConfigError
from ._handoff import ToolSecrets
from ._locations import Pkcs11Spec
from ._passphrases import PassphraseSource
from ._signing import (
    DEFAULT_PADDING,
    FileHandoff,
    HashName,
    Pkcs11Handoff,
    PrivateKey,
    PublicKey,
    SigningKey,
    ToolHandoff,
)
from ._store import FileKey, KeySpec, UnlockedKey, encrypt_pem, load_certificates
from ._store import load_key as load_file_key

__all__ = [
    "DEFAULT_PADDING",
    "FileHandoff",
    "FileKey",
    "HashName",
    "KeySpec",
    "PassphraseSource",
    "Pkcs11Handoff",
    "Pkcs11Spec",
    "PrivateKey",
    "PublicKey",
    "SigningKey",
    "ToolHandoff",
    "ToolSecrets",
    "UnlockedKey",
    "after_fork",
    "encrypt_pem",
    "load_certificates",
    "load_key",
]


def load_key(spec: KeySpec | Pkcs11Spec, secret: bytes) -> SigningKey:
    """Open a key where it lives: ``secret`` is a key file's passphrase or a token's PIN."""
    if isinstance(spec, KeySpec):
        return load_file_key(spec, secret)
    try:
        from ._pkcs11 import load_pkcs11_key  # the PKCS#11 binding only when a key needs it
    except ImportError as e:
        raise ConfigError(f"key '{spec.name}' is a PKCS#11 key, but {e.name} is not installed") from None
    return load_pkcs11_key(spec, secret)


def after_fork() -> None:
    """In a forked signing process, before its first job: what does not survive a fork (PKCS#11
    sessions) is opened anew for this process."""
    pkcs11_backend = sys.modules.get(f"{__name__}.pkcs11")  # loaded only if a key uses it
    if pkcs11_backend is not None:
        pkcs11_backend.after_fork()
