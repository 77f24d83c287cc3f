"""Every format through a real server: signed, checked by its independent verifier, bad input refused."""

from __future__ import annotations

import hashlib
import os
import re
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from sealbox.client import detached_suffix
from sealbox.errors import VerificationFailed
from sealbox.formats import all_formats, signer_class
from sealbox.samples import pe
from sealbox.samples.mar import write_mar
from tests.servers import BIN, Deployment, ServerProcess, env_without_proxy, start_server

Maker = Callable[[Path], Path]


def _payload(d: Path) -> Path:
    p = d / "notes.txt"
    p.write_bytes(b"release notes\n" * 64)
    return p


def _android(kind: str) -> Maker:
    def make(d: Path) -> Path:
        from sealbox.samples import android

        if kind == "legacy-apk":  # target SDK < 30: valid signed v1 only, as the classic names do
            return android.write_apk(d, target_sdk=29)
        return android.write_apk(d) if kind == "apk" else android.write_jar(d)

    return make


def _app(d: Path) -> Path:
    from sealbox.samples.macos import write_app_tarball

    return write_app_tarball(d)


GOOD: dict[str, list[Maker]] = {
    "gpg": [_payload],
    "sha2signcode": [pe.write_pe, pe.write_dll],
    "sha2signcodestub": [pe.write_pe],
    "sha2signcode-v2": [pe.write_pe],
    "sha2signcodestub-v2": [pe.write_pe],
    "signcode": [pe.write_pe],
    "osslsigncode": [pe.write_pe],
    "mar": [lambda d: write_mar(d, size=64 * 1024)],
    "mar_sha384": [lambda d: write_mar(d, size=64 * 1024)],
    "jar": [_android("legacy-apk"), _android("jar")],
    "focus-jar": [_android("legacy-apk")],
    "apk": [_android("apk")],
    "focus-apk": [_android("apk")],
    "emevoucher": [_payload],
    "widevine": [pe.write_pe],
    "widevine_blessed": [pe.write_pe],
    "dmg": [_app],
}
# A name each format accepts, for inputs whose *content* is wrong.
NAMES = {
    "mar": "x.mar",
    "mar_sha384": "x.mar",
    "jar": "x.apk",
    "focus-jar": "x.jar",
    "apk": "x.apk",
    "focus-apk": "x.jar",
    "dmg": "x.tar.gz",
    "widevine": "x.exe",
    "widevine_blessed": "x.exe",
}
CONTENT_CHECKED = [f for f in GOOD if f not in ("gpg", "emevoucher")]


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = Deployment.create(tmp_path_factory.mktemp("full") / "dep", "dep")
    sp = start_server(d)
    yield sp
    sp.stop()


def _served(sp: ServerProcess) -> list[str]:
    return [f for f in all_formats() if f in sp.deployment.config.read_text()]


def _verify(sp: ServerProcess, fmt: str, src: Path, out: Path, public: Path | None = None) -> None:
    public = public or sp.deployment.public
    suffix = detached_suffix(fmt)
    if suffix:
        signer_class(fmt).verify(fmt, out.with_name(out.name + suffix), out, public)
    else:
        signer_class(fmt).verify(fmt, out, None, public)


@pytest.mark.parametrize("fmt", list(GOOD))
def test_every_format_signs_and_verifies(full: ServerProcess, tmp_path: Path, fmt: str) -> None:
    if fmt not in _served(full):
        pytest.fail(f"format {fmt} is not configured by `sealbox init --dev`")
    with full.client(timeout=120) as c:
        for make in GOOD[fmt]:
            src = make(tmp_path)
            out = tmp_path / "out" / src.name
            res = c.sign(src, [fmt], out)
            assert res.ok, res.error
            _verify(full, fmt, src, out)
            if not detached_suffix(fmt):
                assert out.read_bytes() != src.read_bytes()
    # a folder without the public halves: the verifier names the file it needs, whatever the tool
    # would have said about it
    empty = tmp_path / "not-public"
    empty.mkdir()
    with pytest.raises(VerificationFailed, match=rf"{re.escape(str(empty))}/\S+ is missing"):
        _verify(full, fmt, src, out, empty)


def _no_temp_left(sp: ServerProcess) -> bool:
    deadline = time.monotonic() + 60  # a generous cap: the refused job's cleanup is all that is awaited
    tmp = sp.deployment.root / "data" / "tmp"
    while time.monotonic() < deadline:
        if not any(tmp.iterdir()):
            return True
        time.sleep(0.1)
    return False


def _refused_at_once(sp: ServerProcess, fmt: str, data: bytes) -> bool:
    """The server's job for this input ended "rejected": refused for its content at the first
    attempt (no retry, no timeout), which is what makes the refusal fast on any machine."""
    sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest()

    def outcomes(lines: list[dict[str, object]]) -> list[object]:
        return [
            e["outcome"] for e in lines if e.get("event") == "job" and (e["format"], e["sha1"]) == (fmt, sha1)
        ]

    return set(outcomes(sp.wait_log(outcomes))) == {"rejected"}


def _ctx(sp: ServerProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(sp.deployment.ca))


@pytest.mark.parametrize("fmt", CONTENT_CHECKED)
@pytest.mark.parametrize("kind", ["random", "truncated", "wrong-type"])
def test_bad_input_fails_fast_and_server_goes_on(
    full: ServerProcess, tmp_path: Path, fmt: str, kind: str
) -> None:
    name = NAMES.get(fmt, "x.exe")
    bad = tmp_path / name
    if kind == "random":
        bad.write_bytes(os.urandom(8192))
    elif kind == "truncated":
        (tmp_path / "good").mkdir()
        good = GOOD[fmt][0](tmp_path / "good")
        data = good.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_bytes(
            write_mar(tmp_path, "other.mar", size=4096).read_bytes()
            if "mar" not in fmt
            else pe.write_pe(tmp_path).read_bytes()
        )
    with full.client(timeout=120) as c:
        res = c.sign(bad, [fmt], tmp_path / "out" / name)
    assert not res.ok
    assert "signing failed" in (res.error or "") and _refused_at_once(full, fmt, bad.read_bytes()), res.error
    assert not (tmp_path / "out" / name).exists()
    digest = hashlib.sha1(bad.read_bytes(), usedforsecurity=False).hexdigest()
    with httpx.Client(verify=_ctx(full)) as h:
        r = h.get(f"{full.server.url}/sign/{fmt}/{digest}")
        # Remembered: a plain 404 with the reason, no X-Pending, so clients don't poll.
        assert r.status_code == 404 and "X-Pending" not in r.headers and r.headers["X-Sealbox-Error"]
        up = h.post(
            f"{full.server.url}/sign/{fmt}",
            data={"sha1": digest, "filename": name, "token": full.token(), "nonce": ""},
            files={"filedata": (name, bad.read_bytes())},
        )
        assert 400 <= up.status_code < 500 and "signing failed" in up.headers["X-Sealbox-Error"]
    assert _no_temp_left(full)
    (tmp_path / "again").mkdir()
    good = GOOD[fmt][0](tmp_path / "again")
    with full.client() as c:
        assert c.sign(good, [fmt], tmp_path / "again-out" / good.name).ok


@pytest.mark.parametrize("fmt", ["mar", "sha2signcode", "widevine"])
def test_real_signtool_with_more_formats(full: ServerProcess, tmp_path: Path, fmt: str) -> None:
    src = GOOD[fmt][0](tmp_path)
    token = tmp_path / "token"
    token.write_text(full.token())
    out = tmp_path / "out" / src.name
    target = out.with_name(out.name + detached_suffix(fmt))
    res = subprocess.run(
        [
            str(BIN / "signtool"),
            "-H",
            full.hostspec,
            "-c",
            str(full.deployment.ca),
            "-t",
            str(token),
            "-n",
            str(tmp_path / "nonce"),
            "-f",
            fmt,
            "-o",
            str(target),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env_without_proxy(),
        check=False,
    )
    assert res.returncode == 0, res.stderr
    if detached_suffix(fmt):
        out.write_bytes(src.read_bytes())
    _verify(full, fmt, src, out)


def test_chaining_formats_on_one_file(full: ServerProcess, tmp_path: Path) -> None:
    src = pe.write_pe(tmp_path)
    out = tmp_path / "out" / src.name
    with full.client() as c:
        res = c.sign(src, ["gpg", "sha2signcode", "widevine"], out)
    assert res.ok, res.error
    assert res.formats == ["sha2signcode", "widevine", "gpg"]
    _verify(full, "sha2signcode", src, out)
    _verify(full, "widevine", src, out)
    _verify(full, "gpg", src, out)


def _evil_zip(path: Path, kind: str) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\r\n\r\n")
        if kind == "traversal":
            z.writestr("../../evil.class", b"x" * 100)
        else:
            z.writestr("bomb.bin", b"\0" * (300 * 1024 * 1024))  # 300 MiB of zeros, ~300 KiB compressed
    return path


def _evil_tar(path: Path, kind: str) -> Path:
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as t:
        if kind == "traversal":
            info = tarfile.TarInfo("../../etc/evil")
            data = b"x" * 100
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        else:
            info = tarfile.TarInfo("Evil.app/Contents/MacOS/link")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            t.addfile(info)
    return path


@pytest.mark.parametrize(
    "fmt, kind", [("jar", "traversal"), ("jar", "bomb"), ("dmg", "traversal"), ("dmg", "symlink")]
)
def test_malicious_archives_are_refused_by_the_server(
    full: ServerProcess, tmp_path: Path, fmt: str, kind: str
) -> None:
    evil = (
        _evil_zip(tmp_path / "evil.jar", kind) if fmt == "jar" else _evil_tar(tmp_path / "evil.tar.gz", kind)
    )
    with full.client(timeout=120) as c:
        res = c.sign(evil, [fmt], tmp_path / "out" / evil.name)
    assert not res.ok and "signing failed" in (res.error or "")
    assert _refused_at_once(full, fmt, evil.read_bytes())
    assert not (tmp_path / "out" / evil.name).exists()
    assert _no_temp_left(full)


@pytest.mark.parametrize("fmt", ["gpg", "sha2signcode", "mar", "widevine_blessed"])
def test_sealbox_verify_command(full: ServerProcess, tmp_path: Path, fmt: str) -> None:
    src = GOOD[fmt][0](tmp_path)
    with full.client() as c:
        assert c.sign(src, [fmt]).ok
    cmd = [str(BIN / "sealbox"), "verify", "--format", fmt, "--public", str(full.deployment.public), str(src)]
    ok = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "verified" in ok.stdout, ok.stderr
    other = Deployment.create(tmp_path / "other", "nightly", [fmt])
    cmd[cmd.index("--public") + 1] = str(other.public)
    bad = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and "NOT verified" in bad.stderr


@pytest.mark.parametrize("fmt", ["sha2signcode", "mar", "dmg", "jar", "sigstore"])
def test_sealbox_verify_reads_regular_files_only(full: ServerProcess, tmp_path: Path, fmt: str) -> None:
    """A FIFO (nothing ever writes it) or a device: refused at once, never read (a FIFO hung
    the verifiers that open the file themselves; /dev/zero took the memory)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for given in (fifo, Path("/dev/zero")):
        cmd = [
            str(BIN / "sealbox"),
            "verify",
            "--format",
            fmt,
            "--public",
            str(full.deployment.public),
            str(given),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 2 and f"not a regular file: {given}" in res.stderr, res.stderr
