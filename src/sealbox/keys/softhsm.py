"""Provisioning SoftHSM tokens for dev deployments and tests: a private config and token
directory, keys generated inside the token (non-extractable, sensitive), certificates beside them.

Every PIN stays in this process: ``softhsm2-util`` would take them on its command line (or a
terminal), so the token is initialised through the module itself (``C_InitToken``).
"""

from __future__ import annotations

import ctypes
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..errors import ConfigError
from ._locations import Pkcs11Spec

CKF_TOKEN_INITIALIZED = 0x400


@dataclass(frozen=True)
class SoftToken:
    """A SoftHSM token with its own config file (``SOFTHSM2_CONF``) and token directory."""

    module: Path
    conf: Path
    label: str

    @property
    def env(self) -> dict[str, str]:
        """The environment the SoftHSM module reads its config from."""
        return {"SOFTHSM2_CONF": str(self.conf)}

    def spec(
        self, name: str, label: str, key_id: bytes | None = None, chain: Path | None = None
    ) -> Pkcs11Spec:
        """Where the key ``label`` of this token lives, for the server's key ``name``."""
        return Pkcs11Spec(name, self.module, self.label, label, key_id, chain, self.env)


def write_config(hsm_dir: Path) -> Path:
    """``hsm_dir/softhsm2.conf`` naming ``hsm_dir/tokens`` (private: 0700)."""
    tokens = hsm_dir / "tokens"
    tokens.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = hsm_dir / "softhsm2.conf"
    conf.write_text(
        f"# SoftHSM for this deployment: SOFTHSM2_CONF={conf.resolve()}\n"
        f"directories.tokendir = {tokens.resolve()}\n"
        "objectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
    )
    return conf.resolve()


def create_token(hsm_dir: Path, label: str, pin: bytes) -> SoftToken:
    """A new token ``label`` in a new SoftHSM directory, its user PIN ``pin`` (the SO PIN is
    random and not kept: a dev token is made anew, not administered)."""
    from . import _pkcs11 as p11

    module = p11.softhsm_module()
    if module is None:
        raise ConfigError("SoftHSM is not installed (apt-get install softhsm2)")
    if len(label.encode()) > 32:
        raise ConfigError(f"token label '{label}' is longer than 32 bytes")
    conf = write_config(hsm_dir)
    token = SoftToken(module, conf, label)
    loaded = p11._module(module, token.env)
    with loaded.lock:
        loaded.fresh()
        free = [s for s in loaded.lib.get_slots() if not s.get_token().flags & CKF_TOKEN_INITIALIZED]
        if not free:
            raise ConfigError(f"no free SoftHSM slot in {conf}")
        so_pin = secrets.token_urlsafe(24).encode()
        _init_token(module, free[0].slot_id, so_pin, label)
        with loaded.lib.get_token(token_label=label).open(rw=True, so_pin=so_pin.decode()) as so:
            so.init_pin(pin.decode())
        # SoftHSM gives an initialised token a new slot id, which this process sees only once it
        # lists the slots afresh: tools told the slot (Java's SunPKCS11) look there
        loaded.reset()
    return token


def _init_token(module: Path, slot_id: int, so_pin: bytes, label: str) -> None:
    """``C_InitToken`` through ctypes (python-pkcs11 does not wrap it). The module is already
    initialised by python-pkcs11 in this process, so this is a plain call into it."""
    lib = ctypes.CDLL(str(module))
    lib.C_InitToken.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    lib.C_InitToken.restype = ctypes.c_ulong
    padded = label.encode().ljust(32, b" ")
    rv = lib.C_InitToken(slot_id, so_pin, len(so_pin), padded)
    if rv != 0:
        raise ConfigError(f"C_InitToken failed: CKR 0x{rv:x}")


def _rw_session(token: SoftToken, pin: bytes) -> Any:
    """A read-write session sharing this process's login to the token."""
    from . import _pkcs11 as p11

    loaded = p11._module(token.module, token.env)
    loaded.session(token.label, pin, "provisioning")  # logs in (once per process and token)
    return loaded.lib.get_token(token_label=token.label).open(rw=True)


def generate_key(
    token: SoftToken,
    pin: bytes,
    label: str,
    key_id: bytes,
    algorithm: Literal["rsa", "ec", "ed25519"] = "rsa",
    bits: int = 2048,
) -> None:
    """A key pair generated inside the token: the private half sensitive and non-extractable
    (``bits`` only for RSA; EC is P-256)."""
    import pkcs11
    from pkcs11 import Attribute, KeyType

    private = {
        Attribute.SIGN: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.PRIVATE: True,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
    }
    with _rw_session(token, pin) as session:
        if algorithm in ("ec", "ed25519"):
            # Ed25519 by its OID (1.3.101.112), the form SoftHSM 2.6 takes
            kind, curve = (
                (KeyType.EC, "secp256r1") if algorithm == "ec" else (KeyType.EC_EDWARDS, "1.3.101.112")
            )
            der = pkcs11.util.ec.encode_named_curve_parameters(curve)
            params = session.create_domain_parameters(kind, {Attribute.EC_PARAMS: der}, local=True)
            params.generate_keypair(store=True, label=label, id=key_id, private_template=private)
        else:
            session.generate_keypair(
                KeyType.RSA, bits, store=True, label=label, id=key_id, private_template=private
            )


def store_certificate(
    token: SoftToken, pin: bytes, label: str, key_id: bytes, cert: x509.Certificate
) -> None:
    """The key's certificate on the token, under the key's label and id (where tools look)."""
    from pkcs11 import Attribute, CertificateType, ObjectClass

    with _rw_session(token, pin) as session:
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.CERTIFICATE,
                Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: False,
                Attribute.LABEL: label,
                Attribute.ID: key_id,
                Attribute.SUBJECT: cert.subject.public_bytes(),
                Attribute.VALUE: cert.public_bytes(serialization.Encoding.DER),
            }
        )
