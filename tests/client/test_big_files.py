"""A big file (over ``wire.SMALL_FILE``) through our client and a real server: one pass over
it on the server, none on the client beyond TLS. To a server that names uploads (every sealbox
upload answer carries ``X-Sealbox-Input-SHA1``) the client sends it unhashed; to one that does
not (a classic server, an older release) it hashes it as it sends it (the ``sha1`` field after
``filedata``); the upload answers with the result. With a cache (or without a token) it is
hashed first and asked about before it is sent. The server takes the late ``sha1`` only after
the token, and checks it as it would a field sent first."""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web

from sealbox.client import InputChanged, SigningClient, _aio
from sealbox.client._hosts import Server
from tests.servers import ServerProcess, ThreadedApp, gpg_verify

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
    changed = data[:-1] + bytes([data[-1] ^ 1])  # a different last byte, always (a 0 one was left as it was)
    wrong = _post(gpg_server, *_late_form(gpg_server.token(), changed, sha1))
    assert wrong.status_code == 400 and "Hash mismatch" in wrong.headers["X-Sealbox-Error"]
    bad = _post(gpg_server, *_late_form(gpg_server.token(), os.urandom(1000), "not-hex"))
    assert bad.status_code == 400 and "40 lowercase hex" in bad.headers["X-Sealbox-Error"]


def test_without_a_token_first_the_upload_is_refused(gpg_server: ServerProcess) -> None:
    data = os.urandom(64 * 1024)  # fits the socket buffers: the refusal comes before it is read
    r = _post(gpg_server, *_late_form(None, data, hashlib.sha1(data, usedforsecurity=False).hexdigest()))
    assert r.status_code == 400 and r.headers["X-Sealbox-Error"] == "Missing token"
    forged = _post(gpg_server, *_late_form("0!0", data, "0" * 40))
    assert forged.status_code == 400 and forged.headers["X-Sealbox-Error"].startswith("Invalid token")


def _form(fields: dict[str, str], data: bytes) -> tuple[str, bytes]:
    """A form with ``fields`` first, then ``filedata``."""
    b = secrets.token_hex(8)
    head = "".join(
        f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items()
    )
    head += f'--{b}\r\nContent-Disposition: form-data; name="filedata"; filename="named.bin"\r\n\r\n'
    return f"multipart/form-data; boundary={b}", head.encode() + data + f"\r\n--{b}--\r\n".encode()


def _post_with(server: ServerProcess, form: tuple[str, bytes], **headers: str) -> httpx.Response:
    ctx = ssl.create_default_context(cafile=str(server.deployment.ca))
    with httpx.Client(verify=ctx, timeout=60) as c:
        return c.post(
            f"{server.server.url}/sign/gpg",
            content=form[1],
            headers={"Content-Type": form[0], "X-Sealbox-Wait": "30", **headers},
        )


def test_the_server_names_an_upload_that_asks_it_to(gpg_server: ServerProcess) -> None:
    data = os.urandom(SIZE)
    sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest()
    fields = {"token": gpg_server.token(), "filename": "named.bin"}
    named = _post_with(gpg_server, _form(fields, data), **{"X-Sealbox-Hash-Upload": "1"})
    assert named.status_code == 200 and named.headers["X-Sealbox-Input-SHA1"] == sha1
    # the same job as an upload that named itself: asking for it by that name finds it
    ctx = ssl.create_default_context(cafile=str(gpg_server.deployment.ca))
    again = httpx.get(f"{gpg_server.server.url}/sign/gpg/{sha1}", verify=ctx)
    assert again.status_code == 200 and again.content == named.content
    # not asked: the field is required, as in the classic protocol
    other = os.urandom(SIZE)
    unasked = _post_with(gpg_server, _form(fields, other))
    assert unasked.status_code == 400 and unasked.headers["X-Sealbox-Error"] == "missing field sha1"
    # a sha1 field, when sent, is checked even with the header
    wrong = _post_with(
        gpg_server, _form({**fields, "sha1": "0" * 40}, other), **{"X-Sealbox-Hash-Upload": "1"}
    )
    assert wrong.status_code == 400 and "Hash mismatch" in wrong.headers["X-Sealbox-Error"]
    # every answer to an upload read whole names what arrived, whoever hashed it
    assert wrong.headers["X-Sealbox-Input-SHA1"] == hashlib.sha1(other, usedforsecurity=False).hexdigest()
    # a refusal before filedata is read names nothing
    early = _post_with(gpg_server, _form({"filename": "named.bin"}, other))
    assert early.status_code == 400 and "X-Sealbox-Input-SHA1" not in early.headers


class _Hashed:
    """Counts the bytes the client hashes with SHA-1."""

    def __init__(self) -> None:
        self.bytes = 0

    def sha1(self, data: bytes = b"", usedforsecurity: bool = False) -> Any:
        counter, real = self, hashlib.sha1(data, usedforsecurity=False)
        counter.bytes += len(data)

        class Counted:
            def update(self, chunk: bytes) -> None:
                counter.bytes += len(chunk)
                real.update(chunk)

            def hexdigest(self) -> str:
                return real.hexdigest()

        return Counted()


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> _Hashed:
    counter = _Hashed()
    fake = type("hashlib", (), {"sha1": staticmethod(counter.sha1)})
    monkeypatch.setattr(_aio, "hashlib", fake)
    return counter


def _small(tmp: Path) -> Path:
    p = tmp / "small.bin"
    p.write_bytes(os.urandom(4096))
    return p


def test_a_big_file_goes_up_unhashed_to_a_server_that_names_uploads(
    gpg_server: ServerProcess, tmp_path: Path, hashed: _Hashed
) -> None:
    src, _ = _big(tmp_path, "big.bin")
    with gpg_server.client() as client:
        assert client.sign(_small(tmp_path), ["gpg"]).ok  # its answer names the upload
        before = hashed.bytes
        out = client.sign(src, ["gpg"])
    assert out.ok, out.error
    assert hashed.bytes - before < 4096, "the client hashed the big file"  # only the small .asc
    res = gpg_verify(src.with_name("big.bin.asc"), src, gpg_server.deployment.public / "gpg.asc")
    assert res.returncode == 0 and b"VALIDSIG" in res.stdout


def test_checking_the_log_proof_the_client_hashes_the_input_itself(
    gpg_server: ServerProcess, tmp_path: Path, hashed: _Hashed
) -> None:
    src, _ = _big(tmp_path, "proved.bin")
    with gpg_server.client(log_proof=True) as client:
        assert client.sign(_small(tmp_path), ["gpg"]).ok
        before = hashed.bytes
        out = client.sign(src, ["gpg"])
    assert out.ok, out.error
    assert hashed.bytes - before >= SIZE  # the proof is checked against its own hash


class _OlderRelease:
    """A TLS proxy in front of a real server that, once ``older`` is set, behaves as a server
    of an earlier release: it drops ``X-Sealbox-Hash-Upload`` from requests and
    ``X-Sealbox-Input-SHA1`` and ``X-Sealbox-Refusal`` from answers (as if replicas of two
    releases shared an address)."""

    def __init__(self, target: ServerProcess) -> None:
        self.target = target
        self.older = False
        self.upstream = ssl.create_default_context(cafile=str(target.deployment.ca))

    async def forward(self, request: web.Request) -> web.Response:
        skip = ("host", "content-length")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        if self.older:
            headers.pop("X-Sealbox-Hash-Upload", None)
        sent = io.BytesIO(await request.read())  # raw bytes over 1 MiB make aiohttp warn
        async with aiohttp.ClientSession() as s, s.request(
            request.method, f"{self.target.server.url}{request.path_qs}", data=sent,
            headers=headers, ssl=self.upstream,
        ) as r:  # fmt: skip
            body = await r.read()
            out = {k: v for k, v in r.headers.items() if k.lower().startswith("x-")}
        if self.older:
            out.pop("X-Sealbox-Input-SHA1", None)
            out.pop("X-Sealbox-Refusal", None)
        return web.Response(status=r.status, body=body, headers=out)


@pytest.fixture
def older(gpg_server: ServerProcess) -> Iterator[tuple[_OlderRelease, Server]]:
    """The proxy, and the address it listens on (with the server's own certificate)."""
    proxy = _OlderRelease(gpg_server)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", proxy.forward)
    tls = gpg_server.deployment.root / "tls"
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls / "server.pem", tls / "server.key")
    with ThreadedApp(app, ctx) as running:
        yield proxy, Server("127.0.0.1", running.port)


def test_a_server_that_stops_naming_uploads_gets_the_sha1_field_again(
    gpg_server: ServerProcess, older: tuple[_OlderRelease, Server], tmp_path: Path, hashed: _Hashed
) -> None:
    src, _ = _big(tmp_path, "older.bin")
    proxy, address = older
    client = SigningClient([address], gpg_server.deployment.ca, gpg_server.token())
    with client:
        # (the log line of a request is written once its answer is sent: counted from here)
        before_log = len(gpg_server.log_lines())
        assert client.sign(_small(tmp_path), ["gpg"]).ok  # learnt: this address names uploads
        proxy.older = True
        before = hashed.bytes
        out = client.sign(src, ["gpg"])
        assert out.ok, out.error
        assert hashed.bytes - before >= SIZE  # the second upload was hashed as it went
        asked = _signing_requests(gpg_server, before_log, 3)[1:]  # after the small file's
        assert asked == [("POST", "/sign/gpg", 400), ("POST", "/sign/gpg", 200)], asked
        # from then on it is sent hashed, at once
        again, _ = _big(tmp_path, "older2.bin")
        before_log = len(gpg_server.log_lines())
        assert client.sign(again, ["gpg"]).ok
        assert _signing_requests(gpg_server, before_log, 1) == [("POST", "/sign/gpg", 200)]
    res = gpg_verify(src.with_name("older.bin.asc"), src, gpg_server.deployment.public / "gpg.asc")
    assert res.returncode == 0 and b"VALIDSIG" in res.stdout


def test_a_refusal_of_an_unhashed_upload_is_not_sent_again(
    gpg_server: ServerProcess, tmp_path: Path, hashed: _Hashed
) -> None:
    src, _ = _big(tmp_path, "-refused.bin")  # a name allowed_filenames refuses
    before_log = len(gpg_server.log_lines())
    with gpg_server.client() as client:
        assert client.sign(_small(tmp_path), ["gpg"]).ok
        out = client.sign(src, ["gpg"])
    assert not out.ok and "Unacceptable filename" in str(out.error)
    asked = _signing_requests(gpg_server, before_log, 2)
    assert asked == [("POST", "/sign/gpg", 200), ("POST", "/sign/gpg", 403)], asked
    assert hashed.bytes < SIZE  # it went once, unhashed


@pytest.mark.parametrize("change", ["grows", "shrinks"])
def test_a_file_that_changes_as_it_is_sent_is_not_signed(
    gpg_server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """A build still writing the file: the client looked at it (its size), then it changed.
    What was sent is not the file, so nothing is signed, at once (InputChanged); it was sent
    cut short (grown) and signed, or retried until the timeout (shrunk)."""
    src, _ = _big(tmp_path, "growing.bin")
    read = _aio._File.read

    async def then_changed(*args: Any) -> _aio._File:
        job = await read(*args)
        if change == "grows":
            with src.open("ab") as f:  # the build writes on, after the client looked
                f.write(b"more bytes " * 1000)
        else:
            os.truncate(src, SIZE // 2)
        return job

    monkeypatch.setattr(_aio._File, "read", then_changed)
    with gpg_server.client() as c:
        outcome = c.sign(src, ["gpg"])
    assert isinstance(outcome.exception, InputChanged), outcome.error
    how = "grew" if change == "grows" else "shrank"
    assert outcome.error == f"{src} {how} while it was being sent: sign it once it is written"
    assert not src.with_name(src.name + ".asc").exists()


def test_a_redirect_is_not_followed(gpg_server: ServerProcess, tmp_path: Path) -> None:
    """A signing server never redirects: an answer that does (a hijacked or misconfigured
    address) does not take the token and the file to another host; the client fails over to
    the real server."""
    reached: list[str] = []

    async def elsewhere(request: web.Request) -> web.Response:
        reached.append(f"{request.method} {request.path}")
        return web.Response(status=500)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"https://127.0.0.1:{other.port}{request.path}")

    tls = gpg_server.deployment.root / "tls"
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls / "server.pem", tls / "server.key")
    target, redirector = web.Application(), web.Application()
    target.router.add_route("*", "/{tail:.*}", elsewhere)
    redirector.router.add_route("*", "/{tail:.*}", redirect)
    with ThreadedApp(target, ctx) as other, ThreadedApp(redirector, ctx) as hop:
        servers = [Server("127.0.0.1", hop.port), gpg_server.server]
        with SigningClient(servers, gpg_server.deployment.ca, gpg_server.token(), shuffle=False) as client:
            for name in ("small.txt", "big.bin"):
                src = _small(tmp_path) if name == "small.txt" else _big(tmp_path, name)[0]
                out = client.sign(src, ["gpg"])
                assert out.ok and out.server == gpg_server.server.url, out
    assert reached == []
