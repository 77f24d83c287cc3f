"""A big file (over ``wire.SMALL_FILE``) through our client and a real server: one pass over
it on each side. The client hashes it as it sends it (the ``sha1`` field after ``filedata``) and
the upload answers with the result; with a cache (or without a token) it is hashed first and
asked about before it is sent. The server takes the late ``sha1`` only after the token, and
checks it as it would a field sent first."""

from __future__ import annotations

import hashlib
import os
import secrets
import ssl
from pathlib import Path

import httpx

from sealbox.client import SigningClient
from tests.servers import ServerProcess, gpg_verify

SIZE = 3 * 1024 * 1024


def _signing_requests(server: ServerProcess, before: int, n: int) -> list[tuple[object, ...]]:
    """(method, path, status) of the /sign/ requests logged after line ``before``, once there
    are ``n`` (a line is written as its answer goes: waited for, not raced)."""

    def signing(lines: list[dict[str, object]]) -> list[tuple[object, ...]]:
        return [
            (e["method"], e["path"], e["status"])
            for e in lines[before:]
            if e.get("event") == "request" and str(e.get("path", "")).startswith("/sign/")
        ]

    return signing(server.wait_log(lambda lines: len(signing(lines)) >= n))


def _big(tmp: Path, name: str) -> tuple[Path, str]:
    p = tmp / name
    p.write_bytes(os.urandom(SIZE))
    return p, hashlib.sha1(p.read_bytes(), usedforsecurity=False).hexdigest()


def test_a_big_file_goes_up_once_and_comes_back_in_the_same_answer(
    gpg_server: ServerProcess, tmp_path: Path
) -> None:
    src, _ = _big(tmp_path, "big.bin")
    before = len(gpg_server.log_lines())
    with gpg_server.client() as client:
        out = client.sign(src, ["gpg"])
    assert out.ok, out.error
    res = gpg_verify(src.with_name("big.bin.asc"), src, gpg_server.deployment.public / "gpg.asc")
    assert res.returncode == 0 and b"VALIDSIG" in res.stdout
    asked = _signing_requests(gpg_server, before, 1)
    assert asked == [("POST", "/sign/gpg", 200)], asked  # no GET before, no poll after


def test_with_a_cache_a_big_file_is_asked_about_before_it_is_sent(
    gpg_server: ServerProcess, tmp_path: Path
) -> None:
    src, sha1 = _big(tmp_path, "cached.bin")
    before = len(gpg_server.log_lines())
    client = SigningClient(
        [gpg_server.server], gpg_server.deployment.ca, gpg_server.token(), cache_dir=tmp_path / "c"
    )
    with client:
        assert client.sign(src, ["gpg"]).ok
    asked = _signing_requests(gpg_server, before, 2)
    assert asked == [("GET", f"/sign/gpg/{sha1}", 404), ("POST", "/sign/gpg", 200)], asked
    assert (tmp_path / "c" / "gpg" / sha1).is_file()


def _late_form(token: str | None, data: bytes, sha1: str) -> tuple[str, bytes]:
    """A form with ``filedata`` before ``sha1`` (and the token first, when given)."""
    b = secrets.token_hex(8)

    def part(name: str, value: str) -> bytes:
        return f'--{b}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()

    head = (part("token", token) if token is not None else b"") + part("filename", "late.bin")
    file = f'--{b}\r\nContent-Disposition: form-data; name="filedata"; filename="late.bin"\r\n\r\n'.encode()
    return f"multipart/form-data; boundary={b}", head + file + data + b"\r\n" + part(
        "sha1", sha1
    ) + f"--{b}--\r\n".encode()


def _post(server: ServerProcess, content_type: str, body: bytes) -> httpx.Response:
    ctx = ssl.create_default_context(cafile=str(server.deployment.ca))
    with httpx.Client(verify=ctx, timeout=60) as c:
        return c.post(
            f"{server.server.url}/sign/gpg",
            content=body,
            headers={"Content-Type": content_type, "X-Sealbox-Wait": "30"},
        )


def test_a_late_sha1_is_checked_like_an_early_one(gpg_server: ServerProcess) -> None:
    data = os.urandom(SIZE)
    sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest()
    ok = _post(gpg_server, *_late_form(gpg_server.token(), data, sha1))
    assert ok.status_code == 200 and ok.headers["X-SHA1-Digest"]
    wrong = _post(gpg_server, *_late_form(gpg_server.token(), data[:-1] + b"\0", sha1))
    assert wrong.status_code == 400 and "Hash mismatch" in wrong.headers["X-Sealbox-Error"]
    bad = _post(gpg_server, *_late_form(gpg_server.token(), os.urandom(1000), "not-hex"))
    assert bad.status_code == 400 and "40 lowercase hex" in bad.headers["X-Sealbox-Error"]


def test_without_a_token_first_the_upload_is_refused(gpg_server: ServerProcess) -> None:
    data = os.urandom(64 * 1024)  # fits the socket buffers: the refusal comes before it is read
    r = _post(gpg_server, *_late_form(None, data, hashlib.sha1(data, usedforsecurity=False).hexdigest()))
    assert r.status_code == 400 and r.headers["X-Sealbox-Error"] == "Missing token"
    forged = _post(gpg_server, *_late_form("0!0", data, "0" * 40))
    assert forged.status_code == 400 and forged.headers["X-Sealbox-Error"].startswith("Invalid token")
