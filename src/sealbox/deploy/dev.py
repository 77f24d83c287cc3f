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

With ``--hsm`` (``init_dev(..., hsm=True)``) the formats' keys and the signing log's Ed25519
key (in a token of its own) are generated inside SoftHSM tokens instead, sensitive and
non-extractable, and never written to a file: ``DIR/hsm/softhsm2.conf`` and its token
directory ``DIR/hsm/tokens``; the tokens' PIN is each such key's line in ``DIR/passphrases``.
Authenticode, APK and JAR reach their keys there through their tools' own PKCS#11 support;
only macOS signing, whose library has no PKCS#11, keeps an encrypted key file (the config says
so beside it).
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..errors import ConfigError
from ..server.credentials import hash_password
from ..signlog.log import public_key_text
from . import pki
from .context import DevContext

LOG_KEY = "signlog"  # the signing log's Ed25519 checkpoint key (docs/signing-log.md)
LEVEL_PORTS = {"dep": 9110, "nightly": 9111, "release": 9112}


def init_dev(
    root: Path,
    level: str = "dep",
    listen: str | None = None,
    formats: Sequence[str] | None = None,
    hsm: bool = False,
) -> Path:
    """Create a dev deployment in ``root``; refuses to touch an existing one. With ``hsm`` the
    formats' keys (all but macOS's) are made in a SoftHSM token under ``root/hsm`` (one such
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

    # The signing log's checkpoint key, unlocked and proven at start-up like the others: with
    # --hsm generated in a token (the server signs checkpoints there, CKM_EDDSA), else a file. A
    # token of its own: libp11 (osslsigncode's engine) cannot load any key from a token that
    # also holds an Ed25519 key.
    log_key = ctx.signing_key(LOG_KEY, algorithm="ed25519", token=ctx.extra_token("log"))
    assert isinstance(log_key.public_key, Ed25519PublicKey)
    ctx.write_public(
        "signlog.pub",
        (public_key_text(log_key.public_key) + "\n").encode(),
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
        if entry["kind"] != "pkcs11":
            text = text.replace(
                f"[keys.{name}]\n",
                f"# a key FILE, not in the token: what uses '{name}' cannot use a PKCS#11 key\n"
                f"[keys.{name}]\n",
                1,
            )
    return head + text
