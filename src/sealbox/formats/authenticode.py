"""``sha2signcode`` family: SHA-256 Authenticode signatures of Windows PE and MSI files,
cabinets (CAB), security catalogs (CAT), APPX/MSIX packages and PowerShell scripts.

Wire names: ``sha2signcode`` (aliases ``signcode``, ``osslsigncode``), ``sha2signcodestub``
(adds the configured extra certificate, osslsigncode ``-ac``), and the ``-v2`` variants of both,
which add an RFC 3161 timestamp when ``timestamp_url`` is configured.

Every kind but MSI is signed in-process, byte for byte as osslsigncode 2.9 writes it, through
the key interface (a key file and a PKCS#11 token alike): PE images (:mod:`._pe`), cabinets
(:mod:`._cab`), security catalogs (:mod:`._catalog`), PowerShell scripts (:mod:`._script`) and
APPX/MSIX packages (:mod:`._appx`); a process per file is what made these kinds twice as slow as
the raw tool. Verifying them still takes osslsigncode (:data:`_VERIFY_MIN_VERSION`).

MSI packages are signed by Debian's ``osslsigncode`` (2.5 and 2.9 both work). The key never touches disk,
argv or the child's environment. A key file's key and chain are re-encrypted per job into a
PKCS#12 blob under a random one-time password and handed over as ``-pkcs12 /dev/fd/N`` with the
password as ``-readpass /dev/fd/M`` (both pipes, see :class:`~sealbox.keys.ToolSecrets`).
osslsigncode cannot read ``-key`` from a pipe (it probes the file several times), PKCS#12 it can.
A key in a PKCS#11 token stays there: osslsigncode loads the module through OpenSSL's ``pkcs11``
engine (Debian ``libengine-pkcs11-openssl``) and signs there, given the key's PKCS#11 URI (no
PIN in it), the chain as ``-certs /dev/fd/N`` and the token's PIN as ``-readpass /dev/fd/M``;
start-up proves that hand-off with one signature.

Name rules (extension, blocklist) are :meth:`AuthenticodeSigner.refuse_name`, applied at
upload and never remembered; signing decides the kind of file from the bytes alone
(:func:`~sealbox.winfiles.authenticode_kind`), never from the name.

The Windows file rules (names, PE/MSI recognition, :func:`is_signed`) live in
:mod:`sealbox.winfiles`, shared with the task runner, and are re-exported here.
"""

from __future__ import annotations

import functools
import re
import secrets
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, pkcs12

from ..errors import ConfigError, FormatRejected, SigningFailed, VerificationFailed
from ..fsutil import remove_tree
from ..keys import FileHandoff, Pkcs11Handoff, ToolSecrets
from ..winfiles import (  # the Windows file rules live apart; re-exported (__all__)
    ALLOWED_EXTENSIONS,
    BLOCKLIST,
    KIND_EXTENSIONS,
    OLE_MAGIC,
    Kind,
    authenticode_kind,
    check_pe,
    is_msi_bytes,
    is_pe_bytes,
    is_signable_name,
    is_signed,
    name_problem,
    name_rejection,
    pe_cert_table,
    read_head,
)
from ._appx import sign_appx
from ._cab import sign_cab
from ._catalog import sign_catalog
from ._pe import Sign, request_timestamp, sign_pe_file, signed_data
from ._script import sign_script
from .base import (
    FormatSettings,
    KeyResolver,
    Signer,
    SignRequest,
    child_env,
    public_file,
    run_tool,
    run_verifier,
)

if TYPE_CHECKING:
    from ..deploy.context import DevContext

__all__ = [
    "ALLOWED_EXTENSIONS",
    "BLOCKLIST",
    "CA_FILE",
    "KIND_NAMES",
    "OLE_MAGIC",
    "TSA_CA_FILE",
    "AuthenticodeSigner",
    "check_pe",
    "is_msi_bytes",
    "is_pe_bytes",
    "is_signable_name",
    "is_signed",
    "name_rejection",
    "signature_pkcs7",
]

#: public file the verifier trusts; optional TSA root for deployments whose TSA is not in the system store
CA_FILE = "sha2signcode-ca.pem"
TSA_CA_FILE = "sha2signcode-tsa-ca.pem"

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
#: osslsigncode messages that say why a PKCS#11 key could not be used, in order of priority
_PKCS11_ERRORS = ("engine", "PIN", "private key", "certificate")
_PKCS12_ROUNDS = 2048  # the password is 192 random bits: key stretching buys nothing

#: the osslsigncode release that verifies a kind (signing needs none: only MSI runs the tool,
#: and every release Debian ships signs MSI). A catalog needs 2.8 (2.5 cannot verify them), a
#: script too (PowerShell came in 2.8), an APPX/MSIX package 2.7 (NEWS.md: APPX came in 2.7)
_VERIFY_MIN_VERSION: dict[Kind, tuple[int, int]] = {"catalog": (2, 8), "script": (2, 8), "APPX": (2, 7)}
#: each kind as reasons name it
KIND_NAMES: dict[Kind, str] = {
    "PE": "PE images",
    "MSI": "MSI packages",
    "CAB": "cabinets (CAB)",
    "catalog": "security catalogs (CAT)",
    "APPX": "APPX/MSIX packages",
    "script": "PowerShell scripts",
}


@functools.lru_cache(maxsize=8)
def osslsigncode_version(tool: str) -> tuple[int, int] | None:
    """(major, minor) of the osslsigncode at ``tool`` (``--version``), None if it cannot tell."""
    try:
        res = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL, env=child_env(), check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"osslsigncode (\d+)\.(\d+)", res.stdout + res.stderr)
    return (int(found[1]), int(found[2])) if found else None


def signature_pkcs7(path: Path) -> bytes:
    """The DER PKCS#7 SignedData embedded in a signed PE (first WIN_CERTIFICATE), trimmed."""
    head, size = read_head(path)
    off, length = pe_cert_table(head, size)
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
#: The kinds signed in-process: (input, output, signature builder) -> None, raising
#: FormatRejected for a malformed input. What is not here (MSI) goes to osslsigncode.
_IN_PROCESS: dict[Kind, Callable[[Path, Path, Sign], None]] = {
    "PE": sign_pe_file,
    "CAB": sign_cab,
    "catalog": sign_catalog,
    "script": sign_script,
    "APPX": sign_appx,
}


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
    family = "authenticode"
    verifier = f"osslsigncode verify -CAfile public/{CA_FILE} -in FILE"
    #: only an MSI job needs a scratch folder (for osslsigncode): it makes and removes its own,
    #: so the kinds signed in-process cost no folder per job
    uses_work_dir = False

    def __init__(self, settings: FormatSettings, keys: KeyResolver) -> None:
        super().__init__(settings, keys)
        fmt = settings.name
        key = keys(settings.require_key())
        if not key.chain:
            raise ConfigError(
                f"format '{fmt}': key '{settings.key}' needs its certificate chain (leaf first)"
            )
        if key.algorithm == "ed25519":
            raise ConfigError(f"format '{fmt}': key '{settings.key}' must be an RSA or EC key")
        self._signing_key = key  # PE images are signed in-process, through the key interface
        # osslsigncode (MSI) gets a key file's key as PKCS#12, a token's as a PKCS#11 URI (pipes both)
        self._key = key.tool_handoff()
        self._chain_pem = b"".join(c.public_bytes(Encoding.PEM) for c in key.chain)
        tool = settings.get("osslsigncode") or shutil.which("osslsigncode")
        if not tool:
            raise ConfigError(f"format '{fmt}': osslsigncode is not installed")
        self._tool = str(tool)
        self._description: str | None = settings.get("description")
        self._url: str | None = settings.get("url")
        self._timeout = float(settings.get("timeout", 120))
        self._extra_cert: Path | None = None
        self._certificates = list(key.chain)  # what an in-process signature carries, leaf first
        if fmt in _STUB:
            self._extra_cert = settings.path("extra_cert")
            assert self._extra_cert is not None
            self._extra_cert = self._extra_cert.absolute()
            try:
                self._certificates += x509.load_pem_x509_certificates(self._extra_cert.read_bytes())
            except (OSError, ValueError) as e:
                raise ConfigError(f"format '{fmt}': extra_cert {self._extra_cert}: {e}") from None
        self._timestamp_url: str | None = settings.get("timestamp_url")
        if self._timestamp_url is not None:
            if fmt not in _V2:
                raise ConfigError(f"format '{fmt}': timestamp_url is only used by the -v2 formats")
            if not str(self._timestamp_url).startswith(("http://", "https://")):
                raise ConfigError(f"format '{fmt}': timestamp_url must be an http(s) URL")
        if isinstance(self._key, Pkcs11Handoff):
            self._prove_pkcs11()

    @classmethod
    def available(cls) -> str | None:
        if shutil.which("osslsigncode") is None:
            return "osslsigncode is not installed (apt-get install osslsigncode)"
        return None

    # -- signing --------------------------------------------------------------------------
    def refuse_name(self, filename: str) -> str | None:
        # The name is not echoed: the reason goes into a response header.
        problem = name_problem(filename)
        return None if problem is None else f"{self.format}: the file name {problem}"

    def check_input(self, request: SignRequest) -> Kind:
        """Apply the content rules; return the kind of file to sign.

        The kind is decided by the bytes, never by the name: a result belongs to
        (format, sha1), and the reason of a refusal is replayed to uploads under any name."""
        try:
            return authenticode_kind(request.input)
        except FormatRejected as e:
            raise FormatRejected(f"{self.format}: {e}") from None

    def _key_pipes(self, key: FileHandoff | Pkcs11Handoff) -> tuple[bytes, bytes]:
        """What osslsigncode reads from its two pipes: a key file's key as a one-time PKCS#12
        and its password, or a token key's certificate chain and the token's PIN."""
        if isinstance(key, Pkcs11Handoff):
            return self._chain_pem, key.pin
        password = _one_time_password()
        encryption = (
            PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(_PKCS12_ROUNDS)
            .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
            .hmac_hash(hashes.SHA256())
            .build(password)
        )
        return key.pkcs12(b"authenticode", encryption), password

    def _osslsigncode(self, src: Path, out: Path, work_dir: Path, options: list[str]) -> str | None:
        """``osslsigncode sign`` of ``src`` into ``out`` (absolute paths) with this format's key;
        None if it signed, else its output. Not starting or a timeout raise SigningFailed."""
        key = self._key
        env = None  # run_tool's minimal environment; a PKCS#11 module may need its own variables
        with ToolSecrets(*self._key_pipes(key)) as fds:
            if isinstance(key, Pkcs11Handoff):
                # the PIN is not in the URI: the engine logs in with what -readpass gives it
                key_options = ["-pkcs11module", key.module, "-certs", fds.paths[0], "-key", key.uri]
                env = {**child_env(work_dir), **key.env}
            else:
                key_options = ["-pkcs12", fds.paths[0]]
            argv = [self._tool, "sign", *key_options, "-readpass", fds.paths[1], "-h", "sha256", *options,
                    "-in", str(src), "-out", str(out)]  # fmt: skip
            try:
                # not check=True: success also needs "Succeeded", and _raise_failure words the reason
                res = run_tool(argv, what=f"{self.format}: osslsigncode", timeout=self._timeout,
                               cwd=work_dir, secrets=fds, env=env, check=False)  # fmt: skip
            except SigningFailed:
                out.unlink(missing_ok=True)
                raise
        if res.returncode != 0 or "Succeeded" not in res.output or not out.is_file():
            out.unlink(missing_ok=True)
            return res.output
        return None

    def _prove_pkcs11(self) -> None:
        """Sign a small MSI once: a token key osslsigncode cannot reach (no engine, a wrong URI
        or chain) stops start-up here rather than failing every job."""
        from ._msi import write_msi

        with tempfile.TemporaryDirectory(prefix="sealbox-probe-") as tmp:
            work = Path(tmp)
            failed = self._osslsigncode(write_msi(work, "probe.msi"), work / "signed.msi", work, [])
        if failed is not None:
            raise ConfigError(
                f"format '{self.format}': osslsigncode cannot sign with key '{self.settings.key}' "
                f"in its PKCS#11 token (needs libengine-pkcs11-openssl): {_tail(failed, _PKCS11_ERRORS)}"
            )

    def sign(self, request: SignRequest) -> None:
        kind = self.check_input(request)
        in_process = _IN_PROCESS.get(kind)
        if in_process is not None:
            try:
                in_process(request.input, request.output, self._signature)
            except FormatRejected as e:
                request.output.unlink(missing_ok=True)
                raise FormatRejected(f"{self.format}: {e}") from None
            except BaseException:
                request.output.unlink(missing_ok=True)
                raise
            return
        # A private folder beside where the job would have had one (the server's tmp/, swept at
        # start-up); absolute: the child runs in it
        work_dir = Path(tempfile.mkdtemp(prefix="sealbox-msi-", dir=request.work_dir.parent.absolute()))
        try:
            self._sign_with_tool(request, KIND_EXTENSIONS[kind], work_dir)
        finally:
            remove_tree(work_dir)  # never raises; what stays is swept with tmp/ at start-up

    def _sign_with_tool(self, request: SignRequest, ext: str, work_dir: Path) -> None:
        """osslsigncode signs ``request.input`` (an MSI) into ``request.output``, in ``work_dir``,
        under the kind's extension ``ext`` (never the upload's name). Already signed?
        osslsigncode without -nest replaces the signature: the output carries ours only."""
        tmp_out = work_dir / f"authenticode-signed{ext}"
        # osslsigncode tells some kinds by their name: it reads the input under the kind's name
        tmp_in = work_dir / f"authenticode-input{ext}"
        tmp_in.symlink_to(request.input.absolute())
        options: list[str] = []
        if self._description:
            options += ["-n", self._description]
        if self._url:
            options += ["-i", self._url]
        if self._extra_cert is not None:
            options += ["-ac", str(self._extra_cert)]
        if self._timestamp_url:
            options += ["-ts", self._timestamp_url]
        failed = self._osslsigncode(tmp_in, tmp_out, work_dir, options)
        if failed is not None:
            self._raise_failure(failed)
        shutil.move(str(tmp_out), str(request.output))

    def _signature(self, content: bytes, content_type: bytes) -> bytes:
        """This format's Authenticode signature (PKCS#7 SignedData, DER) over ``content``, made
        through the key interface, with the configured description, URL, extra certificates
        and timestamp server (:data:`._pe.Sign`)."""
        key = self._signing_key
        ecdsa = key.algorithm == "ec"
        url = self._timestamp_url
        return signed_data(
            content,
            content_type,
            self._certificates,
            lambda data: key.sign(data, "sha256", "ecdsa" if ecdsa else "pkcs1v15"),
            ecdsa=ecdsa,
            description=self._description,
            url=self._url,
            timestamp=None if url is None else lambda value: self._timestamp(url, value),
        )

    def _timestamp(self, url: str, signature: bytes) -> bytes:
        try:
            return request_timestamp(url, signature, self._timeout)
        except SigningFailed as e:
            raise SigningFailed(f"{self.format}: {e}") from None

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
        name = ctx.signing_key("authenticode", certificate="sealbox authenticode").name
        root = ctx.code_signing_ca()
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
        try:
            kind = authenticode_kind(signed)
        except FormatRejected as e:
            raise VerificationFailed(f"{signed.name}: {e}") from None
        need = _VERIFY_MIN_VERSION.get(kind)
        version = osslsigncode_version(tool)
        if need is not None and (version is None or version < need):
            raise VerificationFailed(f"verifying {KIND_NAMES[kind]} needs osslsigncode {need[0]}.{need[1]}")
        argv = [tool, "verify", "-CAfile", str(public_file(public_dir, CA_FILE))]
        if (public_dir / TSA_CA_FILE).is_file():
            argv += ["-TSA-CAfile", str(public_dir / TSA_CA_FILE)]
        with tempfile.TemporaryDirectory(prefix="sealbox-verify-") as tmp:
            # under its kind's extension: osslsigncode tells a script by its name
            named = Path(tmp) / f"signed{KIND_EXTENSIONS[kind]}"
            named.symlink_to(signed.absolute())
            res = run_verifier(
                [*argv, "-in", str(named)], "osslsigncode verify", 120, child_env(signed.parent)
            )
        argv += ["-in", str(signed)]
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
