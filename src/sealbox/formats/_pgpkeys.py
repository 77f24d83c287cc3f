"""The OpenPGP key of a format that signs OpenPGP (gpg, rpm, deb, apt): loaded for signing, made
in dev, and handed to the independent verifiers. The private half stays behind the key interface."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, VerificationFailed
from ..fsutil import read_small, remove_tree
from ..keys import SigningKey
from . import _openpgp
from .base import FormatSettings, KeyResolver, public_file

if TYPE_CHECKING:
    from ..deploy.context import DevContext


def load(settings: FormatSettings, keys: KeyResolver) -> tuple[SigningKey, _openpgp.PublicKey]:
    """The format's RSA key and its OpenPGP public key (option ``public_key``), which must match."""
    key = keys(settings.require_key())
    key.require(settings.name, "rsa")  # sealbox's OpenPGP packets are RSA ones
    path = settings.path("public_key")
    assert path is not None
    try:
        pub = _openpgp.PublicKey.from_armored(read_small(path))
    except OSError as e:
        raise ConfigError(f"format '{settings.name}': cannot read {path}: {e.strerror}") from None
    except ConfigError as e:  # not a key block (or not a small file): name the option and the file
        raise ConfigError(f"format '{settings.name}': public_key {path}: {e}") from None
    if not pub.matches(key.public_key):
        raise ConfigError(f"format '{settings.name}': {path} is not the public half of key '{settings.key}'")
    return key, pub


def dev_key(ctx: DevContext, name: str, what: str, readme: str) -> str:
    """A new 3072-bit key ``name`` (in the token with ``--hsm``) and its public key block
    ``public/<name>.asc``; returns the path of that file, relative to the deployment."""
    key = ctx.signing_key(name, 3072)
    block = _openpgp.public_key_block(
        key, f"sealbox {ctx.level} {what} <sealbox-{ctx.level}-{name}@example.invalid>", int(time.time())
    )
    ctx.write_public(f"{name}.asc", block, readme)
    return f"public/{name}.asc"


def public_key(public_dir: Path, name: str) -> tuple[_openpgp.PublicKey, bytes]:
    """The verifier's view of ``public/<name>.asc``: the key, and the block as a binary keyring."""
    path = public_file(public_dir, f"{name}.asc")
    try:
        armoured = path.read_bytes()
        return _openpgp.PublicKey.from_armored(armoured), _openpgp.dearmor(armoured)
    except (OSError, ConfigError, ValueError) as e:
        raise VerificationFailed(f"cannot read the public key {path}: {e}") from None


@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A private temporary folder for a verifier (keyrings, databases, a home), removed after."""
    # short: gpg (behind gpgv and debsig-verify) keeps socket paths under ~107 characters
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        remove_tree(path)
