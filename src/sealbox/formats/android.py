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

* ``apk``/``focus-apk``: APKs only. ``zipalign -p -f 4`` first, then ``apksigner sign`` with
  v1, v2 and v3 (never the other way round: zipalign drops the v2/v3 signing block).
* ``jar``/``focus-jar`` on an APK: ``zipalign -p -f 4``, then ``apksigner sign`` v1 only,
  without the v1 claim of v2/v3. Classic signing-task clients run ``zipalign 4`` on what these
  names return; that is safe after v1 only. An APK that Android accepts only with v2+ (target
  SDK >= 30) is refused with a pointer to the ``apk`` names.
* ``jar``/``focus-jar`` on anything else (JAR, AAR, zip): ``jarsigner`` SHA-256 / SHA256withRSA.

A key file's key reaches the JVM as a one-time PKCS#12 keystore, encrypted with a random
password, through a pipe (``/dev/fd/N``); the password goes through a second pipe. A key in a
PKCS#11 token stays there: the JVM opens the token through Java's SunPKCS11 provider (a config
file in the job's folder names the module and slot, no secret) and finds the key by its label
(the alias), which the certificate on the token beside it must share; the PIN goes through a
pipe (``--ks-pass file:`` / ``-storepass:file``). Start-up proves that hand-off with one
signature. The tools run through :func:`~sealbox.formats.base.run_tool`: a minimal environment
(plus the variables a PKCS#11 module needs, e.g. ``SOFTHSM2_CONF``), their process group
killed on timeout.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from ..archives import DEFAULT_MAX_MEMBERS, DEFAULT_MAX_TOTAL, PARSE_ERRORS, Editor, rewrite_zip, zip_members
from ..errors import ConfigError, FormatRejected, SigningFailed, VerificationFailed
from ..keys import FileHandoff, Pkcs11Handoff, ToolSecrets
from ..procs import ToolResult, tool_reason
from .base import FormatSettings, KeyResolver, Signer, SignRequest, child_env, run_tool, run_verifier

if TYPE_CHECKING:
    from ..deploy.context import DevContext

#: store password of the public truststores (a truststore holds no secret)
TRUSTSTORE_PASSWORD = "changeit"  # noqa: S105
ALIAS = "signer"
TOOLS = ("java", "jarsigner", "apksigner", "zipalign")
#: the classic names: v1 only (callers may zipalign the result), JARs and APKs
CLASSIC_FORMATS = ("jar", "focus-jar")
#: the APK-only names (v1+v2+v3, zipaligned) and the classic name whose key each shares
APK_FORMATS = {"apk": "jar", "focus-apk": "focus-jar"}

DEFAULT_TIMEOUT = 300.0
#: JVM options: no hsperfdata file in /tmp, a private tmpdir is added per job
DEFAULT_JAVA_OPTIONS = ("-XX:-UsePerfData", "-XX:+UseSerialGC", "-Xmx1024m")
_CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
#: Java 17 keeps SunPKCS11 in a module apksigner's --provider-class cannot reach without this
_EXPORT_SUNPKCS11 = "--add-exports=jdk.crypto.cryptoki/sun.security.pkcs11=ALL-UNNAMED"

_SIGNATURE_FILE = re.compile(r"^META-INF/(?:[^/]+\.(?:SF|RSA|DSA|EC)|SIG-[^/]*)$", re.IGNORECASE)
_MANIFEST = "META-INF/MANIFEST.MF"
_AXML_MAGIC = b"\x03\x00\x08\x00"
#: apksigner errors that mean "this APK can never be signed" rather than a tool failure
_APK_FORMAT_ERRORS = ("ApkFormatException", "MinSdkVersionException", "ZipFormatException")
#: apksigner verify: the APK's target SDK needs a signature scheme newer than v1
_V2_REQUIRED = re.compile(r"Target SDK version (\d+) requires a minimum of signature scheme (v\d+)")


def _one_time_password() -> str:
    """The password protecting one job's keystore (a function so tests can observe it)."""
    return secrets.token_urlsafe(32)


# -- the input: checked and rewritten under the archive rules (sealbox.archives) ---------------


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

    rewrite_zip(src_path, dest, members, drop=_SIGNATURE_FILE.match, edit=editor)
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


@dataclass(frozen=True)
class _JobKey:
    """How one job's JVM tool reaches the key: what its pipes carry, the options naming the
    keystore (given the pipes' paths), the key's alias, and what the JVM needs besides."""

    pipes: tuple[bytes, ...]
    apksigner: Callable[[list[str]], list[str]]
    jarsigner: Callable[[list[str]], list[str]]
    alias: str
    jvm: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)


def _sunpkcs11_config(fmt: str, key: Pkcs11Handoff) -> str:
    """The SunPKCS11 provider's config: the module and the slot of the key's token (no secret)."""
    if any(c in key.module for c in '"\\\n'):
        raise ConfigError(
            f"format '{fmt}': the PKCS#11 module path {key.module!r} cannot go into a Java config"
        )
    return f'name = sealbox\nlibrary = "{key.module}"\nslot = {key.slot}\n'


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
        # the tools get a key file's key as a PKCS#12 keystore over a pipe, a token's through SunPKCS11
        self._key = key.tool_handoff()
        self._sunpkcs11 = ""
        if isinstance(self._key, Pkcs11Handoff):
            if self._key.label is None:
                raise ConfigError(
                    f"format '{settings.name}': key '{settings.key}' needs a 'label': Java finds a "
                    "PKCS#11 key by the label it shares with its certificate on the token"
                )
            self._sunpkcs11 = _sunpkcs11_config(settings.name, self._key)
        # the archive rules' limits; the rewrite writes no zip64, hence at most 0xFFFF members
        self._max_members = _int_option(settings, "max_members", DEFAULT_MAX_MEMBERS, 1, 0xFFFF)
        self._max_uncompressed = _int_option(settings, "max_uncompressed_size", DEFAULT_MAX_TOTAL, 1, 1 << 40)
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
        if isinstance(self._key, Pkcs11Handoff):
            self._prove_pkcs11()

    @classmethod
    def available(cls) -> str | None:
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if missing:
            return f"missing tools: {', '.join(missing)} (Debian: openjdk-17-jdk-headless apksigner zipalign)"
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
        tmp = work / "jvm-tmp"
        tmp.mkdir(exist_ok=True)
        jvm = list(self._java_options)
        if not any(c.isspace() for c in str(tmp)):  # the apksigner launcher word-splits -J options
            jvm.append(f"-Djava.io.tmpdir={tmp}")
        key = self._job_key(work)
        jvm += key.jvm
        if prepared.is_apk:
            aligned = work / "aligned.apk"
            self._run(["zipalign", "-p", "-f", "4", str(prepared.path), str(aligned)], None, "zipalign", work)
            with ToolSecrets(*key.pipes) as sec:
                self._run(
                    [
                        "apksigner",
                        *(f"-J{o[1:]}" for o in jvm),
                        "sign",
                        *key.apksigner(sec.paths),
                        "--ks-key-alias",
                        key.alias,
                        "--v1-signing-enabled",
                        "true",
                        # classic callers zipalign what they get, which drops a v2/v3 block
                        # (and a v1 claiming v2/v3 would then fail): v1 only for them
                        "--v2-signing-enabled",
                        "true" if apk_only else "false",
                        "--v3-signing-enabled",
                        "true" if apk_only else "false",
                        "--v4-signing-enabled",
                        "false",
                        "--out",
                        str(signed),
                        str(aligned),
                    ],
                    sec,
                    "apksigner",
                    work,
                    key.env,
                )
            if not apk_only and signed.is_file():
                self._check_v1_only(signed, jvm, work)
        else:
            with ToolSecrets(*key.pipes) as sec:
                self._run(
                    [
                        "jarsigner",
                        *(f"-J{o}" for o in jvm),
                        *key.jarsigner(sec.paths),
                        "-digestalg",
                        "SHA-256",
                        "-sigalg",
                        "SHA256withRSA",
                        "-signedjar",
                        str(signed),
                        str(prepared.path),
                        key.alias,
                    ],
                    sec,
                    "jarsigner",
                    work,
                    key.env,
                )
        if not signed.is_file() or signed.stat().st_size == 0:
            raise SigningFailed(f"{'apksigner' if prepared.is_apk else 'jarsigner'} wrote no output")
        shutil.copyfile(signed, request.output)

    def _job_key(self, work: Path) -> _JobKey:
        """This job's way to the key: a key file's key as a PKCS#12 keystore under a one-time
        password (~190 bits of entropy, so a light KDF is enough); a token's key through
        SunPKCS11, whose config goes into ``work``, with the PIN for the pipe."""
        key = self._key
        if isinstance(key, Pkcs11Handoff):
            assert key.label is not None  # checked at start-up
            config = work / "sunpkcs11.cfg"
            config.write_text(self._sunpkcs11)
            return _JobKey(
                pipes=(key.pin + b"\n",),
                apksigner=lambda paths: [
                    "--provider-class", "sun.security.pkcs11.SunPKCS11", "--provider-arg", str(config),
                    "--ks", "NONE", "--ks-type", "PKCS11", "--ks-pass", f"file:{paths[0]}",
                ],
                jarsigner=lambda paths: [
                    "-keystore", "NONE", "-storetype", "PKCS11", "-addprovider", "SunPKCS11",
                    "-providerArg", str(config), "-storepass:file", paths[0],
                ],
                alias=key.label,
                jvm=(_EXPORT_SUNPKCS11,),
                env=key.env,
            )  # fmt: skip
        password = _one_time_password().encode()
        return _JobKey(
            pipes=(_keystore(key, password), password + b"\n"),
            apksigner=lambda p: ["--ks", p[0], "--ks-type", "PKCS12", "--ks-pass", f"file:{p[1]}"],
            jarsigner=lambda p: ["-keystore", p[0], "-storetype", "PKCS12", "-storepass:file", p[1]],
            alias=ALIAS,
        )

    def _prove_pkcs11(self) -> None:
        """Sign a small sample once (an APK for the APK names, else a JAR): a token key the JVM
        cannot reach (no certificate beside it, a wrong label or slot) stops start-up here
        rather than failing every job."""
        from ._apk import write_apk, write_jar

        with tempfile.TemporaryDirectory(prefix="sealbox-probe-") as tmp:
            work = Path(tmp)
            src = write_apk(work) if self.format in APK_FORMATS else write_jar(work)
            job = work / "job"
            job.mkdir()
            try:
                self.sign(SignRequest(src, work / "signed", src.name, job))
            except (SigningFailed, FormatRejected) as e:
                raise ConfigError(
                    f"format '{self.format}': the JVM cannot sign with key '{self.settings.key}' in its "
                    f"PKCS#11 token: {e}"
                ) from None

    def _check_v1_only(self, signed: Path, jvm: list[str], work: Path) -> None:
        """Refuse an APK that a v1 signature alone cannot make valid: Android wants v2+ for a
        target SDK >= 30, which the classic names cannot give (their callers zipalign)."""
        argv = ["apksigner", *(f"-J{o[1:]}" for o in jvm), "verify", str(signed)]
        res = self._run(argv, None, "apksigner verify", work, check=False)
        code, text = res.returncode, res.output
        if code == 0:
            return
        need = _V2_REQUIRED.search(text)
        if need is not None:
            apk_name = next(n for n, classic in APK_FORMATS.items() if classic == self.format)
            raise FormatRejected(
                f"this APK targets SDK {need.group(1)}, which Android accepts only with APK Signature "
                f"Scheme {need.group(2)} or later; '{self.format}' signs v1 only (its classic callers "
                f"zipalign the result, which strips v2/v3): sign it as '{apk_name}'"
            )
        if "DOES NOT VERIFY" in text:  # apksigner's verdict on these bytes: it will not change
            raise FormatRejected(f"the v1-signed APK does not verify: {_safe(res.reason, 300)}")
        raise SigningFailed(f"apksigner verify failed (exit {code}): {res.reason}")

    def _run(
        self,
        argv: list[str],
        sec: ToolSecrets | None,
        what: str,
        work: Path,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> ToolResult:
        """Run a tool in ``work`` (killed on timeout) with the minimal environment plus ``env``;
        with ``check``, a non-zero exit raises, as FormatRejected when apksigner says the APK
        is malformed."""
        malformed = _APK_FORMAT_ERRORS if what == "apksigner" else ()
        return run_tool(argv, what=what, timeout=self._timeout, cwd=work, secrets=sec,
                        env={**child_env(work, _CHILD_PATH), **(env or {})}, malformed=malformed,
                        check=check)  # fmt: skip

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


def _keystore(key: FileHandoff, password: bytes) -> bytes:
    """A key file's key and certificate as a PKCS#12 keystore under a one-time password."""
    return key.pkcs12(ALIAS.encode(), _pkcs12_encryption(password))


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
