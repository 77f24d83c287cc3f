"""``sha2signcode`` family: SHA-256 Authenticode signatures of Windows PE and MSI files.

Wire names: ``sha2signcode`` (aliases ``signcode``, ``osslsigncode``), ``sha2signcodestub``
(adds the configured extra certificate, osslsigncode ``-ac``), and the ``-v2`` variants of both,
which add an RFC 3161 timestamp when ``timestamp_url`` is configured.

Signing runs Debian's ``osslsigncode`` (2.5 and 2.9 both work). The key never touches disk,
argv or the child's environment: the unlocked key and its chain are re-encrypted per job into a
PKCS#12 blob under a random one-time password and handed over as ``-pkcs12 /dev/fd/N`` with the
password as ``-readpass /dev/fd/M`` (both pipes, see :class:`~sealbox.keys.handoff.ToolSecrets`).
osslsigncode cannot read ``-key`` from a pipe (it probes the file several times), PKCS#12 it can.

The module also exposes the Windows file rules the task runner reuses for zips:
:func:`is_signable_name`, :func:`is_pe_bytes` and :func:`is_signed`.
"""

from __future__ import annotations

import fnmatch
import os
import secrets
import shutil
import struct
import subprocess
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import PrivateFormat, pkcs12

from ..errors import ConfigError, FormatRejected, SigningFailed, VerificationFailed
from ..keys.handoff import ToolSecrets
from .base import FormatSettings, KeyResolver, Signer, SignRequest, child_env, run_verifier

if TYPE_CHECKING:
    from ..deploy.dev import DevContext

#: extensions (of the uploaded filename) this family signs
ALLOWED_EXTENSIONS = (".exe", ".dll", ".sys", ".msi")
#: names already signed by Microsoft that must never be re-signed (fnmatch, case-insensitive)
BLOCKLIST = ("msvc*.dll", "d3dcompiler_42.dll", "d3dcompiler_43.dll", "d3dx9_42.dll", "d3dx9_43.dll")
#: public file the verifier trusts; optional TSA root for deployments whose TSA is not in the system store
CA_FILE = "sha2signcode-ca.pem"
TSA_CA_FILE = "sha2signcode-tsa-ca.pem"

OLE_MAGIC = bytes.fromhex("d0cf11e0a1b11ae1")
_MSI_SIGNATURE_STREAM = "\x05DigitalSignature".encode("utf-16-le")
_CERT_TABLE = 4  # index of IMAGE_DIRECTORY_ENTRY_SECURITY
_HEAD = 64 * 1024  # every header we parse must lie in the first 64 KiB
_STUB = ("sha2signcodestub", "sha2signcodestub-v2")
_V2 = ("sha2signcode-v2", "sha2signcodestub-v2")
# osslsigncode messages that mean "this input is malformed" (deterministic), not a tool hiccup
_INPUT_ERRORS = (
    "Corrupt",
    "corrupt",
    "unsupported input file type",
    "Failed to parse",
    "Unrecognized file type",
    "Unexpected ",
    "Unknown Major Version",
    "Unsupported",
)
_PKCS12_ROUNDS = 2048  # the password is 192 random bits: key stretching buys nothing


# -- Windows file rules (also used by the task runner for zip members) -------------------------
def _basename(filename: str) -> str:
    return PurePosixPath(filename.replace("\\", "/")).name


def name_rejection(filename: str) -> str | None:
    """Why ``filename`` may not be Authenticode-signed, or None if it may."""
    base = _basename(filename)
    lower = base.lower()
    if not lower.endswith(ALLOWED_EXTENSIONS):
        return f"'{base}' does not end in {', '.join(ALLOWED_EXTENSIONS)}"
    for pattern in BLOCKLIST:
        if fnmatch.fnmatchcase(lower, pattern):
            return f"'{base}' is on the blocklist of Microsoft-signed files ({pattern})"
    return None


def is_signable_name(filename: str) -> bool:
    """True if the name has a signable extension and is not blocklisted (``msvc*.dll`` ...)."""
    return name_rejection(filename) is None


def is_pe_bytes(head: bytes) -> bool:
    """True if ``head`` (the first bytes of a file, at least up to ``e_lfanew + 4``) is a PE image."""
    if len(head) < 0x40 or head[:2] != b"MZ":
        return False
    (lfanew,) = struct.unpack_from("<I", head, 0x3C)
    return lfanew + 4 <= len(head) and head[lfanew : lfanew + 4] == b"PE\0\0"


def is_msi_bytes(head: bytes) -> bool:
    """True if ``head`` starts with an OLE compound-file header of a sane version (MSI container)."""
    if len(head) < 512 or head[:8] != OLE_MAGIC:
        return False
    major, order, shift = struct.unpack_from("<HHH", head, 26)
    return order == 0xFFFE and (major, shift) in ((3, 9), (4, 12))


def _pe_cert_table(head: bytes, size: int) -> tuple[int, int]:
    """Validate a PE's headers against the file size; return the certificate table (offset, size).

    Raises :class:`FormatRejected` naming the first inconsistency.
    """
    if not is_pe_bytes(head):
        raise FormatRejected("not a PE file (no MZ header with a PE signature at e_lfanew)")
    (lfanew,) = struct.unpack_from("<I", head, 0x3C)
    coff = lfanew + 4
    opt = coff + 20
    if opt + 2 > len(head):
        raise FormatRejected("truncated PE: COFF header cut off")
    (nsections,) = struct.unpack_from("<H", head, coff + 2)
    (opt_size,) = struct.unpack_from("<H", head, coff + 16)
    if not 1 <= nsections <= 96:
        raise FormatRejected(f"malformed PE: {nsections} sections")
    (magic,) = struct.unpack_from("<H", head, opt)
    if magic == 0x10B:
        count_at, dirs_at = opt + 92, opt + 96
    elif magic == 0x20B:
        count_at, dirs_at = opt + 108, opt + 112
    else:
        raise FormatRejected(f"malformed PE: unknown optional header magic 0x{magic:x}")
    if dirs_at > opt + opt_size or opt + opt_size > len(head):
        raise FormatRejected("truncated PE: optional header cut off")
    (ndirs,) = struct.unpack_from("<I", head, count_at)
    cert_off = cert_size = 0
    if ndirs > _CERT_TABLE and dirs_at + 8 * (_CERT_TABLE + 1) <= opt + opt_size:
        cert_off, cert_size = struct.unpack_from("<II", head, dirs_at + 8 * _CERT_TABLE)
    table = opt + opt_size
    if table + 40 * nsections > len(head):
        raise FormatRejected("truncated PE: section table cut off")
    for i in range(nsections):
        raw_size, raw_ptr = struct.unpack_from("<II", head, table + 40 * i + 16)
        if raw_size and raw_ptr + raw_size > size:
            name = head[table + 40 * i : table + 40 * i + 8].rstrip(b"\0").decode("ascii", "replace")
            raise FormatRejected(
                f"truncated PE: section {name!r} ends at byte {raw_ptr + raw_size}, the file has {size}"
            )
    if cert_size and (cert_off < table + 40 * nsections or cert_off + cert_size > size):
        raise FormatRejected("malformed PE: the certificate table lies outside the file")
    return cert_off, cert_size


def check_pe(path: Path) -> None:
    """Raise :class:`FormatRejected` unless ``path`` is a whole, well-formed PE file."""
    _pe_cert_table(*_read_head(path))


def _read_head(path: Path) -> tuple[bytes, int]:
    with path.open("rb") as f:
        return f.read(_HEAD), os.fstat(f.fileno()).st_size


def is_signed(path: Path) -> bool:
    """True if ``path`` already carries an Authenticode signature.

    PE: the certificate-table directory entry is non-empty. MSI: the compound file has a
    ``\\x05DigitalSignature`` stream (found by its UTF-16 directory name). Anything else: False.
    """
    head, size = _read_head(path)
    if is_pe_bytes(head):
        try:
            return _pe_cert_table(head, size)[1] != 0
        except FormatRejected:
            return False
    if is_msi_bytes(head):
        with path.open("rb") as f:
            tail = b""
            while chunk := f.read(1 << 20):
                if _MSI_SIGNATURE_STREAM in tail + chunk:
                    return True
                tail = chunk[-len(_MSI_SIGNATURE_STREAM) :]
    return False


def signature_pkcs7(path: Path) -> bytes:
    """The DER PKCS#7 SignedData embedded in a signed PE (first WIN_CERTIFICATE), trimmed."""
    head, size = _read_head(path)
    off, length = _pe_cert_table(head, size)
    if not length:
        raise VerificationFailed(f"{path.name} carries no Authenticode signature")
    with path.open("rb") as f:
        f.seek(off)
        blob = f.read(length)
    dw_len, _rev, cert_type = struct.unpack_from("<IHH", blob, 0)
    if cert_type != 2 or dw_len > len(blob):  # WIN_CERT_TYPE_PKCS_SIGNED_DATA
        raise VerificationFailed(f"{path.name}: unexpected WIN_CERTIFICATE (type {cert_type})")
    der = blob[8:dw_len]
    # trim the 8-byte alignment padding: take exactly the outer DER element
    if len(der) < 2 or der[0] != 0x30:
        raise VerificationFailed(f"{path.name}: the signature is not DER")
    if der[1] < 0x80:
        total = 2 + der[1]
    else:
        n = der[1] & 0x7F
        total = 2 + n + int.from_bytes(der[2 : 2 + n], "big")
    return der[:total]


# -- the signer -----------------------------------------------------------------------------
def _one_time_password() -> bytes:
    """A fresh password for one job's PKCS#12 hand-off (a function so tests can observe it)."""
    return secrets.token_urlsafe(24).encode()


def _tail(text: str, markers: tuple[str, ...] = ()) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # OpenSSL error-stack lines (``40C0...:error:...``) are noise next to osslsigncode's own words
    own = [ln for ln in lines if ":error:" not in ln] or lines
    for marker in markers:  # in order of priority
        for ln in own:
            if marker in ln:
                return ln
    useful = [ln for ln in own if ln not in ("Failed", "Succeeded")]
    return useful[-1] if useful else (own[-1] if own else "no output")


class AuthenticodeSigner(Signer):
    formats = (
        "sha2signcode",
        "sha2signcodestub",
        "sha2signcode-v2",
        "sha2signcodestub-v2",
        "signcode",
        "osslsigncode",
    )
    verifier = f"osslsigncode verify -CAfile public/{CA_FILE} -in FILE"

    def __init__(self, settings: FormatSettings, keys: KeyResolver) -> None:
        super().__init__(settings, keys)
        fmt = settings.name
        unlocked = keys(settings.require_key())
        self._key = unlocked.private_key
        if not unlocked.chain:
            raise ConfigError(
                f"format '{fmt}': key '{settings.key}' needs its certificate chain (leaf first)"
            )
        self._cert = unlocked.chain[0]
        self._extra_chain = list(unlocked.chain[1:])
        tool = settings.get("osslsigncode") or shutil.which("osslsigncode")
        if not tool:
            raise ConfigError(f"format '{fmt}': osslsigncode is not installed")
        self._tool = str(tool)
        self._description: str | None = settings.get("description")
        self._url: str | None = settings.get("url")
        self._timeout = float(settings.get("timeout", 120))
        self._extra_cert: Path | None = None
        if fmt in _STUB:
            self._extra_cert = settings.path("extra_cert")
            assert self._extra_cert is not None
            self._extra_cert = self._extra_cert.absolute()
            try:
                x509.load_pem_x509_certificates(self._extra_cert.read_bytes())
            except (OSError, ValueError) as e:
                raise ConfigError(f"format '{fmt}': extra_cert {self._extra_cert}: {e}") from None
        self._timestamp_url: str | None = settings.get("timestamp_url")
        if self._timestamp_url is not None:
            if fmt not in _V2:
                raise ConfigError(f"format '{fmt}': timestamp_url is only used by the -v2 formats")
            if not str(self._timestamp_url).startswith(("http://", "https://")):
                raise ConfigError(f"format '{fmt}': timestamp_url must be an http(s) URL")

    @classmethod
    def available(cls) -> str | None:
        if shutil.which("osslsigncode") is None:
            return "osslsigncode is not installed (apt-get install osslsigncode)"
        return None

    # -- signing --------------------------------------------------------------------------
    def check_input(self, request: SignRequest) -> str:
        """Apply the name and content rules; return the extension to sign under."""
        reason = name_rejection(request.filename)
        if reason is not None:
            raise FormatRejected(f"{self.format}: {reason}")
        ext = "." + _basename(request.filename).lower().rsplit(".", 1)[1]
        head, size = _read_head(request.input)
        if ext == ".msi":
            if not is_msi_bytes(head):
                raise FormatRejected(
                    f"{self.format}: '{_basename(request.filename)}' is not an MSI (OLE) file"
                )
        else:
            try:
                _pe_cert_table(head, size)
            except FormatRejected as e:
                raise FormatRejected(f"{self.format}: '{_basename(request.filename)}': {e}") from None
        return ext

    def _pkcs12(self, password: bytes) -> bytes:
        encryption = (
            PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(_PKCS12_ROUNDS)
            .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
            .hmac_hash(hashes.SHA256())
            .build(password)
        )
        return pkcs12.serialize_key_and_certificates(
            b"authenticode", self._key, self._cert, self._extra_chain or None, encryption
        )

    def sign(self, request: SignRequest) -> None:
        ext = self.check_input(request)
        # Already signed? osslsigncode without -nest replaces the signature: the output carries ours only.
        work_dir = request.work_dir.absolute()  # the child runs in work_dir: no relative paths
        tmp_out = work_dir / f"authenticode-signed{ext}"
        tmp_out.unlink(missing_ok=True)  # osslsigncode 2.5 refuses to overwrite
        password = _one_time_password()
        with ToolSecrets(self._pkcs12(password), password) as fds:
            argv = [self._tool, "sign", "-pkcs12", fds.paths[0], "-readpass", fds.paths[1], "-h", "sha256"]
            if self._description:
                argv += ["-n", self._description]
            if self._url:
                argv += ["-i", self._url]
            if self._extra_cert is not None:
                argv += ["-ac", str(self._extra_cert)]
            if self._timestamp_url:
                argv += ["-ts", self._timestamp_url]
            argv += ["-in", str(request.input.absolute()), "-out", str(tmp_out)]
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    pass_fds=fds.fds,
                    env=child_env(work_dir),
                    cwd=work_dir,
                )
            except OSError as e:
                raise SigningFailed(f"{self.format}: cannot run osslsigncode: {e.strerror}") from None
            fds.close_parent_ends()
            try:
                out, err = proc.communicate(timeout=self._timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                tmp_out.unlink(missing_ok=True)
                raise SigningFailed(
                    f"{self.format}: osslsigncode timed out after {self._timeout:g}s"
                ) from None
        text = out.decode(errors="replace") + "\n" + err.decode(errors="replace")
        if proc.returncode != 0 or "Succeeded" not in text or not tmp_out.is_file():
            tmp_out.unlink(missing_ok=True)
            self._raise_failure(text)
        shutil.move(str(tmp_out), str(request.output))

    def _raise_failure(self, text: str) -> None:
        timestamp_trouble = self._timestamp_url and any(
            m in text for m in ("timestamp", "Timestamp", "Connecting", "curl", "HTTP")
        )
        if not timestamp_trouble and any(m in text for m in _INPUT_ERRORS):
            raise FormatRejected(
                f"{self.format}: osslsigncode refused the input: {_tail(text, _INPUT_ERRORS)}"
            )
        raise SigningFailed(f"{self.format}: osslsigncode failed: {_tail(text)}")

    # -- dev deployment and verification -----------------------------------------------
    @classmethod
    def dev_setup(cls, ctx: DevContext) -> dict[str, dict[str, Any]]:
        root = ctx.code_signing_ca()
        leaf = ctx.issue("sealbox authenticode")
        name = ctx.add_key("authenticode", leaf.key, chain=[leaf.cert, root.cert])
        ctx.write_public(CA_FILE, root.cert_pem(), f"osslsigncode verify -CAfile public/{CA_FILE} -in FILE")
        stub = ctx.issue("sealbox stub dummy")
        stub_path = ctx.write_file("keys/sha2signcodestub-extra.pem", stub.cert_pem())
        common = {
            "key": name,
            "description": f"sealbox {ctx.level}",
            "url": "https://example.invalid/sealbox",
        }
        extra = {"extra_cert": str(stub_path.relative_to(ctx.dir))}
        return {
            "sha2signcode": dict(common),
            "sha2signcodestub": {**common, **extra},
            "sha2signcode-v2": dict(common),
            "sha2signcodestub-v2": {**common, **extra},
            "signcode": dict(common),
            "osslsigncode": dict(common),
        }

    @classmethod
    def verify(cls, fmt: str, signed: Path, original: Path | None, public_dir: Path) -> str:
        tool = shutil.which("osslsigncode")
        if tool is None:
            raise VerificationFailed("osslsigncode is not installed")
        argv = [tool, "verify", "-CAfile", str(public_dir / CA_FILE)]
        if (public_dir / TSA_CA_FILE).is_file():
            argv += ["-TSA-CAfile", str(public_dir / TSA_CA_FILE)]
        argv += ["-in", str(signed)]
        res = run_verifier(argv, "osslsigncode verify", 120, child_env(signed.parent))
        text = res.stdout.decode(errors="replace") + "\n" + res.stderr.decode(errors="replace")
        ok = (
            res.returncode == 0
            and "Succeeded" in text
            and "Signature verification: ok" in text
            and "verification: failed" not in text
            and "MISMATCH" not in text
        )
        if not ok:
            markers = ("MISMATCH", "verification: failed", "No signature found", "Corrupt", "Unable", "error")
            raise VerificationFailed(f"osslsigncode verify: {_tail(text, markers)}")
        return " ".join(["osslsigncode", *argv[1:]])
