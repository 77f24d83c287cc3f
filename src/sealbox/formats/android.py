"""``jar``, ``focus-jar``, ``apk``, ``focus-apk``: Android APKs and Java JARs.

``apk`` shares the key of ``jar``, ``focus-apk`` that of ``focus-jar``. How an input is
signed depends on the wire name and the bytes only, never on the upload's name: a result is
named by (format, sha1) alone, so the same bytes must give the same output under any name.
Every input is checked and rewritten in Python before any tool sees it, under the archive
rules of :mod:`sealbox.archives` (:func:`~sealbox.archives.zip_members`,
:func:`~sealbox.archives.rewrite_zip`): it must be a well-formed zip with safe member names,
bounded member count and expanded size, no duplicates, no symlinks and valid CRCs. The
rewrite drops the old signature files
(``META-INF/*.SF|RSA|DSA|EC``, ``SIG-*``), the digest lines of ``META-INF/MANIFEST.MF``, any
APK Signing Block, extra fields and comments, and copies the compressed bytes of every member
unchanged. An APK is a zip with a compiled (binary XML) ``AndroidManifest.xml`` at its root.

* ``apk``/``focus-apk``: APKs only, signed v1, v2 and v3 by apksig, which also aligns the
  archive (4 bytes, ``.so`` files to a page) as ``zipalign -p 4`` would.
* ``jar``/``focus-jar`` on an APK: v1 only, without the v1 claim of v2/v3. Classic
  signing-task clients run ``zipalign 4`` on what these names return; that is safe after v1
  only. An APK that Android accepts only with v2+ (target SDK >= 30) is refused with a pointer
  to the ``apk`` names (apksig's own verification of the v1 output says so).
* ``jar``/``focus-jar`` on anything else (JAR, AAR, zip): v1 (JAR signing) with SHA-256 digests
  and SHA256withRSA, as ``jarsigner -digestalg SHA-256 -sigalg SHA256withRSA`` would.

Signing runs in one long-lived JVM driving apksig (:mod:`sealbox.formats._apksig`): no JVM
start per file. The key never goes there: apksig's signatures come back over the JVM's pipe
as digests, signed here through the key interface (a key file in memory, or a PKCS#11 token),
so no keystore, key or PIN reaches the JVM. Start-up proves that path with a sample APK and
JAR, then stops the JVM (signing workers are forked afterwards); the first job starts it again.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from ..archives import DEFAULT_MAX_MEMBERS, DEFAULT_MAX_TOTAL, PARSE_ERRORS, Editor, rewrite_zip, zip_members
from ..errors import ConfigError, FormatRejected, SigningFailed, VerificationFailed
from ..keys import HashName
from ..procs import tool_reason
from ._apksig import APKSIG_JAR, V1, V2, V3, JvmSettings, jvm_for
from .base import FormatSettings, KeyResolver, Signer, SignRequest, child_env, public_file, run_verifier

if TYPE_CHECKING:
    from ..deploy.context import DevContext

#: store password of the public truststores (a truststore holds no secret)
TRUSTSTORE_PASSWORD = "changeit"  # noqa: S105
#: what signing needs (verifying needs apksigner, zipalign and jarsigner)
TOOLS = ("java", "javac")
#: the classic names: v1 only (callers may zipalign the result), JARs and APKs
CLASSIC_FORMATS = ("jar", "focus-jar")
#: the APK-only names (v1+v2+v3, zipaligned) and the classic name whose key each shares
APK_FORMATS = {"apk": "jar", "focus-apk": "focus-jar"}

DEFAULT_TIMEOUT = 300.0
#: JVM options: no hsperfdata file in /tmp (a private tmpdir is added)
DEFAULT_JAVA_OPTIONS = ("-XX:-UsePerfData", "-XX:+UseSerialGC", "-Xmx1024m")
#: a JVM takes at most this many jobs, and new ones for at most this many seconds
DEFAULT_JVM_JOBS = 2000
DEFAULT_JVM_LIFETIME = 3600.0
#: the minimum SDK apksig is told for a JAR (no AndroidManifest to read it from): >= 18 gives
#: SHA-256 digests and SHA256withRSA, what jarsigner -digestalg SHA-256 gives
JAR_MIN_SDK = 24
_CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"

_SIGNATURE_FILE = re.compile(r"^META-INF/(?:[^/]+\.(?:SF|RSA|DSA|EC)|SIG-[^/]*)$", re.IGNORECASE)
_MANIFEST = "META-INF/MANIFEST.MF"
_AXML_MAGIC = b"\x03\x00\x08\x00"
#: apksig's verification: the APK's target SDK needs a signature scheme newer than v1
_V2_REQUIRED = re.compile(r"Target SDK version (\d+) requires a minimum of signature scheme (v\d+)")


# -- the input: checked and rewritten under the archive rules (sealbox.archives) ---------------


def _clean_manifest(data: bytes) -> bytes:
    """Drop the per-entry digest attributes (and sections left empty) from a JAR manifest."""
    text = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    # An attribute's pieces are joined once: adding each continuation line to the attribute
    # made a long one quadratic (a 4 MiB manifest took 26 s of CPU).
    pieces: list[list[list[bytes]]] = [[]]
    for line in text.split(b"\n"):
        if not line:
            if pieces[-1]:
                pieces.append([])
        elif line.startswith(b" ") and pieces[-1]:
            pieces[-1][-1].append(line[1:])
        else:
            pieces[-1].append([line])
    sections = [[b"".join(attribute) for attribute in s] for s in pieces if s]
    main, *entries = sections or [[]]
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
    chunks, start, limit = [], 0, 72
    while len(line) - start > limit:  # (by index: slicing off the rest each time was quadratic)
        cut = start + limit
        while cut > start + 1 and 0x80 <= line[cut] < 0xC0:
            cut -= 1
        chunks.append(line[start:cut])
        start, limit = cut, 71
    chunks.append(line[start:])
    return b"\r\n ".join(chunks) + b"\r\n"


@dataclass(frozen=True)
class _Prepared:
    path: Path
    #: None for an APK, else why the input is not one (content only, never its name)
    not_apk: str | None

    @property
    def is_apk(self) -> bool:
        return self.not_apk is None


def _safe(text: str, limit: int = 120) -> str:
    """``text`` as one short line of printable ASCII (it may hold bytes of the archive)."""
    return text[:limit].encode("unicode_escape").decode("ascii")


def _alignment(name: str) -> int:
    """``zipalign -p 4``'s rule for STORED members: native libraries to a page, the rest to 4."""
    return 4096 if name.endswith(".so") else 4


def _prepare(
    src_path: Path, dest: Path, max_members: int, max_uncompressed: int, require_apk: bool = False
) -> _Prepared:
    """Check the input under the archive rules and write its unsigned, cleaned copy to ``dest``:
    the old signature files dropped, the manifest's digest lines removed, everything else copied
    as it is. Every way a malformed archive can fail is a :class:`FormatRejected` saying what."""
    members = zip_members(src_path, max_members=max_members, max_total=max_uncompressed)
    not_apk: str | None = None
    if not any(m.name == "AndroidManifest.xml" for m in members):
        not_apk = "the archive has no AndroidManifest.xml at its root"
        if require_apk:  # refuse before the rewrite
            raise FormatRejected(f"not an APK: {not_apk}")
    axml_head = b""

    def look(plain: bytes) -> None:  # the Android manifest is copied unchanged, only looked at
        nonlocal axml_head
        axml_head = plain[:4]

    def editor(name: str) -> Editor | None:
        if name == "AndroidManifest.xml":
            return look
        return _clean_manifest if name.upper() == _MANIFEST else None

    # aligned as zipalign -p 4 would (apksig keeps the alignment it finds): JARs too, harmlessly
    rewrite_zip(src_path, dest, members, drop=_SIGNATURE_FILE.match, edit=editor, align=_alignment)
    if not_apk is None and axml_head != _AXML_MAGIC:
        not_apk = "AndroidManifest.xml is not compiled binary XML"
    if require_apk and not_apk is not None:
        raise FormatRejected(f"not an APK: {not_apk}")
    return _Prepared(dest, not_apk)


def is_apk_file(path: Path) -> bool:
    """Whether ``path`` holds an APK: a zip with a binary-XML ``AndroidManifest.xml`` at its root."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("AndroidManifest.xml") as f:
            return f.read(4) == _AXML_MAGIC
    except (KeyError, OSError, RuntimeError, *PARSE_ERRORS):  # RuntimeError: encrypted member
        return False


# -- the signer ---------------------------------------------------------------------------------


def _seconds_option(settings: FormatSettings, name: str, default: float) -> float:
    value = settings.get(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"format '{settings.name}': '{name}' must be a positive number of seconds")
    return float(value)


def _int_option(settings: FormatSettings, name: str, default: int, low: int, high: int) -> int:
    value = settings.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"format '{settings.name}': '{name}' must be an integer in [{low}, {high}]")
    return value


class AndroidSigner(Signer):
    family = "android"
    verifier = (
        "APK: apksigner verify --verbose --print-certs --min-sdk-version 18 (cert public/<fmt>.pem) + "
        "zipalign -c -p 4 (apk names; classic names: apksigner verify again after zipalign -f 4); "
        "JAR: jarsigner -verify -strict -keystore public/<fmt>-truststore.p12"
    )

    def __init__(self, settings: FormatSettings, keys: KeyResolver) -> None:
        super().__init__(settings, keys)
        key = keys(settings.require_key())
        key.require(settings.name, "rsa")
        if key.certificate.public_key() != key.public_key:
            raise ConfigError(
                f"format '{settings.name}': the certificate of key '{settings.key}' is not its own"
            )
        # apksig gets the certificates; the key stays behind the key interface, in this process
        self._key = key
        self._chain = [c.public_bytes(serialization.Encoding.DER) for c in key.chain]
        # the archive rules' limits; the rewrite writes no zip64, hence at most 0xFFFF members
        self._max_members = _int_option(settings, "max_members", DEFAULT_MAX_MEMBERS, 1, 0xFFFF)
        self._max_uncompressed = _int_option(settings, "max_uncompressed_size", DEFAULT_MAX_TOTAL, 1, 1 << 40)
        self._timeout = _seconds_option(settings, "timeout", DEFAULT_TIMEOUT)
        java_options = settings.get("java_options", list(DEFAULT_JAVA_OPTIONS))
        if not isinstance(java_options, list) or not all(
            isinstance(o, str) and o.startswith("-") for o in java_options
        ):
            raise ConfigError(f"format '{settings.name}': 'java_options' must be a list of JVM options")
        lifetime = _seconds_option(settings, "jvm_lifetime", DEFAULT_JVM_LIFETIME)
        jobs = _int_option(settings, "jvm_jobs", DEFAULT_JVM_JOBS, 1, 1 << 30)
        # formats with the same JVM settings share one JVM (usually all four names)
        self._jvm = jvm_for(JvmSettings(tuple(java_options), jobs, lifetime))
        if not self._jvm.proven:
            self._prove()

    @classmethod
    def available(cls) -> str | None:
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if not APKSIG_JAR.is_file():
            missing.append(str(APKSIG_JAR))
        if missing:
            return f"missing: {', '.join(missing)} (Debian: openjdk-17-jdk-headless libapksig-java)"
        return None

    # -- signing --------------------------------------------------------------------------------
    def sign(self, request: SignRequest) -> None:
        work = request.work_dir
        # the upload's name plays no part: a result is named by (format, sha1) alone
        apk_only = self.format in APK_FORMATS
        prepared = _prepare(
            request.input, work / "unsigned.zip", self._max_members, self._max_uncompressed, apk_only
        )
        signed = work / ("signed.apk" if prepared.is_apk else "signed.jar")
        if prepared.is_apk:
            # classic callers zipalign what they get, which drops a v2/v3 block (and a v1
            # claiming v2/v3 would then fail): v1 only for them
            self._apksig(prepared.path, signed, V1 | V2 | V3 if apk_only else V1, None)
            if not apk_only:
                self._check_v1_only(signed)
        else:
            self._apksig(prepared.path, signed, V1, JAR_MIN_SDK)
        if not signed.is_file() or signed.stat().st_size == 0:
            raise SigningFailed("apksig wrote no output")
        shutil.copyfile(signed, request.output)

    def _apksig(self, src: Path, dest: Path, flags: int, min_sdk: int | None) -> None:
        self._jvm.sign(src, dest, flags, min_sdk, self._chain, self._sign_digest, self._timeout)

    def _sign_digest(self, hash_name: HashName, digest: bytes) -> bytes:
        """A signature apksig asked for, made through the key interface and checked before it
        goes back (a faulty one never reaches an output)."""
        return self._key.sign_digest(digest, hash_name, "pkcs1v15")

    def _prove(self) -> None:
        """Sign a small APK (v1+v2+v3) and a JAR once: a JVM or an apksig that cannot sign stops
        start-up here rather than failing every job. Then the JVM stops: signing workers are
        forked after start-up and must inherit no pipe to it (the first job starts it again)."""
        from ._apk import write_apk, write_jar

        with tempfile.TemporaryDirectory(prefix="sealbox-probe-") as tmp:
            work = Path(tmp)
            try:
                apk, jar = write_apk(work), write_jar(work)
                self._apksig(apk, work / "signed.apk", V1 | V2 | V3, None)
                self._apksig(jar, work / "signed.jar", V1, JAR_MIN_SDK)
            except (SigningFailed, FormatRejected) as e:
                raise ConfigError(
                    f"format '{self.format}': apksig cannot sign with key '{self.settings.key}': {e}"
                ) from None
            finally:
                self._jvm.stop()
        self._jvm.proven = True

    def _check_v1_only(self, signed: Path) -> None:
        """Refuse an APK that a v1 signature alone cannot make valid: Android wants v2+ for a
        target SDK >= 30, which the classic names cannot give (their callers zipalign)."""
        verdict = self._jvm.verify(signed, self._timeout)
        if verdict.verified:
            return
        need = _V2_REQUIRED.search(verdict.text)
        if need is not None:
            apk_name = next(n for n, classic in APK_FORMATS.items() if classic == self.format)
            raise FormatRejected(
                f"this APK targets SDK {need.group(1)}, which Android accepts only with APK Signature "
                f"Scheme {need.group(2)} or later; '{self.format}' signs v1 only (its classic callers "
                f"zipalign the result, which strips v2/v3): sign it as '{apk_name}'"
            )
        # apksig's verdict on these bytes: it will not change
        raise FormatRejected(f"the v1-signed APK does not verify: {_safe(tool_reason(verdict.text), 300)}")

    # -- dev keys and verification ----------------------------------------------------------------
    @classmethod
    def dev_setup(cls, ctx: DevContext) -> dict[str, dict[str, Any]]:
        sections: dict[str, dict[str, Any]] = {}
        certs: dict[str, bytes] = {}
        for fmt in CLASSIC_FORMATS:
            key = ctx.signing_key(fmt, 2048)  # Android signing certificates are self-signed
            cert = ctx.self_signed(key, f"sealbox {ctx.level} {fmt} signer")
            name = ctx.add_chain(key, [cert]).name
            certs[fmt] = cert.public_bytes(serialization.Encoding.PEM)
            ctx.write_public(
                f"{fmt}.pem",
                certs[fmt],
                f"APK signed as '{fmt}' (v1 only): apksigner verify --verbose --print-certs "
                f"--min-sdk-version 18 FILE (signer cert SHA-256 digest = that of public/{fmt}.pem), "
                "and again after zipalign -f 4 FILE ALIGNED",
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
        for fmt, classic in APK_FORMATS.items():
            ctx.write_public(
                f"{fmt}.pem",
                certs[classic],
                f"APK signed as '{fmt}' (v1+v2+v3): apksigner verify --verbose --print-certs "
                f"--min-sdk-version 18 FILE (signer cert SHA-256 digest = that of public/{fmt}.pem, "
                f"the certificate of '{classic}') && zipalign -c -p 4 FILE",
            )
            sections[fmt] = {"key": sections[classic]["key"]}
        return sections

    @classmethod
    def verify(cls, fmt: str, signed: Path, original: Path | None, public_dir: Path) -> str:
        if fmt not in cls.formats:
            raise VerificationFailed(f"format '{fmt}' is not served by {cls.__name__}")
        if fmt in APK_FORMATS:
            return _verify_apk(fmt, signed, public_dir)
        if is_apk_file(signed):  # by content, as the signer decides
            return _verify_classic_apk(fmt, signed, public_dir)
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


def _apksigner_verify(fmt: str, signed: Path, public_dir: Path, schemes: tuple[str, ...]) -> str:
    """apksigner verify: one signer, this format's certificate, each of ``schemes`` verified.
    Returns the command line (without the file)."""
    cert_path = public_file(public_dir, f"{fmt}.pem")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as e:
        raise VerificationFailed(f"cannot read {cert_path}: {e}") from None
    want = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    cmd = ["apksigner", "verify", "--verbose", "--print-certs", "--min-sdk-version", "18", str(signed)]
    rc, out = _run_verifier(cmd, public_dir)
    if rc != 0:
        lines = [ln for ln in out.splitlines() if ln.strip()]
        why = next((ln for ln in lines if ln.startswith("ERROR")), lines[0] if lines else "failed")
        raise VerificationFailed(f"apksigner verify: {why[:300]} (exit {rc})")
    for scheme in schemes:
        if not re.search(rf"^Verified using {scheme} scheme [^:]*: true$", out, re.MULTILINE):
            raise VerificationFailed(f"apksigner verify: not verified with the {scheme} scheme")
    if not re.search(r"^Number of signers: 1$", out, re.MULTILINE):
        raise VerificationFailed("apksigner verify: expected exactly one signer")
    digest = re.search(r"^Signer #1 certificate SHA-256 digest: ([0-9a-f]{64})$", out, re.MULTILINE)
    if digest is None or digest.group(1) != want:
        raise VerificationFailed(
            f"apksigner verify: the APK is not signed with the certificate {cert_path.name}"
        )
    return " ".join(cmd[:-1])


def _verify_apk(fmt: str, signed: Path, public_dir: Path) -> str:
    """``apk``/``focus-apk``: v1, v2 and v3, zipaligned."""
    how = _apksigner_verify(fmt, signed, public_dir, ("v1", "v2", "v3"))
    align = ["zipalign", "-c", "-p", "4", str(signed)]
    rc, _ = _run_verifier(align, public_dir)
    if rc != 0:
        raise VerificationFailed(f"zipalign -c -p 4: not aligned (exit {rc})")
    return f"{how} FILE && {' '.join(align[:-1])} FILE"


def _verify_classic_apk(fmt: str, signed: Path, public_dir: Path) -> str:
    """An APK signed as ``jar``/``focus-jar``: v1 only, and still valid after the ``zipalign 4``
    that classic signing-task clients run on it."""
    if _has_apk_signing_block(signed):
        raise VerificationFailed(f"an APK signed as '{fmt}' must be v1 only: it has an APK Signing Block")
    how = _apksigner_verify(fmt, signed, public_dir, ("v1",))
    with tempfile.TemporaryDirectory(prefix="sealbox-verify-") as tmp:
        aligned = Path(tmp) / "aligned.apk"
        rc, out = _run_verifier(["zipalign", "-f", "4", str(signed), str(aligned)], public_dir)
        if rc != 0:
            raise VerificationFailed(f"zipalign -f 4 failed (exit {rc}): {tool_reason(out)}")
        try:
            _apksigner_verify(fmt, aligned, public_dir, ("v1",))
        except VerificationFailed as e:
            raise VerificationFailed(f"after zipalign -f 4: {e}") from None
    return f"{how} FILE && zipalign -f 4 FILE ALIGNED && {how} ALIGNED"


def _verify_jar(fmt: str, signed: Path, public_dir: Path) -> str:
    trust = public_file(public_dir, f"{fmt}-truststore.p12")
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
