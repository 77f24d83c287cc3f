"""The PKCS#11 backend: keys that sign inside a token (an HSM, a smartcard, SoftHSM) and never leave it:
RSA, EC and Ed25519 (CKM_EDDSA, PKCS#11 3.0; SoftHSM 2.6 has it).

One library (module) is loaded once per process with the environment it needs (SoftHSM reads
``SOFTHSM2_CONF`` when it initialises); keys on one token share one logged-in session. All use
of a module is serialised by its lock: a session runs one operation at a time, and re-opening
re-initialises the whole module.

Sessions do not survive a fork: a process that finds itself forked (a signing worker)
re-initialises the module and opens its own sessions before its first signature. A failed
operation re-initialises the module and tries once more (a lost session comes back); if the
token is still unreachable the signature fails with :class:`~sealbox.errors.SigningFailed`,
which jobs treat as retryable and the heartbeat as an error.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, utils
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import PKCS11Error

from ..errors import ConfigError, KeyUnlockError, SigningFailed
from ._locations import Pkcs11Spec
from ._signing import DIGEST_INFO, HashName, Padding, Pkcs11Handoff, PublicKey, SigningKey
from ._store import load_certificates

log = logging.getLogger("sealbox.keys")
T = TypeVar("T")
_HASH_MECHANISMS = {
    "sha1": (Mechanism.SHA_1, pkcs11.MGF.SHA1),
    "sha256": (Mechanism.SHA256, pkcs11.MGF.SHA256),
    "sha384": (Mechanism.SHA384, pkcs11.MGF.SHA384),
    "sha512": (Mechanism.SHA512, pkcs11.MGF.SHA512),
}
#: where Debian (and most distributions) put SoftHSM's module
SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


def softhsm_module() -> Path | None:
    """SoftHSM's PKCS#11 module on this host, if installed."""
    return next((Path(p) for p in SOFTHSM_MODULES if Path(p).is_file()), None)


def describe(e: BaseException) -> str:
    """python-pkcs11's exceptions often carry no message: name the return value too."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _Module:
    """A PKCS#11 library in this process and its logged-in sessions, by token label."""

    def __init__(self, path: str, env: Mapping[str, str]) -> None:
        self.path = path
        self.env = dict(env)
        self.lock = threading.RLock()
        self.pid = os.getpid()
        #: bumped whenever the library is re-initialised: every session before it is gone
        self.generation = 0
        self._sessions: dict[str, tuple[Any, bytes]] = {}
        try:
            with self._environment():
                self.lib = pkcs11.lib(path)
        except PKCS11Error as e:
            raise ConfigError(f"cannot load PKCS#11 module {path}: {describe(e)}") from None

    @contextlib.contextmanager
    def _environment(self) -> Iterator[None]:
        """The module's variables, set only while it initialises (it reads them then): they
        stay out of the environment every other child of this process inherits."""
        before = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            yield
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def fresh(self) -> None:
        """After a fork, before anything else: this process's own initialisation."""
        if self.pid != os.getpid():
            self.pid = os.getpid()
            self.reset()

    def reset(self) -> None:
        """Re-initialise the library: every session (ours or inherited) is dropped."""
        self.generation += 1
        self._sessions.clear()
        with contextlib.suppress(PKCS11Error):  # not initialised (a failed re-initialisation)
            self.lib.finalize()
        with self._environment():
            self.lib.initialize()

    def session(self, token_label: str, pin: bytes, key_name: str) -> Any:
        """The logged-in session for ``token_label``; one token has one user PIN, so a key
        whose PIN differs from the one that logged in has the wrong PIN."""
        self.fresh()
        known = self._sessions.get(token_label)
        if known is not None:
            session, logged_in_with = known
            if not hmac.compare_digest(pin, logged_in_with):
                raise KeyUnlockError(f"key '{key_name}': wrong PIN for token '{token_label}'")
            return session
        token = self.lib.get_token(token_label=token_label)
        try:
            session = token.open(user_pin=pin.decode("utf-8"))
        except (pkcs11.PinIncorrect, pkcs11.PinLenRange, pkcs11.PinInvalid, UnicodeDecodeError):
            raise KeyUnlockError(f"key '{key_name}': wrong PIN for token '{token_label}'") from None
        except pkcs11.PinLocked:
            raise KeyUnlockError(f"key '{key_name}': the PIN of token '{token_label}' is locked") from None
        self._sessions[token_label] = (session, pin)
        return session


_modules: dict[str, _Module] = {}
_modules_lock = threading.Lock()


def _module(path: Path, env: Mapping[str, str]) -> _Module:
    with _modules_lock:
        module = _modules.get(str(path))
        if module is None:
            module = _modules[str(path)] = _Module(str(path), env)
        elif module.env != dict(env):
            raise ConfigError(
                f"PKCS#11 module {path} is already loaded with another environment "
                f"({module.env}): every key of one module must use the same module_env"
            )
        return module


def after_fork() -> None:
    """In a freshly forked process: open this process's own sessions (a failure is left to the
    next signature, which tries again and reports it)."""
    for module in list(_modules.values()):
        with module.lock, contextlib.suppress(PKCS11Error):
            module.fresh()


def _ed25519_public(pub: Any, name: str) -> ed25519.Ed25519PublicKey:
    """An Edwards public key object's point: PKCS#11 3.0 wraps it in a DER OCTET STRING (SoftHSM
    does), some tokens give the raw 32 bytes."""
    point = bytes(pub[Attribute.EC_POINT])
    if len(point) == 34 and point[:2] == b"\x04\x20":
        point = point[2:]
    if len(point) != 32:
        raise ConfigError(f"key '{name}': an Edwards key that is not Ed25519 ({len(point)}-byte point)")
    return ed25519.Ed25519PublicKey.from_public_bytes(point)


def _public_key(session: Any, spec: Pkcs11Spec, priv: Any, chain: tuple[x509.Certificate, ...]) -> PublicKey:
    """The public half: an RSA key's modulus and exponent, read from its private key object; an
    EC or Ed25519 key's public key object on the token, else its certificate."""
    if priv.key_type == KeyType.RSA:
        n = int.from_bytes(priv[Attribute.MODULUS], "big")
        e = int.from_bytes(priv[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    edwards = priv.key_type == KeyType.EC_EDWARDS
    want: type[ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey] = (
        ed25519.Ed25519PublicKey if edwards else ec.EllipticCurvePublicKey
    )
    try:
        pub = session.get_key(object_class=ObjectClass.PUBLIC_KEY, **spec.search())
        key: Any = (
            _ed25519_public(pub, spec.name)
            if edwards
            else serialization.load_der_public_key(pkcs11.util.ec.encode_ec_public_key(pub))
        )
    except (pkcs11.NoSuchKey, pkcs11.MultipleObjectsReturned):
        if not chain:
            raise ConfigError(
                f"key '{spec.name}': no public key or certificate for it on the token"
            ) from None
        key = chain[0].public_key()
    if not isinstance(key, want):
        raise ConfigError(f"key '{spec.name}': its public key is not an {'Ed25519' if edwards else 'EC'} key")
    return key


def _token_certificate(session: Any, spec: Pkcs11Spec) -> tuple[x509.Certificate, ...]:
    query: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.CERTIFICATE}
    if spec.label is not None:
        query[Attribute.LABEL] = spec.label
    if spec.id is not None:
        query[Attribute.ID] = spec.id
    found = [x509.load_der_x509_certificate(obj[Attribute.VALUE]) for obj in session.get_objects(query)]
    return tuple(found[:1])


class Pkcs11Key(SigningKey):
    """A private key inside a PKCS#11 token; it signs there and is never read out."""

    backend = "pkcs11"

    def __init__(
        self,
        spec: Pkcs11Spec,
        pin: bytes,
        module: _Module,
        public_key: PublicKey,
        chain: tuple[x509.Certificate, ...],
    ) -> None:
        super().__init__(spec.name, public_key, chain)
        self.spec = spec
        self._pin = pin
        self._module = module
        self._handle: Any = None
        self._generation = -1

    def _private(self) -> Any:
        """The private key object in this process's current session (found again after a reset)."""
        module = self._module
        session = module.session(self.spec.token, self._pin, self.name)
        if self._handle is None or self._generation != module.generation:
            self._handle = session.get_key(object_class=ObjectClass.PRIVATE_KEY, **self.spec.search())
            self._generation = module.generation
        return self._handle

    def _with_key(self, op: Callable[[Any], T]) -> T:
        """``op(private key object)``; once more after a re-initialisation if it fails."""
        module = self._module
        with module.lock:
            try:
                return op(self._private())
            except (PKCS11Error, KeyUnlockError) as e:
                fields = {"event": "pkcs11_reopen", "key": self.name, "error": describe(e)}
                log.warning("PKCS#11 operation failed: re-opening", extra={"fields": fields})
            try:
                module.reset()
                return op(self._private())
            except (PKCS11Error, KeyUnlockError) as e:
                raise SigningFailed(
                    f"key '{self.name}': PKCS#11 token '{self.spec.token}' is unavailable: {describe(e)}"
                ) from None

    def _sign_digest(self, digest: bytes, hash_name: HashName, pad: Padding) -> bytes:
        param: Any = None
        if pad == "ecdsa":
            mechanism, data = Mechanism.ECDSA, digest
        elif pad == "pss":
            hash_mech, mgf = _HASH_MECHANISMS[hash_name]
            mechanism, data, param = Mechanism.RSA_PKCS_PSS, digest, (hash_mech, mgf, len(digest))
        else:  # CKM_RSA_PKCS pads what it is given: the DigestInfo must come with the digest
            mechanism, data = Mechanism.RSA_PKCS, DIGEST_INFO[hash_name] + digest
        raw = self._with_key(lambda k: bytes(k.sign(data, mechanism=mechanism, mechanism_param=param)))
        if pad != "ecdsa":
            return raw
        half = len(raw) // 2  # PKCS#11 gives r || s; X.509, CMS and OpenSSL want DER
        return utils.encode_dss_signature(
            int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        )

    def _sign_message(self, data: bytes) -> bytes:
        """Ed25519 (CKM_EDDSA without parameters: pure Ed25519, the message itself)."""
        return self._with_key(lambda k: bytes(k.sign(data, mechanism=Mechanism.EDDSA)))

    def tool_handoff(self) -> Pkcs11Handoff:
        """The module, the key's PKCS#11 URI and label, the slot its token is in now and the
        PIN, for a tool that speaks PKCS#11 (SigningFailed if the token cannot be reached)."""
        slot = self._with_key(lambda k: int(k.session.token.slot.slot_id))
        return Pkcs11Handoff(
            name=self.name,
            chain=self.chain,
            module=self._module.path,
            uri=self.spec.uri(),
            label=self.spec.label,
            slot=slot,
            env=dict(self.spec.env),
            pin=self._pin,
        )


def load_pkcs11_key(spec: Pkcs11Spec, pin: bytes) -> Pkcs11Key:
    """Log in to the token and find the key; failures raise :class:`KeyUnlockError` naming it."""
    if spec.label is None and spec.id is None:
        raise ConfigError(f"key '{spec.name}': a PKCS#11 key needs 'label' or 'id'")
    module = _module(spec.module, spec.env)
    where = f"key '{spec.name}' (PKCS#11 token '{spec.token}')"
    with module.lock:
        try:
            session = module.session(spec.token, pin, spec.name)
            priv = session.get_key(object_class=ObjectClass.PRIVATE_KEY, **spec.search())
            if priv.key_type not in (KeyType.RSA, KeyType.EC, KeyType.EC_EDWARDS):
                raise ConfigError(f"{where}: only RSA, EC and Ed25519 keys are supported")
            chain = load_certificates(spec.chain) if spec.chain else _token_certificate(session, spec)
            public = _public_key(session, spec, priv, chain)
        except pkcs11.NoSuchToken:
            raise KeyUnlockError(f"{where}: no such token in {spec.module}") from None
        except pkcs11.NoSuchKey:
            raise KeyUnlockError(f"{where}: no private key with {spec.search()} on the token") from None
        except pkcs11.MultipleObjectsReturned:
            raise KeyUnlockError(f"{where}: several private keys match {spec.search()}") from None
        except PKCS11Error as e:
            raise KeyUnlockError(f"{where}: {describe(e)}") from None
    return Pkcs11Key(spec, pin, module, public, chain)
