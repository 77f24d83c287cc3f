"""``widevine`` / ``widevine_blessed``: detached RSA-PSS signature files (``.sig``).

Google's real Widevine ``.sig`` framing is not public, so sealbox defines its own (see
docs/formats/widevine.md). All integers are big-endian::

    offset size  field
    0      4     magic "SBWV"
    4      1     version (1)
    5      1     flags: bit 0 = blessed, bits 1-7 zero
    6      1     hash id: 1 = SHA-256 / RSA-PSS, MGF1-SHA256, salt 32
    7      1     reserved (0)
    8      32    key id: SHA-256 of the signing key's DER SubjectPublicKeyInfo
    40     2     signature length N (= RSA modulus size in bytes)
    42     N     RSA-PSS signature

The signature is RSA-PSS (SHA-256, MGF1-SHA256, salt 32) over the message
``DOMAIN || sig[4:7] || SHA-256(file)``: a fixed domain-separation prefix, then the
version, flags and hash-id bytes of the header, then the raw SHA-256 of the signed file.
So the blessed bit is covered by the signature, and ``DIGEST = SHA-256(message)`` can be
rebuilt with ``printf`` and ``openssl dgst`` for ``openssl pkeyutl -verify``.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ..errors import ConfigError, FormatRejected, SigningFailed, VerificationFailed
from ..hashing import CHUNK
from ..keys import PublicKey
from .base import FormatSettings, KeyResolver, Signer, SignRequest, public_file, run_verifier

if TYPE_CHECKING:
    from ..deploy.context import DevContext

MAGIC = b"SBWV"
VERSION = 1
FLAG_BLESSED = 0x01
HASH_SHA256 = 1
DOMAIN = b"sealbox widevine signature v1\n"
HEADER = struct.Struct(">4sBBBB32sH")  # 42 bytes
SALT_LENGTH = 32
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=SALT_LENGTH)
BLESSED = {"widevine": False, "widevine_blessed": True}
MIN_KEY_BITS = 2048
SUBPROCESS_TIMEOUT = 60

#: magic numbers of the executables Widevine signatures are meant for
_EXECUTABLE_MAGIC = (
    b"\x7fELF",  # ELF
    b"MZ",  # PE (Windows .exe/.dll)
    b"\xfe\xed\xfa\xce",
    b"\xce\xfa\xed\xfe",  # Mach-O 32-bit
    b"\xfe\xed\xfa\xcf",
    b"\xcf\xfa\xed\xfe",  # Mach-O 64-bit
    b"\xca\xfe\xba\xbe",
    b"\xca\xfe\xba\xbf",  # Mach-O universal (fat / fat64)
)

PKEYUTL_OPTS = (
    "-pkeyopt",
    "rsa_padding_mode:pss",
    "-pkeyopt",
    f"rsa_pss_saltlen:{SALT_LENGTH}",
    "-pkeyopt",
    "digest:sha256",
    "-pkeyopt",
    "rsa_mgf1_md:sha256",
)


def key_id(public_key: PublicKey) -> bytes:
    """SHA-256 of the DER SubjectPublicKeyInfo (``openssl pkey -pubin -outform DER | sha256sum``)."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()


def flags_for(blessed: bool) -> int:
    return FLAG_BLESSED if blessed else 0


def message(version: int, flags: int, hash_id: int, file_sha256: bytes) -> bytes:
    """What is signed: DOMAIN || version || flags || hash id || SHA-256(file)."""
    return DOMAIN + bytes((version, flags, hash_id)) + file_sha256


def signed_digest(version: int, flags: int, hash_id: int, file_sha256: bytes) -> bytes:
    """DIGEST for ``openssl pkeyutl -verify``: SHA-256 of :func:`message`."""
    return hashlib.sha256(message(version, flags, hash_id, file_sha256)).digest()


@dataclass(frozen=True)
class SigFile:
    version: int
    flags: int
    hash_id: int
    key_id: bytes
    signature: bytes

    @property
    def blessed(self) -> bool:
        return bool(self.flags & FLAG_BLESSED)

    def to_bytes(self) -> bytes:
        head = HEADER.pack(MAGIC, self.version, self.flags, self.hash_id, 0, self.key_id, len(self.signature))
        return head + self.signature

    @classmethod
    def parse(cls, data: bytes) -> SigFile:
        """Parse a ``.sig``; raises :class:`VerificationFailed` for anything malformed."""
        if len(data) < HEADER.size:
            raise VerificationFailed(f"not a sealbox widevine signature: {len(data)} bytes is too short")
        magic, version, flags, hash_id, reserved, kid, sig_len = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise VerificationFailed("not a sealbox widevine signature (no SBWV magic)")
        if version != VERSION:
            raise VerificationFailed(f"unsupported widevine signature version {version}")
        if flags & ~FLAG_BLESSED or reserved:
            raise VerificationFailed(f"unknown flags {flags:#04x} / reserved byte {reserved:#04x}")
        if hash_id != HASH_SHA256:
            raise VerificationFailed(f"unknown hash id {hash_id}")
        if len(data) != HEADER.size + sig_len:
            raise VerificationFailed(
                f"signature length field says {sig_len} bytes, the file holds {len(data) - HEADER.size}"
            )
        return cls(version, flags, hash_id, kid, data[HEADER.size :])


def _file_sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.digest()


def _load_public(public_key_pem: bytes) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_pem_public_key(public_key_pem)
    except ValueError as e:
        raise VerificationFailed(f"cannot read the widevine public key: {e}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise VerificationFailed("the widevine public key is not an RSA key")
    return key


def verify_sig(sig_bytes: bytes, data_path: Path, public_key_pem: bytes, expect_blessed: bool) -> None:
    """Verify a sealbox widevine ``.sig`` over ``data_path``; raises :class:`VerificationFailed`."""
    sig = SigFile.parse(sig_bytes)
    if sig.blessed != expect_blessed:
        want, got = ("blessed", "non-blessed") if expect_blessed else ("non-blessed", "blessed")
        raise VerificationFailed(f"expected a {want} signature, got a {got} one")
    public = _load_public(public_key_pem)
    if sig.key_id != key_id(public):
        raise VerificationFailed("signed by a different key (key id does not match the public key)")
    if len(sig.signature) != (public.key_size + 7) // 8:
        raise VerificationFailed(
            f"signature is {len(sig.signature)} bytes; the key needs {public.key_size // 8}"
        )
    try:
        file_hash = _file_sha256(data_path)
    except OSError as e:
        raise VerificationFailed(f"cannot read {data_path}: {e.strerror}") from None
    try:
        public.verify(
            sig.signature, message(sig.version, sig.flags, sig.hash_id, file_hash), PSS, hashes.SHA256()
        )
    except InvalidSignature:
        raise VerificationFailed("RSA-PSS signature does not match the file") from None


def _bool_option(settings: FormatSettings, name: str, default: bool) -> bool:
    value = settings.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"format '{settings.name}': {name} must be true or false")
    return value


def _check_whole(path: Path, head: bytes) -> None:
    """Refuse a truncated binary: a PE's sections, or an ELF's section header table, must lie
    inside the file."""
    if head.startswith(b"MZ"):
        from .authenticode import check_pe

        check_pe(path)
    elif head.startswith(b"\x7fELF"):
        with path.open("rb") as f:
            ident = f.read(64)
        size = path.stat().st_size
        if len(ident) < 52:
            raise FormatRejected("truncated ELF: header cut off")
        is64, little = ident[4] == 2, ident[5] == 1
        end = "<" if little else ">"
        if is64:
            if len(ident) < 64:
                raise FormatRejected("truncated ELF: header cut off")
            (shoff,) = struct.unpack_from(end + "Q", ident, 0x28)
            shentsize, shnum = struct.unpack_from(end + "HH", ident, 0x3A)
        else:
            (shoff,) = struct.unpack_from(end + "I", ident, 0x20)
            shentsize, shnum = struct.unpack_from(end + "HH", ident, 0x2E)
        if shoff + shentsize * shnum > size:
            raise FormatRejected(
                f"truncated ELF: section headers end at byte {shoff + shentsize * shnum}, the file has {size}"
            )


class WidevineSigner(Signer):
    family = "widevine"
    verifier = (
        "openssl pkeyutl -verify -pubin -inkey public/widevine.pem (PSS, salt 32) over the digest in docs"
    )
    uses_work_dir = False

    def __init__(self, settings: FormatSettings, keys: KeyResolver) -> None:
        super().__init__(settings, keys)
        if settings.name not in BLESSED:
            raise ConfigError(f"format '{settings.name}' is not a widevine format")
        self._key = keys(settings.require_key())
        self._key.require(settings.name, "rsa", min_bits=MIN_KEY_BITS)
        if self._key.chain and self._key.chain[0].public_key() != self._key.public_key:
            raise ConfigError(
                f"format '{settings.name}': the certificate of key '{settings.key}' does not match it"
            )
        self._flags = flags_for(BLESSED[settings.name])
        self._key_id = key_id(self._key.public_key)
        self._require_executable = _bool_option(settings, "require_executable", True)

    def _check_input(self, path: Path) -> None:
        try:
            with path.open("rb") as f:
                head = f.read(4)
        except OSError as e:
            raise SigningFailed(f"cannot read input: {e.strerror}") from None
        if not head:
            raise FormatRejected("empty input: nothing to sign")
        if self._require_executable and not head.startswith(_EXECUTABLE_MAGIC):
            raise FormatRejected(
                "not an executable (ELF, PE or Mach-O); widevine signatures are only made for binaries"
            )
        if self._require_executable:
            _check_whole(path, head)

    def sign(self, request: SignRequest) -> None:
        self._check_input(request.input)
        file_hash = request.hash_state("sha256").digest()
        digest = signed_digest(VERSION, self._flags, HASH_SHA256, file_hash)
        # PSS with MGF1-SHA256 and a 32-byte salt: the key interface's "pss" for SHA-256
        signature = self._key.sign_digest(digest, "sha256", "pss")
        sig = SigFile(VERSION, self._flags, HASH_SHA256, self._key_id, signature)
        request.output.write_bytes(sig.to_bytes())

    @classmethod
    def dev_setup(cls, ctx: DevContext) -> dict[str, dict[str, Any]]:
        key = ctx.signing_key("widevine", 3072, certificate="sealbox widevine signer")
        name = key.name
        pem = key.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        steps = (
            "tail -c +43 FILE.sig > RAWSIG",
            "{ printf 'sealbox widevine signature v1\\n'; head -c 7 FILE.sig | tail -c 3; "
            "openssl dgst -sha256 -binary FILE; } | openssl dgst -sha256 -binary > DIGEST",
            "openssl pkeyutl -verify -pubin -inkey public/widevine.pem -in DIGEST -sigfile RAWSIG "
            + " ".join(PKEYUTL_OPTS),
            "od -An -tx1 -j5 -N1 FILE.sig    # flags: 01 = widevine_blessed, 00 = widevine",
            "(layout: docs/formats/widevine.md)",
        )
        ctx.write_public("widevine.pem", pem, "\n    ".join(steps))
        ctx.write_public("widevine-cert.pem", key.certificate.public_bytes(serialization.Encoding.PEM))
        section = {"key": name, "require_executable": True}
        return {"widevine": dict(section), "widevine_blessed": dict(section)}

    @classmethod
    def verify(cls, fmt: str, signed: Path, original: Path | None, public_dir: Path) -> str:
        if fmt not in BLESSED:
            raise VerificationFailed(f"'{fmt}' is not a widevine format")
        if original is None:
            raise VerificationFailed("widevine signatures are detached: the signed file is needed too")
        pub = public_file(public_dir, "widevine.pem")
        try:
            sig_bytes = signed.read_bytes()
            pem = pub.read_bytes()
        except OSError as e:
            raise VerificationFailed(f"cannot read {e.filename}: {e.strerror}") from None
        verify_sig(sig_bytes, original, pem, BLESSED[fmt])
        openssl = shutil.which("openssl")
        if openssl is None:
            raise VerificationFailed("openssl is not installed")
        sig = SigFile.parse(sig_bytes)
        digest = signed_digest(sig.version, sig.flags, sig.hash_id, _file_sha256(original))
        with tempfile.TemporaryDirectory(prefix="sbwv") as tmp:
            digest_path, raw_path = Path(tmp) / "digest", Path(tmp) / "rawsig"
            digest_path.write_bytes(digest)
            raw_path.write_bytes(sig.signature)
            cmd = [
                openssl,
                "pkeyutl",
                "-verify",
                "-pubin",
                "-inkey",
                str(pub),
                "-in",
                str(digest_path),
                "-sigfile",
                str(raw_path),
                *PKEYUTL_OPTS,
            ]
            res = run_verifier(cmd, "openssl pkeyutl -verify", SUBPROCESS_TIMEOUT)
        out = (res.stdout + res.stderr).decode(errors="replace").strip()
        if res.returncode != 0 or "Signature Verified Successfully" not in out:
            raise VerificationFailed(
                f"openssl pkeyutl -verify (rc {res.returncode}): {out.splitlines()[0] if out else ''}"
            )
        return (
            "openssl pkeyutl -verify -pubin -inkey public/widevine.pem -in DIGEST -sigfile RAWSIG "
            + " ".join(PKEYUTL_OPTS)
        )
