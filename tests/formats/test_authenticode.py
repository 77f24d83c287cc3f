"""Authenticode (sha2signcode family): real osslsigncode signing, real osslsigncode verification.

Set ``SEALBOX_TEST_OSSLSIGNCODE`` to extra osslsigncode binaries (``:``-separated, e.g. an
extracted Debian 2.5 build) to run the signing round trip with those too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sealbox.deploy import pki
from sealbox.deploy.dev import init_dev
from sealbox.errors import ConfigError, FormatRejected, SigningFailed, VerificationFailed
from sealbox.formats import FormatSettings, SignRequest, authenticode, signer_class
from sealbox.formats._msi import write_msi
from sealbox.formats.authenticode import AuthenticodeSigner
from sealbox.keys import UnlockedKey
from sealbox.samples.pe import launcher_path, write_dll, write_pe
from tests.servers import exec_image, refusing_port

OSSL = shutil.which("osslsigncode")
pytestmark = pytest.mark.skipif(OSSL is None, reason="osslsigncode is not installed")

FORMATS = (
    "sha2signcode",
    "sha2signcodestub",
    "sha2signcode-v2",
    "sha2signcodestub-v2",
    "signcode",
    "osslsigncode",
)
STUB = ("sha2signcodestub", "sha2signcodestub-v2")
ALT_TOOLS = [p for p in os.environ.get("SEALBOX_TEST_OSSLSIGNCODE", "").split(":") if p]


# -- shared helpers ------------------------------------------------------------------------
@dataclass
class Deployment:
    root: Path
    public_dir: Path
    resolver: Callable[[str], UnlockedKey]
    sections: dict[str, FormatSettings]

    def signer(self, fmt: str, **options: Any) -> AuthenticodeSigner:
        base = self.sections[fmt]
        settings = FormatSettings(fmt, base.key, {**base.options, **options}, base.base_dir)
        cls = signer_class(fmt)
        assert cls is AuthenticodeSigner
        return AuthenticodeSigner(settings, self.resolver)


@pytest.fixture
def deployment(authenticode_dep: Deployment) -> Deployment:
    """A dev deployment's signers for :data:`FORMATS`, file keys (one for the run: conftest.py)."""
    return authenticode_dep


@dataclass
class Job:
    request: SignRequest
    work_dir: Path
    output: Path


def make_job(tmp_path: Path, src: Path, filename: str | None = None) -> Job:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    out = tmp_path / "out.bin"
    out.unlink(missing_ok=True)
    req = SignRequest(input=src, output=out, filename=filename or src.name, work_dir=work)
    return Job(req, work, out)


def sign(signer: AuthenticodeSigner, tmp_path: Path, src: Path, filename: str | None = None) -> Path:
    job = make_job(tmp_path, src, filename)
    signer.sign(job.request)
    assert job.output.is_file()
    assert list(job.work_dir.iterdir()) == [], "signing left scratch files behind"
    return job.output


def raw_verify(path: Path, ca: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    assert OSSL is not None
    return subprocess.run(
        [OSSL, "verify", "-CAfile", str(ca), *extra, "-in", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def embedded_certs(path: Path, tmp_path: Path) -> tuple[list[str], str]:
    """Subjects (CN) of the certificates in the embedded PKCS#7, by our parse and by openssl."""
    der = authenticode.signature_pkcs7(path)
    with warnings.catch_warnings():  # osslsigncode 2.5 leaves the certificate SET unsorted (BER, not DER)
        warnings.simplefilter("ignore", UserWarning)
        certs = pkcs7.load_der_pkcs7_certificates(der)
    ours = [c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value for c in certs]
    p7 = tmp_path / "sig.p7"
    p7.write_bytes(der)
    res = subprocess.run(
        ["openssl", "pkcs7", "-inform", "DER", "-in", str(p7), "-print_certs", "-noout"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [str(s) for s in ours], res.stdout


# -- dev set-up ------------------------------------------------------------------------------
def test_dev_setup_layout(deployment: Deployment) -> None:
    ca = deployment.public_dir / "sha2signcode-ca.pem"
    root = x509.load_pem_x509_certificate(ca.read_bytes())
    assert root.subject == root.issuer
    readme = (deployment.public_dir / "README").read_text()
    assert "osslsigncode verify -CAfile public/sha2signcode-ca.pem -in FILE" in readme
    keys = {deployment.sections[f].key for f in FORMATS}
    assert keys == {"authenticode"}
    for fmt in FORMATS:
        assert ("extra_cert" in deployment.sections[fmt].options) == (fmt in STUB)
    assert AuthenticodeSigner.available() is None


def test_dev_keys_differ_per_deployment(deployment: Deployment, tmp_path: Path) -> None:
    other = init_dev(tmp_path / "other", "nightly", formats=["sha2signcode"])
    other_ca = (other.parent / "public" / "sha2signcode-ca.pem").read_bytes()
    assert other_ca != (deployment.public_dir / "sha2signcode-ca.pem").read_bytes()


# -- signing round trips -------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["exe", "dll"])
def test_sign_and_verify(deployment: Deployment, tmp_path: Path, fmt: str, kind: str) -> None:
    src = write_pe(tmp_path, "setup.exe") if kind == "exe" else write_dll(tmp_path, "xul.dll")
    assert not authenticode.is_signed(src)
    out = sign(deployment.signer(fmt), tmp_path, src)
    assert authenticode.is_signed(out)
    assert AuthenticodeSigner.verify(fmt, out, src, deployment.public_dir).startswith("osslsigncode verify")
    res = raw_verify(out, deployment.public_dir / "sha2signcode-ca.pem")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Succeeded" in res.stdout and "Signature verification: ok" in res.stdout
    assert "Timestamp is not available" in res.stdout  # no timestamp_url configured
    subjects, printed = embedded_certs(out, tmp_path)
    assert any(s.startswith("sealbox authenticode") for s in subjects)
    has_stub = any(s.startswith("sealbox stub dummy") for s in subjects)
    assert has_stub == (fmt in STUB), subjects
    assert ("sealbox stub dummy" in printed) == (fmt in STUB)


def test_signed_with_sha256(deployment: Deployment, tmp_path: Path) -> None:
    out = sign(deployment.signer("sha2signcode"), tmp_path, write_pe(tmp_path))
    res = raw_verify(out, deployment.public_dir / "sha2signcode-ca.pem")
    assert (
        "Message digest algorithm  : SHA256" in res.stdout or "Message digest algorithm: SHA256" in res.stdout
    )


@pytest.mark.parametrize("tool", ALT_TOOLS or [None])
def test_other_osslsigncode_builds(deployment: Deployment, tmp_path: Path, tool: str | None) -> None:
    if tool is None:
        pytest.skip(
            "set SEALBOX_TEST_OSSLSIGNCODE to other osslsigncode binaries (e.g. Debian 2.5) to run this"
        )
    signer = deployment.signer("sha2signcodestub", osslsigncode=tool)
    src = write_msi(tmp_path)  # osslsigncode signs MSI; a PE is signed in-process
    out = sign(signer, tmp_path, src)
    AuthenticodeSigner.verify("sha2signcodestub", out, src, deployment.public_dir)


def test_resign_already_signed_replaces_signature(deployment: Deployment, tmp_path: Path) -> None:
    first = sign(deployment.signer("sha2signcode"), tmp_path, write_pe(tmp_path))
    again_in = tmp_path / "signed-once.exe"
    shutil.move(first, again_in)
    second = sign(deployment.signer("sha2signcodestub"), tmp_path, again_in, "setup.exe")
    res = raw_verify(second, deployment.public_dir / "sha2signcode-ca.pem")
    assert res.returncode == 0 and "Number of verified signatures: 1" in res.stdout, res.stdout
    subjects, _ = embedded_certs(second, tmp_path)
    assert any(s.startswith("sealbox stub dummy") for s in subjects)  # the new signature, not the old


def test_tampered_output_fails(deployment: Deployment, tmp_path: Path) -> None:
    src = write_pe(tmp_path)
    out = sign(deployment.signer("sha2signcode"), tmp_path, src)
    data = bytearray(out.read_bytes())
    data[0x1000] ^= 0x01  # inside the first section
    bad = tmp_path / "tampered.exe"
    bad.write_bytes(bytes(data))
    with pytest.raises(VerificationFailed, match=r"MISMATCH|failed"):
        AuthenticodeSigner.verify("sha2signcode", bad, src, deployment.public_dir)
    res = raw_verify(bad, deployment.public_dir / "sha2signcode-ca.pem")
    assert res.returncode != 0 and "Succeeded" not in res.stdout


def test_wrong_root_fails(deployment: Deployment, tmp_path: Path) -> None:
    out = sign(deployment.signer("sha2signcode"), tmp_path, write_pe(tmp_path))
    other = tmp_path / "pub"
    other.mkdir()
    (other / "sha2signcode-ca.pem").write_bytes(pki.make_ca("someone else").cert_pem())
    with pytest.raises(VerificationFailed):
        AuthenticodeSigner.verify("sha2signcode", out, None, other)


def test_unsigned_fails_verify(deployment: Deployment, tmp_path: Path) -> None:
    with pytest.raises(VerificationFailed):
        AuthenticodeSigner.verify("sha2signcode", write_pe(tmp_path), None, deployment.public_dir)


# -- refusals ----------------------------------------------------------------------------------
def _truncated(tmp_path: Path) -> Path:
    data = launcher_path().read_bytes()
    p = tmp_path / "cut.exe"
    p.write_bytes(data[: len(data) * 2 // 3])
    return p


def _text(tmp_path: Path) -> Path:
    p = tmp_path / "notes.exe"
    p.write_bytes(b"This is not a program.\0\n" * 100)
    return p


def _random(tmp_path: Path) -> Path:
    p = tmp_path / "noise.exe"
    p.write_bytes(os.urandom(64 * 1024))
    return p


def _mz_garbage(tmp_path: Path) -> Path:
    p = tmp_path / "mz.exe"
    p.write_bytes(b"MZ" + os.urandom(8000))
    return p


def _bad_lfanew(tmp_path: Path) -> Path:
    data = bytearray(launcher_path().read_bytes())
    data[0x3C:0x40] = (0x7FFFFFF0).to_bytes(4, "little")
    p = tmp_path / "lfanew.exe"
    p.write_bytes(bytes(data))
    return p


def _ole_garbage(tmp_path: Path) -> Path:
    # A plausible OLE header (v3, little-endian marker, 512-byte sectors) over random sectors
    head = bytearray(os.urandom(4096))
    head[:8] = authenticode.OLE_MAGIC
    head[24:30] = bytes.fromhex("3e000300feff")
    head[30:32] = (9).to_bytes(2, "little")
    p = tmp_path / "broken.msi"
    p.write_bytes(bytes(head))
    return p


BAD_NAMES = [
    "msvcp140.dll",
    "MSVCR120.DLL",
    "bin/msvcp140_1.dll",
    "D3DCompiler_43.dll",
    "d3dcompiler_42.DLL",
    "d3dx9_42.dll",
    "D3DX9_43.dll",
    "setup.txt",
    "setup.exe.zip",
    "README",
    "setup.msixbundle",
    "x.EXE.bak",
]


@pytest.mark.parametrize("filename", BAD_NAMES)
def test_refused_names(deployment: Deployment, filename: str) -> None:
    # A rule on names, applied at upload (never by sign(), never remembered); the reason does
    # not echo the name (it goes into a response header).
    fixed = [f"is on the blocklist of Microsoft-signed files ({p})" for p in authenticode.BLOCKLIST]
    fixed.append(f"does not end in {', '.join(authenticode.ALLOWED_EXTENSIONS)}")
    reason = deployment.signer("sha2signcode").refuse_name(filename)
    assert reason in [f"sha2signcode: the file name {text}" for text in fixed]
    assert authenticode.name_rejection(filename) is not None


@pytest.mark.parametrize("filename", ["setup.exe", "XUL.DLL", "driver.sys", "pkg.msi", "d3dx9_44.dll"])
def test_accepted_names(deployment: Deployment, filename: str) -> None:
    assert deployment.signer("sha2signcode").refuse_name(filename) is None


@pytest.mark.parametrize(
    "maker,filename,reason",
    [
        (_truncated, "setup.exe", "truncated PE"),
        (_text, "setup.dll", "not a PE"),  # NUL bytes: not a script (text is one, by content)
        (_random, "setup.dll", "not a PE"),
        (_mz_garbage, "setup.exe", "not a PE"),
        (_bad_lfanew, "setup.exe", "not a PE"),
        (_ole_garbage, "setup.exe", "refused the input"),  # MSI or PE: decided by the bytes
        (_ole_garbage, "setup.msi", "refused the input"),
    ],
)
def test_refused_contents(
    deployment: Deployment, tmp_path: Path, maker: Callable[[Path], Path], filename: str, reason: str
) -> None:
    job = make_job(tmp_path, maker(tmp_path), filename)
    with pytest.raises(FormatRejected, match=reason) as e:
        deployment.signer("sha2signcode-v2").sign(job.request)
    assert filename not in str(e.value)  # replayed to uploads of these bytes under any name
    assert not job.output.exists()
    assert list(job.work_dir.iterdir()) == []


def test_windows_rules_helpers(tmp_path: Path) -> None:
    assert authenticode.is_signable_name("setup.exe")
    assert authenticode.is_signable_name("dir/Sub/XUL.DLL")
    assert authenticode.is_signable_name("driver.sys") and authenticode.is_signable_name("pkg.msi")
    assert not authenticode.is_signable_name("firefox/msvcp140.dll")
    assert not authenticode.is_signable_name("D3DX9_43.DLL")
    assert authenticode.is_signable_name("d3dx9_44.dll")
    assert not authenticode.is_signable_name("application.ini")
    head = launcher_path().read_bytes()[:4096]
    assert authenticode.is_pe_bytes(head)
    assert not authenticode.is_pe_bytes(head[:0x40])  # e_lfanew points past the bytes given
    assert not authenticode.is_pe_bytes(b"PK\3\4" + head[4:])
    assert not authenticode.is_pe_bytes(b"MZ")
    assert not authenticode.is_signed(_random(tmp_path))
    assert not authenticode.is_signed(_ole_garbage(tmp_path))


# -- configuration -----------------------------------------------------------------------------
def test_stub_requires_extra_cert(deployment: Deployment) -> None:
    base = deployment.sections["sha2signcodestub"]
    opts = {k: v for k, v in base.options.items() if k != "extra_cert"}
    with pytest.raises(ConfigError, match="extra_cert"):
        AuthenticodeSigner(
            FormatSettings("sha2signcodestub", base.key, opts, base.base_dir), deployment.resolver
        )


def test_timestamp_only_for_v2(deployment: Deployment) -> None:
    with pytest.raises(ConfigError, match="-v2"):
        deployment.signer("sha2signcode", timestamp_url="http://127.0.0.1:1/")
    with pytest.raises(ConfigError, match="http"):
        deployment.signer("sha2signcode-v2", timestamp_url="file:///etc/passwd")


# -- RFC 3161 timestamps from a local TSA -------------------------------------------------------
class LocalTSA:
    """An RFC 3161 HTTP responder on 127.0.0.1 answering with ``openssl ts -reply``."""

    def __init__(self, root: Path) -> None:
        self.dir = root
        root.mkdir()
        self.ca = pki.make_ca("sealbox test TSA root")
        tsa = pki.issue(
            self.ca, "sealbox test TSA", ekus=[ExtendedKeyUsageOID.TIME_STAMPING], eku_critical=True
        )
        (root / "tsa.pem").write_bytes(tsa.cert_pem())
        key = tsa.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (root / "tsa.key").write_bytes(key)  # test-only TSA key in the test's temp dir
        (root / "serial").write_text("01\n")
        (root / "ts.cnf").write_text(
            "[ tsa ]\ndefault_tsa = tsa1\n[ tsa1 ]\n"
            f"serial = {root}/serial\ncrypto_device = builtin\n"
            f"signer_cert = {root}/tsa.pem\ncerts = {root}/tsa.pem\nsigner_key = {root}/tsa.key\n"
            "signer_digest = sha256\ndefault_policy = 1.2.3.4.1\nother_policies = 1.2.3.4.2\n"
            "digests = sha1, sha256, sha384, sha512\naccuracy = secs:1\nordering = yes\ntsa_name = no\n"
            "ess_cert_id_chain = no\ness_cert_id_alg = sha256\n"
        )
        self.requests = 0
        self.available = True  # False: answer 503, as a timestamp server that is down
        self._lock = threading.Lock()
        tsa_self = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if not tsa_self.available:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with tsa_self._lock:
                    tsa_self.requests += 1
                    reply = tsa_self.reply(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/timestamp-reply")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reply(self, query: bytes) -> bytes:
        (self.dir / "q.tsq").write_bytes(query)
        subprocess.run(
            [
                "openssl",
                "ts",
                "-reply",
                "-config",
                str(self.dir / "ts.cnf"),
                "-queryfile",
                str(self.dir / "q.tsq"),
                "-out",
                str(self.dir / "r.tsr"),
            ],
            capture_output=True,
            check=True,
        )
        return (self.dir / "r.tsr").read_bytes()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tsa(inprocess_tsa: LocalTSA) -> LocalTSA:
    """A local RFC 3161 TSA (one for the run: conftest.py)."""
    return inprocess_tsa


@pytest.mark.parametrize("fmt", ["sha2signcode-v2", "sha2signcodestub-v2"])
def test_v2_timestamp(deployment: Deployment, tsa: LocalTSA, tmp_path: Path, fmt: str) -> None:
    before = tsa.requests
    src = write_pe(tmp_path)
    out = sign(deployment.signer(fmt, timestamp_url=tsa.url), tmp_path, src)
    assert tsa.requests == before + 1
    # The deployment's public dir plus the TSA root, as an operator with a private TSA would ship it
    pub = tmp_path / "public"
    shutil.copytree(deployment.public_dir, pub)
    with pytest.raises(VerificationFailed, match="Timestamp"):
        AuthenticodeSigner.verify(fmt, out, src, pub)  # TSA root unknown: the timestamp does not verify
    (pub / "sha2signcode-tsa-ca.pem").write_bytes(tsa.ca.cert_pem())
    AuthenticodeSigner.verify(fmt, out, src, pub)
    res = raw_verify(out, pub / "sha2signcode-ca.pem", "-TSA-CAfile", str(pub / "sha2signcode-tsa-ca.pem"))
    assert res.returncode == 0 and "Succeeded" in res.stdout
    assert "Timestamp Server Signature verification: ok" in res.stdout


def test_v2_without_tsa_configured_has_no_timestamp(deployment: Deployment, tmp_path: Path) -> None:
    out = sign(deployment.signer("sha2signcodestub-v2"), tmp_path, write_pe(tmp_path))
    res = raw_verify(out, deployment.public_dir / "sha2signcode-ca.pem")
    assert res.returncode == 0 and "Timestamp is not available" in res.stdout


def test_unreachable_tsa_is_transient(deployment: Deployment, tmp_path: Path) -> None:
    job = make_job(tmp_path, write_pe(tmp_path))
    with refusing_port() as port, pytest.raises(SigningFailed):
        deployment.signer("sha2signcode-v2", timestamp_url=f"http://127.0.0.1:{port}/").sign(job.request)
    assert not job.output.exists() and list(job.work_dir.iterdir()) == []


# -- key hand-off --------------------------------------------------------------------------------
def test_password_never_in_child_argv_or_env(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    passwords: list[bytes] = []
    real_password = authenticode._one_time_password

    def recording_password() -> bytes:
        pw = real_password()
        passwords.append(pw)
        return pw

    monkeypatch.setattr(authenticode, "_one_time_password", recording_password)
    # Every snapshot is kept: the first one of a pid may predate its exec (still our own argv).
    seen: dict[int, set[tuple[bytes, bytes]]] = {}

    def snapshot(pid: int) -> None:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return
        if cmd:
            seen.setdefault(pid, set()).add((cmd, env))

    real_popen = subprocess.Popen

    class SpyPopen(real_popen):  # type: ignore[valid-type,misc]
        def __init__(self, argv: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(argv, *args, **kwargs)
            # What exec got, for certain (a child that has exited leaves nothing in /proc)
            seen.setdefault(self.pid, set()).add(exec_image(argv, kwargs.get("env")))
            snapshot(self.pid)  # and what the running child shows (exec has happened once Popen returns)

    stop = threading.Event()

    def poll_children() -> None:  # and independently, poll /proc for our children
        me = str(os.getpid())
        while not stop.is_set():
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        stat = Path(f"/proc/{entry}/stat").read_text()
                    except OSError:
                        continue
                    if stat.rsplit(")", 1)[1].split()[1] == me:
                        snapshot(int(entry))
            time.sleep(0.001)

    monkeypatch.setattr(subprocess, "Popen", SpyPopen)
    poller = threading.Thread(target=poll_children, daemon=True)
    poller.start()
    try:
        # MSI: osslsigncode signs it with the key handed over (a PE is signed in-process)
        src = write_msi(tmp_path, "big-setup.msi", os.urandom(48 * 1024))
        out = sign(deployment.signer("sha2signcodestub-v2"), tmp_path, src)
        second = tmp_path / "second"
        second.mkdir()
        sign(deployment.signer("sha2signcode"), second, write_msi(second))
    finally:
        stop.set()
        poller.join()
    monkeypatch.undo()
    AuthenticodeSigner.verify("sha2signcodestub-v2", out, src, deployment.public_dir)

    assert len(passwords) == 2 and len(set(passwords)) == 2

    def is_tool(cmd: bytes) -> bool:
        return os.path.basename(cmd.split(b"\0")[0]) == b"osslsigncode"

    children = [snap for snaps in seen.values() for snap in snaps if is_tool(snap[0])]
    assert len({pid for pid, snaps in seen.items() if any(is_tool(c) for c, _ in snaps)}) >= 2, seen
    for cmd, env in children:
        argv = cmd.split(b"\0")
        for pw in passwords:
            assert pw not in cmd and pw not in env
        assert b"-pass" not in argv
        assert argv[argv.index(b"-pkcs12") + 1].startswith(b"/dev/fd/")
        assert argv[argv.index(b"-readpass") + 1].startswith(b"/dev/fd/")
        names = {kv.split(b"=", 1)[0] for kv in env.split(b"\0") if kv}
        assert names <= {b"PATH", b"LANG", b"HOME"}, names


def test_relative_paths(deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_pe(Path("."), "rel.exe")
    Path("w").mkdir()
    req = SignRequest(
        input=Path("rel.exe"), output=Path("rel-out.exe"), filename="rel.exe", work_dir=Path("w")
    )
    deployment.signer("sha2signcodestub").sign(req)
    AuthenticodeSigner.verify("sha2signcodestub", Path("rel-out.exe"), None, deployment.public_dir)
