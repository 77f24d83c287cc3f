"""``jar`` and ``focus-jar``: Android APKs (v1+v2+v3, zipaligned) and Java JARs (jarsigner).

Both wire names work the same way with different keys. Every input is checked and
rewritten in Python before any tool sees it: it must be a well-formed zip with safe
member names, bounded member count and expanded size, no duplicates, no symlinks and
valid CRCs. The rewrite drops the old signature files (``META-INF/*.SF|RSA|DSA|EC``,
``SIG-*``), the digest lines of ``META-INF/MANIFEST.MF``, any APK Signing Block,
extra fields and comments, and copies the compressed bytes of every member unchanged.

* ``*.apk`` holding ``AndroidManifest.xml``: ``zipalign -p -f 4`` first, then
  ``apksigner sign`` with v1, v2 and v3 (never the other way round: zipalign drops the
  v2/v3 signing block).
* anything else (``*.jar``, ``*.aar``, ``*.zip``...): ``jarsigner`` SHA-256 / SHA256withRSA.

The key reaches the JVM as a one-time PKCS#12 keystore, encrypted with a random password,
through a pipe (``/dev/fd/N``); the password goes through a second pipe. Children get a
minimal environment and are killed on timeout.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import itertools
import os
import re
import secrets
import shutil
import signal
import stat
import struct
import subprocess
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from ..errors import ConfigError, FormatRejected, SigningFailed, VerificationFailed
from ..keys.handoff import ToolSecrets
from .base import FormatSettings, KeyResolver, Signer, SignRequest, child_env, run_verifier

if TYPE_CHECKING:
    from ..deploy.dev import DevContext

#: store password of the public truststores (a truststore holds no secret)
TRUSTSTORE_PASSWORD = "changeit"  # noqa: S105
ALIAS = "signer"
TOOLS = ("java", "jarsigner", "apksigner", "zipalign")

DEFAULT_MAX_MEMBERS = 20_000
DEFAULT_MAX_UNCOMPRESSED = 2 * 1024**3
# A large member compressed better than this is a decompression bomb, not code or resources.
MAX_RATIO = 200
BOMB_MIN_SIZE = 16 * 1024**2
DEFAULT_TIMEOUT = 300.0
#: JVM options: no hsperfdata file in /tmp, a private tmpdir is added per job
DEFAULT_JAVA_OPTIONS = ("-XX:-UsePerfData", "-XX:+UseSerialGC", "-Xmx1024m")
_CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
_CHUNK = 1 << 20
_MAX_MANIFEST = 64 << 20
_U32 = 0xFFFFFFFF

_SIGNATURE_FILE = re.compile(r"^META-INF/(?:[^/]+\.(?:SF|RSA|DSA|EC)|SIG-[^/]*)$", re.IGNORECASE)
_MANIFEST = "META-INF/MANIFEST.MF"
_DRIVE = re.compile(r"^[A-Za-z]:")
_AXML_MAGIC = b"\x03\x00\x08\x00"
#: apksigner errors that mean "this APK can never be signed" rather than a tool failure
_APK_FORMAT_ERRORS = ("ApkFormatException", "MinSdkVersionException", "ZipFormatException")


def _one_time_password() -> str:
    """The password protecting one job's keystore (a function so tests can observe it)."""
    return secrets.token_urlsafe(32)


# -- zip validation and rewrite -----------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    info: zipfile.ZipInfo
    raw_name: bytes
    is_dir: bool


def _check_name(name: str) -> str | None:
    """Why ``name`` is unsafe as a member name, or None."""
    if not name:
        return "empty member name"
    if "\x00" in name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "control character in member name"
    if "\\" in name:
        return "backslash in member name"
    if name.startswith("/") or _DRIVE.match(name):
        return "absolute member path"
    parts = name.split("/")
    if parts[-1] == "":
        parts = parts[:-1]  # a directory entry
    for part in parts:
        if part in ("", ".", ".."):
            return "'.', '..' or empty path component"
    return None


def _inspect(zf: zipfile.ZipFile, max_members: int, max_uncompressed: int) -> list[_Member]:
    infos = zf.infolist()
    if not infos:
        raise FormatRejected("empty zip archive: nothing to sign")
    if len(infos) > max_members:
        raise FormatRejected(f"zip has {len(infos)} members, more than the limit of {max_members}")
    seen: set[str] = set()
    total = 0
    members: list[_Member] = []
    for info in infos:
        name = info.orig_filename
        shown = name[:120].encode("unicode_escape").decode("ascii")
        why = _check_name(name)
        if why:
            raise FormatRejected(f"unsafe member '{shown}': {why}")
        if name in seen:
            raise FormatRejected(f"duplicate member '{shown}'")
        seen.add(name)
        if info.flag_bits & 0x41:
            raise FormatRejected(f"member '{shown}' is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise FormatRejected(f"member '{shown}' uses unsupported compression method {info.compress_type}")
        mode = info.external_attr >> 16
        if info.create_system == 3 and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
            raise FormatRejected(f"member '{shown}' is {kind}")
        is_dir = name.endswith("/")
        if is_dir and info.file_size:
            raise FormatRejected(f"directory member '{shown}' has content")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise FormatRejected(f"stored member '{shown}' has inconsistent sizes")
        if info.file_size > BOMB_MIN_SIZE and info.file_size > MAX_RATIO * max(1, info.compress_size):
            raise FormatRejected(
                f"member '{shown}' expands {info.file_size // max(1, info.compress_size)}:1 to "
                f"{info.file_size} bytes (zip bomb?)"
            )
        total += info.file_size
        if total > max_uncompressed:
            raise FormatRejected(
                f"member '{shown}' makes the archive expand beyond {max_uncompressed} bytes (zip bomb?)"
            )
        raw = name.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
        members.append(_Member(info, raw, is_dir))
    # entries must not share bytes (overlapping entries are the classic zip bomb trick)
    spans = sorted(
        (
            m.info.header_offset,
            m.info.header_offset + 30 + len(m.raw_name) + m.info.compress_size,
            m.info.orig_filename,
        )
        for m in members
    )
    for (_, end, name), (start, _, other) in itertools.pairwise(spans):
        if start < end:
            raise FormatRejected(f"members '{name[:120]}' and '{other[:120]}' overlap")
    return members


def _clean_manifest(data: bytes) -> bytes:
    """Drop the per-entry digest attributes (and sections left empty) from a JAR manifest."""
    text = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    sections: list[list[bytes]] = [[]]
    for line in text.split(b"\n"):
        if not line:
            if sections[-1]:
                sections.append([])
        elif line.startswith(b" ") and sections[-1]:
            sections[-1][-1] += line[1:]
        else:
            sections[-1].append(line)
    main, *entries = [s for s in sections if s] or [[]]
    if not main or main[0].lower().startswith(b"name:"):
        entries = [main, *entries] if main else entries
        main = [b"Manifest-Version: 1.0"]
    out = [main]
    for section in entries:
        kept = [a for a in section if not a.split(b":", 1)[0].strip().lower().endswith(b"-digest")]
        if any(not a.lower().startswith(b"name:") for a in kept):
            out.append(kept)
    return b"".join(b"".join(_wrap(a) for a in s) + b"\r\n" for s in out)


def _wrap(line: bytes) -> bytes:
    """A manifest line folded at 72 bytes on UTF-8 character boundaries."""
    chunks, limit = [], 72
    while len(line) > limit:
        cut = limit
        while cut > 1 and 0x80 <= line[cut] < 0xC0:
            cut -= 1
        chunks.append(line[:cut])
        line, limit = line[cut:], 71
    chunks.append(line)
    return b"\r\n ".join(chunks) + b"\r\n"


class _ZipWriter:
    """Writes members without extra fields, comments or data descriptors (no zip64)."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._central: list[bytes] = []

    def add(self, m: _Member, crc: int, method: int, csize: int, usize: int, chunks: Iterable[bytes]) -> None:
        offset = self._f.tell()
        if offset + 30 + len(m.raw_name) + csize > _U32 or len(self._central) >= 0xFFFF:
            raise FormatRejected("archive too large to sign (zip64 output is not supported)")
        y, mo, d, h, mi, s = m.info.date_time
        dos_date = ((max(y, 1980) - 1980) << 9) | (mo << 5) | d
        dos_time = (h << 11) | (mi << 5) | (s // 2)
        flags = m.info.flag_bits & 0x800
        common = struct.pack(
            "<HHHHIIIH", flags, method, dos_time, dos_date, crc, csize, usize, len(m.raw_name)
        )
        self._f.write(b"PK\x03\x04" + struct.pack("<H", 20) + common + struct.pack("<H", 0) + m.raw_name)
        for chunk in chunks:
            self._f.write(chunk)
        external = 0x10 if m.is_dir else 0
        self._central.append(
            b"PK\x01\x02"
            + struct.pack("<HH", 20, 20)
            + common
            + struct.pack("<HHHHII", 0, 0, 0, 0, external, offset)
            + m.raw_name
        )

    def finish(self) -> None:
        start = self._f.tell()
        for entry in self._central:
            self._f.write(entry)
        size = self._f.tell() - start
        n = len(self._central)
        self._f.write(b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, n, n, size, start, 0))


def _member_chunks(src: IO[bytes], m: _Member, file_size: int) -> Iterator[bytes]:
    """Yield the compressed bytes of ``m`` while checking its local header, size bound and CRC;
    the final checks run when the generator is exhausted, so always consume it fully."""
    info, shown = m.info, m.info.orig_filename[:120]
    src.seek(info.header_offset)
    head = src.read(30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise FormatRejected(f"member '{shown}': bad local header")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    if src.read(name_len) != m.raw_name:
        raise FormatRejected(f"member '{shown}': local and central names differ")
    data_start = info.header_offset + 30 + name_len + extra_len
    if data_start + info.compress_size > file_size:
        raise FormatRejected(f"member '{shown}' is truncated")
    crc, produced, left, pos = 0, 0, info.compress_size, data_start
    inflater = zlib.decompressobj(-15) if info.compress_type == zipfile.ZIP_DEFLATED else None
    while left:
        src.seek(pos)  # the consumer may share the file position
        chunk = src.read(min(_CHUNK, left))
        if not chunk:
            raise FormatRejected(f"member '{shown}' is truncated")
        left -= len(chunk)
        pos += len(chunk)
        if inflater is None:
            plain = chunk
        else:
            try:
                # never expand past the declared size (+1 to notice a lie)
                plain = inflater.decompress(chunk, info.file_size - produced + 1)
            except zlib.error as e:
                raise FormatRejected(f"member '{shown}': corrupt deflate data ({e})") from None
        produced += len(plain)
        if produced > info.file_size or (inflater is not None and inflater.unconsumed_tail):
            raise FormatRejected(f"member '{shown}' expands beyond its declared size")
        crc = zlib.crc32(plain, crc)
        yield chunk
    if inflater is not None and (not inflater.eof or inflater.unused_data):
        raise FormatRejected(f"member '{shown}': deflate stream does not end where the entry does")
    if produced != info.file_size:
        raise FormatRejected(f"member '{shown}': size mismatch ({produced} != {info.file_size})")
    if crc != info.CRC:
        raise FormatRejected(f"member '{shown}': CRC mismatch")


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


@dataclass(frozen=True)
class _Prepared:
    path: Path
    is_apk: bool


def _prepare(src_path: Path, filename: str, dest: Path, max_members: int, max_uncompressed: int) -> _Prepared:
    """Validate the input and write its unsigned, cleaned copy to ``dest``."""
    try:
        zf = zipfile.ZipFile(src_path)
    except zipfile.BadZipFile as e:
        raise FormatRejected(f"not a zip archive ({e})") from None
    except (ValueError, EOFError, struct.error, OverflowError, NotImplementedError, UnicodeDecodeError) as e:
        raise FormatRejected(f"malformed zip archive ({type(e).__name__})") from None
    with zf:
        members = _inspect(zf, max_members, max_uncompressed)
    names = {m.info.orig_filename for m in members}
    is_apk = filename.lower().endswith(".apk")
    if is_apk and "AndroidManifest.xml" not in names:
        raise FormatRejected("an .apk must contain AndroidManifest.xml")
    file_size = src_path.stat().st_size
    axml_head = b""
    with src_path.open("rb") as src, dest.open("wb") as out:
        writer = _ZipWriter(out)
        for m in members:
            name, info = m.info.orig_filename, m.info
            chunks = _member_chunks(src, m, file_size)
            if _SIGNATURE_FILE.match(name):
                for _ in chunks:
                    pass
            elif name.upper() == _MANIFEST or (is_apk and name == "AndroidManifest.xml"):
                if info.file_size > _MAX_MANIFEST:
                    raise FormatRejected(f"member '{name}' is larger than {_MAX_MANIFEST} bytes")
                raw = b"".join(chunks)
                plain = zlib.decompress(raw, -15) if info.compress_type else raw
                if name == "AndroidManifest.xml":
                    axml_head = plain[:4]
                    writer.add(m, info.CRC, info.compress_type, len(raw), len(plain), [raw])
                else:
                    plain = _clean_manifest(plain)
                    data = _deflate(plain) if info.compress_type else plain
                    writer.add(m, zlib.crc32(plain), info.compress_type, len(data), len(plain), [data])
            else:
                writer.add(m, info.CRC, info.compress_type, info.compress_size, info.file_size, chunks)
        writer.finish()
    if is_apk and axml_head != _AXML_MAGIC:
        raise FormatRejected("AndroidManifest.xml is not compiled binary XML")
    return _Prepared(dest, is_apk)


# -- the signer ---------------------------------------------------------------------------------


def _int_option(settings: FormatSettings, name: str, default: int, low: int, high: int) -> int:
    value = settings.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"format '{settings.name}': '{name}' must be an integer in [{low}, {high}]")
    return value


class AndroidSigner(Signer):
    formats = ("jar", "focus-jar")
    verifier = (
        "APK: apksigner verify --verbose --print-certs --min-sdk-version 18 (cert public/<fmt>.pem) + "
        "zipalign -c -p 4; JAR: jarsigner -verify -strict -keystore public/<fmt>-truststore.p12"
    )

    def __init__(self, settings: FormatSettings, keys: KeyResolver) -> None:
        super().__init__(settings, keys)
        unlocked = keys(settings.require_key())
        self._key = unlocked.rsa
        self._cert = unlocked.certificate
        if self._cert.public_key() != self._key.public_key():
            raise ConfigError(
                f"format '{settings.name}': the certificate of key '{settings.key}' is not its own"
            )
        self._extra = list(unlocked.chain[1:])
        self._max_members = _int_option(settings, "max_members", DEFAULT_MAX_MEMBERS, 1, 0xFFFF)
        self._max_uncompressed = _int_option(
            settings, "max_uncompressed_size", DEFAULT_MAX_UNCOMPRESSED, 1, 1 << 40
        )
        timeout = settings.get("timeout", DEFAULT_TIMEOUT)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
            raise ConfigError(f"format '{settings.name}': 'timeout' must be a positive number of seconds")
        self._timeout = float(timeout)
        java_options = settings.get("java_options", list(DEFAULT_JAVA_OPTIONS))
        if not isinstance(java_options, list) or not all(
            isinstance(o, str) and o.startswith("-") for o in java_options
        ):
            raise ConfigError(f"format '{settings.name}': 'java_options' must be a list of JVM options")
        self._java_options: list[str] = java_options

    @classmethod
    def available(cls) -> str | None:
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if missing:
            return f"missing tools: {', '.join(missing)} (Debian: openjdk-17-jdk-headless apksigner zipalign)"
        return None

    # -- signing --------------------------------------------------------------------------------
    def sign(self, request: SignRequest) -> None:
        work = request.work_dir
        prepared = _prepare(
            request.input, request.filename, work / "unsigned.zip", self._max_members, self._max_uncompressed
        )
        signed = work / ("signed.apk" if prepared.is_apk else "signed.jar")
        tmp = work / "jvm-tmp"
        tmp.mkdir(exist_ok=True)
        jvm = list(self._java_options)
        if not any(c.isspace() for c in str(tmp)):  # the apksigner launcher word-splits -J options
            jvm.append(f"-Djava.io.tmpdir={tmp}")
        password = _one_time_password()
        keystore = self._keystore(password.encode())
        if prepared.is_apk:
            aligned = work / "aligned.apk"
            self._run(["zipalign", "-p", "-f", "4", str(prepared.path), str(aligned)], None, "zipalign", work)
            with ToolSecrets(keystore, password.encode() + b"\n") as sec:
                self._run(
                    [
                        "apksigner",
                        *(f"-J{o[1:]}" for o in jvm),
                        "sign",
                        "--ks",
                        sec.paths[0],
                        "--ks-type",
                        "PKCS12",
                        "--ks-key-alias",
                        ALIAS,
                        "--ks-pass",
                        f"file:{sec.paths[1]}",
                        "--v1-signing-enabled",
                        "true",
                        "--v2-signing-enabled",
                        "true",
                        "--v3-signing-enabled",
                        "true",
                        "--v4-signing-enabled",
                        "false",
                        "--out",
                        str(signed),
                        str(aligned),
                    ],
                    sec,
                    "apksigner",
                    work,
                )
        else:
            with ToolSecrets(keystore, password.encode() + b"\n") as sec:
                self._run(
                    [
                        "jarsigner",
                        *(f"-J{o}" for o in jvm),
                        "-keystore",
                        sec.paths[0],
                        "-storetype",
                        "PKCS12",
                        "-storepass:file",
                        sec.paths[1],
                        "-digestalg",
                        "SHA-256",
                        "-sigalg",
                        "SHA256withRSA",
                        "-signedjar",
                        str(signed),
                        str(prepared.path),
                        ALIAS,
                    ],
                    sec,
                    "jarsigner",
                    work,
                )
        if not signed.is_file() or signed.stat().st_size == 0:
            raise SigningFailed(f"{'apksigner' if prepared.is_apk else 'jarsigner'} wrote no output")
        shutil.copyfile(signed, request.output)

    def _keystore(self, password: bytes) -> bytes:
        """This job's PKCS#12 keystore under a one-time password (the password has ~190 bits of
        entropy, so a light KDF is enough)."""
        return pkcs12.serialize_key_and_certificates(
            ALIAS.encode(), self._key, self._cert, self._extra or None, _pkcs12_encryption(password)
        )

    def _run(self, argv: list[str], sec: ToolSecrets | None, what: str, work: Path) -> str:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=child_env(work, _CHILD_PATH),
                cwd=work,
                pass_fds=sec.fds if sec else (),
                start_new_session=True,
            )
        except OSError as e:
            raise SigningFailed(f"cannot run {what}: {e.strerror}") from None
        if sec is not None:
            sec.close_parent_ends()
        try:
            out, _ = proc.communicate(timeout=self._timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise SigningFailed(f"{what} timed out after {self._timeout:g} s") from None
        except BaseException:
            _kill_group(proc)
            raise
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            reason = next(
                (ln for ln in lines if "Exception" in ln or "rror" in ln), lines[-1] if lines else ""
            )
            message = f"{what} failed (exit {proc.returncode}): {reason[:300]}"
            if what == "apksigner" and any(marker in text for marker in _APK_FORMAT_ERRORS):
                raise FormatRejected(message)
            raise SigningFailed(message)
        return text

    # -- dev keys and verification ----------------------------------------------------------------
    @classmethod
    def dev_setup(cls, ctx: DevContext) -> dict[str, dict[str, Any]]:
        sections: dict[str, dict[str, Any]] = {}
        for fmt in cls.formats:
            key = ctx.rsa(2048)
            cert = _self_signed(key, f"sealbox {ctx.level} {fmt} signer")
            name = ctx.add_pkcs12_key(fmt, key, cert)
            ctx.write_public(
                f"{fmt}.pem",
                cert.public_bytes(serialization.Encoding.PEM),
                f"APK signed as '{fmt}': apksigner verify --verbose --print-certs --min-sdk-version 18 FILE "
                f"(signer cert SHA-256 digest = that of public/{fmt}.pem) && zipalign -c -p 4 FILE",
            )
            trust = pkcs12.serialize_java_truststore(
                [pkcs12.PKCS12Certificate(cert, fmt.encode())],
                _pkcs12_encryption(TRUSTSTORE_PASSWORD.encode()),
            )
            ctx.write_public(
                f"{fmt}-truststore.p12",
                trust,
                f"JAR signed as '{fmt}': jarsigner -verify -strict -keystore public/{fmt}-truststore.p12 "
                f"-storetype PKCS12 -storepass {TRUSTSTORE_PASSWORD} FILE (public store password)",
            )
            sections[fmt] = {"key": name}
        return sections

    @classmethod
    def verify(cls, fmt: str, signed: Path, original: Path | None, public_dir: Path) -> str:
        if fmt not in cls.formats:
            raise VerificationFailed(f"format '{fmt}' is not served by {cls.__name__}")
        if signed.suffix.lower() == ".apk" or _has_apk_signing_block(signed):
            return _verify_apk(fmt, signed, public_dir)
        return _verify_jar(fmt, signed, public_dir)


def _pkcs12_encryption(password: bytes) -> serialization.KeySerializationEncryption:
    """AES-256 PKCS#12 protection with a light KDF: used only for random one-time passwords and
    for the public truststores, where a slow KDF would only slow the JVM down (~1 s per load)."""
    return (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(2048)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password)
    )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def _self_signed(key: rsa.RSAPrivateKey, cn: str, years: int = 25) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sealbox dev"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365 * years))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _has_apk_signing_block(path: Path) -> bool:
    """Whether the zip at ``path`` has an APK Signing Block before its central directory."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            tail_len = min(size, 65557)
            f.seek(size - tail_len)
            tail = f.read()
            pos = tail.rfind(b"PK\x05\x06")
            if pos < 0 or pos + 22 > len(tail):
                return False
            cd_offset = struct.unpack("<I", tail[pos + 16 : pos + 20])[0]
            if cd_offset < 16:
                return False
            f.seek(cd_offset - 16)
            return f.read(16) == b"APK Sig Block 42"
    except OSError:
        return False


def _run_verifier(argv: list[str], work: Path) -> tuple[int, str]:
    tool = shutil.which(argv[0])
    if tool is None:
        raise VerificationFailed(f"{argv[0]} is not installed")
    res = run_verifier(argv, argv[0], 300, child_env(work, _CHILD_PATH))
    return res.returncode, (res.stdout + res.stderr).decode(errors="replace")


def _verify_apk(fmt: str, signed: Path, public_dir: Path) -> str:
    cert_path = public_dir / f"{fmt}.pem"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as e:
        raise VerificationFailed(f"cannot read {cert_path}: {e}") from None
    want = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    cmd = ["apksigner", "verify", "--verbose", "--print-certs", "--min-sdk-version", "18", str(signed)]
    rc, out = _run_verifier(cmd, public_dir)
    if rc != 0:
        lines = [ln for ln in out.splitlines() if ln.strip()]
        raise VerificationFailed(f"apksigner verify: {lines[0] if lines else 'failed'} (exit {rc})")
    for scheme in ("v1", "v2", "v3"):
        if not re.search(rf"^Verified using {scheme} scheme [^:]*: true$", out, re.MULTILINE):
            raise VerificationFailed(f"apksigner verify: not verified with the {scheme} scheme")
    if not re.search(r"^Number of signers: 1$", out, re.MULTILINE):
        raise VerificationFailed("apksigner verify: expected exactly one signer")
    digest = re.search(r"^Signer #1 certificate SHA-256 digest: ([0-9a-f]{64})$", out, re.MULTILINE)
    if digest is None or digest.group(1) != want:
        raise VerificationFailed(
            f"apksigner verify: the APK is not signed with the certificate {cert_path.name}"
        )
    align = ["zipalign", "-c", "-p", "4", str(signed)]
    rc, out = _run_verifier(align, public_dir)
    if rc != 0:
        raise VerificationFailed(f"zipalign -c -p 4: not aligned (exit {rc})")
    return f"{' '.join(cmd[:-1])} FILE && {' '.join(align[:-1])} FILE"


def _verify_jar(fmt: str, signed: Path, public_dir: Path) -> str:
    trust = public_dir / f"{fmt}-truststore.p12"
    if not trust.is_file():
        raise VerificationFailed(f"missing truststore {trust}")
    cmd = [
        "jarsigner",
        "-verify",
        "-strict",
        "-keystore",
        str(trust),
        "-storetype",
        "PKCS12",
        "-storepass",
        TRUSTSTORE_PASSWORD,
        str(signed),
    ]
    rc, out = _run_verifier(cmd, public_dir)
    if rc != 0 or "jar verified." not in out:
        lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
        reason = next(
            (ln for ln in lines if "Exception" in ln or "unsigned" in ln or "not" in ln),
            lines[0] if lines else "failed",
        )
        raise VerificationFailed(f"jarsigner -verify -strict: {reason[:300]} (exit {rc})")
    return (
        f"jarsigner -verify -strict -keystore {trust.name} -storetype PKCS12 "
        f"-storepass {TRUSTSTORE_PASSWORD} FILE"
    )
