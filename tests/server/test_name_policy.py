"""A result is a function of (format, content): name rules are checked at upload and never
remembered, and Authenticode decides MSI or PE by the bytes.

Real ``sealbox serve`` over HTTPS with an Authenticode (and gpg) dev deployment, real
osslsigncode signing and ``osslsigncode verify``.
"""

from __future__ import annotations

import hashlib
import shutil
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sealbox.formats.authenticode import (
    ALLOWED_EXTENSIONS,
    AuthenticodeSigner,
    is_msi_bytes,
    is_pe_bytes,
    is_signed,
)
from sealbox.samples.msi import write_msi
from sealbox.samples.pe import launcher_path
from tests.servers import Deployment, ServerProcess, start_server

pytestmark = pytest.mark.skipif(shutil.which("osslsigncode") is None, reason="osslsigncode is not installed")

FMT = "sha2signcode"
POLL_CAP = 120.0  # seconds; a bounded wait, not a timing assumption


class Box:
    """One running server and a token for it."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.token = server.token()
        self.http = httpx.Client(
            base_url=server.server.url,
            verify=ssl.create_default_context(cafile=str(server.deployment.ca)),
            timeout=POLL_CAP,
        )

    def upload(self, data: bytes, filename: str, fmt: str = FMT) -> httpx.Response:
        """Upload as ``filename``; the answer once the job is done (or the upload's refusal)."""
        sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest()
        fields = {"sha1": sha1, "filename": filename, "token": self.token, "nonce": ""}
        r = self.http.post(
            f"/sign/{fmt}",
            data=fields,
            files={"filedata": (filename, data)},
            headers={"X-Sealbox-Wait": "30"},
        )
        return self.get(fmt, sha1) if r.status_code == 202 else r

    def get(self, fmt: str, sha1: str) -> httpx.Response:
        """GET the result, polling while the job is pending (up to ``POLL_CAP`` seconds)."""
        deadline = time.monotonic() + POLL_CAP
        while True:
            r = self.http.get(f"/sign/{fmt}/{sha1}")
            if r.headers.get("X-Pending") != "True" or time.monotonic() > deadline:
                return r


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    dep = Deployment.create(tmp_path_factory.mktemp("namepolicy") / "dep", "dep", [FMT, "gpg"])
    server = start_server(dep)
    b = Box(server)
    try:
        yield b
    finally:
        b.http.close()
        server.stop()


def pe_bytes(tag: str) -> bytes:
    """A real unsigned PE (pip's launcher) with an overlay making its sha1 unique to ``tag``."""
    return launcher_path().read_bytes() + tag.encode().ljust(64, b".")


def msi_data(tmp_path: Path, tag: str) -> bytes:
    return write_msi(tmp_path, "sample.msi", f"payload {tag}\n".encode()).read_bytes()


def verified(box: Box, r: httpx.Response, tmp_path: Path, name: str) -> Path:
    """The signed result of ``r``, checked by ``osslsigncode verify``."""
    assert r.status_code == 200, (r.status_code, r.text)
    out = tmp_path / name
    out.write_bytes(r.content)
    assert r.headers["X-SHA1-Digest"] == hashlib.sha1(r.content, usedforsecurity=False).hexdigest()
    assert is_signed(out)
    AuthenticodeSigner.verify(FMT, out, None, box.server.deployment.public)
    return out


def reason(r: httpx.Response) -> str:
    return str(r.headers.get("X-Sealbox-Error", ""))


# -- name rules: answered at upload, never remembered ------------------------------------------
@pytest.mark.parametrize(
    "bad, good, why",
    [
        ("setup.bin", "setup.exe", "does not end in " + ", ".join(ALLOWED_EXTENSIONS)),
        ("msvcp140.dll", "app.dll", "is on the blocklist of Microsoft-signed files (msvc*.dll)"),
    ],
)
def test_name_refusal_is_not_remembered(box: Box, tmp_path: Path, bad: str, good: str, why: str) -> None:
    data = pe_bytes(f"name-{bad}")
    r = box.upload(data, bad)
    assert r.status_code == 400, (r.status_code, r.text)
    assert reason(r) == f"{FMT}: the file name {why}"
    assert bad not in reason(r)  # raw client text stays out of the header
    out = verified(box, box.upload(data, good), tmp_path, good)
    assert is_pe_bytes(out.read_bytes()[:4096])
    # The name rule still holds once the server has a result for these bytes...
    again = box.upload(data, bad)
    assert again.status_code == 400 and reason(again) == reason(r)
    # ...and the result itself is answered to a GET, which carries no name.
    got = box.get(FMT, hashlib.sha1(data, usedforsecurity=False).hexdigest())
    assert got.status_code == 200 and got.content == out.read_bytes()


# -- content refusals: remembered, and named by the content only --------------------------------
def test_content_refusal_is_remembered_without_names(box: Box) -> None:
    whole = launcher_path().read_bytes()
    data = whole[: len(whole) * 2 // 3]  # a truncated download
    first = box.upload(data, "a.exe")
    assert first.status_code == 404, (first.status_code, first.text)  # the job refused it
    why = reason(first)
    assert why.startswith(f"signing failed: {FMT}: truncated PE"), why
    second = box.upload(data, "b.exe")
    assert second.status_code == 400, (second.status_code, second.text)  # remembered: not read again
    assert reason(second) == why
    assert "a.exe" not in why and "b.exe" not in why


# -- MSI or PE: decided by the bytes; the same (format, sha1) always gives the same bytes --------
@pytest.mark.parametrize(
    "kind, names",
    [
        ("msi", ["setup.exe", "setup.msi", "Other.DLL"]),
        ("pe", ["x.msi", "x.exe", "driver.sys"]),
    ],
)
def test_type_is_decided_by_content(box: Box, tmp_path: Path, kind: str, names: list[str]) -> None:
    data = msi_data(tmp_path, "by-content") if kind == "msi" else pe_bytes("by-content")
    out = verified(box, box.upload(data, names[0]), tmp_path, "first")
    head = out.read_bytes()[:4096]
    assert is_msi_bytes(head) if kind == "msi" else is_pe_bytes(head)
    for name in names[1:]:
        r = box.upload(data, name)
        assert r.status_code == 200, (name, r.status_code, r.text)
        assert r.headers["X-SHA1-Digest"] == hashlib.sha1(out.read_bytes(), usedforsecurity=False).hexdigest()
        assert r.content == out.read_bytes()


def test_no_kind_says_what_it_is_not(box: Box) -> None:
    data = b"This is not a program.\x00\x01\n" * 100  # binary, and no kind's header
    r = box.upload(data, "notes.exe")
    assert r.status_code == 404, (r.status_code, r.text)
    assert reason(r).startswith(f"signing failed: {FMT}: not a PE, MSI, CAB"), reason(r)
    assert "notes.exe" not in reason(r)


def test_text_is_signed_as_a_script_whatever_its_name(box: Box) -> None:
    """A kind is told by the bytes: UTF-8 text is a PowerShell script, under any allowed name."""
    data = b"Write-Output 'not a program'\r\n" * 10
    r = box.upload(data, "notes.exe")
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.content.startswith(data) and b"# SIG # Begin signature block" in r.content


# -- content the server already holds under another name: signed by a GET, no name rules -------
def test_held_content_signs_like_an_upload(box: Box, tmp_path: Path) -> None:
    data = pe_bytes("held-for-gpg")
    sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest()
    held = box.upload(data, "setup.bin", fmt="gpg")  # a name Authenticode would refuse
    assert held.status_code == 200, (held.status_code, held.text)
    out = verified(box, box.get(FMT, sha1), tmp_path, "by-get")  # no upload, no name
    assert is_pe_bytes(out.read_bytes()[:4096])
    r = box.upload(data, "setup.exe")  # an upload of the same bytes gets the same output
    assert r.status_code == 200 and r.content == out.read_bytes()
    refused = box.upload(data, "setup.bin")  # the name rule applies to uploads still
    assert refused.status_code == 400 and reason(
        refused
    ) == f"{FMT}: the file name does not end in " + ", ".join(ALLOWED_EXTENSIONS)
