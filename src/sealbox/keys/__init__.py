"""Signing keys behind one interface (:class:`SigningKey`): encrypted key files unlocked into
memory at start-up, or keys inside a PKCS#11 token; passphrases and PINs; hand-off to tools."""

from __future__ import annotations

import sys

from ..errors import ConfigError
from .handoff import ToolSecrets
from .locations import Pkcs11Spec
from .passphrases import PassphraseSource
from .signing import FileHandoff, Pkcs11Handoff, SigningKey, ToolHandoff
from .store import FileKey, KeySpec, UnlockedKey
from .store import load_key as load_file_key

__all__ = [
    "FileHandoff",
    "FileKey",
    "KeySpec",
    "PassphraseSource",
    "Pkcs11Handoff",
    "Pkcs11Spec",
    "SigningKey",
    "ToolHandoff",
    "ToolSecrets",
    "UnlockedKey",
    "after_fork",
    "load_key",
]


def load_key(spec: KeySpec | Pkcs11Spec, secret: bytes) -> SigningKey:
    """Open a key where it lives: ``secret`` is a key file's passphrase or a token's PIN."""
    if isinstance(spec, KeySpec):
        return load_file_key(spec, secret)
    try:
        from .pkcs11 import load_pkcs11_key  # the PKCS#11 binding only when a key needs it
    except ImportError as e:
        raise ConfigError(f"key '{spec.name}' is a PKCS#11 key, but {e.name} is not installed") from None
    return load_pkcs11_key(spec, secret)


def after_fork() -> None:
    """In a forked signing process, before its first job: what does not survive a fork (PKCS#11
    sessions) is opened anew for this process."""
    pkcs11_backend = sys.modules.get(f"{__name__}.pkcs11")  # loaded only if a key uses it
    if pkcs11_backend is not None:
        pkcs11_backend.after_fork()
