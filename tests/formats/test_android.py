"""``jar`` / ``focus-jar`` / ``apk`` / ``focus-apk``: real apksigner, zipalign and jarsigner, signed
and verified end to end (classic names on APKs, and content-based dispatch: test_android_content)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import threading
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sealbox.deploy.dev import init_dev
from sealbox.errors import ConfigError, FormatRejected, VerificationFailed
from sealbox.formats import FormatSettings, SignRequest, android, signer_class
from sealbox.formats.android import AndroidSigner
from sealbox.keys import PassphraseSource, UnlockedKey, load_key
from sealbox.samples.android import binary_manifest, write_apk, write_jar
from sealbox.server.config import load_config
from tests.servers import exec_image

pytestmark = pytest.mark.skipif(AndroidSigner.available() is not None, reason=str(AndroidSigner.available()))

FORMATS = ("jar", "focus-jar")
APK_NAMES = ("apk", "focus-apk")
OTHER = {"jar": "focus-jar", "focus-jar": "jar", "apk": "focus-apk", "focus-apk": "apk"}
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


# -- shared helpers --------------------------------------------------------------------------------


@dataclass
class Deployment:
    root: Path
    public: Path
    passphrases: dict[str, str]
    resolver: Callable[[str], UnlockedKey]
    signers: dict[str, AndroidSigner]

    def signer(self, fmt: str, **options: Any) -> AndroidSigner:
        return AndroidSigner(FormatSettings(fmt, fmt, options, self.root), self.resolver)


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    root = tmp_path_factory.mktemp("android") / "dep"
    config_path = init_dev(root, "dep", formats=[*FORMATS, *APK_NAMES])
    cfg = load_config(config_path)
    source = PassphraseSource.from_file(root / "passphrases")
    cache: dict[str, UnlockedKey] = {}

    def resolver(name: str) -> UnlockedKey:
        if name not in cache:
            key = load_key(cfg.key_spec(name), source.get(name))
            assert isinstance(key, UnlockedKey)  # a dev deployment keeps its keys in files
            cache[name] = key
        return cache[name]

    signers: dict[str, AndroidSigner] = {}
    for fmt in (*FORMATS, *APK_NAMES):
        signer = signer_class(fmt)(cfg.format_settings(fmt), resolver)
        assert isinstance(signer, AndroidSigner)
        signers[fmt] = signer
    passphrases = dict(line.split(":", 1) for line in (root / "passphrases").read_text().splitlines() if line)
    return Deployment(root, root / "public", passphrases, resolver, signers)


def sign(signer: AndroidSigner, src: Path, tmp: Path, filename: str | None = None) -> Path:
    work = tmp / f"work-{src.name}"
    work.mkdir()
    out = tmp / f"signed-{src.name}"
    signer.sign(SignRequest(input=src, output=out, filename=filename or src.name, work_dir=work))
    return out


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=ENV, check=False)


def cert_sha256(public: Path, fmt: str) -> str:
    cert = x509.load_pem_x509_certificate((public / f"{fmt}.pem").read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def apksigner_verify(path: Path) -> subprocess.CompletedProcess[str]:
    return run("apksigner", "verify", "--verbose", "--print-certs", "--min-sdk-version", "18", str(path))


def jarsigner_verify(path: Path, truststore: Path) -> subprocess.CompletedProcess[str]:
    return run(
        "jarsigner", "-verify", "-strict", "-keystore", str(truststore),
        "-storetype", "PKCS12", "-storepass", "changeit", str(path),
    )  # fmt: skip


def member_data_offset(path: Path, name: str) -> int:
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    with path.open("rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + int(name_len) + int(extra_len)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# -- APK ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", APK_NAMES)  # the classic names sign APKs v1 only (test_android_content)
def test_apk_signed_v1_v2_v3_aligned_with_the_right_key(dep: Deployment, tmp_path: Path, fmt: str) -> None:
    apk = write_apk(tmp_path)
    assert run("zipalign", "-c", "-p", "4", str(apk)).returncode != 0, "sample must start unaligned"
    out = sign(dep.signers[fmt], apk, tmp_path)

    assert "apksigner verify" in AndroidSigner.verify(fmt, out, None, dep.public)
    res = apksigner_verify(out)
    assert res.returncode == 0, res.stdout + res.stderr
    for scheme in ("v1", "v2", "v3"):
        assert re.search(rf"^Verified using {scheme} scheme .*: true$", res.stdout, re.M), res.stdout
    digests = re.findall(r"^Signer #\d+ certificate SHA-256 digest: (\w+)$", res.stdout, re.M)
    assert digests == [cert_sha256(dep.public, fmt)]
    assert digests[0] != cert_sha256(dep.public, OTHER[fmt])
    assert run("zipalign", "-c", "-p", "4", str(out)).returncode == 0
    # the other format's public half must not accept this output
    with pytest.raises(VerificationFailed, match="not signed with the certificate"):
        AndroidSigner.verify(OTHER[fmt], out, None, dep.public)
    # content is unchanged
    with zipfile.ZipFile(apk) as a, zipfile.ZipFile(out) as b:
        for name in a.namelist():
            assert a.read(name) == b.read(name)
        assert b.getinfo("res/raw/blob.bin").compress_type == zipfile.ZIP_STORED


def test_presigned_apk_is_resigned_cleanly(dep: Deployment, tmp_path: Path) -> None:
    # sign the sample with a foreign key first (the signer under test signs as 'apk')
    foreign = dep.resolver("focus-jar")
    key = tmp_path / "foreign.pk8"
    key.write_bytes(
        foreign._key.private_bytes(  # the file backend's key
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert = tmp_path / "foreign.pem"
    cert.write_bytes(foreign.certificate.public_bytes(serialization.Encoding.PEM))
    apk = write_apk(tmp_path)
    aligned = tmp_path / "aligned.apk"
    assert run("zipalign", "-p", "-f", "4", str(apk), str(aligned)).returncode == 0
    presigned = tmp_path / "presigned.apk"
    res = run(
        "apksigner", "sign", "--key", str(key), "--cert", str(cert), "--v4-signing-enabled", "false",
        "--v1-signer-name", "OLDSIGNER", "--out", str(presigned), str(aligned),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert cert_sha256(dep.public, "focus-jar") in apksigner_verify(presigned).stdout

    out = sign(dep.signers["apk"], presigned, tmp_path)
    AndroidSigner.verify("apk", out, None, dep.public)
    res = apksigner_verify(out)
    assert res.returncode == 0
    assert "Number of signers: 1" in res.stdout
    assert cert_sha256(dep.public, "focus-jar") not in res.stdout
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        manifest = zf.read("META-INF/MANIFEST.MF").decode()
    assert not any("OLDSIGNER" in n for n in names), names
    assert manifest.count("Name: res/raw/blob.bin") == 1


def test_unsigned_and_tampered_apk_fail_verification(dep: Deployment, tmp_path: Path) -> None:
    apk = write_apk(tmp_path, blob_size=20000)
    with pytest.raises(VerificationFailed):
        AndroidSigner.verify("apk", apk, None, dep.public)  # unsigned input
    out = sign(dep.signers["apk"], apk, tmp_path)
    AndroidSigner.verify("apk", out, None, dep.public)
    flip_byte(out, member_data_offset(out, "res/raw/blob.bin") + 1000)
    assert apksigner_verify(out).returncode != 0
    with pytest.raises(VerificationFailed, match="apksigner verify"):
        AndroidSigner.verify("apk", out, None, dep.public)


def test_apk_with_broken_binary_manifest_is_rejected(dep: Deployment, tmp_path: Path) -> None:
    apk = tmp_path / "broken.apk"
    with zipfile.ZipFile(apk, "w") as zf:
        zf.writestr("AndroidManifest.xml", binary_manifest("org.example")[:40])
        zf.writestr("assets/a.txt", b"a")
    with pytest.raises(FormatRejected, match="apksigner"):
        sign(dep.signers["jar"], apk, tmp_path)
    assert not (tmp_path / "signed-broken.apk").exists()


# -- JAR ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_jar_signed_verifies_strict_with_the_right_truststore(
    dep: Deployment, tmp_path: Path, fmt: str
) -> None:
    jar = write_jar(tmp_path)
    assert jarsigner_verify(jar, dep.public / f"{fmt}-truststore.p12").returncode != 0  # unsigned
    out = sign(dep.signers[fmt], jar, tmp_path)
    assert "jarsigner -verify -strict" in AndroidSigner.verify(fmt, out, None, dep.public)
    res = jarsigner_verify(out, dep.public / f"{fmt}-truststore.p12")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "jar verified." in res.stdout
    # signed with this format's key only: the other truststore does not know the signer
    assert jarsigner_verify(out, dep.public / f"{OTHER[fmt]}-truststore.p12").returncode != 0
    with pytest.raises(VerificationFailed):
        AndroidSigner.verify(OTHER[fmt], out, None, dep.public)
    with zipfile.ZipFile(out) as zf:
        sig_files = [n for n in zf.namelist() if n.upper().endswith((".SF", ".RSA"))]
        manifest = zf.read("META-INF/MANIFEST.MF").decode()
    assert len(sig_files) == 2
    assert "SHA-256-Digest" in manifest and "Created-By: sealbox samples" in manifest


def test_presigned_jar_and_zip_named_jar_resigned(dep: Deployment, tmp_path: Path) -> None:
    first = sign(dep.signers["focus-jar"], write_jar(tmp_path), tmp_path)
    renamed = tmp_path / "again.jar"
    shutil.copyfile(first, renamed)
    out = sign(dep.signers["jar"], renamed, tmp_path)
    AndroidSigner.verify("jar", out, None, dep.public)
    with zipfile.ZipFile(out) as zf:
        manifest = zf.read("META-INF/MANIFEST.MF").decode()
        assert len([n for n in zf.namelist() if n.upper().endswith(".SF")]) == 1
    # one digest line per entry: the old ones were removed, not kept next to the new ones
    assert manifest.count("Name: org/sealbox/sample/Hello.class") == 1
    # an .aar-like zip holding a *text* AndroidManifest.xml is signed as a JAR
    aar = tmp_path / "lib.aar"
    with zipfile.ZipFile(aar, "w") as zf:
        zf.writestr("AndroidManifest.xml", "<manifest package='x'/>")
        zf.writestr("classes.jar", b"not really")
    AndroidSigner.verify("jar", sign(dep.signers["jar"], aar, tmp_path), None, dep.public)


def test_tampered_jar_fails_verification(dep: Deployment, tmp_path: Path) -> None:
    out = sign(dep.signers["jar"], write_jar(tmp_path), tmp_path)
    tampered = tmp_path / "tampered.jar"
    with zipfile.ZipFile(out) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("messages.properties"):
                data = data.replace(b"Hello", b"Howdy")
            dst.writestr(info, data)
    res = jarsigner_verify(tampered, dep.public / "jar-truststore.p12")
    assert res.returncode != 0
    with pytest.raises(VerificationFailed, match="jarsigner"):
        AndroidSigner.verify("jar", tampered, None, dep.public)


# -- bad inputs --------------------------------------------------------------------------------------


def _zip(path: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for info, data in members:
                zf.writestr(info, data)
    return path


def _symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = 0o120777 << 16
    return info


def _forged_size(path: Path) -> Path:
    """A jar whose central directory claims a 3 GiB member."""
    _zip(path, [("META-INF/MANIFEST.MF", b"Manifest-Version: 1.0\r\n\r\n"), ("a.bin", b"x" * 100)])
    data = bytearray(path.read_bytes())
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24 : cd + 28] = struct.pack("<I", 3 * 1024**3)
    path.write_bytes(bytes(data))
    return path


def _lying_crc(path: Path) -> Path:
    _zip(path, [("a.txt", b"hello world" * 10)])
    data = bytearray(path.read_bytes())
    for sig, off in ((b"PK\x03\x04", 14), (b"PK\x01\x02", 16)):
        pos = data.find(sig)
        data[pos + off] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "random": (lambda d: _write(d / "x.jar", os.urandom(4096)), "not a zip"),
    "empty-file": (lambda d: _write(d / "x.jar", b""), "not a zip"),
    "truncated": (lambda d: _write(d / "x.apk", write_apk(d).read_bytes()[:-200]), "not a zip"),
    "dotdot": (lambda d: _zip(d / "x.jar", [("../evil", b"x")]), "unsafe member '../evil'"),
    "nested-dotdot": (lambda d: _zip(d / "x.jar", [("a/../../evil", b"x")]), "unsafe member"),
    "absolute": (lambda d: _zip(d / "x.jar", [("/etc/evil", b"x")]), "absolute"),
    "drive": (lambda d: _zip(d / "x.jar", [("C:/evil", b"x")]), "absolute"),
    "backslash": (lambda d: _zip(d / "x.jar", [("..\\evil", b"x")]), "backslash"),
    "duplicate": (lambda d: _zip(d / "x.jar", [("a.txt", b"1"), ("a.txt", b"2")]), "duplicate member"),
    "symlink": (lambda d: _zip(d / "x.jar", [(_symlink("link"), b"/etc/passwd")]), "symlink"),
    "forged-size": (lambda d: _forged_size(d / "x.jar"), "zip bomb"),
    "bad-crc": (lambda d: _lying_crc(d / "x.jar"), "CRC mismatch"),
    "apk-without-manifest": (lambda d: _zip(d / "x.apk", [("classes.dex", b"dex")]), "AndroidManifest"),
    "apk-text-manifest": (
        lambda d: _zip(d / "x.apk", [("AndroidManifest.xml", b"<manifest/>")]),
        "not compiled binary XML",
    ),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def no_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if any external tool is started: validation must come first."""

    def popen(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a tool ran on a bad input: {args[0]}")

    monkeypatch.setattr(subprocess, "Popen", popen)


def _assert_rejected(signer: AndroidSigner, src: Path, tmp: Path, match: str) -> None:
    out = tmp / "out.bin"
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    with pytest.raises(FormatRejected, match=match) as exc:
        signer.sign(SignRequest(input=src, output=out, filename=src.name, work_dir=work))
    assert "\n" not in str(exc.value)
    assert not out.exists()


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_are_rejected_before_any_tool(
    dep: Deployment, tmp_path: Path, case: str, no_tools: None
) -> None:
    make, match = BAD_INPUTS[case]
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    # APK-ness is content, not a name: a zip without a binary manifest is a JAR to 'jar'
    fmt = "apk" if case.startswith("apk-") else "jar"
    _assert_rejected(dep.signers[fmt], make(src_dir), tmp_path, match)


def test_zip_bomb_with_highly_compressed_member(dep: Deployment, tmp_path: Path, no_tools: None) -> None:
    bomb = tmp_path / "bomb.jar"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("ok.txt", b"fine")
        with zf.open("bomb.bin", "w") as f:
            block = bytes(1 << 20)
            for _ in range(96):
                f.write(block)
    assert bomb.stat().st_size < 200_000
    signer = dep.signer("jar", max_uncompressed_size=1 << 30)
    _assert_rejected(signer, bomb, tmp_path, "member 'bomb.bin' expands")


def test_total_uncompressed_size_is_bounded(dep: Deployment, tmp_path: Path, no_tools: None) -> None:
    big = _zip(tmp_path / "big.jar", [("a.bin", os.urandom(600_000)), ("b.bin", os.urandom(600_000))])
    signer = dep.signer("jar", max_uncompressed_size=1 << 20)
    _assert_rejected(signer, big, tmp_path, "member 'b.bin' makes the archive expand beyond")


def test_too_many_members(dep: Deployment, tmp_path: Path, no_tools: None) -> None:
    many = _zip(tmp_path / "many.jar", [(f"f{i}.txt", b"x") for i in range(51)])
    _assert_rejected(
        dep.signer("jar", max_members=50), many, tmp_path, "51 members, more than the limit of 50"
    )


def test_bad_options_refused(dep: Deployment) -> None:
    for options in ({"max_members": 0}, {"max_uncompressed_size": "big"}, {"timeout": -1},
                    {"java_options": "-Xmx1g"}):  # fmt: skip
        with pytest.raises(ConfigError):
            dep.signer("jar", **options)


def test_manifest_cleaning() -> None:
    long_name = "a/" + "x" * 100 + ".class"
    manifest = (
        "Manifest-Version: 1.0\r\nCreated-By: me\r\n\r\n"
        f"Name: {long_name[:66]}\r\n {long_name[66:]}\r\nSHA-256-Digest: abc=\r\n\r\n"
        "Name: pkg/\r\nSealed: true\r\nSHA1-Digest: def=\r\n\r\n"
    ).encode()
    cleaned = android._clean_manifest(manifest)
    assert cleaned == (b"Manifest-Version: 1.0\r\nCreated-By: me\r\n\r\nName: pkg/\r\nSealed: true\r\n\r\n")
    wrapped = android._clean_manifest(f"Manifest-Version: 1.0\nX-Long: {'é' * 60}\n".encode())
    assert all(len(line) <= 72 for line in wrapped.split(b"\r\n"))
    assert wrapped.decode().replace("\r\n ", "").count("é") == 60


# -- secrets never leave through argv or the environment ---------------------------------------------


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier and pid not in found}
        found |= frontier
    return found


class ProcWatcher:
    """Records the argv and environment of this process's descendants (NUL-separated, as in
    /proc): for certain what each direct child was started with, and what /proc shows while
    they run (polled: how the JVM behind the apksigner launcher script is seen)."""

    def __init__(self) -> None:
        self.seen: set[tuple[bytes, bytes]] = set()
        self._earlier: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        seen = self.seen
        self._popen = real = subprocess.Popen

        class SpyPopen(real):  # type: ignore[valid-type,misc]
            def __init__(self, argv: Any, *args: Any, **kwargs: Any) -> None:
                super().__init__(argv, *args, **kwargs)
                seen.add(exec_image(argv, kwargs.get("env")))

        self._spy: Any = SpyPopen  # stands in for subprocess.Popen (a generic class)

    def _poll(self) -> None:
        me = os.getpid()
        earlier = self._earlier
        while not self._stop.is_set():
            for pid in _descendants(me) - earlier:  # not servers other tests left running
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    environ = Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:
                    continue
                if cmdline:
                    self.seen.add((cmdline, environ))
            time.sleep(0.002)

    def __enter__(self) -> ProcWatcher:
        self._earlier = _descendants(os.getpid())
        subprocess.Popen = self._spy  # type: ignore[misc]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.Popen = self._popen  # type: ignore[misc]
        self._stop.set()
        self._thread.join()


@pytest.mark.parametrize("kind", ["apk", "jar"])
def test_no_secret_in_child_cmdline_or_environ(
    dep: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setenv("SEALBOX_TEST_CANARY", "parent-env-must-not-leak")
    src = write_apk(tmp_path) if kind == "apk" else write_jar(tmp_path)
    dep.signers[kind]._jvm.stop()  # the job starts the long-lived JVM anew, under the watcher
    with ProcWatcher() as watcher:
        out = sign(dep.signers[kind], src, tmp_path)
    AndroidSigner.verify(kind, out, None, dep.public)

    secrets = [v.encode() for v in dep.passphrases.values()]
    assert all(len(s) >= 16 for s in secrets)
    programs = {os.path.basename(c.split(b"\0")[0]) for c, _ in watcher.seen}
    assert b"java" in programs, f"no JVM child observed: {programs}"
    me = Path("/proc/self/cmdline").read_bytes()
    for cmdline, environ in watcher.seen:
        for secret in secrets:
            assert secret not in cmdline and secret not in environ, cmdline
        if cmdline == me:
            continue  # forked but not yet exec'd: still a copy of this process
        names = {item.split(b"=", 1)[0] for item in environ.split(b"\0") if item}
        # the apksigner launcher is a bash script: bash adds PWD, OLDPWD, SHLVL and _ itself
        assert names <= {b"PATH", b"LANG", b"HOME", b"PWD", b"OLDPWD", b"SHLVL", b"_"}, names
        assert b"SEALBOX_TEST_CANARY" not in environ


def test_timeout_kills_the_tool(dep: Deployment, tmp_path: Path) -> None:
    # The apksig JVM, made to hang for certain: it waits at start-up until a file it creates is
    # removed, which nobody does. Start-up's test signature finds out, and kills it.
    hang = [
        "-XX:+UnlockDiagnosticVMOptions",
        "-XX:+PauseAtStartup",
        f"-XX:PauseAtStartupFile={tmp_path / 'paused'}",
    ]
    earlier = _descendants(os.getpid())  # e.g. servers other tests left running
    with pytest.raises(ConfigError, match="timed out"):
        dep.signer("jar", timeout=0.2, java_options=[*android.DEFAULT_JAVA_OPTIONS, *hang])
    assert not _descendants(os.getpid()) - earlier


def test_dev_setup_public_files(dep: Deployment) -> None:
    for fmt in FORMATS:
        assert (dep.public / f"{fmt}.pem").is_file()
        assert (dep.public / f"{fmt}-truststore.p12").is_file()
        res = run(
            "keytool", "-list", "-keystore", str(dep.public / f"{fmt}-truststore.p12"),
            "-storetype", "PKCS12", "-storepass", "changeit",
        )  # fmt: skip
        assert res.returncode == 0 and "trustedCertEntry" in res.stdout, res.stdout + res.stderr
    readme = (dep.public / "README").read_text()
    assert "jarsigner -verify -strict -keystore public/focus-jar-truststore.p12" in readme
    assert cert_sha256(dep.public, "jar") != cert_sha256(dep.public, "focus-jar")
