"""Malformed and refused uploads: each gets the right status, and the server keeps serving."""

from __future__ import annotations

import hashlib
import socket
import ssl
from pathlib import Path

import httpx
import pytest

from tests.servers import Deployment, ServerProcess, start_server


def _ctx(d: Deployment) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(d.ca))


def post(
    server: ServerProcess,
    fmt: str = "gpg",
    *,
    fields: dict[str, str] | None = None,
    data: bytes | None = b"x" * 100,
    filename: str = "t.bin",
) -> httpx.Response:
    body = data if data is not None else b""
    f = {
        "sha1": hashlib.sha1(body, usedforsecurity=False).hexdigest(),
        "filename": filename,
        "token": server.token(),
        "nonce": "",
    }
    f.update(fields or {})
    f = {k: v for k, v in f.items() if v is not None}
    # without filedata, still send multipart (another part), as a broken client would
    files = {"filedata": (filename, body)} if data is not None else {"other": ("x", b"")}
    with httpx.Client(verify=_ctx(server.deployment)) as c:
        return c.post(f"{server.server.url}/sign/{fmt}", data=f, files=files)


def still_serving(server: ServerProcess, tmp: Path) -> bool:
    p = tmp / f"alive-{id(tmp)}.txt"
    p.write_bytes(b"still alive and signing " * 4)
    with server.client() as c:
        return c.sign(p, ["gpg"]).ok


@pytest.mark.parametrize(
    "case, status, reason",
    [
        ("missing token", 400, "Missing token"),
        ("missing sha1", 400, "missing field sha1"),
        ("missing filename", 400, "missing field filename"),
        ("missing filedata", 400, "File too small"),
        ("hash mismatch", 400, "Hash mismatch"),
        ("too small", 400, "File too small"),
        ("bad sha1", 400, "40 lowercase hex"),
        ("rejected filename", 403, "Unacceptable filename: not allowed by this server's allowed_filenames"),
        ("path in filename", 403, "plain file name"),
        ("unknown format", 400, "unknown format"),
    ],
)
def test_bad_uploads(gpg_server: ServerProcess, tmp_path: Path, case: str, status: int, reason: str) -> None:
    kw: dict = {}  # type: ignore[type-arg]
    if case.startswith("missing ") and case != "missing filedata":
        kw["fields"] = {case.split()[1]: None}
    elif case == "missing filedata":
        kw["data"] = None
    elif case == "hash mismatch":
        kw["fields"] = {"sha1": "0" * 40}
    elif case == "too small":
        kw["data"] = b"tiny"
    elif case == "bad sha1":
        kw["fields"] = {"sha1": "ABC"}
    elif case == "rejected filename":
        kw["filename"] = "-rf"
    elif case == "path in filename":
        kw["filename"] = "../../etc/passwd"
    elif case == "unknown format":
        kw["fmt"] = "nosuch"
    r = post(gpg_server, **kw)
    assert r.status_code == status, r.text
    assert reason in r.headers.get("X-Sealbox-Error", "")
    # the kind of refusal, for clients to tell a token from an input without reading the text
    assert r.headers["X-Sealbox-Refusal"] == KINDS[case]
    assert still_serving(gpg_server, tmp_path)


KINDS = {
    "missing token": "token_missing",
    "missing sha1": "malformed",
    "missing filename": "malformed",
    "missing filedata": "malformed",
    "hash mismatch": "hash_mismatch",
    "too small": "size",
    "bad sha1": "malformed",
    "rejected filename": "filename",
    "path in filename": "filename",
    "unknown format": "format",
}


def test_too_large_is_refused_before_reading(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "small", "dep", ["gpg"])
    d.config.write_text(
        d.config.read_text().replace("[formats.gpg]\n", "[formats.gpg]\nmax_filesize = 1000\n")
    )
    sp = start_server(d)
    try:
        # Announce 50 MB but send nothing: the answer must come from the headers alone.
        ctx = _ctx(d)
        with (
            socket.create_connection(("127.0.0.1", sp.port), timeout=60) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(
                b"POST /sign/gpg HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 50000000\r\n\r\n"
            )
            answer = tls.recv(4096)
        assert answer.startswith(b"HTTP/1.1 413")
        # Without a Content-Length (chunked), the stream is cut at the limit.
        r = post(sp, data=b"y" * 5000)
        assert r.status_code == 400 and "File too large" in r.headers["X-Sealbox-Error"]
        assert list((d.root / "data" / "tmp").iterdir()) == []
        assert still_serving(sp, tmp_path)
    finally:
        sp.stop()


def test_malformed_multipart(gpg_server: ServerProcess, tmp_path: Path) -> None:
    with httpx.Client(verify=_ctx(gpg_server.deployment)) as c:
        r = c.post(
            f"{gpg_server.server.url}/sign/gpg",
            headers={"Content-Type": "multipart/form-data; boundary=zzz"},
            content=b'--zzz\r\nContent-Disposition: form-data; name="token"\r\n\r\nabc\r\n--zzz',
        )
        assert r.status_code == 400
        r = c.post(f"{gpg_server.server.url}/sign/gpg", content=b"not multipart at all")
        assert r.status_code == 400
        r = c.get(f"{gpg_server.server.url}/sign/gpg/NOTAHASH")
        assert r.status_code == 400
        r = c.put(f"{gpg_server.server.url}/sign/gpg")
        assert r.status_code == 405
        r = c.get(f"{gpg_server.server.url}/token")
        assert r.status_code == 400
    assert still_serving(gpg_server, tmp_path)


def test_address_not_allowed(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "acl", "dep", ["gpg"])
    d.config.write_text(d.config.read_text().replace('"127.0.0.0/8",', '"127.0.0.1/32",'))
    sp = start_server(d)
    try:
        ctx = _ctx(d)
        with httpx.Client(
            transport=httpx.HTTPTransport(verify=ctx, local_address="127.0.0.2"), verify=ctx
        ) as c:
            assert c.get(f"{sp.server.url}/sign/gpg/{'a' * 40}").status_code == 403
        with httpx.Client(verify=ctx) as c:
            assert c.get(f"{sp.server.url}/sign/gpg/{'a' * 40}").status_code == 404
    finally:
        sp.stop()
