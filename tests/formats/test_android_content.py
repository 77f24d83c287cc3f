"""Android signing through a real ``sealbox serve``: decided by the bytes, never by the upload's name
(a result is named by (format, sha1) alone); the classic names (``jar``, ``focus-jar``) sign APKs
v1 only so they stay valid after the ``zipalign 4`` classic clients run; the APK names (``apk``,
``focus-apk``) sign v1+v2+v3, zipaligned; malformed zips are refused at once."""

from __future__ import annotations

import hashlib
import re
import shutil
import ssl
import struct
import subprocess
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sealbox.formats.android import APK_FORMATS, AndroidSigner
from sealbox.samples.android import write_apk, write_jar
from tests.servers import Deployment, ServerProcess, start_server

pytestmark = pytest.mark.skipif(AndroidSigner.available() is not None, reason=str(AndroidSigner.available()))

FORMATS = ["jar", "focus-jar", "apk", "focus-apk"]
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = Deployment.create(tmp_path_factory.mktemp("android-content") / "dep", "dep", FORMATS)
    sp = start_server(d)
    yield sp
    sp.stop()


# -- helpers ---------------------------------------------------------------------------------------


def legacy_apk(directory: Path) -> Path:
    """An APK targeting SDK 29: Android accepts it with a v1 signature alone."""
    return write_apk(directory, "legacy.apk", target_sdk=29)


def named(src: Path, directory: Path, name: str) -> Path:
    """The bytes of ``src`` under another upload name."""
    directory.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(src, directory / name))


def sign(sp: ServerProcess, src: Path, fmt: str, out: Path) -> Path:
    with sp.client(timeout=120) as c:
        res = c.sign(src, [fmt], out)
    assert res.ok, res.error
    return out


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=ENV, check=False, timeout=300)


def apksigner_verify(path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return run("apksigner", "verify", *options, str(path))


def cert_sha256(public: Path, fmt: str) -> str:
    cert = x509.load_pem_x509_certificate((public / f"{fmt}.pem").read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def signature_files(path: Path) -> str:
    with zipfile.ZipFile(path) as zf:
        return "".join(zf.read(n).decode() for n in zf.namelist() if n.upper().endswith(".SF"))


def sha1(data: bytes) -> str:
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


def outcome(sp: ServerProcess, fmt: str, name: str, data: bytes) -> httpx.Response:
    """Upload ``data`` as ``name`` the way signtool does, then poll until the job is done (an
    upload of bytes already refused is answered at once with the remembered reason)."""
    ctx = ssl.create_default_context(cafile=str(sp.deployment.ca))
    digest = sha1(data)
    with httpx.Client(verify=ctx, timeout=120) as h:
        up = h.post(
            f"{sp.server.url}/sign/{fmt}",
            data={"sha1": digest, "filename": name, "token": sp.token(), "nonce": ""},
            files={"filedata": (name, data)},
        )
        if up.status_code != 202:
            return up
        deadline = time.monotonic() + 120
        while True:
            r = h.get(f"{sp.server.url}/sign/{fmt}/{digest}")
            if "X-Pending" not in r.headers or time.monotonic() > deadline:
                return r


def job_lines(sp: ServerProcess, fmt: str, digest: str) -> list[dict[str, object]]:
    """The server's log lines of the jobs for (fmt, digest), once there is one (bounded wait:
    the line is written just after the outcome is stored)."""
    deadline = time.monotonic() + 30
    while True:
        lines = [
            e
            for e in sp.log_lines()
            if e.get("event") == "job" and (e.get("format"), e.get("sha1")) == (fmt, digest)
        ]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def refusal(sp: ServerProcess, fmt: str, name: str, data: bytes) -> str:
    """The reason a permanent refusal of ``data`` gives (checked to be remembered, not retried)."""
    r = outcome(sp, fmt, name, data)
    assert r.status_code in (400, 404) and "X-Pending" not in r.headers, (r.status_code, r.headers)
    reason = r.headers["X-Sealbox-Error"]
    assert reason.startswith("signing failed: "), reason
    # the job ended with a FormatRejected on its first attempt: "failed" would be the retry path
    lines = job_lines(sp, fmt, sha1(data))
    assert lines and lines[-1]["outcome"] == "rejected", lines
    return reason


# -- the same bytes give the same output under any name ---------------------------------------------


@pytest.mark.parametrize("fmt", ["jar", "apk"])
@pytest.mark.parametrize(
    "names", [("app.jar", "app.apk"), ("app.apk", "app.jar")], ids=["jar-first", "apk-first"]
)
def test_same_bytes_same_output_under_any_name(
    server: ServerProcess, tmp_path: Path, fmt: str, names: tuple[str, str]
) -> None:
    src = legacy_apk(tmp_path) if fmt == "jar" else write_apk(tmp_path)
    outputs = []
    for n, name in enumerate(names):
        upload = named(src, tmp_path / f"in{n}", name)
        outputs.append(sign(server, upload, fmt, tmp_path / f"out{n}" / name))
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    res = apksigner_verify(outputs[0], "--verbose")
    assert res.returncode == 0, res.stdout + res.stderr
    if fmt in APK_FORMATS:
        assert run("zipalign", "-c", "-p", "4", str(outputs[0])).returncode == 0
    else:  # v1 only, whatever the name: nothing a zipalign could strip
        assert "X-Android-APK-Signed" not in signature_files(outputs[0])
    # the format's own verifier: for 'jar' it includes the check after zipalign -f 4
    AndroidSigner.verify(fmt, outputs[1], None, server.deployment.public)


# -- classic names: v1 only, still valid after zipalign ---------------------------------------------


@pytest.mark.parametrize("fmt", ["jar", "focus-jar"])
def test_classic_name_apk_survives_zipalign(server: ServerProcess, tmp_path: Path, fmt: str) -> None:
    out = sign(server, legacy_apk(tmp_path), fmt, tmp_path / "out" / "legacy.apk")
    assert "X-Android-APK-Signed" not in signature_files(out)
    assert b"APK Sig Block 42" not in out.read_bytes()
    # what a classic signing-task client does with the APK it gets back
    aligned = tmp_path / "aligned.apk"
    res = run("zipalign", "-f", "4", str(out), str(aligned))
    assert res.returncode == 0, res.stdout + res.stderr
    for path in (out, aligned):
        plain = apksigner_verify(path)
        assert plain.returncode == 0, plain.stdout + plain.stderr
        res = apksigner_verify(path, "--verbose", "--print-certs", "--min-sdk-version", "18")
        assert res.returncode == 0, res.stdout + res.stderr
        assert re.search(r"^Verified using v1 scheme .*: true$", res.stdout, re.M), res.stdout
        digests = re.findall(r"^Signer #\d+ certificate SHA-256 digest: (\w+)$", res.stdout, re.M)
        assert digests == [cert_sha256(server.deployment.public, fmt)]
    assert "zipalign -f 4" in AndroidSigner.verify(fmt, out, None, server.deployment.public)


def test_classic_name_refuses_an_apk_that_needs_v2(server: ServerProcess, tmp_path: Path) -> None:
    # target SDK 33: Android wants v2+, which a v1-only signature (all zipalign leaves) lacks
    data = write_apk(tmp_path).read_bytes()
    first = refusal(server, "jar", "modern.apk", data)
    assert "targets SDK 33" in first and "'apk'" in first, first
    again = refusal(server, "jar", "renamed.jar", data)  # remembered, replayed
    assert again == first
    # a fresh job of the same content under another name says the same
    fresh = refusal(server, "focus-jar", "renamed.jar", data)
    assert fresh == first.replace("'jar'", "'focus-jar'").replace("'apk'", "'focus-apk'")
    for name in ("modern", "renamed"):
        assert name not in first and name not in fresh
    # the same bytes sign under the APK name
    src = named(tmp_path / "app.apk", tmp_path / "again", "modern.apk")
    AndroidSigner.verify(
        "apk", sign(server, src, "apk", tmp_path / "out.apk"), None, server.deployment.public
    )


# -- the APK names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["apk", "focus-apk"])
def test_apk_names_sign_v1_v2_v3_aligned(server: ServerProcess, tmp_path: Path, fmt: str) -> None:
    out = sign(server, write_apk(tmp_path), fmt, tmp_path / "out" / "app.apk")
    res = apksigner_verify(out, "--verbose", "--print-certs", "--min-sdk-version", "18")
    assert res.returncode == 0, res.stdout + res.stderr
    for scheme in ("v1", "v2", "v3"):
        assert re.search(rf"^Verified using {scheme} scheme .*: true$", res.stdout, re.M), res.stdout
    digests = re.findall(r"^Signer #\d+ certificate SHA-256 digest: (\w+)$", res.stdout, re.M)
    # the key of the classic name it pairs with
    assert digests == [cert_sha256(server.deployment.public, APK_FORMATS[fmt])]
    assert run("zipalign", "-c", "-p", "4", str(out)).returncode == 0
    assert "zipalign -c -p 4" in AndroidSigner.verify(fmt, out, None, server.deployment.public)


@pytest.mark.parametrize("kind", ["jar", "text-manifest"])
def test_apk_names_refuse_other_content_whatever_its_name(
    server: ServerProcess, tmp_path: Path, kind: str
) -> None:
    if kind == "jar":
        data = write_jar(tmp_path, "lib.jar").read_bytes()
        words = ("not an APK", "no AndroidManifest.xml")
    else:  # an AAR-like zip: its manifest is text, not compiled binary XML
        aar = tmp_path / "lib.aar"
        with zipfile.ZipFile(aar, "w") as zf:
            zf.writestr("AndroidManifest.xml", "<manifest package='org.example'/>")
            zf.writestr("classes.jar", b"not really a jar")
        data = aar.read_bytes()
        words = ("not an APK", "not compiled binary XML")
    first = refusal(server, "apk", "library.jar", data)
    for w in words:
        assert w in first, first
    again = refusal(server, "apk", "disguised.apk", data)  # remembered, replayed
    assert again == first
    # a fresh job of the same content under another name says the same
    assert refusal(server, "focus-apk", "disguised.apk", data) == first
    for name in ("library", "disguised"):
        assert name not in first
    # the classic name signs the same bytes as a JAR
    src = named(tmp_path / ("lib.jar" if kind == "jar" else "lib.aar"), tmp_path / "c", "disguised.apk")
    AndroidSigner.verify(
        "jar", sign(server, src, "jar", tmp_path / "out.bin"), None, server.deployment.public
    )


# -- malformed zips: one permanent refusal saying what is wrong --------------------------------------


def _bogus_directory_offset(data: bytes) -> bytes:
    b = bytearray(data)
    end = b.rfind(b"PK\x05\x06")
    b[end + 16 : end + 20] = struct.pack("<I", len(data) + 100)
    return bytes(b)


def _lost_stretch(data: bytes) -> bytes:
    """The archive lost part of its member data; the central directory and end record survive."""
    end = data.rfind(b"PK\x05\x06")
    directory = struct.unpack("<I", data[end + 16 : end + 20])[0]
    return data[: directory - 3000] + data[directory:]


@pytest.mark.parametrize(
    "damage", [_bogus_directory_offset, _lost_stretch], ids=["bogus-offset", "truncated"]
)
def test_malformed_zip_is_refused_on_the_first_attempt(
    server: ServerProcess, tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    data = damage(write_jar(tmp_path, extra_size=5000).read_bytes())
    reason = refusal(server, "jar", "broken.jar", data)
    assert "not a valid zip" in reason and "Errno" not in reason, reason
    assert len(job_lines(server, "jar", sha1(data))) == 1


# -- a dev deployment serves the APK names ------------------------------------------------------------


def test_dev_deployment_serves_the_apk_names(server: ServerProcess, tmp_path: Path) -> None:
    everything = Deployment.create(tmp_path / "all", "dep")  # `sealbox init --dev`, every format
    formats = tomllib.loads(everything.config.read_text())["formats"]
    assert formats["apk"] == {"key": formats["jar"]["key"]}
    assert formats["focus-apk"] == {"key": formats["focus-jar"]["key"]}
    assert (everything.public / "apk.pem").read_bytes() == (everything.public / "jar.pem").read_bytes()
    ctx = ssl.create_default_context(cafile=str(server.deployment.ca))
    with httpx.Client(verify=ctx) as h:
        beat = h.get(f"{server.server.url}/__heartbeat__").json()
    assert set(FORMATS) <= set(beat["formats"]), beat


def test_manifest_cleaning_folds_and_joins_as_before() -> None:
    """Continuation lines joined once and lines folded by index (both were quadratic: a 4 MiB
    manifest in a 4 KB zip took 16 to 26 s of CPU): the same bytes as the JAR rules give."""
    from sealbox.formats.android import _clean_manifest, _wrap

    long_name = ("Name: res/" + "é" * 40 + "x" * 100).encode()
    folded = _wrap(long_name)
    parts = folded.split(b"\r\n ")
    assert all(len(p) <= 72 for p in parts) and b"".join(parts) == long_name + b"\r\n"
    assert all(p.decode() for p in parts)  # cut on character boundaries
    manifest = (
        b"Manifest-Version: 1.0\r\nCreated-By: a\r\n b\r\n c\r\n\r\n"
        + folded
        + b"SHA-256-Digest: abc\r\nX-Kept: y\r\n\r\nName: gone\r\nSHA1-Digest: d\r\n\r\n"
    )
    assert _clean_manifest(manifest) == (
        b"Manifest-Version: 1.0\r\nCreated-By: abc\r\n\r\n" + folded + b"X-Kept: y\r\n\r\n"
    )
